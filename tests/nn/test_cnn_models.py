"""The CNNs (cnn-fdfa, cnn-baydin) and ResNet-18 with its aux heads: parameter counts, shapes,
option validation, forward vs reverse mode on the whole objective, the hidden layers' points,
BatchNorm train/eval, and one step of every rule family."""
import numpy as np
import pytest

import dualnet as dn
from dualnet import cli, models, rules
from dualnet.gradients import Gradients
from dualnet.nn.conv import conv2d
from dualnet.nn.plan import Plan
from dualnet.rules.base import PLANS, exact_gradients, local_head_grads, objective

RESNETS = [dict(blocks=b, aux=a) for b in (8, 16) for a in ("linear", "mlp", "cnn")]


def tiny(name, **options):
    if name == "cnn-fdfa":
        options = dict(input_shape=(1, 12, 12), channels=(3, 4), hidden=6, **options)
    elif name == "cnn-baydin":
        options = dict(input_shape=(2, 8, 8), channels=3, hidden=6, **options)
    else:
        options = dict(input_shape=(3, 8, 8), width=2, **options)
    return models.create(name, num_classes=3, **options)


def jittered(model, seed=0):
    """float64 parameters off the ReLU kinks (zero biases) and with distinct read-out rows."""
    rng = np.random.default_rng(seed + 100)
    return {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in model.init(seed, dtype=np.float64).items()}


def batch(model, n=4, seed=0):
    rng = np.random.default_rng(seed + 200)
    return rng.standard_normal((n,) + model.input_shape), rng.integers(0, model.num_classes, n)


TINY = [("cnn-fdfa", dict(local_heads=True)), ("cnn-baydin", dict(batch_norm=True, local_heads=True))] + [
    ("resnet18", options) for options in RESNETS]
IDS = [f"{name}-{'-'.join(map(str, o.values()))}" for name, o in TINY]


# ---------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------
def test_parameter_counts_at_the_papers_sizes():
    conv = lambda c_in, c_out, k, bias=True: c_out * c_in * k * k + c_out * bias
    bn = lambda c: 2 * c
    fdfa = (conv(1, 15, 5) + bn(15) + conv(15, 40, 5) + bn(40) + 40 * 10 * 10 * 128 + 128 + bn(128)
            + 128 * 10 + 10)  # 28 → 24 → 20 → pool → 10
    assert models.create("cnn-fdfa").num_params() == fdfa
    baydin = conv(1, 64, 3) + 3 * conv(64, 64, 3) + 64 * 7 * 7 * 1024 + 1024 + 1024 * 10 + 10  # 28 → 14 → 7
    assert models.create("cnn-baydin").num_params() == baydin
    resnet = models.create("resnet18", aux="linear")
    backbone = sum(int(np.prod(s.shape)) for n, s in resnet.specs.items() if not resnet.is_local_head(n))
    assert backbone == 11_173_962  # the CIFAR ResNet-18 (3×3 stem, no max-pool), read-out included
    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    assert resnet.num_params() - backbone == sum(bn(c) + 4 * c * 10 + 10 for c in widths)  # linear aux heads


@pytest.mark.parametrize("name, options", TINY, ids=IDS)
def test_output_shapes_and_points(name, options):
    model = tiny(name, **options)
    params = model.init(0, dtype=np.float64)
    x, y = batch(model)
    state = model.init_state(np.float64)
    pooled, replicated = (model.forward(params, x, y, Plan(local_losses=True, replicated=r), state) for r in (0, 1))
    for trace, shape in ((pooled, (4,)), (replicated, (4, 1, 1))):
        assert trace.logits.shape == (4, 3) and trace.loss.shape == (4,)
        assert len(trace.outputs) == len(trace.local_losses) == model.num_blocks
        assert all(loss.shape == shape for loss in trace.local_losses)
    for one, whole in zip(pooled.local_losses, replicated.local_losses):  # one replica per example
        np.testing.assert_allclose(whole[:, 0, 0], one, rtol=1e-12)
    trace = pooled
    hidden = [n for n in model.specs if n.endswith(".weight") and not model.is_local_head(n) and n != "head.weight"]
    assert sorted(f"blocks.{p.block}.{p.name}.weight" for p in trace.points) == sorted(hidden)  # each layer once
    for point in trace.points:
        assert point.mask.shape == point.h.shape == point.post.shape and point.h.shape[0] == 4
    assert trace.readout_input.shape == (4, model.specs["head.weight"].shape[0])


