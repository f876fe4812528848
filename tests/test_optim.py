"""Optimisers and schedules: hand-computed updates, schedule values, groups, exact resume, convergence."""
import math
import pickle

import numpy as np
import pytest

from dualnet import optim
from dualnet.gradients import Gradients, Outer


def _params(rng, dtype=np.float64):
    return {"layer.w": rng.standard_normal((3, 4)).astype(dtype), "layer.b": rng.standard_normal(4).astype(dtype),
            "head.w": rng.standard_normal((4, 2)).astype(dtype)}


def _grads(rng, params):
    return {name: rng.standard_normal(value.shape).astype(value.dtype) for name, value in params.items()}


def _copy(tree):
    return {name: value.copy() for name, value in tree.items()}


def test_plain_sgd_is_param_minus_lr_grad(rng):
    params = _params(rng)
    before, grads = _copy(params), _grads(rng, params)
    returned = optim.SGD(lr=0.1).step(params, grads)
    assert returned is params
    for name in params:
        np.testing.assert_array_equal(params[name], before[name] - 0.1 * grads[name])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_weight_decay_match_hand_computation(rng, nesterov):
    lr, mu, wd = 0.05, 0.9, 1e-2
    params = {"w": rng.standard_normal(5)}
    opt = optim.SGD(lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    w, buffer = params["w"].copy(), np.zeros(5)
    for _ in range(4):
        grad = rng.standard_normal(5)
        opt.step(params, {"w": grad})
        g = grad + wd * w
        buffer = mu * buffer + g
        w = w - lr * (g + mu * buffer if nesterov else buffer)
        np.testing.assert_allclose(params["w"], w, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_textbook_formula(rng, decoupled):
    lr, b1, b2, eps, wd = 1e-2, 0.8, 0.95, 1e-8, 0.1
    params = {"w": rng.standard_normal(6)}
    opt = optim.Adam(lr, betas=(b1, b2), eps=eps, weight_decay=wd, decoupled=decoupled)
    w, m, v = params["w"].copy(), np.zeros(6), np.zeros(6)
    for t in range(1, 6):
        grad = rng.standard_normal(6)
        opt.step(params, {"w": grad})
        g = grad if decoupled else grad + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        if decoupled:
            w = w * (1 - lr * wd)
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(params["w"], w, rtol=1e-12, atol=1e-14)


def test_adam_first_step_moves_each_coordinate_by_lr(rng):
    """Bias correction: after one step m_hat = g, sqrt(v_hat) = |g|, so delta = -lr g / (|g| + eps)."""
    params = {"w": np.zeros(100)}
    grad = rng.standard_normal(100) * 10.0 ** rng.integers(-6, 3, 100)
    optim.Adam(lr=0.01).step(params, {"w": grad})
    np.testing.assert_allclose(params["w"], -0.01 * grad / (np.abs(grad) + 1e-8), rtol=1e-12)
    assert np.abs(params["w"]).max() == pytest.approx(0.01, rel=1e-6)  # scale-free: large |g| moves by lr


def test_lars_trust_ratio_and_exclusion_of_1d(rng):
    lr, mu, eta, wd = 0.5, 0.9, 0.01, 1e-3
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    opt = optim.LARS(lr, momentum=mu, eta=eta, weight_decay=wd)
    w, b, buffer_w, buffer_b = params["w"].copy(), params["b"].copy(), 0.0, 0.0
    for _ in range(3):
        grads = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
        opt.step(params, grads)
        g = grads["w"] + wd * w
        trust = eta * np.linalg.norm(w) / np.linalg.norm(g)
        buffer_w = mu * buffer_w + lr * trust * g
        w = w - buffer_w
        buffer_b = mu * buffer_b + lr * grads["b"]  # 1-D: no decay, no trust scaling
        b = b - buffer_b
        np.testing.assert_allclose(params["w"], w, rtol=1e-13)
        np.testing.assert_allclose(params["b"], b, rtol=1e-13)


def test_lars_zero_weights_use_trust_one():
    params = {"w": np.zeros((2, 2))}
    optim.LARS(0.1, momentum=0.0).step(params, {"w": np.ones((2, 2))})
    np.testing.assert_array_equal(params["w"], -0.1 * np.ones((2, 2)))


def test_schedule_values_at_known_steps():
    assert [optim.Constant()(s) for s in (0, 10 ** 6)] == [1.0, 1.0]
    linear = optim.LinearDecay(total_steps=100)
    assert [linear(s) for s in (0, 25, 100, 150)] == [1.0, 0.75, 0.0, 0.0]
    assert optim.LinearDecay(10, final=0.1)(5) == pytest.approx(0.55, abs=1e-15)
    staircase = optim.StepDecay(gamma=0.2, every=30)
    assert [staircase(s) for s in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.2, 0.2, 0.04], rel=1e-15)
    assert optim.ExponentialDecay(rate=0.01)(100) == pytest.approx(math.exp(-1.0), rel=1e-15)
    cosine = optim.WarmupCosine(total_steps=110, warmup_steps=10)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0], rel=1e-15)
    assert [cosine(s) for s in (10, 60, 110, 500)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-15)
    assert optim.WarmupCosine(100, final=0.2)(50) == pytest.approx(0.6, rel=1e-14)


