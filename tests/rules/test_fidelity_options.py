"""The options that run a rule as its authors ran it (docs/fidelity.md), each against its formula.

Monte-Carlo tests follow tests/rules/test_unbiased.py: CALLS independent calls of the rule, each
averaging K directions; per coordinate, |mean − exact| / (standard error from the calls) must stay
below T_MAX = 5.5 (with 49 degrees of freedom P(|t| > 5.5) = 1.4e-6 per coordinate; < 6e-4 over the
≤ 400 coordinates of a test by the union bound).
"""
import numpy as np
import pytest

from dualnet import autodiff, losses, models, rules
from dualnet.gradients import Gradients
from dualnet.nn.layers import value_of
from dualnet.nn.plan import Plan
from dualnet.rules import exact_gradients, forward
from dualnet.rules.base import Batch

CALLS = 50
T_MAX = 5.5


def _unbiased(rule, model, params, x, labels, target, tiny, monte_carlo, state=None):
    exact, _ = exact_gradients(model, params, x, labels, target, state)
    rule.setup(model, params, 0)
    samples = monte_carlo.samples(rule, model, params, x, labels, CALLS, state)
    assert set(samples) == set(exact)
    floor = 1e-9 * max(float(np.abs(g).max()) for g in exact.values())
    return samples, monte_carlo.t_statistics(samples, exact, floor)


# --- read-out perturbed (Bacho & Chu, Baydin et al.) ---------------------------------------------
@pytest.mark.parametrize("name", ["fg-w", "fg-a"])
def test_perturbed_readout_is_unbiased_for_every_parameter_and_random_on_the_readout(name, tiny, monte_carlo):
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create(name, directions=2000, readout="perturbed")
    samples, t = _unbiased(rule, model, params, x, labels, "global", tiny, monte_carlo)
    assert max(t.values()) < T_MAX, t
    assert t["head.weight"] < T_MAX  # the read-out too, now estimated ...
    spread = samples["head.weight"].std(axis=0)
    assert spread.max() > 1e-3 * np.abs(samples["head.weight"].mean(axis=0)).max()  # ... and no longer exact


def test_exact_readout_is_the_default_and_exact(tiny):
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    exact, _ = exact_gradients(model, params, x, labels)
    for name in ("fg-w", "fg-a"):
        grads = rules.create(name)(model, params, x, labels, np.random.default_rng(0)).grads
        np.testing.assert_allclose(grads["head.weight"], exact["head.weight"], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, options, message", [
    ("fg-w", {"readout": "noisy"}, "readout='noisy'"),
    ("lg-fg-w", {"readout": "perturbed"}, "global rule"),
    ("lg-fg-a", {"readout": "perturbed"}, "global rule"),
    ("fg-w", {"dense_groups": "own"}, "use lg-fg-w"),
    ("lg-fg-w", {"dense_groups": "some"}, "dense_groups='some'"),
    ("fg-a", {"loss_reduction": "max"}, "loss_reduction='max'"),
    ("lg-fg-a", {"loss_reduction": "sum"}, "use fg-a"),
])
def test_bad_fidelity_options_are_one_clear_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        rules.create(name, **options)


# --- Ren's global FG-A: the batch sum ------------------------------------------------------------
def test_sum_reduction_scales_the_hidden_layers_by_the_batch_and_keeps_the_heads(tiny):
    model = tiny.mlp()
    params = tiny.params(model)
    n = 5
    x, labels = tiny.batch(model, n)
    mean = rules.create("fg-a")(model, params, x, labels, np.random.default_rng(3)).grads
    total = rules.create("fg-a", loss_reduction="sum")(model, params, x, labels, np.random.default_rng(3)).grads
    for name in mean:
        factor = 1.0 if tiny.is_head(model, name) else n
        np.testing.assert_allclose(total[name], factor * mean[name], rtol=1e-12, atol=1e-15)


