"""Fournier et al.'s gradient guesses × targets (``rules.create('guess', ...)``, dualnet/rules/guesses.py).

* Random guesses (Gaussian, Rademacher) are unbiased for the global gradient, in activity and
  weight space, with and without a later BatchNorm (which switches activity space to batch totals).
* The projection helpers: a normalised projection on a fixed guess is a descent direction,
  ⟨ĝ, t⟩ = ‖ĝ‖² (1 + ε/‖g‖²); for isotropic random g in ℝ^d, E[(⟨t,g⟩/‖g‖²) g] = t/d while
  E[⟨t,g⟩ g] = t; the span projection is idempotent, recovers targets in the span, and leaves a
  residual orthogonal to every guess.
* The estimates equal ⟨T, G⟩/‖G‖² · G with T and G computed by reverse mode in the test (weight
  space per block, activity space per example), for the global, local and intermediate targets;
  local guess × local target is local greedy backprop exactly (MLP, LocalMixer, resnet18).
* Every (guess, target, space) runs on a tiny MLP with local heads and a tiny LocalMixer; the
  loss falls with a local guess and the global target; passes per step; NTK / fixed-NTK / state
  round trip; invalid options raise errors that name the option, the value and what is allowed.
"""
import itertools

import numpy as np
import pytest

from dualnet import models, optim, rules
from dualnet.nn.plan import Plan
from dualnet.rules import exact_gradients
from dualnet.rules.guesses import GUESSES, SPACES, TARGETS, sample_projection, span_projection

# Monte Carlo: CALLS independent calls of the rule (one guess each).  Per coordinate, the sample
# mean is compared with the exact gradient in standard errors estimated from the calls: with
# ~1000 degrees of freedom P(|t| > 5.5) ≈ 4e-8, so over the ≤ 60 coordinates of a test a false
# alarm has probability < 3e-6 (union bound).  Along the exact gradient e, the scalar
# ⟨ĝ, e⟩/‖e‖² has mean 1; its standard error here is ≈ 0.03, so |mean − 1| < 5.5 SE detects a
# bias of ≈ 15 % of the gradient.
CALLS = 1000
T_MAX = 5.5


def small_mlp(tiny, batch_norm):
    return tiny.mlp(batch_norm=batch_norm, hidden=4, input_shape=(1, 2, 2))


def backbone(model, tree, tiny):
    return {name: value for name, value in tree.items() if not tiny.is_head(model, name)}


@pytest.mark.parametrize("guess", ["gaussian", "rademacher"])
@pytest.mark.parametrize("space, batch_norm", [("activity", False), ("activity", True), ("weight", True)])
def test_random_guesses_are_unbiased_for_the_global_gradient(guess, space, batch_norm, tiny, monte_carlo):
    model = small_mlp(tiny, batch_norm)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    state = model.init_state(np.float64)
    exact = exact_gradients(model, params, x, labels, "global", state)[0]
    rule = rules.create("guess", guess=guess, target="global", space=space)
    samples = backbone(model, monte_carlo.samples(rule, model, params, x, labels, CALLS, state), tiny)
    scale = max(float(np.abs(exact[name]).max()) for name in samples)
    t = monte_carlo.t_statistics(samples, exact, floor=1e-12 * scale)
    assert max(t.values()) < T_MAX, t
    names = sorted(samples)
    flat = np.concatenate([samples[name].reshape(CALLS, -1) for name in names], axis=1)
    direction = np.concatenate([exact[name].ravel() for name in names])
    along = flat @ direction / (direction @ direction)  # mean 1 when unbiased
    assert abs(along.mean() - 1) < T_MAX * along.std(ddof=1) / np.sqrt(CALLS), along.mean()


# --- the projection helpers ---------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_normalised_projection_on_a_fixed_guess_is_a_descent_direction(eps, rng):
    targets, guesses = rng.standard_normal((50, 7)), rng.standard_normal((50, 7))
    estimates = sample_projection(guesses, np.einsum("md,md->m", targets, guesses), eps)
    inner = np.einsum("md,md->m", estimates, targets)
    squared = np.einsum("md,md->m", estimates, estimates)
    np.testing.assert_allclose(inner, squared * (1 + eps / np.einsum("md,md->m", guesses, guesses)), rtol=1e-12)
    assert np.all(inner >= 0)


