"""FDFA's feedback learning (Bacho & Chu; docs/estimators.md).

One forward pass perturbs every hidden post-activation h_l with u_l ~ N(0, I) per example; the
output tangent is d = Σ_m J_m u_m, so X_l = mean_n d_n u_{l,n}ᵀ is an unbiased one-sample estimate
of the mean output Jacobian J̄_l = mean_n ∂y_n/∂h_{l,n}, and B_l ← (1−α) B_l + α X_l.  Checked here:

* with frozen weights, B_l converges to J̄_l (computed exactly by forward mode over basis vectors);
* the EMA of i.i.d. samples has stationary variance α/(2−α)·Var(X) — on the library's update with
  independent chains, and on the rule's B across many steps at a fixed batch;
* with α = 1 and a batch of one, FDFA's update is FG-A's with the same noise at the same ('post')
  site: B = d uᵀ, so e B = (e·d) uᵀ and e·d is the loss's JVP.

Models have no BatchNorm, so example n's output depends on its own units only.
"""
import numpy as np
import pytest

from dualnet import rules
from dualnet.nn.plan import Plan

KEYS = ["B.0.linear", "B.1.linear"]  # two hidden layers: B.{block}.{layer}


@pytest.fixture
def frozen(tiny):
    """A 2-hidden-layer MLP with fixed weights and a fixed batch of 32."""
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 32)
    return model, params, x, labels


def mean_output_jacobian(model, params, x, labels, block):
    """J̄ = mean_n ∂y_n/∂h_n [classes, units] at block's post-activation: forward mode with the
    unit basis vectors as K tangents at that site (the same unit perturbed in every example)."""
    units = model.hidden_width
    basis = np.broadcast_to(np.eye(units)[:, None, :], (units, len(x), units)).copy()

    def perturb(site):
        return basis if (site.block, site.kind) == (block, "post") else None
    logits = model.forward(params, x, labels, Plan(perturb=perturb)).logits
    return logits.tangent.mean(axis=1).T  # [K=units, N, classes] -> [classes, units]


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_fdfa(model, params, x, labels, steps, seed, record=None, **options):
    """Call FDFA ``steps`` times without applying its gradients; ``record(rule)`` after each step."""
    rule = rules.create("fdfa", **options)
    rule.setup(model, params, 0)
    for step in range(steps):
        rule(model, params, x, labels, np.random.default_rng(seed + step))
        if record is not None:
            record(rule)
    return rule


def test_fdfa_feedback_converges_to_the_mean_output_jacobian(frozen):
    """α = 0.005, K = 64 directions, 3000 steps: the start (B₀ = 0) has decayed to (0.995)^3000 ≈ 3e-7
    and the stationary RMS relative error is √(α/(2−α)·tr Var(X))/‖J̄‖, estimated below from 200
    α = 1 steps (≈ 0.9 % for layer 0), so 5 % is ≥ 4 times the expected error."""
    model, params, x, labels = frozen
    alpha, directions = 0.005, 64
    exact = {f"B.{block}.linear": mean_output_jacobian(model, params, x, labels, block) for block in (0, 1)}
    samples = {key: [] for key in KEYS}  # α = 1: B after a step is the sample X itself
    run_fdfa(model, params, x, labels, 200, 0, alpha=1.0, directions=directions,
             record=lambda rule: [samples[key].append(rule.state[key].copy()) for key in KEYS])
    rule = run_fdfa(model, params, x, labels, 3000, 10_000, alpha=alpha, directions=directions)
    for key in KEYS:
        variance = np.var(samples[key], axis=0, ddof=1).sum()
        expected_rms = np.sqrt(alpha / (2 - alpha) * variance) / np.linalg.norm(exact[key])
        assert 4 * expected_rms <= 0.05, (key, expected_rms)
        assert relative_error(rule.state[key], exact[key]) < 0.05, key


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
def test_ema_update_has_stationary_variance_alpha_over_two_minus_alpha(alpha):
    """The library's update (``_learn_jacobian``) on 200,000 independent chains fed i.i.d. N(μ, σ²):
    after T steps, Var(B_T) = α/(2−α)·σ²·(1 − (1−α)^{2T}) and E[B_T] = μ(1 − (1−α)^T); T makes the
    transient < 1e-8.  B_T is Gaussian, so the sample variance has relative standard error
    √(2/R) = 0.32 % and 2 % is > 6 of them; the mean is checked to 6 standard errors."""
    chains, mu, sigma = 200_000, 0.7, 1.5
    steps = int(np.ceil(np.log(1e-8) / np.log(1 - alpha))) if alpha < 1 else 1
    rule = rules.create("fdfa", alpha=alpha)
    rule.state = {"B": np.zeros(chains)}
    rng = np.random.default_rng(0)
    for _ in range(steps):
        rule._learn_jacobian("B", mu + sigma * rng.standard_normal(chains))
    final = rule.state["B"]
    stationary = alpha / (2 - alpha) * sigma ** 2
    assert abs(final.var(ddof=1) / stationary - 1) < 0.02
    assert abs(final.mean() - mu) < 6 * np.sqrt(stationary / chains)