# --- Ren's LG-FG-W: a dense layer's column block g from group g's replicas -----------------------
def test_own_group_dense_columns_equal_the_hand_formula(tiny, monkeypatch):
    """Ĝ[:, block g] = (Σ_{n,p} d[n, p, g] / N) · v[:, block g] for the dense weight (and its bias),
    with d the local loss tangents of the same draw v; the other tensors as with dense_groups='all'."""
    model = tiny.mixer()  # 2 blocks, 4 patches, 8 channels in 2 groups
    params = tiny.params(model)
    n = 3
    x, labels = tiny.batch(model, n)
    drawn = []  # the rule's perturbed parameters (their tangents are drawn again on access)

    class Recording(forward._PerturbedParams):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn.append(self)
    monkeypatch.setattr(forward, "_PerturbedParams", Recording)
    own = rules.create("lg-fg-w", dense_groups="own")(model, params, x, labels, np.random.default_rng(7)).grads
    every = rules.create("lg-fg-w")(model, params, x, labels, np.random.default_rng(7)).grads
    perturbed = drawn[0]
    for name in perturbed.seeds:  # the same draw in both calls
        np.testing.assert_array_equal(perturbed.tangent(name), drawn[1].tangent(name))
    names = sorted(perturbed.seeds)
    plan = Plan(local_losses=True, greedy=True, replicated=True, readout_stop_gradient=True)
    trace = model.forward(perturbed, x, labels, plan)  # the same pass by hand
    checked = 0
    for name in names:
        spec = model.specs[name]
        if spec.channel_group_axis is None:
            np.testing.assert_array_equal(own[name], every[name])
            continue
        d = trace.local_losses[spec.block].tangent[0]  # [N, P, G]
        per_group = d.sum(axis=(0, 1)) / n  # [G]
        v = perturbed.tangent(name)[0]
        groups, width = len(per_group), v.shape[spec.channel_group_axis] // len(per_group)
        expected = np.empty_like(v)
        for g in range(groups):
            block = [slice(None)] * v.ndim
            block[spec.channel_group_axis] = slice(g * width, (g + 1) * width)
            expected[tuple(block)] = per_group[g] * v[tuple(block)]
        np.testing.assert_allclose(own[name], expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(every[name], per_group.sum() * v, rtol=1e-12, atol=1e-15)
        assert not np.allclose(own[name], every[name])
        checked += 1
    assert checked == 4  # each block's dense weight and bias


@pytest.mark.parametrize("post_linear_ln", [False, True])
def test_own_group_dense_columns_are_unbiased_only_without_a_norm_over_all_channels(post_linear_ln, tiny,
                                                                                    monte_carlo):
    """Without the post-linear LN, channel block g reaches group g's replicas only, so the per-group
    estimate is unbiased for LG-BP; with it (Ren's setting) the LN spreads every column over all
    groups and the shortcut is biased (measured: t ≈ 15–40 on the dense tensors at this size)."""
    model = models.create("localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2,
                          patches=2, channels=8, groups=2, post_linear_ln=post_linear_ln)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create("lg-fg-w", directions=1000, dense_groups="own")
    samples, t = _unbiased(rule, model, params, x, labels, "local-greedy", tiny, monte_carlo)
    dense = max(value for name, value in t.items() if model.specs[name].channel_group_axis is not None)
    others = max(value for name, value in t.items() if model.specs[name].channel_group_axis is None)
    assert others < T_MAX, t
    assert (dense > 2 * T_MAX) if post_linear_ln else (dense < T_MAX), t


# --- Ren's LN flags ------------------------------------------------------------------------------
def _mixer(**options):
    return models.create("localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2,
                         patches=2, channels=8, groups=2, **options)


def _ln(a, axis=-1, eps=1e-5):
    centred = a - a.mean(axis=axis, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(axis=axis, keepdims=True) + eps)


def _cross_entropy(logits, labels):
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_p, labels.reshape(labels.shape + (1,) * (log_p.ndim - labels.ndim)), -1)[..., 0]