def test_make_schedule_from_name_dict_callable():
    assert optim.make_schedule("step", gamma=0.5, every=2)(4) == 0.25
    assert optim.make_schedule({"name": "linear", "total_steps": 4})(1) == 0.75
    assert optim.make_schedule(None)(7) == 1.0
    custom = lambda step: 0.5  # noqa: E731
    assert optim.make_schedule(custom) is custom
    expected = "unknown schedule 'poly'; valid: constant, linear, step, exponential, warmup_cosine"
    with pytest.raises(ValueError, match=expected):
        optim.make_schedule("poly")


def test_schedule_scales_the_step(rng):
    params = {"w": np.zeros(2)}
    opt = optim.SGD(1.0, schedule=optim.StepDecay(0.1, every=1))
    for _ in range(3):
        opt.step(params, {"w": np.ones(2)})
    np.testing.assert_allclose(params["w"], -(1 + 0.1 + 0.01) * np.ones(2), rtol=1e-15)
    assert opt.learning_rate() == pytest.approx(1e-3, rel=1e-12)


def test_group_multipliers_prefix_glob_longest_wins(rng):
    params = {"block.w": np.zeros(2), "block.head.w": np.zeros(2), "head.w": np.zeros(2), "x.bias": np.zeros(2)}
    groups = {"block": 2.0, "block.head": 10.0, "*.bias": {"lr": 0.5}, "head": {"weight_decay": 1.0}}
    opt = optim.SGD(0.1, groups=groups, weight_decay=0.0)
    params["head.w"] += 1.0
    opt.step(params, {name: np.ones(2) for name in params})
    np.testing.assert_allclose(params["block.w"], -0.2)
    np.testing.assert_allclose(params["block.head.w"], -1.0)
    np.testing.assert_allclose(params["x.bias"], -0.05)
    np.testing.assert_allclose(params["head.w"], 1.0 - 0.1 * (1.0 + 1.0 * 1.0))  # lr 0.1, own weight decay 1
    assert opt.learning_rate("block.head.w") == pytest.approx(1.0) and opt.learning_rate("other") == 0.1
    with pytest.raises(ValueError, match=r"group 'head': unknown option\(s\) \['momentum'\]"):
        optim.SGD(0.1, groups={"head": {"momentum": 0.5}})


def test_missing_gradient_means_no_update_and_no_state(rng):
    params = _params(rng)
    before = _copy(params)
    opt = optim.Adam(0.1)
    opt.step(params, {"layer.w": np.ones((3, 4)), "head.w": None})
    np.testing.assert_array_equal(params["layer.b"], before["layer.b"])
    np.testing.assert_array_equal(params["head.w"], before["head.w"])
    assert set(opt.state) == {"layer.w"}