def test_fdfa_feedback_fluctuates_with_the_ema_stationary_variance(tiny):
    """The rule itself at a fixed batch, α = 0.5: mean over 3000 steps of ‖B_t − J̄‖² equals
    α/(2−α)·E‖X − J̄‖² (X unbiased for J̄, so E‖X − J̄‖² = tr Var X; estimated from 3000 α = 1 steps).
    Standard errors: i.i.d. for the α = 1 steps; batch means (30 batches of 100 steps, ≫ the EMA's
    correlation time of ~2 steps) for the correlated B_t.  10 % is asserted to be ≥ 4 standard
    errors of the ratio (measured ≈ 2 %)."""
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 8)
    alpha, steps, burn_in = 0.5, 3000, 50  # (1−α)^50 ≈ 1e-15
    exact = {f"B.{block}.linear": mean_output_jacobian(model, params, x, labels, block) for block in (0, 1)}
    sample_errors, ema_errors = {key: [] for key in KEYS}, {key: [] for key in KEYS}

    def squared_errors(into):
        return lambda rule: [into[key].append(float(((rule.state[key] - exact[key]) ** 2).sum())) for key in KEYS]
    run_fdfa(model, params, x, labels, steps, 0, alpha=1.0, record=squared_errors(sample_errors))
    run_fdfa(model, params, x, labels, steps + burn_in, 10_000, alpha=alpha, record=squared_errors(ema_errors))
    for key in KEYS:
        variance = np.array(sample_errors[key])
        batches = np.array(ema_errors[key][burn_in:]).reshape(30, -1).mean(axis=1)
        ratio = batches.mean() / (alpha / (2 - alpha) * variance.mean())
        relative_se = np.hypot(batches.std(ddof=1) / np.sqrt(len(batches)) / batches.mean(),
                               variance.std(ddof=1) / np.sqrt(len(variance)) / variance.mean())
        assert 4 * relative_se <= 0.10, (key, relative_se)
        assert abs(ratio - 1) < 0.10, (key, ratio)


def fdfa_and_fg_a(model, params, x, labels, seed, alpha=1.0, directions=1):
    fdfa = rules.create("fdfa", alpha=alpha, directions=directions)
    fdfa.setup(model, params, 0)
    fg_a = rules.create("fg-a", site="post", directions=directions)
    return (fdfa(model, params, x, labels, np.random.default_rng(seed)).grads,
            fg_a(model, params, x, labels, np.random.default_rng(seed)).grads)


@pytest.mark.parametrize("directions", [1, 3])
def test_fdfa_with_alpha_one_and_one_example_is_fg_a_at_the_post_site(directions, tiny):
    """Same generator seed = the same u at every hidden post-activation (both rules draw them in the
    same order); with K directions both average the K per-direction updates."""
    model = tiny.mlp(layers=4)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 1)
    fdfa, fg_a = fdfa_and_fg_a(model, params, x, labels, seed=5, directions=directions)
    assert set(fdfa) == set(fg_a) == set(params)
    for name in params:
        np.testing.assert_allclose(fdfa[name], fg_a[name], rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("batch, alpha", [(4, 1.0), (1, 0.5)])
def test_fdfa_differs_from_fg_a_with_a_batch_or_an_ema(batch, alpha, tiny):
    """With N > 1, B averages d_n u_nᵀ over the batch (every example's error meets every example's
    noise); with α < 1 the first step gives B = α X.  Either way the hidden updates differ."""
    model = tiny.mlp(layers=4)
    params = tiny.params(model)
    x, labels = tiny.batch(model, batch)
    fdfa, fg_a = fdfa_and_fg_a(model, params, x, labels, seed=5, alpha=alpha)
    for name in params:
        if name.startswith("blocks.") and name.endswith(".weight"):
            assert relative_error(fdfa[name], fg_a[name]) > 0.1, name