def test_inter_ln_and_last_layer_ln_normalise_the_heads_inputs_only(tiny):
    plain, flagged = _mixer(), _mixer(inter_ln=True, last_layer_ln=True)
    assert plain.param_counts() == flagged.param_counts()
    params = tiny.params(plain)
    n = 3
    x, labels = tiny.batch(plain, n)
    plan = Plan(local_losses=True, replicated=True)
    a, b = plain.forward(params, x, labels, plan), flagged.forward(params, x, labels, plan)
    for k, (out_a, out_b) in enumerate(zip(a.outputs, b.outputs)):
        np.testing.assert_allclose(value_of(out_b), value_of(out_a), rtol=1e-12)  # the backbone is unchanged
        grid = value_of(out_a).reshape(n, 4, 2, 4)  # [N, P, G, c]
        weight, bias = params[f"blocks.{k}.head.weight"], params[f"blocks.{k}.head.bias"]
        for normalised, trace in ((False, a), (True, b)):  # every replica's value is the pooled loss
            pooled = (_ln(grid) if normalised else grid).mean(axis=1).reshape(n, -1)  # LN per token and group
            expected = _cross_entropy(pooled @ weight + bias, labels)
            np.testing.assert_allclose(value_of(trace.local_losses[k]),
                                       np.broadcast_to(expected[:, None, None], (n, 4, 2)), rtol=1e-10)
    features = value_of(a.outputs[-1]).mean(axis=1)
    logits = _ln(features) @ params["head.weight"] + params["head.bias"]
    np.testing.assert_allclose(value_of(b.logits), logits, rtol=1e-10)
    np.testing.assert_allclose(value_of(b.loss), _cross_entropy(logits, labels), rtol=1e-10)


# --- Ren's "DFA": a fixed random local classifier per hidden layer ----------------------------------
def test_random_local_classifier_is_each_layers_exact_gradient_of_its_own_classifier(tiny):
    """For an MLP without norms, hidden layer l's estimate is the exact gradient, through the layer
    alone (its input held fixed), of mean_n CE(relu(x_l W_l + b_l) C_l, y_n) for the rule's fixed C_l."""
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 5)
    rule = rules.create("dfa-local")
    rule.setup(model, params, seed=4)
    grads = rule(model, params, x, labels, np.random.default_rng(0)).grads
    exact, _ = exact_gradients(model, params, x, labels)
    np.testing.assert_allclose(grads["head.weight"], exact["head.weight"], rtol=1e-10)
    layer_input = x.reshape(len(x), -1)
    for k in model.blocks():
        weight, bias = f"blocks.{k}.linear.weight", f"blocks.{k}.linear.bias"
        classifier = rule.state[f"C.{k}.linear"]

        def local_loss(w, b, inputs=layer_input, classifier=classifier):
            from dualnet import primitives as P
            hidden = P.relu(inputs @ w + b)
            return P.mean(losses.cross_entropy(hidden @ classifier, labels, reduction="none"))
        _, pullback = autodiff.vjp(local_loss, params[weight], params[bias])
        expected = pullback(np.ones(()))
        np.testing.assert_allclose(grads[weight], expected[0], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(grads[bias], expected[1], rtol=1e-10, atol=1e-14)
        assert not np.allclose(grads[weight], exact[weight])  # not backprop (nor the output error's DFA)
        layer_input = np.maximum(layer_input @ params[weight] + params[bias], 0)


def test_random_local_classifier_averages_the_patches_of_a_mixer(tiny):
    """On [N, P, ...] layers the classifier reads the patch mean: every patch of an example gets the
    same cotangent, 1/P of the classifier's, so doubling the patch count with copies leaves it alone."""
    model = tiny.mixer()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 3)
    rule = rules.create("dfa-local")
    rule.setup(model, params, seed=1)
    trace = model.forward(params, x, labels)
    grads = rule(model, params, x, labels, np.random.default_rng(0)).grads
    point = trace.points[0]  # block 0's dense layer: [N, P, C], LN after it
    classifier = rule.state["C.0.dense"]
    features = point.post.mean(axis=1)
    logits = features @ classifier
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(3), labels] -= 1
    delta = np.broadcast_to(((p / 3) @ classifier.T)[:, None, :] / point.post.shape[1], point.post.shape)
    expected = Gradients(point.weight_grads(delta * point.mask))
    np.testing.assert_allclose(grads["blocks.0.dense.weight"], expected["blocks.0.dense.weight"], rtol=1e-12)
    assert set(rule.state) == {f"C.{pt.block}.{pt.name}" for pt in trace.points}


