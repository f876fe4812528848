"""``Model.hidden``'s fused path (local LN -> 'pre' tangent -> + residual -> ReLU in one pass,
``layers.normalized_relu``) against its unfused path (``normalized`` -> ``ctx.inject`` -> + residual ->
activation), on a small LocalMixer (two blocks: token mixing, the residual add and grouped layers).

The unfused path is forced by handing ``hidden`` an activation that is ReLU but not ``P.relu`` itself.
Both passes see the same parameters, inputs and 'pre' tangents (float64); the loss, its tangent, the
logits and every ``Point`` (h, mask, post, u_pre, and the layer's weight_grads) must agree to float64
rounding, with the NumPy references (``DUALNET_KERNELS=reference``) and with the kernels.
"""
import zlib

import numpy as np
import pytest

import dualnet as dn
from dualnet import models, rules
from dualnet import primitives as P
from dualnet.dual import value_of
from dualnet.gradients import Gradients
from dualnet.nn import model as model_module
from dualnet.nn.model import Model
from dualnet.nn.plan import Plan

CLOSE = dict(rtol=1e-10, atol=1e-12)
MODES = ["reference", "auto"]


def mixer():
    return models.create("localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2, patches=2,
                         channels=8, groups=2)


def params_of(model, seed=0):
    """float64 parameters with a small jitter: the zero biases and read-out of the initialisation would put units on
    ReLU kinks and make every logit equal."""
    rng = np.random.default_rng(seed + 1000)
    return {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in model.init(seed, dtype=np.float64).items()}


def batch(model, n=5, seed=0):
    rng = np.random.default_rng(seed + 2000)
    return rng.standard_normal((n,) + model.input_shape), rng.integers(0, model.num_classes, n)


def site_noise(directions, kinds=("pre",)):
    """A deterministic plan ``perturb``: fixed noise [K, *site.shape] at every site of ``kinds``, keyed by (block,
    layer, kind)."""
    def perturb(site):
        if site.kind not in kinds:
            return None
        rng = np.random.default_rng([site.block, zlib.crc32(site.name.encode()), zlib.crc32(site.kind.encode()),
                                     directions])
        return rng.standard_normal((directions,) + tuple(site.shape)).astype(site.dtype)
    return perturb


@pytest.fixture
def unfused(monkeypatch):
    """Patch ``Model.hidden`` so that every ReLU layer takes the unfused branch; returns the call counter of the fused
    path (``layers.normalized_relu`` as ``model.py`` sees it), to show which branch ran."""
    fused_calls = []
    original_normalized_relu = model_module.normalized_relu

    def counting(*args, **kwargs):
        fused_calls.append(args[0])
        return original_normalized_relu(*args, **kwargs)
    monkeypatch.setattr(model_module, "normalized_relu", counting)
    original_hidden = Model.hidden

    def hidden(self, *args, activation=P.relu, **kwargs):
        if activation is P.relu:
            activation = lambda z: P.relu(z)  # noqa: E731 - ReLU, but not the fused path's P.relu
        return original_hidden(self, *args, activation=activation, **kwargs)

    def force(on):
        monkeypatch.setattr(Model, "hidden", hidden if on else original_hidden)
    return fused_calls, force


def run_both(unfused, run):
    """``run()`` through the fused path, then through the unfused one; checks which path each took."""
    fused_calls, force = unfused
    force(False)
    fused_result = run()
    layers = len(fused_calls)
    assert layers > 0 and layers % 5 == 0  # per pass: dense, grouped; token, dense, grouped
    force(True)
    unfused_result = run()
    assert len(fused_calls) == layers  # the unfused pass never reached normalized_relu
    return fused_result, unfused_result


def tangent(a):
    return a.tangent if isinstance(a, dn.Dual) else None


def assert_same(actual, expected, what):
    if expected is None:
        assert actual is None, what
        return
    assert actual is not None, what
    np.testing.assert_allclose(value_of(actual), value_of(expected), **CLOSE, err_msg=what)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("directions, local, kinds", [(1, False, ("pre",)), (3, False, ("pre",)),
                                                     (2, True, ("pre",)), (2, False, ("pre", "post"))])