@pytest.mark.parametrize("blocks, shapes", [
    (8, [(2, 8, 8)] * 2 + [(4, 4, 4)] * 2 + [(8, 2, 2)] * 2 + [(16, 1, 1)] * 2),
    (16, [(2, 8, 8)] * 4 + [(4, 4, 4)] * 4 + [(8, 2, 2)] * 4 + [(16, 1, 1)] * 4),
])
def test_resnet_block_outputs_halve_the_image_at_each_stage(blocks, shapes):
    model = tiny("resnet18", blocks=blocks)
    x, y = batch(model, n=2)
    trace = model.forward(model.init(0, dtype=np.float64), x, y)
    assert [o.shape[1:] for o in trace.outputs] == shapes
    skips = {p.block for p in trace.points if p.name == "shortcut"}
    assert skips == ({2, 4, 6} if blocks == 8 else set())


def test_resnet_skip_connection_is_added_before_the_last_relu(rng):
    """Block 1 of the 8-block ResNet: out = relu(h₂ + block input), h₂ its conv2's 'pre' value."""
    model = tiny("resnet18", blocks=8, aux="linear")
    x, y = batch(model, n=2)
    trace = model.forward(model.init(0, dtype=np.float64), x, y)
    conv2 = [p for p in trace.points if p.block == 1 and p.name == "conv2"][0]
    np.testing.assert_allclose(trace.outputs[1], np.maximum(conv2.h + trace.outputs[0], 0), rtol=1e-12)
    no_skip = tiny("resnet18", blocks=16, aux="linear")
    trace = no_skip.forward(no_skip.init(0, dtype=np.float64), x, y)
    np.testing.assert_allclose(trace.outputs[1], np.maximum(trace.points[2].h, 0), rtol=1e-12)


@pytest.mark.parametrize("name, options, message", [
    ("resnet18", dict(blocks=12), "blocks=12; allowed: 8 .* or 16"),
    ("resnet18", dict(aux="rnn"), "aux='rnn' is unknown; allowed: linear, mlp, cnn"),
    ("resnet18", dict(width=0), "width=0 must be a positive int"),
    ("resnet18", dict(aux="linear", aux_width=8), "aux_width=8 does not apply to aux='linear'"),
    ("resnet18", dict(aux="mlp", aux_depth=0), "aux_depth=0 must be a positive int"),
    ("resnet18", dict(input_shape=(32, 32)), r"input_shape=\(32, 32\) must be \(channels, height, width\)"),
    ("cnn-fdfa", dict(input_shape=(1, 9, 9)), r"input_shape=\(1, 9, 9\) is too small .* at least 10x10"),
    ("cnn-baydin", dict(input_shape=(1, 3, 8)), r"input_shape=\(1, 3, 8\) is too small .* at least 4x4"),
    ("cnn-fdfa", dict(channels=(15,)), r"channels=\(15,\) and hidden=128; allowed: two positive conv widths"),
    ("cnn-fdfa", dict(channels=15), r"channels=15 and hidden=128; allowed: two positive conv widths"),
    ("cnn-baydin", dict(hidden=0), "hidden=0 must be positive"),
])
def test_invalid_options_name_the_option_value_and_what_is_allowed(name, options, message):
    with pytest.raises(ValueError, match=message):
        models.create(name, **options)


def test_resnet_local_losses_are_aux_net_classifiers_only():
    model = tiny("resnet18", aux="mlp")
    params = model.init(0, dtype=np.float64)
    x, y = batch(model)
    with pytest.raises(ValueError, match="contrastive .* need linear projection heads"):
        model.forward(params, np.concatenate([x, x]), y, Plan(contrastive=True, local_losses=True))
    with pytest.raises(ValueError, match="no replica grid"):
        model.replica_grid(x)


def test_cli_lists_and_describes_the_new_models(capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("cnn-fdfa", "cnn-baydin", "resnet18"))
    assert cli.main(["info", "--model", "resnet18", "--blocks", "16", "--aux", "linear", "--model-opt", "width=2",
                     "--input-shape", "3,8,8"]) == 0
    out = capsys.readouterr().out
    count = models.create("resnet18", blocks=16, aux="linear", width=2, input_shape=(3, 8, 8)).num_params()
    assert "block 15" in out and f"total: {count:,}" in out