def test_isotropic_random_guesses_normalised_mean_is_target_over_d_plain_mean_is_target(rng):
    """t ∈ ℝ^5, M = 200 000 Gaussian guesses; tolerance 5 standard errors of each coordinate's mean."""
    d, draws = 5, 200_000
    t = rng.standard_normal(d)
    g = rng.standard_normal((draws, d))
    for normalised, expected in ((True, t / d), (False, t)):
        estimates = sample_projection(g, g @ t, 0.0, normalised)
        se = estimates.std(axis=0, ddof=1) / np.sqrt(draws)
        assert np.all(np.abs(estimates.mean(axis=0) - expected) < 5 * se), (normalised, estimates.mean(axis=0))
    assert np.linalg.norm(t / d - t) > 50 * se.max()  # the two means are far apart at this resolution


@pytest.mark.parametrize("guesses_count", [3, 9])  # 9 > D = 7: the guesses span all of ℝ^7
def test_span_projection_is_idempotent_recovers_the_span_and_leaves_an_orthogonal_residual(guesses_count, rng):
    guesses = rng.standard_normal((guesses_count, 7))
    targets = rng.standard_normal((4, 7))
    projected = span_projection(guesses, guesses @ targets.T)
    np.testing.assert_allclose(span_projection(guesses, guesses @ projected.T), projected, atol=1e-12)
    np.testing.assert_allclose(guesses @ (targets - projected).T, 0, atol=1e-12)
    in_span = rng.standard_normal((4, guesses_count)) @ guesses
    np.testing.assert_allclose(span_projection(guesses, guesses @ in_span.T), in_span, atol=1e-12)
    if guesses_count > 7:
        np.testing.assert_allclose(projected, targets, atol=1e-12)


def test_span_projection_of_repeated_guesses_is_that_of_the_distinct_ones(rng):
    """A rank-deficient Gram matrix (a guess repeated) changes nothing: the pseudo-inverse."""
    guesses = rng.standard_normal((3, 6))
    targets = rng.standard_normal((2, 6))
    repeated = np.concatenate([guesses, guesses[:1]])
    np.testing.assert_allclose(span_projection(repeated, repeated @ targets.T),
                               span_projection(guesses, guesses @ targets.T), atol=1e-12)


# --- the rule on models -------------------------------------------------------------------------
def mlp_heads(tiny):
    return tiny.mlp(batch_norm=True, local_heads=True)


def mixer(tiny):
    return tiny.mixer(channels=4, image=4)


def resnet(tiny):
    """BatchNorm in every block and in the MLP aux heads: the batch-projection path of activity space."""
    return models.create("resnet18", input_shape=(3, 8, 8), num_classes=3, width=2, aux="mlp", aux_width=4)


@pytest.mark.parametrize("make, space, projection", [
    (make, space, projection) for make in (mlp_heads, mixer, resnet)
    for space, projection in (("activity", "sample"), ("weight", "sample"), ("activity", "span"))
    if not (make is resnet and projection == "span")])  # resnet18 mixes the batch: span is refused