def test_hidden_fused_path_equals_unfused_path(monkeypatch, unfused, mode, directions, local, kinds):
    monkeypatch.setenv("DUALNET_KERNELS", mode)
    model = mixer()
    params = params_of(model)
    x, labels = batch(model)
    plan = dict(perturb=site_noise(directions, kinds), local_losses=local, replicated=local, greedy=local)

    def run():
        trace = model.forward(params, x, labels, Plan(**plan))
        deltas = [np.random.default_rng(100 + i).standard_normal(point.h.shape) for i, point in enumerate(trace.points)]
        return trace, [Gradients(point.weight_grads(delta)) for point, delta in zip(trace.points, deltas)]

    (fused_trace, fused_grads), (unfused_trace, unfused_grads) = run_both(unfused, run)
    assert_same(fused_trace.loss, unfused_trace.loss, "loss")
    assert fused_trace.loss.tangent.shape == (directions, len(labels))
    assert_same(tangent(fused_trace.loss), tangent(unfused_trace.loss), "loss tangent")
    assert_same(fused_trace.logits, unfused_trace.logits, "logits")
    assert_same(tangent(fused_trace.logits), tangent(unfused_trace.logits), "logits tangent")
    for k, (mine, theirs) in enumerate(zip(fused_trace.local_losses, unfused_trace.local_losses)):
        assert_same(mine, theirs, f"local loss {k}")
        assert_same(tangent(mine), tangent(theirs), f"local loss tangent {k}")
    assert [(p.block, p.name) for p in fused_trace.points] == [(p.block, p.name) for p in unfused_trace.points]
    assert len(fused_trace.points) == 5
    for mine, theirs, mine_grads, their_grads in zip(fused_trace.points, unfused_trace.points, fused_grads,
                                                     unfused_grads):
        where = f"block {mine.block} {mine.name}"
        assert not isinstance(mine.h, dn.Dual) and not isinstance(mine.post, dn.Dual)
        assert_same(mine.h, theirs.h, f"{where}: h")
        np.testing.assert_array_equal(mine.mask, theirs.mask, err_msg=f"{where}: mask")
        assert mine.mask.dtype == bool and 0 < mine.mask.mean() < 1
        assert_same(mine.post, theirs.post, f"{where}: post")
        np.testing.assert_array_equal(mine.mask, mine.post > 0, err_msg=f"{where}: mask is where the unit is on")
        assert mine.u_pre is not None and mine.u_pre.shape == (directions,) + mine.h.shape
        np.testing.assert_array_equal(mine.u_pre, theirs.u_pre, err_msg=f"{where}: u_pre")
        if "post" in kinds:
            assert mine.u_post is not None
            np.testing.assert_array_equal(mine.u_post, theirs.u_post, err_msg=f"{where}: u_post")
        else:
            assert mine.u_post is None and theirs.u_post is None
        assert mine.replica == theirs.replica
        assert mine_grads.keys() == their_grads.keys()
        for name in mine_grads:
            assert_same(mine_grads[name], their_grads[name], f"{where}: weight_grads {name}")


@pytest.mark.parametrize("mode", MODES)
def test_hidden_fused_path_reverse_mode_equals_unfused_path(monkeypatch, unfused, mode):
    monkeypatch.setenv("DUALNET_KERNELS", mode)
    model = mixer()
    params = params_of(model)
    x, labels = batch(model)

    def run():
        objective = dn.value_and_grad(lambda p: dn.mean(model.forward(p, x, labels).loss))
        loss, grads = objective(params)
        estimate = rules.create("bp")(model, params, x, labels, np.random.default_rng(0))
        return loss, grads, estimate

    (loss, grads, estimate), (unfused_loss, unfused_grads, unfused_estimate) = run_both(unfused, run)
    assert_same(loss, unfused_loss, "loss")
    assert grads.keys() == unfused_grads.keys() == params.keys()
    for name in grads:
        assert model.is_local_head(name) or np.any(grads[name] != 0), name  # the global loss reaches the backbone
        assert_same(grads[name], unfused_grads[name], f"grad {name}")
        assert_same(estimate.grads[name], unfused_estimate.grads[name], f"bp estimate {name}")
        assert_same(estimate.grads[name], grads[name], f"bp estimate vs dn.grad {name}")


@pytest.mark.parametrize("rule", ["fg-a", "lg-fg-a"])
def test_forward_gradient_estimates_equal_on_both_paths(monkeypatch, unfused, rule):
    """FG-A reads u_pre, the mask and weight_grads of every point: one step's estimate is the same on both paths."""
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    model = mixer()
    params = params_of(model)
    x, labels = batch(model)

    def run():
        return rules.create(rule, directions=2)(model, params, x, labels, np.random.default_rng(3))

    mine, theirs = run_both(unfused, run)
    assert mine.grads.keys() == theirs.grads.keys()
    for name in mine.grads:
        assert_same(mine.grads[name], theirs.grads[name], f"{rule} {name}")
    np.testing.assert_allclose(mine.loss, theirs.loss, **CLOSE)