# ---------------------------------------------------------------------------------------
# derivatives of the whole model
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", TINY, ids=IDS)
@pytest.mark.parametrize("target", ["global", "local-greedy"])
def test_forward_mode_equals_reverse_mode_on_the_objective(name, options, target, rng):
    """⟨∇L, v⟩ from one reverse pass equals the JVP (and, globally, central differences)."""
    model = tiny(name, **options)
    params = jittered(model)
    x, y = batch(model)
    state = model.init_state(np.float64)
    loss = lambda p: objective(model.forward(p, x, y, Plan(**PLANS[target]), state))
    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    _, tangent = dn.jvp(loss, (params,), (direction,))
    (grads,) = dn.vjp(loss, params)[1](np.ones(()))
    assert np.isclose(sum(float((grads[k] * direction[k]).sum()) for k in params), float(tangent), rtol=1e-10)
    if target == "global":  # stop-gradients make the local objectives' derivatives differ from their FD
        eps = 1e-6
        shifted = lambda s: float(loss({k: v + s * direction[k] for k, v in params.items()}))
        finite = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert abs(float(tangent) - finite) <= 1e-5 * max(1.0, abs(finite))


def test_k_directions_equal_single_passes(rng):
    model = tiny("resnet18", blocks=8, aux="cnn")
    params = jittered(model)
    x, y = batch(model)
    loss = lambda p: objective(model.forward(p, x, y, Plan(local_losses=True)))
    directions = {k: rng.standard_normal((3,) + v.shape) for k, v in params.items()}
    _, together = dn.jvp(loss, (params,), (directions,))
    for i in range(3):
        _, single = dn.jvp(loss, (params,), ({k: v[i] for k, v in directions.items()},))
        np.testing.assert_allclose(together[i], single, rtol=1e-11)


@pytest.mark.parametrize("name, options", [("cnn-fdfa", {}), ("resnet18", dict(blocks=8, aux="linear")),
                                           ("resnet18", dict(blocks=16, aux="cnn"))])
def test_points_turn_the_site_gradient_into_the_exact_parameter_gradient(name, options):
    """For every hidden layer: the exact ∂L/∂h at its 'pre' site (forward mode, one basis
    direction per unit) vanishes where ``mask`` is 0, and ``weight_grads`` turns it into exactly
    backprop's gradient of the layer's parameters (BatchNorm pulled back; the 1×1 shortcut too)."""
    model = tiny(name, **options)
    params = jittered(model)
    x, y = batch(model, n=2)
    state = model.init_state(np.float64)
    exact, trace = exact_gradients(model, params, x, y, "global", state)
    covered = set()
    for point in trace.points:
        size = point.h.size
        basis = np.eye(size).reshape((size,) + point.h.shape)
        site = lambda s, p=point: basis if (s.block, s.name, s.kind) == (p.block, p.name, "pre") else None
        d = model.forward(params, x, y, Plan(perturb=site), state).loss.tangent  # [size, N]
        site_grad = d.mean(axis=1).reshape(point.h.shape)
        np.testing.assert_array_equal(site_grad[~point.mask], 0)
        for param, g in Gradients(point.weight_grads(site_grad)).items():
            np.testing.assert_allclose(g, exact[param], rtol=1e-9, atol=1e-12)
            covered.add(param)
    assert covered == {n for n in params if model.block_of(n) != "head" and not model.is_local_head(n)}


def test_points_handed_on_one_by_one_equal_the_recorded_ones():
    """``Plan.on_point`` (FG-A's memory='recompute') sees the same layers and masks — the
    shortcut's, that of the sum it feeds, included — as a recording pass."""
    model = tiny("resnet18", blocks=8, aux="linear")
    params = jittered(model)
    x, y = batch(model)
    recorded = model.forward(params, x, y, Plan(), model.init_state(np.float64)).points
    handed = []
    model.forward(params, x, y, Plan(record_points=False, on_point=handed.append), model.init_state(np.float64))
    assert [(p.block, p.name) for p in handed] == [(p.block, p.name) for p in recorded]
    for a, b in zip(handed, recorded):
        np.testing.assert_array_equal(a.mask, b.mask)
    shortcut, conv2 = [p for p in recorded if p.block == 2 and p.name in ("shortcut", "conv2")]
    assert shortcut.mask is conv2.mask and not np.array_equal(shortcut.mask, shortcut.h > 0)