# --- FDFA: the authors' update order ---------------------------------------------------------------
def test_fdfa_after_uses_the_previous_feedback_and_then_learns_the_same(tiny):
    """update='after': this step's δ_l = (e B_l^{old}) ⊙ f′ (zero at the first step, B starts at 0),
    and B then learns from the same sample as update='before' does."""
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    before, after = rules.create("fdfa"), rules.create("fdfa", update="after")
    for rule in (before, after):
        rule.setup(model, params, 0)
    for step in range(2):
        old = {key: value.copy() for key, value in after.state.items()}
        got = after(model, params, x, labels, np.random.default_rng(step)).grads
        before(model, params, x, labels, np.random.default_rng(step))
        for key in before.state:
            np.testing.assert_allclose(after.state[key], before.state[key], rtol=1e-12, atol=1e-15)
        trace = model.forward(params, x, labels)
        error = rules.base.output_error(trace.logits, labels)
        for point in trace.points:
            feedback = old.get(f"B.{point.block}.{point.name}", np.zeros((3, point.h.shape[1])))
            expected = Gradients(point.weight_grads((error @ feedback).reshape(point.h.shape) * point.mask))
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-10, atol=1e-15)
        if step == 0:
            assert all(not np.any(got[name]) for name in got if not tiny.is_head(model, name))


# --- Fournier et al.: the last block on its exact gradient ----------------------------------------
def _batch_norm_model(name, tiny):
    """An MLP with BatchNorm and linear local heads, or a tiny ResNet-18 with CNN aux nets."""
    if name == "mlp":
        return tiny.mlp(batch_norm=True, local_heads=True)
    return models.create("resnet18", input_shape=(3, 8, 8), num_classes=3, width=2, aux="cnn", aux_width=2,
                         aux_depth=1)


