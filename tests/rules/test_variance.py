"""Ren et al.'s Table 1, in its conditional form for a fixed batch (docs/estimators.md).

One linear layer z_n = x_n W (W p×q) under softmax cross-entropy, so the per-example gradients are
known in closed form: g_n = x_n ⊗ (softmax(z_n) − onehot(y_n)), ḡ = mean_n g_n.  For unit Gaussian
perturbations, E‖ĝ − ḡ‖² is

    shared perturbation:       (d + 1) ‖ḡ‖²
    independent perturbation:  (1/N²) Σ_n (d + 1) ‖g_n‖²

with d = pq for weight perturbation and d = q for activity perturbation (identity behind it:
E‖(g·v)v‖² = (d + 2)‖g‖²).  The four estimators are built from genuine forward-mode JVPs
(``dualnet.jvp``); the two that the library's rules implement (FG-W = weight/shared, FG-A =
activity/independent) are also checked through the rules on a one-hidden-layer MLP.

Tolerance: the sample mean of ‖ĝ − ḡ‖² must be within 5 % of the formula, and every test also
asserts that 5 % is at least 4 standard errors of that mean (standard error = sample standard
deviation / √samples).  The coefficient of variation of one squared error measured here is at
most ≈ 2.5 (activity/shared), so 4 · 2.5 / √SAMPLES ≤ 0.05 needs SAMPLES ≥ 40,000; we use 100,000.
"""
import numpy as np
import pytest

import dualnet as dn
from dualnet import rules
from dualnet.rules import exact_gradients

P_IN, Q_OUT, N = 4, 3, 6
SAMPLES = 100_000
RELATIVE_TOLERANCE = 0.05


@pytest.fixture
def layer():
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((N, P_IN)), rng.standard_normal((P_IN, Q_OUT))
    labels = rng.integers(0, Q_OUT, N)
    z = x @ weight
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    delta = softmax - np.eye(Q_OUT)[labels]  # ∂ℓ_n/∂z_n in closed form
    per_example = np.einsum("np,nq->npq", x, delta)
    return dict(x=x, weight=weight, labels=labels, per_example=per_example, mean=per_example.mean(axis=0))


def per_example_losses(z, labels):
    return -dn.getitem(dn.log_softmax(z, axis=-1), (np.arange(len(labels)), labels))


# --- the four estimators: [SAMPLES, p, q], each row one draw of the perturbation ---------------
def weight_shared(layer, rng):
    """v ~ N(0, I_pq) for the whole batch; ĝ = (∇L·v) v with ∇L·v the JVP of the batch-mean loss."""
    x, labels = layer["x"], layer["labels"]
    v = rng.standard_normal((SAMPLES, P_IN, Q_OUT))
    _, slopes = dn.jvp(lambda w: dn.mean(per_example_losses(dn.matmul(x, w), labels)), (layer["weight"],), (v,))
    return slopes[:, None, None] * v


def weight_independent(layer, rng):
    """v_n ~ N(0, I_pq) per example: every example multiplies its own copy of W (tangent [K, N, p, q]);
    ĝ = (1/N) Σ_n (∇ℓ_n·v_n) v_n."""
    x, labels = layer["x"], layer["labels"]
    copies = np.broadcast_to(layer["weight"], (N, P_IN, Q_OUT)).copy()
    v = rng.standard_normal((SAMPLES, N, P_IN, Q_OUT))

    def losses(w):
        z = dn.reshape(dn.matmul(dn.reshape(x, (N, 1, P_IN)), w), (N, Q_OUT))
        return per_example_losses(z, labels)
    _, slopes = dn.jvp(losses, (copies,), (v,))  # [K, N]
    return np.einsum("kn,knpq->kpq", slopes, v) / N


def activity(layer, rng, shared):
    """u ~ N(0, I_q) added to z (one u for the batch if ``shared``, else one per example), as the
    tangent of a zero offset e in z = xW + e; ĝ = (1/N) Σ_n x_n ⊗ (∇ℓ_n·u_n) u_n."""
    x, labels = layer["x"], layer["labels"]
    offset = np.zeros((1 if shared else N, Q_OUT))
    u = rng.standard_normal((SAMPLES,) + offset.shape)
    _, slopes = dn.jvp(lambda e: per_example_losses(x @ layer["weight"] + e, labels), (offset,), (u,))  # [K, N]
    return np.einsum("np,kn,knq->kpq", x, slopes, np.broadcast_to(u, (SAMPLES, N, Q_OUT))) / N


def activity_shared(layer, rng):
    return activity(layer, rng, shared=True)


def activity_independent(layer, rng):
    return activity(layer, rng, shared=False)


def squared_norm(g):
    return float(np.sum(g ** 2))


def assert_mean_within_tolerance(squared_errors, theory):
    """mean within 5 % of ``theory``, and 5 % ≥ 4 standard errors of the mean."""
    mean = squared_errors.mean()
    standard_error = squared_errors.std(ddof=1) / np.sqrt(len(squared_errors))
    assert 4 * standard_error <= RELATIVE_TOLERANCE * theory, (standard_error, theory)
    assert abs(mean - theory) <= RELATIVE_TOLERANCE * theory, (mean, theory)