def test_bad_gradients_are_reported(rng):
    params = _params(rng)
    with pytest.raises(KeyError, match=r"unknown parameters \['layer.v'\]"):
        optim.SGD(0.1).step(params, {"layer.v": np.ones(3)})
    with pytest.raises(ValueError, match=r"gradient of 'layer.b' has shape \(3,\), parameter has \(4,\)"):
        optim.SGD(0.1).step(params, {"layer.b": np.ones(3)})


def _trajectory(opt, params, grad_stream):
    for grads in grad_stream:
        opt.step(params, grads)
    return params


@pytest.mark.parametrize("name, options", [
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("adam", dict(lr=1e-3, weight_decay=1e-2, decoupled=True)),
    ("lars", dict(lr=0.5, momentum=0.9, weight_decay=1e-4)),
])
def test_state_round_trip_resumes_bit_identically(rng, name, options):
    options = dict(options, schedule=optim.WarmupCosine(10, warmup_steps=3), groups={"head": 10.0})
    start = _params(rng, np.float32)
    stream = [_grads(rng, start) for _ in range(10)]
    straight = _trajectory(optim.create(name, **options), _copy(start), stream)

    first = optim.create(name, **options)
    params = _trajectory(first, _copy(start), stream[:4])
    saved = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint file would hold it
    if name == "adam":  # an npz checkpoint hands numbers back as 0-d arrays
        saved["step_count"] = np.asarray(saved["step_count"])
        saved["state"] = {key: {k: np.asarray(v) for k, v in tensor.items()} for key, tensor in saved["state"].items()}
    resumed = optim.create(name, **options)
    resumed.load_state_dict(saved)
    _trajectory(resumed, params, stream[4:])
    for key in start:
        np.testing.assert_array_equal(params[key], straight[key])
        assert params[key].dtype == np.float32


def test_state_dict_holds_plain_numpy_and_numbers(rng):
    opt = optim.Adam(0.01)
    params = _params(rng)
    opt.step(params, _grads(rng, params))
    state = opt.state_dict()
    assert state["optimizer"] == "adam" and state["step_count"] == 1
    leaves = [value for tensor in state["state"].values() for value in tensor.values()]
    assert all(isinstance(value, (np.ndarray, int)) for value in leaves) and len(leaves) == 9
    assert not any(np.shares_memory(value, opt.state[name][key]) for name, tensor in state["state"].items()
                   for key, value in tensor.items() if isinstance(value, np.ndarray))
    with pytest.raises(ValueError, match="state was saved by optimiser 'adam'"):
        optim.SGD(0.1).load_state_dict(state)


def test_adam_minimises_an_ill_conditioned_quadratic(rng):
    """f(x) = 1/2 (x - c)^T A (x - c), condition number 1e3: Adam reaches c to 1e-3."""
    basis, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    curvature = basis @ np.diag(np.logspace(0, 3, 10)) @ basis.T
    target = rng.standard_normal(10)
    params = {"x": np.zeros(10)}
    opt = optim.Adam(0.05, schedule=optim.LinearDecay(3000))
    for _ in range(3000):
        opt.step(params, {"x": curvature @ (params["x"] - target)})
    np.testing.assert_allclose(params["x"], target, atol=1e-3)