@pytest.mark.parametrize("options", [{}, {"space": "weight"}, {"guess": "gaussian"}])
@pytest.mark.parametrize("model_name", ["mlp", "resnet18"])
def test_guess_last_block_exact_is_backprop_there_and_leaves_the_other_blocks(model_name, options, tiny):
    model = _batch_norm_model(model_name, tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    state = model.init_state(np.float64)
    exact, _ = exact_gradients(model, params, x, labels, "global", state)
    grads = {}
    for last_block in ("estimate", "exact"):
        rule = rules.create("guess", last_block=last_block, **options)
        rule.setup(model, params, 0)
        grads[last_block] = rule(model, params, x, labels, np.random.default_rng(5), state).grads
    last = model.num_blocks - 1
    estimated_differs = False
    for name in grads["exact"]:
        spec = model.specs[name]
        if spec.block == last and not spec.local_head:
            np.testing.assert_allclose(grads["exact"][name], exact[name], rtol=1e-9, atol=1e-12)
            estimated_differs |= not np.allclose(grads["estimate"][name], exact[name])
        else:
            np.testing.assert_array_equal(grads["exact"][name], grads["estimate"][name])
    assert estimated_differs


# --- Fournier et al.: which BatchNorms couple a block's output to its target ----------------------
def _reaches_other_examples(model, params, x, labels, k, plan_options):
    """Forward mode: a tangent on example 0's block-k output only; does any other example's target
    loss (the final loss, or block k's pooled local loss) get a non-zero tangent?"""
    def perturb(site):
        if site.kind != "output" or site.block != k:
            return None
        u = np.zeros(site.shape)
        u[0] = np.random.default_rng(0).standard_normal(site.shape[1:])
        return u
    trace = model.forward(params, x, labels, Plan(perturb=perturb, **plan_options))
    loss = trace.local_losses[k] if plan_options.get("local_losses") else trace.loss
    return bool(np.abs(loss.tangent[1:]).max() > 1e-12 * np.abs(loss.tangent[0]).max())


@pytest.mark.parametrize("model_name", ["mlp", "resnet18"])
def test_output_coupling_is_true_exactly_where_other_examples_losses_move(model_name, tiny):
    model = _batch_norm_model(model_name, tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    seen = set()
    for plan_options in ({}, {"local_losses": True, "greedy": True}):
        for k in model.blocks():
            coupled = model.couples_examples_after_output(k, Plan(**plan_options))
            assert coupled == _reaches_other_examples(model, params, x, labels, k, plan_options), (k, plan_options)
            seen.add(coupled)
    assert seen == {True, False}
    if model_name == "resnet18":  # the last block's output meets no BatchNorm on the way to the final loss
        last = model.num_blocks - 1
        assert not model.couples_examples_after_output(last, Plan()) and model.couples_examples_after(last, Plan())
        rule = rules.create("guess")
        rule.setup(model, params)
        assert rule._coupled == [True] * last + [False]


# --- Fournier et al.: weight-space projection per block or per module ------------------------------
@pytest.mark.parametrize("weight_unit", ["block", "module"])
@pytest.mark.parametrize("model_name", ["mlp", "resnet18"])
def test_weight_space_projection_per_unit_equals_the_formula(model_name, weight_unit, tiny):
    """For each unit u (a block, or a module: a conv / linear map with its bias, a norm's scale and
    shift), ĝ_t = D_u / (‖G_u‖² + ε) · G_t for its tensors t, with D_u = Σ_{t∈u} ⟨∇_t L, G_t⟩ from
    backprop and G the rule's local guess (deterministic given the parameters)."""
    model = _batch_norm_model(model_name, tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    state = model.init_state(np.float64)
    rule = rules.create("guess", space="weight", weight_unit=weight_unit)
    rule.setup(model, params, 0)
    grads = rule(model, params, x, labels, np.random.default_rng(0), state).grads
    primal = model.forward(params, x, labels, Plan(record_points=False), state)
    guesses = rule._weight_guesses(model, params, labels, np.random.default_rng(0), state,
                                   rule._block_values(model, x, primal), Batch.whole(len(labels)))
    exact, _ = exact_gradients(model, params, x, labels, "global", state)
    units = {}
    for k, guess in guesses.items():
        for name in guess:
            key = k if weight_unit == "block" else (k, model.specs[name].module)
            units.setdefault(key, []).append(name)
    assert (len(units) > model.num_blocks) == (weight_unit == "module")
    for names in units.values():
        derivative = sum(float((exact[t] * guesses_of(guesses, t)).sum()) for t in names)
        squared = sum(float((guesses_of(guesses, t) ** 2).sum()) for t in names)
        for t in names:
            expected = derivative / (squared + rule.eps) * guesses_of(guesses, t)
            np.testing.assert_allclose(grads[t], expected, rtol=1e-7, atol=1e-12 * np.abs(expected).max())


def guesses_of(guesses, name):
    return next(guess[name] for guess in guesses.values() if name in guess)


def test_normalised_random_guesses_are_the_authors_biased_projection(tiny, monte_carlo):
    """normalise_random=True: ĝ = ⟨T, u⟩ u / ‖u‖², whose mean is T/d (d numbers in the unit), not T."""
    model = tiny.mlp(batch_norm=True, local_heads=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    state = model.init_state(np.float64)
    exact, _ = exact_gradients(model, params, x, labels, "global", state)
    rule = rules.create("guess", guess="gaussian", space="weight", weight_unit="module", normalise_random=True)
    rule.setup(model, params, 0)
    samples = monte_carlo.samples(rule, model, params, x, labels, 400, state)
    for k in model.blocks():
        modules = {}
        for name in model.parameters_of(k, local_head=False):
            modules.setdefault(model.specs[name].module, []).append(name)
        for names in modules.values():
            d = sum(int(np.prod(model.specs[t].shape)) for t in names)
            for call in range(3):  # every sample is a projection onto its guess: ⟨ĝ, T⟩ = ‖ĝ‖²
                along = sum(float((samples[t][call] * exact[t]).sum()) for t in names)
                squared = sum(float((samples[t][call] ** 2).sum()) for t in names)
                assert np.isclose(along, squared, rtol=1e-6, atol=1e-15), (names, along, squared)
            target = {t: exact[t] / d for t in names}
            floor = 1e-9 * max(float(np.abs(g).max()) for g in exact.values())
            t_stats = monte_carlo.t_statistics({t: samples[t] for t in names}, target, floor)
            assert max(t_stats.values()) < T_MAX, (names, t_stats)


@pytest.mark.parametrize("options, message", [({"weight_unit": "layer"}, "weight_unit='layer'"),
                                              ({"weight_unit": "module"}, "space='weight'"),
                                              ({"last_block": "frozen"}, "last_block='frozen'")])
def test_bad_guess_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        rules.create("guess", **options)


@pytest.mark.parametrize("model_name", ["mlp", "localmixer", "resnet18", "cnn-fdfa", "cnn-baydin"])
def test_every_backbone_tensor_declares_its_module_within_one_block(model_name):
    model = models.create(model_name, **({"input_shape": (3, 32, 32)} if model_name == "resnet18" else {}))
    blocks = {}
    for name, spec in model.specs.items():
        assert spec.module is not None, name
        blocks.setdefault(spec.module, set()).add((spec.block, spec.local_head))
    assert all(len(where) == 1 for where in blocks.values()), blocks