@pytest.mark.parametrize("estimator, dimension, shared", [
    (weight_shared, P_IN * Q_OUT, True),
    (weight_independent, P_IN * Q_OUT, False),
    (activity_shared, Q_OUT, True),
    (activity_independent, Q_OUT, False),
])
def test_estimator_error_matches_ren_table_1(estimator, dimension, shared, layer):
    estimates = estimator(layer, np.random.default_rng(1))
    squared_errors = np.sum((estimates - layer["mean"]) ** 2, axis=(1, 2))
    if shared:
        theory = (dimension + 1) * squared_norm(layer["mean"])
    else:
        theory = sum((dimension + 1) * squared_norm(g) for g in layer["per_example"]) / N ** 2
    assert_mean_within_tolerance(squared_errors, theory)


def test_shared_and_independent_formulas_are_distinguishable(layer):
    """The four predictions differ by far more than the 5 % tolerance, so each test above can only
    pass with its own formula (here weight ≫ activity by ~ p, shared ≫ independent by ~ N)."""
    shared = squared_norm(layer["mean"])
    independent = sum(squared_norm(g) for g in layer["per_example"]) / N ** 2
    predictions = sorted([(P_IN * Q_OUT + 1) * shared, (P_IN * Q_OUT + 1) * independent,
                          (Q_OUT + 1) * shared, (Q_OUT + 1) * independent])
    assert all(b > 1.2 * a for a, b in zip(predictions, predictions[1:])), predictions


# --- the library's rules: one hidden layer, K directions per call --------------------------------
HIDDEN = ["blocks.0.linear.weight", "blocks.0.linear.bias"]
HIDDEN_UNITS = 5
DIRECTIONS, CALLS = 16, 4000  # measured coefficient of variation of one call's squared error ≤ 0.7:
#                                4 · 0.7 / √4000 = 0.044 ≤ 0.05 (asserted below from the samples)


@pytest.fixture
def one_hidden_layer(tiny):
    model = tiny.mlp(layers=2, hidden=HIDDEN_UNITS, input_shape=(1, 2, 2))
    params = tiny.params(model)
    x, labels = tiny.batch(model, N)
    mean, trace = exact_gradients(model, params, x, labels)
    per_example = [exact_gradients(model, params, x[n:n + 1], labels[n:n + 1])[0] for n in range(N)]
    return dict(model=model, params=params, x=x, labels=labels, mean=mean, per_example=per_example,
                active=trace.points[0].mask.sum(axis=1))


def hidden_squared_norm(grads):
    return sum(squared_norm(grads[name]) for name in HIDDEN)


def rule_squared_errors(name, net, noise="gaussian"):
    rule = rules.create(name, directions=DIRECTIONS, noise=noise)
    errors = []
    for call in range(CALLS):
        grads = rule(net["model"], net["params"], net["x"], net["labels"], np.random.default_rng(call)).grads
        errors.append(hidden_squared_norm({k: grads[k] - net["mean"][k] for k in HIDDEN}))
    return np.array(errors)


# E‖(g·v)v‖² = (d + 2)‖g‖² for Gaussian v and d‖g‖² for Rademacher v (‖v‖² = d), so the error
# E‖(g·v)v − g‖² is (d + 1)‖g‖² and (d − 1)‖g‖²: the cells' "+ 1" becomes "− 1".
EXCESS = {"gaussian": 1, "rademacher": -1}


@pytest.mark.parametrize("noise", sorted(EXCESS))
def test_fg_w_rule_is_the_shared_weight_cell(one_hidden_layer, noise):
    """FG-W perturbs W and b of the hidden layer with one v for the batch: d = pq + q (the read-out
    is exact), and K directions divide the error by K."""
    net = one_hidden_layer
    weight, bias = (net["params"][name] for name in HIDDEN)
    dimension = weight.size + bias.size
    theory = (dimension + EXCESS[noise]) * hidden_squared_norm(net["mean"]) / DIRECTIONS
    assert_mean_within_tolerance(rule_squared_errors("fg-w", net, noise), theory)


@pytest.mark.parametrize("noise", sorted(EXCESS))
def test_fg_a_rule_is_the_independent_activity_cell_with_relu_sparsity(one_hidden_layer, noise):
    """FG-A perturbs each example's q pre-activations independently and keeps only the active
    units (the ReLU-sparsity trick), so example n's d is its number a_n of active units:
    E‖ĝ − ḡ‖² = (1/(K N²)) Σ_n (a_n + 1) ‖g_n‖² over (W, b)."""
    net = one_hidden_layer
    theory = sum((a + EXCESS[noise]) * hidden_squared_norm(g) for a, g in zip(net["active"], net["per_example"]))
    theory /= DIRECTIONS * N ** 2
    # the trick matters for this batch: d = q would predict a clearly larger error
    dense = sum((HIDDEN_UNITS + 1) * hidden_squared_norm(g) for g in net["per_example"]) / (DIRECTIONS * N ** 2)
    assert dense > 1.2 * theory, (dense, theory)
    assert_mean_within_tolerance(rule_squared_errors("fg-a", net, noise), theory)
