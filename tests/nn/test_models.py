"""MLP and LocalMixer: parameter counts, shapes, the plan's semantics, derivatives of the whole model."""
import numpy as np
import pytest

import dualnet as dn
from dualnet import models
from dualnet.nn.plan import Plan
from dualnet.rules.base import objective


@pytest.mark.parametrize("config, input_shape, count", [
    ("S/1/1", (1, 28, 28), 271_892),
    ("M/1/16", (1, 28, 28), 429_076),
    ("M/8/16", (3, 32, 32), 918_770),
    ("L/8/64", (3, 32, 32), 13_074_674),
])
def test_localmixer_parameter_counts_match_the_paper(config, input_shape, count):
    model = models.create("localmixer", config=config, input_shape=input_shape, num_classes=10)
    assert model.num_params() == count


def test_mlp_parameter_count_fdfa_four_layers():
    # 784-800-800-800-10 without BatchNorm: 3 hidden layers + output ("4 layers", ~1.9M on MNIST)
    model = models.create("mlp", layers=4, hidden=800, batch_norm=False)
    assert model.num_params() == 784 * 800 + 800 + 2 * (800 * 800 + 800) + 800 * 10 + 10


@pytest.mark.parametrize("options, message", [
    (dict(config="M/1/16", channels=100), "channels=100 is not divisible by groups=16"),
    (dict(config="M/8/16", input_shape=(1, 28, 30)), "patches=8 does not divide"),
    (dict(config="X/1/1"), "config='X/1/1' is unknown"),
])
def test_invalid_localmixer_configurations_name_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        models.create("localmixer", **options)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean localmixer"):
        models.create("localmixr")


def small_mixer():
    return models.create("localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2,
                         patches=2, channels=8, groups=2)


def small_mlp(batch_norm=True):
    return models.create("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=6, layers=3,
                         batch_norm=batch_norm, local_heads=True)


def batch(rng, model, n=5):
    x = rng.standard_normal((n,) + model.input_shape)
    return x, rng.integers(0, model.num_classes, n)


@pytest.mark.parametrize("make", [small_mixer, small_mlp])
def test_output_shapes_and_points(make, rng):
    model = make()
    params = model.init(0, dtype=np.float64)
    x, y = batch(rng, model)
    trace = model.forward(params, x, y, Plan(local_losses=True, replicated=True))
    assert trace.logits.shape == (5, 3) and trace.loss.shape == (5,)
    assert len(trace.outputs) == model.num_blocks == len(trace.local_losses)
    for point in trace.points:
        assert point.mask.shape == point.h.shape and point.h.shape[0] == 5
    if isinstance(model, models.LocalMixer):
        assert trace.local_losses[0].shape == (5, 4, 2)  # [N, P, G] replicas
        # every replica of an example carries the pooled loss value
        assert np.allclose(trace.local_losses[1], trace.local_losses[1][:, :1, :1])


@pytest.mark.parametrize("make", [small_mixer, lambda: small_mlp(batch_norm=True)])
@pytest.mark.parametrize("target", ["global", "local", "local-greedy"])
def test_model_jvp_matches_finite_differences_and_vjp(make, target, rng):
    """Forward mode through the whole model = central differences; reverse = forward (dot product)."""
    from dualnet.rules.base import PLANS
    model = make()
    # jitter the initialisation: zero biases and the zero read-out can put ReLU inputs exactly on
    # the kink, where central differences only converge linearly
    params = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in model.init(1, dtype=np.float64).items()}
    x, y = batch(rng, model)
    plan = Plan(**PLANS[target])

    def loss(p):
        return objective(model.forward(p, x, y, plan))

    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    _, tangent = dn.jvp(loss, (params,), (direction,))
    if target == "global":  # stop-gradients make the local objectives' "gradients" differ from their FD
        eps = 1e-6
        shifted = lambda s: float(loss({k: v + s * direction[k] for k, v in params.items()}))
        finite = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert abs(float(tangent) - finite) <= 1e-6 * max(1.0, abs(finite))  # O(eps²) truncation, float64
    _, pullback = dn.vjp(loss, params)
    (grads,) = pullback(np.ones(()))
    assert np.isclose(sum(float((grads[k] * direction[k]).sum()) for k in params), float(tangent), rtol=1e-10)


def test_k_directions_equal_single_passes(rng):
    model = small_mixer()
    params = model.init(2, dtype=np.float64)
    x, y = batch(rng, model)
    loss = lambda p: model.forward(p, x, y).loss
    directions = {k: rng.standard_normal((3,) + v.shape) for k, v in params.items()}
    _, batched = dn.jvp(loss, (params,), (directions,))
    for i in range(3):
        _, single = dn.jvp(loss, (params,), ({k: v[i] for k, v in directions.items()},))
        np.testing.assert_allclose(batched[i], single, rtol=1e-12, atol=1e-14)


def test_greedy_plan_stops_tangents_between_blocks(rng):
    model = small_mixer()
    params = model.init(3, dtype=np.float64)
    x, y = batch(rng, model)
    tangents = {k: (rng.standard_normal(v.shape) if k.startswith("blocks.0.") and ".head." not in k else None)
                for k, v in params.items()}
    duals = {k: dn.Dual(v, tangents[k]) for k, v in params.items()}
    trace = model.forward(duals, x, y, Plan(greedy=True, local_losses=True, replicated=True,
                                            readout_stop_gradient=True))
    assert trace.local_losses[0].tangent is not None
    assert trace.local_losses[1].tangent is None and trace.loss.tangent is None  # symbolic zeros


def test_batch_norm_train_uses_batch_statistics_and_eval_running_averages(rng):
    model = small_mlp(batch_norm=True)
    params = model.init(4, dtype=np.float64)
    x, y = batch(rng, model, n=16)
    state = model.init_state(np.float64)
    trained = model.forward(params, x, y, Plan(train=True), state)
    # evaluation with fresh running averages (mean 0, var 1) is a plain affine map: differs from training
    evaluated = model.forward(params, x, y, Plan(train=False), state)
    assert not np.allclose(trained.logits, evaluated.logits)
    # running averages moved toward the batch statistics (momentum 0.1)
    mean, var = trained.state["blocks.0.bn"]
    z = x.reshape(16, -1) @ params["blocks.0.linear.weight"] + params["blocks.0.linear.bias"]
    np.testing.assert_allclose(mean, 0.1 * z.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(var, 0.9 + 0.1 * z.var(axis=0, ddof=1), rtol=1e-10)
    # in training mode each hidden unit is normalised over the batch
    point = trained.points[0]
    gamma, beta = params["blocks.0.bn.gamma"], params["blocks.0.bn.beta"]
    normalised = (point.h - beta) / gamma
    np.testing.assert_allclose(normalised.mean(axis=0), 0, atol=1e-10)
