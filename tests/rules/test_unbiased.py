"""Unbiasedness of the forward-gradient rules, by Monte Carlo (docs/estimators.md).

E[FG-W] = E[FG-A] = the BP gradient (MLP; FG-A also with BatchNorm), and E[LG-FG-W] = E[LG-FG-A]
= the LG-BP gradient for every parameter of a LocalMixer (2 blocks, 4 patches, 2 groups).  Heads
are exact.  FG-A with ``norm_grad=False`` (Ren's "NG") is *not* unbiased for BP: its mean is the
chain rule with the norm's Jacobian replaced by the identity, computed here exactly.

Statistics: each test calls the rule CALLS = 50 times (fresh noise; each call averages K
directions) and, per coordinate, compares the sample mean with the exact value in units of the
standard error estimated from those 50 calls.  With 49 degrees of freedom P(|t| > 5.5) = 1.4e-6,
so over the ≤ 400 coordinates of a test the chance of a false alarm is < 6e-4 (union bound, valid
for correlated coordinates).  Power: the Monte-Carlo error of the mean, ‖se‖/‖g‖ per weight, is
0.5–4 % for FG-A / LG-FG-A, 4–5 % for FG-W and 5–10 % for LG-FG-W on the mixer (measured), and
the biased estimators these tests know give max t ≈ 250 (FG-A's per-example d_n under a later
BatchNorm, before it was fixed) and min t ≈ 86 (NG against BP).
"""
import numpy as np
import pytest

from dualnet import rules
from dualnet.gradients import Gradients
from dualnet.nn.plan import Plan
from dualnet.rules import exact_gradients

CALLS = 50
T_MAX = 5.5  # see the module docstring


def mlp(tiny):
    return tiny.mlp()


def mlp_bn(tiny):
    return tiny.mlp(batch_norm=True)


def mlp_bn_local(tiny):
    return tiny.mlp(batch_norm=True, local_heads=True)


def mixer(tiny):
    return tiny.mixer()


def backbone(model, tree, tiny):
    return {name: value for name, value in tree.items() if not tiny.is_head(model, name)}