# ---------------------------------------------------------------------------------------
# BatchNorm and the aux heads
# ---------------------------------------------------------------------------------------
def test_batch_norm_train_updates_running_statistics_and_eval_uses_them():
    model = tiny("resnet18", blocks=8, aux="mlp")
    params = jittered(model)
    x, y = batch(model, n=6)
    state = model.init_state(np.float64)
    assert {"blocks.0.stem.bn", "blocks.2.shortcut.bn", "blocks.3.head.fc1.bn"} <= set(state)
    trained = model.forward(params, x, y, Plan(local_losses=True), state)
    stem = trained.points[0]
    gamma, beta = params["blocks.0.stem.bn.gamma"], params["blocks.0.stem.bn.beta"]
    normalised = (stem.h - beta[:, None, None]) / gamma[:, None, None]
    np.testing.assert_allclose(normalised.mean(axis=(0, 2, 3)), 0, atol=1e-10)  # per channel over N, H, W
    np.testing.assert_allclose(normalised.var(axis=(0, 2, 3)), 1, rtol=1e-3)
    z = conv2d(x, params["blocks.0.stem.weight"], None, 1, 1)
    mean, var = trained.state["blocks.0.stem.bn"]
    np.testing.assert_allclose(mean, 0.1 * z.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(var, 0.9 + 0.1 * z.var(axis=(0, 2, 3), ddof=1), rtol=1e-10)
    for key in ("blocks.3.head.fc0.bn", "blocks.7.head.fc1.bn"):  # the aux heads' statistics moved too
        assert not np.allclose(trained.state[key][0], 0)
    # evaluation: running statistics, so an example's logits do not depend on the rest of the batch
    evaluate = lambda rows, train: model.forward(params, x[rows], y[rows], Plan(train=train, local_losses=True),
                                                 trained.state)
    whole, part = evaluate(slice(None), False), evaluate(slice(0, 2), False)
    np.testing.assert_allclose(whole.logits[:2], part.logits, rtol=1e-12)
    np.testing.assert_allclose(whole.local_losses[3][:2], part.local_losses[3], rtol=1e-12)
    assert not np.allclose(evaluate(slice(None), True).logits[:2], evaluate(slice(0, 2), True).logits)
    assert whole.state["blocks.3.head.fc0.bn"] is trained.state["blocks.3.head.fc0.bn"]  # eval: unchanged


@pytest.mark.parametrize("aux", ["linear", "mlp", "cnn"])
def test_local_head_grads_cover_every_aux_parameter_exactly(aux):
    """Heads always backprop: the aux nets' gradients equal LG-BP's, parameter by parameter."""
    model = tiny("resnet18", blocks=8, aux=aux)
    params = jittered(model)
    x, y = batch(model)
    state = model.init_state(np.float64)
    exact, trace = exact_gradients(model, params, x, y, "local-greedy", state)
    heads = local_head_grads(model, params, trace, y)
    assert set(heads) == {n for n in params if model.is_local_head(n)}
    for name, g in heads.items():
        np.testing.assert_allclose(g, exact[name], rtol=1e-10, atol=1e-14)
    for k in range(model.num_blocks):  # every head learns (single units may sit dead behind a ReLU)
        assert sum(np.abs(g).sum() for name, g in heads.items() if model.block_of(name) == k) > 0


# ---------------------------------------------------------------------------------------
# the rules run on the CNNs
# ---------------------------------------------------------------------------------------
RULES = ["bp", "lg-bp", "fa", "fg-a", "lg-fg-a", "dfa", "fdfa", "fg-w"]
LOCAL = {"lg-bp", "lg-fg-a"}


@pytest.mark.parametrize("name, options", [("cnn-fdfa", dict(local_heads=True))] + [("resnet18", o) for o in RESNETS],
                         ids=["cnn-fdfa"] + [f"resnet18-{o['blocks']}-{o['aux']}" for o in RESNETS])
def test_every_rule_takes_a_finite_step(name, options):
    """Each rule returns a finite gradient for every parameter of its objective (the aux heads
    belong to the local objectives only)."""
    model = tiny(name, **options)
    params = model.init(0)
    x, y = batch(model)
    x = x.astype(np.float32)
    for rule_name in RULES:
        rule = rules.create(rule_name)
        rule.setup(model, params)
        estimate = rule(model, params, x, y, np.random.default_rng(0), model.init_state())
        expected = {n for n in params if rule_name in LOCAL or not model.is_local_head(n)}
        assert expected <= set(estimate.grads), (rule_name, sorted(expected - set(estimate.grads)))
        for param, g in estimate.grads.items():
            assert g.shape == params[param].shape and np.all(np.isfinite(g)), (rule_name, param)
        assert np.isfinite(estimate.loss) and set(estimate.state) == set(model.init_state())