def test_create_lists_valid_names_and_options():
    assert isinstance(optim.create("SGD", lr=0.1), optim.SGD)
    with pytest.raises(ValueError, match="unknown optimiser 'rmsprop'; valid: sgd, adam, lars"):
        optim.create("rmsprop", lr=0.1)
    with pytest.raises(TypeError, match=r"optimiser 'adam': unknown option\(s\) \['momentum'\]; accepted: lr, betas"):
        optim.create("adam", lr=0.1, momentum=0.9)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "weight_decay": 5e-4}, {"momentum": 0.9, "nesterov": True}])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_with_its_kernel_equals_the_reference_bit_for_bit(monkeypatch, options, dtype):
    shapes = {"w": (17, 9), "b": (9,)}
    runs = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv("DUALNET_KERNELS", mode)
        params = {name: np.random.default_rng(1).standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
        optimizer = optim.SGD(0.05, **options)
        for step in range(3):
            grads = {name: np.random.default_rng(10 + step).standard_normal(shape).astype(dtype)
                     for name, shape in shapes.items()}
            optimizer.step(params, grads)
        runs[mode] = params
    for name in shapes:
        np.testing.assert_array_equal(runs["auto"][name], runs["reference"][name])


# --------------------------------------------------------------------- gradients held as factors
def _factored(rng, params, rows=16):
    """Gradients with every matrix held as Outer factors [rows, p], [rows, q] (vectors dense),
    and the same gradients formed."""
    entries = {name: Outer(rng.standard_normal((rows, value.shape[0])).astype(value.dtype),
                           rng.standard_normal((rows, value.shape[1])).astype(value.dtype))
               if value.ndim == 2 else rng.standard_normal(value.shape).astype(value.dtype)
               for name, value in params.items()}
    return Gradients(entries), {name: e.dense() if isinstance(e, Outer) else e for name, e in entries.items()}


def _step_both(rng, params, make_optimizer, steps, formed_after):
    """The same steps from factored and from formed gradients; returns both parameter sets and
    optimisers, after checking each step left the factors of "layer.w" unformed (or formed)."""
    factored, dense = _copy(params), _copy(params)
    factored_opt, dense_opt = make_optimizer(), make_optimizer()
    for _ in range(steps):
        grads, dense_grads = _factored(rng, params)
        factored_opt.step(factored, grads)
        dense_opt.step(dense, dense_grads)
        assert (grads.factors("layer.w") is None) is formed_after
    return factored, dense, factored_opt, dense_opt


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_adds_factored_gradients_into_the_weights_without_forming_them(rng, options, dtype):
    params = _params(rng, dtype)
    factored, dense, factored_opt, dense_opt = _step_both(rng, params, lambda: optim.SGD(0.05, **options), 3, False)
    # each update within (M + 2)·ε·lr·Σ|l||r| of the dense one (M = 16, Σ over 16 products of
    # |N(0,1)|·|N(0,1)| ≲ 16·3), the momentum buffer carrying it into the next two
    bound = 3 * 3 * 18 * np.finfo(dtype).eps * 0.05 * 16 * 3 / (1 - 0.9 if options else 1)
    for name in params:
        np.testing.assert_allclose(factored[name], dense[name], rtol=0, atol=bound, err_msg=name)
    if options:
        np.testing.assert_allclose(factored_opt.state["layer.w"]["momentum"], dense_opt.state["layer.w"]["momentum"],
                                   rtol=0, atol=bound / 0.05)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}])
def test_a_factored_sgd_step_is_the_dense_step_bit_for_bit_on_the_reference_kernels(rng, monkeypatch, options):
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    params = _params(rng, np.float32)
    factored, dense, _, _ = _step_both(rng, params, lambda: optim.SGD(0.05, **options), 3, False)
    for name in params:
        np.testing.assert_array_equal(factored[name], dense[name], err_msg=name)


@pytest.mark.parametrize("name, options", [("sgd", {"momentum": 0.9, "nesterov": True}),
                                           ("sgd", {"weight_decay": 1e-2}), ("adam", {}), ("lars", {})])
def test_optimisers_that_need_the_formed_gradient_form_it(rng, name, options):
    """Nesterov, weight decay, Adam and LARS take the gradient formed: the dense step, bit for bit."""
    params = _params(rng, np.float32)
    factored, dense, _, _ = _step_both(rng, params, lambda: optim.create(name, lr=0.05, **options), 2, True)
    for key in params:
        np.testing.assert_array_equal(factored[key], dense[key], err_msg=key)


def test_factored_gradients_of_the_wrong_shape_are_reported(rng):
    params = {"w": np.zeros((3, 4))}
    grads = Gradients({"w": Outer(np.ones((5, 4)), np.ones((5, 3)))})
    with pytest.raises(ValueError, match=r"gradient of 'w' has shape \(4, 3\), parameter has \(3, 4\)"):
        optim.SGD(0.1).step(params, grads)