def test_local_guess_with_local_target_is_local_greedy_backprop(make, space, projection, tiny):
    """ε = 0: the guess G is the target T, so ⟨T, G⟩/‖G‖² · G = G (and G is in the span).  Every
    parameter, heads included, equals LG-BP's gradient up to round-off (1e-10 of the largest)."""
    model = make(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    state = model.init_state(np.float64)
    exact = exact_gradients(model, params, x, labels, "local-greedy", state)[0]
    rule = rules.create("guess", guess="local", target="local", space=space, projection=projection, eps=0.0)
    grads = rule(model, params, x, labels, np.random.default_rng(0), state).grads
    assert set(grads) == set(exact)
    scale = max(float(np.abs(g).max()) for g in exact.values())
    for name in exact:
        np.testing.assert_allclose(grads[name], exact[name], rtol=0, atol=1e-10 * scale, err_msg=name)


def _exact(model, params, x, labels, objective):
    return exact_gradients(model, params, x, labels, objective)[0]


def _block(k, tree):
    return {name: tree[name] for name in (f"blocks.{k}.linear.weight", f"blocks.{k}.linear.bias")}


def _dot(a, b):
    return sum(float((a[name] * b[name]).sum()) for name in a)


@pytest.mark.parametrize("target", TARGETS)
def test_weight_space_estimate_is_the_targets_projection_on_the_guess(target, tiny):
    """Two-block MLP with local heads, ε = 0.  References by reverse mode: guess G_k = ∇_θk ℓ_k (LG-BP);
    target T_0 = ∇_θ0 L (global), G_0 (local), ∇_θ0 ℓ_1 = L-BP − LG-BP on θ_0 (intermediate; L-BP sums
    both local losses); T_1 = ∇_θ1 L for the last block unless local.  Estimate ⟨T, G⟩/‖G‖² · G."""
    model = tiny.mlp(local_heads=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 5)
    greedy, both, end_to_end = (_exact(model, params, x, labels, o) for o in ("local-greedy", "local", "global"))
    targets = {"global": [_block(0, end_to_end), _block(1, end_to_end)],
               "local": [_block(0, greedy), _block(1, greedy)],
               "intermediate": [{n: both[n] - greedy[n] for n in _block(0, greedy)}, _block(1, end_to_end)]}[target]
    rule = rules.create("guess", guess="local", target=target, space="weight", eps=0.0)
    grads = rule(model, params, x, labels, np.random.default_rng(0)).grads
    for k, t in enumerate(targets):
        g = _block(k, greedy)
        for name in g:
            np.testing.assert_allclose(grads[name], _dot(t, g) / _dot(g, g) * g[name], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("target", TARGETS)
def test_activity_space_estimate_projects_each_examples_target_on_its_guess(target, tiny):
    """Same MLP (no BatchNorm, so examples do not mix), N = 3, ε = 0.  Per example n, by reverse mode on
    that example alone: at block k's output y_k (z_{k+1} = y_k W_{k+1} + b), a loss downstream of z_{k+1}
    has ∂ℓ/∂y_k = W_{k+1} ∂ℓ/∂b_{k+1}; the guess is G_n = W_head,k ∂ℓ_k/∂b_head,k.  Expected block-k
    gradient: (1/N) Σ_n a_n ∇_θk ℓ_{k,n}, a_n = ⟨T_n, G_n⟩/‖G_n‖² (a_n G_n carried back through block k)."""
    model = tiny.mlp(local_heads=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 3)
    expected = {name: 0.0 for name in list(_block(0, params)) + list(_block(1, params))}
    for n in range(3):
        xn, yn = x[n:n + 1], labels[n:n + 1]
        greedy, end_to_end = (_exact(model, params, xn, yn, o) for o in ("local-greedy", "global"))
        downstream = {"global": [("blocks.1.linear", end_to_end), ("head", end_to_end)],
                      "intermediate": [("blocks.1.linear", greedy), ("head", end_to_end)]}
        for k in range(2):
            guess = params[f"blocks.{k}.head.weight"] @ greedy[f"blocks.{k}.head.bias"]
            if target == "local":
                t = guess
            else:
                layer, grads = downstream[target][k]
                t = params[f"{layer}.weight"] @ grads[f"{layer}.bias"]
            a = (t @ guess) / (guess @ guess)
            for name, g in _block(k, greedy).items():
                expected[name] = expected[name] + a * g / 3
    rule = rules.create("guess", guess="local", target=target, space="activity", eps=0.0)
    grads = rule(model, params, x, labels, np.random.default_rng(0)).grads
    for name, value in expected.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-9, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("make", [mlp_heads, mixer])
@pytest.mark.parametrize("guess, target, space", list(itertools.product(GUESSES, TARGETS, SPACES)))
def test_every_guess_target_space_gives_finite_grads_for_every_parameter(make, guess, target, space, tiny):
    model = make(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    for aux in (None, "mlp"):  # the model's heads, or rule-owned MLP aux nets
        rule = rules.create("guess", guess=guess, target=target, space=space, aux=aux, aux_width=5)
        estimate = rule(model, params, x, labels, np.random.default_rng(0), model.init_state(np.float64))
        assert set(estimate.grads) == set(params), aux
        for name, g in estimate.grads.items():
            assert g.shape == params[name].shape and np.all(np.isfinite(g)), (aux, name)
        assert np.isfinite(estimate.loss)


def test_rule_owned_cnn_aux_nets_on_image_block_outputs(tiny):
    """resnet18's block outputs are images: aux='cnn' builds 1×1 conv → 3×3 stride-2 conv → pooled linear
    nets of its own for every block (the model's aux heads are then trained as probes)."""
    model = resnet(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create("guess", guess="local", target="intermediate", aux="cnn", aux_width=3, aux_depth=1)
    estimate = rule(model, params, x, labels, np.random.default_rng(0), model.init_state(np.float64))
    assert set(estimate.grads) == set(params) and all(np.all(np.isfinite(g)) for g in estimate.grads.values())
    channels = model.layout[0].layers[-1].c_out
    assert rule.state["aux.0.0.weight"].shape == (3, channels, 1, 1)
    assert rule.state["aux.0.1.weight"].shape == (3, 3, 3, 3)
    assert rule.state["aux.0.2.weight"].shape == (3 * 2 * 2, 3)  # 2×2 pooled, then the classifier
    assert {name.split(".")[1] for name in rule.state} == {str(k) for k in range(model.num_blocks)}


@pytest.mark.parametrize("guess", GUESSES)
@pytest.mark.parametrize("target", TARGETS)
def test_span_projection_runs_on_the_localmixer(guess, target, tiny):
    model = mixer(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    grads = rules.create("guess", guess=guess, target=target, projection="span")(
        model, params, x, labels, np.random.default_rng(0)).grads
    assert set(grads) == set(params) and all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.parametrize("space", SPACES)
def test_loss_falls_with_a_local_guess_and_the_global_target(space, tiny):
    """A teacher task the read-out alone cannot fit: SGD (momentum 0.9) on the guess rule's
    estimates takes the training loss from ≈ 1.1 to below 0.25 in 300 steps, and below half of
    what the same steps reach with only the read-out trained (≈ 0.6)."""
    model = tiny.mlp(hidden=16, local_heads=True)
    x, labels = tiny.teacher(model, 64)

    def train(readout_only):
        params = tiny.params(model)
        rule = rules.create("guess", guess="local", target="global", space=space)
        sgd = optim.create("sgd", lr=0.05, momentum=0.9)
        first = None
        for step in range(300):
            estimate = rule(model, params, x, labels, np.random.default_rng(step))
            first = estimate.loss if first is None else first
            sgd.step(params, {k: g for k, g in estimate.grads.items() if not readout_only or k.startswith("head.")})
        return first, float(model.forward(params, x, labels, Plan()).loss.mean())
    first, final = train(readout_only=False)
    _, readout_only = train(readout_only=True)
    assert final < 0.25 * first and final < 0.5 * readout_only, (first, final, readout_only)


def test_rule_owned_aux_nets_learn_and_carry_the_network(tiny):
    """An MLP without local heads: the rule's own MLP aux nets, trained by its SGD, give local guesses
    that lower the global loss (to below a quarter of the start in 300 steps)."""
    model = tiny.mlp(hidden=16)
    x, labels = tiny.teacher(model, 64)
    params = tiny.params(model)
    rule = rules.create("guess", guess="local", target="global", space="weight", aux="mlp", aux_width=16, aux_lr=0.1)
    rule.setup(model, params, 0)
    sgd = optim.create("sgd", lr=0.05, momentum=0.9)
    history = []
    for step in range(300):
        estimate = rule(model, params, x, labels, np.random.default_rng(step))
        history.append(estimate.loss)
        sgd.step(params, estimate.grads)
    assert sorted(rule.state) == [f"aux.{k}.{i}.{p}" for k in range(2) for i in range(3) for p in ("bias", "weight")]
    assert history[-1] < 0.25 * history[0], (history[0], history[-1])


@pytest.mark.parametrize("guess, space, projection, passes", [
    ("gaussian", "activity", "sample", 1),  # every block's guess in one pass of K = blocks directions
    ("gaussian", "weight", "sample", 1),
    ("local", "activity", "sample", 2),  # + one plain pass for the activations the aux nets read
    ("local", "weight", "sample", 2),
    ("local", "activity", "span", 3),  # + one pass of N directions per block (2 blocks)
])
def test_forward_passes_per_step(guess, space, projection, passes, tiny):
    model = mixer(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    calls = []
    real_forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)
    model.forward = counting_forward
    rules.create("guess", guess=guess, space=space, projection=projection)(model, params, x, labels,
                                                                          np.random.default_rng(0))
    assert len(calls) == passes


@pytest.mark.parametrize("aux", [None, "linear"])
def test_ntk_guesses_are_redrawn_every_step_fixed_ntk_and_local_guesses_are_not(aux, tiny):
    """Same parameters and batch, two noise seeds: NTK estimates differ, fixed-NTK and local ones
    do not; the fixed NTK nets are kept in the rule's state and never change."""
    model = mlp_heads(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    state = model.init_state(np.float64)
    for guess, redrawn in (("ntk", True), ("fixed-ntk", False), ("local", False)):
        rule = rules.create("guess", guess=guess, aux=aux, aux_lr=0.0)
        rule.setup(model, params, 3)
        first, second = (rule(model, params, x, labels, np.random.default_rng(seed), state).grads for seed in (0, 1))
        same = all(np.array_equal(first[name], second[name]) for name in first)
        assert same != redrawn, guess
        if guess == "fixed-ntk":
            kept = {name: value.copy() for name, value in rule.state.items()}
            assert kept and all(name.startswith("ntk.") for name in kept)
            rule(model, params, x, labels, np.random.default_rng(2), state)
            assert all(np.array_equal(rule.state[name], kept[name]) for name in kept)


def test_state_dict_round_trip_continues_identically(tiny):
    """Trained (aux.*) and fixed-NTK (ntk.*) rule-owned nets: a rule restored from ``state_dict``
    gives the same next estimate and the same next state, bit for bit."""
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    for guess, target in (("local", "global"), ("fixed-ntk", "intermediate")):
        rule = rules.create("guess", guess=guess, target=target, aux="mlp", aux_width=5)
        rule.setup(model, params, 7)
        for step in range(3):
            rule(model, params, x, labels, np.random.default_rng(step))
        restored = rules.create("guess", guess=guess, target=target, aux="mlp", aux_width=5)
        restored.setup(model, params, 7)
        restored.load_state_dict(rule.state_dict())
        a, b = (r(model, params, x, labels, np.random.default_rng(9)) for r in (rule, restored))
        assert all(np.array_equal(a.grads[name], b.grads[name]) for name in a.grads)
        assert rule.state.keys() == restored.state.keys()
        assert all(np.array_equal(rule.state[name], restored.state[name]) for name in rule.state)


def test_diagnostics_follow_the_rules_objective(tiny):
    """target=local on the model's heads is compared with LG-BP (cosine 1 for the local guess)."""
    model = mlp_heads(tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create("guess", guess="local", target="local", diagnostics=True)
    report = rule(model, params, x, labels, np.random.default_rng(0), model.init_state(np.float64)).diagnostics
    assert rule.target == "local-greedy"
    assert all(abs(entry["cosine"] - 1) < 1e-6 for name, entry in report.items() if name.endswith(".weight"))


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(guess="noise"), r"guess='noise'; allowed: 'gaussian', 'rademacher', 'local', 'ntk', 'fixed-ntk'"),
    (dict(target="next"), r"target='next'; allowed: 'global', 'local', 'intermediate'"),
    (dict(space="output"), r"space='output'; allowed: 'activity', 'weight'"),
    (dict(projection="pca"), r"projection='pca'; allowed: 'sample', 'span'"),
    (dict(aux="resnet"), r"aux='resnet'; allowed: None, 'linear', 'mlp', 'cnn'"),
    (dict(projection="span", space="weight"), r"projection='span' needs space='activity'"),
    (dict(eps=-1.0), r"eps=-1.0 must be >= 0"),
    (dict(aux_depth=0), r"aux_depth=0 must be an integer >= 1"),
    (dict(aux_lr=-0.1), r"aux_lr=-0.1 must be >= 0"),
    (dict(directions=4), r"unexpected keyword argument 'directions'"),
])
def test_invalid_options_name_the_option_the_value_and_the_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        rules.create("guess", **options)


def test_span_on_a_batch_coupled_model_and_cnn_aux_on_vectors_are_refused(tiny):
    model = tiny.mlp(batch_norm=True)  # a later BatchNorm mixes the batch after block 0's output
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    with pytest.raises(ValueError, match=r"projection='span' .* mlp mixes the batch after block 0's output"):
        rules.create("guess", projection="span")(model, params, x, labels, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"aux='cnn' needs image block outputs \[N, C, H, W\]; block 0 of mlp "
                                         r"outputs \(4, 6\)"):
        rules.create("guess", aux="cnn")(model, params, x, labels, np.random.default_rng(0))
