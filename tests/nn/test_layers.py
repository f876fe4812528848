"""Layers: the shortcut parameter pullbacks equal reverse mode; feedback alignment's contract;
BatchNorm derivatives through the batch statistics."""
import numpy as np
import pytest

import dualnet as dn
from dualnet.gradients import formed
from dualnet.nn.layers import batch_norm, feedback_alignment, grouped, linear, token_mixing


def layer_inputs(rng, fn):
    if fn is grouped:
        return rng.standard_normal((3, 4, 2, 5)), rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 6))
    if fn is token_mixing:
        return rng.standard_normal((3, 4, 5)), rng.standard_normal((4, 4)), rng.standard_normal(4)
    return rng.standard_normal((3, 4, 5)), rng.standard_normal((5, 6)), rng.standard_normal(6)


@pytest.mark.parametrize("fn", [linear, grouped, token_mixing])
def test_param_pullback_equals_reverse_mode(fn, rng):
    x, weight, bias = layer_inputs(rng, fn)
    out, pullback = dn.vjp(lambda w, b: fn(x, w, b), weight, bias)
    delta = rng.standard_normal(out.shape)
    for expected, got in zip(pullback(delta), fn.param_pullback(x, delta)):
        np.testing.assert_allclose(formed(got), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [linear, grouped, token_mixing])
def test_feedback_alignment_sends_the_input_cotangent_through_B(fn, rng):
    x, weight, bias = layer_inputs(rng, fn)
    feedback = rng.standard_normal(weight.shape)
    fa = feedback_alignment(fn)
    np.testing.assert_array_equal(fa(x, weight, feedback, bias), fn(x, weight, bias))  # same value
    tangents = [rng.standard_normal(a.shape) for a in (x, weight, bias)]
    _, fa_tangent = dn.jvp(lambda a, w, b: fa(a, w, feedback, b), (x, weight, bias), tangents)
    _, tangent = dn.jvp(fn, (x, weight, bias), tangents)
    np.testing.assert_allclose(fa_tangent, tangent, rtol=1e-12)  # forward mode unchanged
    out, fa_pullback = dn.vjp(lambda a, w, b: fa(a, w, feedback, b), x, weight, bias)
    g = rng.standard_normal(out.shape)
    fa_grads = fa_pullback(g)
    exact = dn.vjp(fn, x, weight, bias)[1](g)
    through_b = dn.vjp(lambda a: fn(a, feedback, bias), x)[1](g)[0]
    np.testing.assert_allclose(fa_grads[0], through_b, rtol=1e-12)       # x: through B
    np.testing.assert_allclose(fa_grads[1], exact[1], rtol=1e-12)        # W: its usual gradient
    np.testing.assert_allclose(fa_grads[2], exact[2], rtol=1e-12)        # bias too
    assert not np.allclose(fa_grads[0], exact[0])


def test_batch_norm_jvp_through_statistics_matches_finite_differences(rng):
    x = rng.standard_normal((6, 4))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    running = (np.zeros(4), np.ones(4))
    f = lambda a: batch_norm(a, gamma, beta, running, train=True)[0]
    direction = rng.standard_normal(x.shape)
    _, tangent = dn.jvp(f, (x,), (direction,))
    eps = 1e-6
    finite = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(tangent, finite, rtol=1e-6, atol=1e-8)
    # the tangent of a batch-normalised unit sums to zero over the batch when gamma = 1 (mean is removed)
    _, unit = dn.jvp(lambda a: batch_norm(a, np.ones(4), np.zeros(4), running, True)[0], (x,), (direction,))
    np.testing.assert_allclose(unit.sum(axis=0), 0, atol=1e-12)