@pytest.mark.parametrize("name, make, target, directions, options", [
    ("fg-w", mlp, "global", 2000, {}),
    ("fg-a", mlp, "global", 2000, {}),
    ("fg-a", mlp_bn, "global", 2000, {}),  # a later BatchNorm couples the examples of block 0
    ("lg-fg-a", mlp_bn_local, "local-greedy", 2000, {}),  # greedy: no coupling across blocks
    ("lg-fg-a", mixer, "local-greedy", 500, {}),
    ("lg-fg-w", mixer, "local-greedy", 1000, {}),
    ("fg-w", mlp, "global", 2000, {"noise": "rademacher"}),  # ±1 entries: E[v vᵀ] = I too
    ("fg-a", mlp_bn, "global", 2000, {"noise": "rademacher"}),
    ("lg-fg-a", mixer, "local-greedy", 500, {"noise": "rademacher"}),
])
def test_forward_gradient_mean_equals_its_target_gradient(name, make, target, directions, options, tiny,
                                                          monte_carlo):
    model = make(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    state = model.init_state(np.float64)
    exact, _ = exact_gradients(model, params, x, labels, target, state)
    rule = rules.create(name, directions=directions, **options)
    rule.setup(model, params, 0)
    samples = monte_carlo.samples(rule, model, params, x, labels, CALLS, state)
    assert set(samples) == set(exact)
    for head in set(exact) - set(backbone(model, exact, tiny)):  # heads always get their exact gradient
        np.testing.assert_allclose(samples[head][0], exact[head], rtol=1e-10, atol=1e-13)
    floor = 1e-9 * max(float(np.abs(g).max()) for g in exact.values())
    t = monte_carlo.t_statistics(backbone(model, samples, tiny), exact, floor)
    assert max(t.values()) < T_MAX, t


def pre_site_gradients(model, params, x, labels):
    """[(point, ∂L/∂h)] for every hidden layer, L the batch-mean final loss and h the 'pre' site:
    forward mode over basis vectors, one pass per site with K = h.size identity tangents there."""
    result = []
    for point in model.forward(params, x, labels).points:
        size = point.h.size
        basis = np.eye(size).reshape((size,) + point.h.shape)

        def perturb(site, point=point):
            return basis if (site.block, site.name, site.kind) == (point.block, point.name, "pre") else None
        loss = model.forward(params, x, labels, Plan(perturb=perturb)).loss
        result.append((point, loss.tangent.mean(axis=1).reshape(point.h.shape)))
    return result


def chain_rule(site_gradients, through_norm):
    grads = {}
    for point, delta in site_gradients:
        grads.update(Gradients(point.weight_grads(delta, through_norm=through_norm)))
    return grads


def test_fg_a_without_norm_gradient_is_biased_toward_the_norm_free_chain_rule(tiny, monte_carlo):
    """On a LocalMixer (every hidden layer is followed by LN), the NG estimate's mean is
    Σ_sites (linear map's pullback of ∂L/∂h) with the LN Jacobian skipped — not the BP gradient."""
    model = tiny.mixer()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    exact, _ = exact_gradients(model, params, x, labels, "global")
    sites = pre_site_gradients(model, params, x, labels)
    # pulling the exact ∂L/∂h back through the LN and the layer is backprop, to round-off ...
    through_norm = chain_rule(sites, through_norm=True)
    for name, g in through_norm.items():
        np.testing.assert_allclose(g, exact[name], rtol=1e-9, atol=1e-12)
    # ... skipping the LN is not: every weight's NG target is off by > 10 % of its gradient
    norm_free = chain_rule(sites, through_norm=False)
    for name in norm_free:
        if name.endswith(".weight"):
            assert np.linalg.norm(norm_free[name] - exact[name]) > 0.1 * np.linalg.norm(exact[name]), name

    rule = rules.create("fg-a", directions=250, norm_grad=False)
    samples = backbone(model, monte_carlo.samples(rule, model, params, x, labels, CALLS), tiny)
    floor = 1e-9 * max(float(np.abs(g).max()) for g in exact.values())
    assert max(monte_carlo.t_statistics(samples, norm_free, floor).values()) < T_MAX
    # the same samples reject the BP gradient by far more than the unbiasedness tests' threshold
    against_bp = monte_carlo.t_statistics(samples, exact, floor)
    assert min(t for name, t in against_bp.items() if name.endswith(".weight")) > 10 * T_MAX, against_bp


def test_own_batch_coupling_is_the_biased_per_example_estimator(tiny, monte_carlo):
    """``batch_coupling='own'`` keeps each example's own d_n under a later BatchNorm: the lower-variance
    estimator that misses the batch statistics' cross-example terms.  Without BatchNorm it is the
    default estimator exactly; with it, its mean is rejected as the BP gradient (t far above T_MAX)."""
    plain, coupled = tiny.mlp(), tiny.mlp(batch_norm=True)
    params = tiny.params(plain)
    x, labels = tiny.batch(plain, 4)
    own, total = rules.create("fg-a", batch_coupling="own"), rules.create("fg-a")
    a, b = (rule(plain, params, x, labels, np.random.default_rng(5)).grads for rule in (own, total))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    params = tiny.params(coupled)
    state = coupled.init_state(np.float64)
    exact, _ = exact_gradients(coupled, params, x, labels, "global", state)
    rule = rules.create("fg-a", batch_coupling="own", directions=2000)
    samples = monte_carlo.samples(rule, coupled, params, x, labels, CALLS, state)
    floor = 1e-9 * max(float(np.abs(g).max()) for g in exact.values())
    t = monte_carlo.t_statistics(backbone(coupled, samples, tiny), exact, floor)
    assert max(t.values()) > 10 * T_MAX, t
    with pytest.raises(ValueError, match="batch_coupling='mixed'.*'total'.*'own'"):
        rules.create("fg-a", batch_coupling="mixed")



@pytest.mark.parametrize("name", ["fg-w", "fg-a"])
def test_rademacher_directions_are_signs(name, tiny):
    """noise='rademacher' injects ±1 entries (E[v vᵀ] = I: the unbiasedness cases above cover it)."""
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create(name, noise="rademacher")
    assert set(np.unique(np.abs(rule_noise_values(rule, model, params, x, labels)))) == {1.0}


def rule_noise_values(rule, model, params, x, labels):
    """The directions a forward-gradient rule injects in one pass (its tangents at the inputs of
    its perturbation), to check they are ±1."""
    from dualnet.rules.base import Batch
    from dualnet.rules.forward import _PerturbedParams, example_noise
    rng = np.random.default_rng(0)
    if rule.name.endswith("fg-w"):
        perturbed = _PerturbedParams(params, {name: 1 for name in params}, 3, rule.noise)
        return np.concatenate([perturbed.tangent(name).ravel() for name in params])
    draw = example_noise(rng, Batch.whole(len(labels)), 3, rule.site, distribution=rule.noise)
    site = model.forward(params, x, labels).points[0]
    from dualnet.nn.plan import Site
    return draw(Site(site.block, site.name, rule.site, site.h.shape, site.h.dtype)).ravel()
