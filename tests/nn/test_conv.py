"""Convolution and pooling layers: values against direct loops; derivatives (forward mode against
central differences, reverse mode by the dot-product identity, K directions against single passes);
the conv parameter pullback against reverse mode; max-pool ties; float32; errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dualnet as dn
from dualnet.nn.conv import (
    adaptive_avg_pool2d,
    avg_pool2d,
    conv2d,
    conv_layer,
    flatten,
    im2col,
    max_pool2d,
    output_size,
)

STEP, FD_RTOL, FD_ATOL, DOT_RTOL = 1e-6, 1e-6, 1e-7, 1e-10


# ---------------------------------------------------------------------------------------
# loop references
# ---------------------------------------------------------------------------------------
def loop_conv(x, weight, bias, stride, padding):
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    o, _, kh, kw = weight.shape
    ho, wo = output_size(x.shape[2], kh, stride, padding), output_size(x.shape[3], kw, stride, padding)
    out = np.zeros((x.shape[0], o, ho, wo))
    for n in range(x.shape[0]):
        for k in range(o):
            for i in range(ho):
                for j in range(wo):
                    window = padded[n, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    out[n, k, i, j] = (window * weight[k]).sum() + (0 if bias is None else bias[k])
    return out


def loop_pool(reduce, x, size, stride):
    ho, wo = output_size(x.shape[2], size, stride), output_size(x.shape[3], size, stride)
    out = np.zeros(x.shape[:2] + (ho, wo))
    for i in range(ho):
        for j in range(wo):
            out[:, :, i, j] = reduce(x[:, :, i * stride:i * stride + size, j * stride:j * stride + size], axis=(2, 3))
    return out


def loop_adaptive(x, out_h, out_w):
    height, width = x.shape[2:]
    out = np.zeros(x.shape[:2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(i * height // out_h, -(-(i + 1) * height // out_h))
            cols = slice(j * width // out_w, -(-(j + 1) * width // out_w))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


# ---------------------------------------------------------------------------------------
# random applications: draw -> (fn, float64 inputs differentiated, reference or None)
# ---------------------------------------------------------------------------------------
def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _conv_case(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    height = draw(st.integers(max(1, kh - 2 * padding), 7))
    width = draw(st.integers(max(1, kw - 2 * padding), 7))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = _rng(draw)
    x, w, b = rng.standard_normal((n, c, height, width)), rng.standard_normal((o, c, kh, kw)), rng.standard_normal(o)
    if draw(st.booleans()):
        return (lambda a, k, c0: conv2d(a, k, c0, stride, padding)), [x, w, b], loop_conv(x, w, b, stride, padding)
    return (lambda a, k: conv2d(a, k, None, stride, padding)), [x, w], loop_conv(x, w, None, stride, padding)


def _pool_case(layer, reduce):
    def case(draw):
        size, stride = draw(st.integers(1, 3)), draw(st.one_of(st.none(), st.integers(1, 3)))
        shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(size, 7)),
                 draw(st.integers(size, 7)))
        # distinct values with gaps >> the finite-difference step: no max ties
        x = _rng(draw).permutation(int(np.prod(shape))).reshape(shape) * 0.1
        return (lambda a: layer(a, size, stride)), [x], loop_pool(reduce, x, size, size if stride is None else stride)
    return case


def _adaptive_case(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    out_h, out_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = _rng(draw).standard_normal(shape)
    return (lambda a: adaptive_avg_pool2d(a, (out_h, out_w))), [x], loop_adaptive(x, out_h, out_w)


def _im2col_case(draw):
    kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 1))
    side = draw(st.integers(max(1, kernel - 2 * padding), 6))
    x = _rng(draw).standard_normal((draw(st.integers(1, 2)), draw(st.integers(1, 3)), side, side))
    return (lambda a: im2col(a, kernel, stride, padding)), [x], None


def _flatten_case(draw):
    x = _rng(draw).standard_normal((draw(st.integers(1, 3)), 2, draw(st.integers(1, 3)), 3))
    return flatten, [x], x.reshape(len(x), -1)


CASES = {"conv2d": _conv_case, "max_pool2d": _pool_case(max_pool2d, np.max),
         "avg_pool2d": _pool_case(avg_pool2d, np.mean), "adaptive_avg_pool2d": _adaptive_case,
         "im2col": _im2col_case, "flatten": _flatten_case}
NAMES = sorted(CASES)


def _inner(a, b):
    return float(np.sum(np.asarray(a) * np.asarray(b)))


# ---------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in NAMES if n != "im2col"])
@settings(max_examples=30)
@given(data=st.data())
def test_values_match_loop_references(name, data):
    fn, inputs, expected = CASES[name](data.draw)
    np.testing.assert_allclose(fn(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_im2col_windows_hold_the_padded_pixels(rng):
    x = rng.standard_normal((2, 3, 5, 4))
    cols = im2col(x, (3, 2), 2, 1)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    assert cols.shape == (2, 3, 3, 3, 3, 2)  # H' = ⌊(5 + 2 − 3)/2⌋ + 1, W' = ⌊(4 + 2 − 2)/2⌋ + 1
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(cols[:, i, j], padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 2])


# ---------------------------------------------------------------------------------------
# derivatives
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_jvp_matches_central_differences(name, data):
    fn, inputs, _ = CASES[name](data.draw)
    rng = np.random.default_rng(1)
    tangents = [rng.standard_normal(x.shape) for x in inputs]
    out, tangent = dn.jvp(fn, inputs, tangents)
    plus = fn(*[x + STEP * t for x, t in zip(inputs, tangents)])
    minus = fn(*[x - STEP * t for x, t in zip(inputs, tangents)])
    np.testing.assert_allclose(tangent, (plus - minus) / (2 * STEP), rtol=FD_RTOL, atol=FD_ATOL)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_vjp_satisfies_the_dot_product_identity(name, data):
    """<J u, w> from forward mode equals <u, Jᵀ w> from reverse mode."""
    fn, inputs, _ = CASES[name](data.draw)
    rng = np.random.default_rng(2)
    directions = [rng.standard_normal(x.shape) for x in inputs]
    out, forward = dn.jvp(fn, inputs, directions)
    weights = rng.standard_normal(out.shape)
    _, pullback = dn.vjp(fn, *inputs)
    cotangents = pullback(weights)
    assert all(c.shape == x.shape for c, x in zip(cotangents, inputs))
    left, right = _inner(forward, weights), sum(_inner(u, c) for u, c in zip(directions, cotangents))
    assert abs(left - right) <= DOT_RTOL * (np.linalg.norm(forward) * np.linalg.norm(weights) + 1e-300)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10)
@given(data=st.data())
def test_k_directions_equal_k_single_passes(name, data):
    fn, inputs, _ = CASES[name](data.draw)
    rng = np.random.default_rng(3)
    batched = [rng.standard_normal((3,) + x.shape) for x in inputs]
    _, together = dn.jvp(fn, inputs, batched)
    assert together.shape[0] == 3
    for i in range(3):
        _, single = dn.jvp(fn, inputs, [t[i] for t in batched])
        np.testing.assert_allclose(together[i], single, rtol=1e-12, atol=1e-12)  # GEMM blocking may differ


def test_symbolic_zero_in_gives_symbolic_zero_out(rng):
    x, weight = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3))
    out = max_pool2d(conv2d(dn.Dual(x), weight, None, 1, 1), 2)
    assert out.tangent is None and out.shape == (2, 4, 2, 2)


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1), (3, 2)])
def test_conv_param_pullback_equals_reverse_mode(stride, padding, rng):
    x, weight, bias = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    layer = conv_layer((3, 2), stride, padding)
    out, pullback = dn.vjp(lambda w, b: layer(x, w, b), weight, bias)
    np.testing.assert_allclose(out, conv2d(x, weight, bias, stride, padding), rtol=1e-14)
    delta = rng.standard_normal(out.shape)
    for expected, got in zip(pullback(delta), layer.param_pullback(x, delta)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_max_pool_ties_share_the_derivative_evenly():
    x = np.array([[[[1.0, 1.0, 0.0, 2.0],
                    [1.0, 0.5, 2.0, 2.0]]]])  # window 1: three tied maxima; window 2: a tie of three 2.0s
    tangent = np.arange(8.0).reshape(x.shape)
    _, jvp = dn.jvp(lambda a: max_pool2d(a, 2), (x,), (tangent,))
    np.testing.assert_allclose(jvp.ravel(), [(0 + 1 + 4) / 3, (3 + 6 + 7) / 3])
    _, pullback = dn.vjp(lambda a: max_pool2d(a, 2), x)
    (grad,) = pullback(np.array([[[[3.0, 6.0]]]]))
    np.testing.assert_allclose(grad, [[[[1, 1, 0, 2], [1, 0, 2, 2]]]])


def test_overlapping_max_pool_windows_accumulate_in_reverse_mode():
    x = np.array([[[[0.0, 5.0, 1.0]]]])  # two windows of width 2, stride 1, share the 5
    _, pullback = dn.vjp(lambda a: max_pool2d(a, (1, 2), (1, 1)), x)
    np.testing.assert_allclose(pullback(np.ones((1, 1, 1, 2)))[0], [[[[0, 2, 0]]]])


def test_float32_stays_float32(rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    f = lambda a, w: adaptive_avg_pool2d(max_pool2d(conv2d(a, w, None, 1, 1), 2), 2)
    out, tangent = dn.jvp(f, (x, weight), (np.ones_like(x), np.ones_like(weight)))
    grads = dn.vjp(f, x, weight)[1](np.ones(out.shape, np.float32))
    assert out.dtype == tangent.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)


@pytest.mark.parametrize("call, message", [
    (lambda x: conv2d(x, np.zeros((4, 2, 3, 3))), r"same C, got shapes \(2, 3, 5, 5\) and \(4, 2, 3, 3\)"),
    (lambda x: conv2d(x, np.zeros((4, 3, 7, 7))), "a 7x7 window does not fit the padded 5x5 image"),
    (lambda x: max_pool2d(x, 6), "a 6x6 window does not fit"),
    (lambda x: conv2d(x, np.zeros((4, 3, 3, 3)), stride=(1, 2, 3)), r"stride=\(1, 2, 3\) must be an int or a pair"),
    (lambda x: adaptive_avg_pool2d(x, 0), "output_size=0"),
    (lambda x: im2col(x[0], 2), r"expected an image batch \[N, C, H, W\], got shape \(3, 5, 5\)"),
])
def test_invalid_geometry_is_reported(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.zeros((2, 3, 5, 5)))
