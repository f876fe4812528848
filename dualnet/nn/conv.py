"""Convolution and pooling on Duals or arrays, images as [N, C, H, W].

One fused primitive does the geometry, everything else is existing primitives:

* ``im2col(x, kernel, stride, padding)``: the sliding windows of the zero-padded image,
  x [N, C, H, W] -> cols [N, H', W', C, kh, kw] with cols[n, i, j, c, a, b] =
  x_pad[n, c, s_h·i + a, s_w·j + b] and H' = ⌊(H + 2p_h − kh)/s_h⌋ + 1 (likewise W').  It is linear,
  so its jvp is itself applied to the tangent (the K directions ride along the batch axis) and
  its vjp is ``col2im``, which adds every window back into the image it came from.
* ``conv2d``: im2col, then one GEMM of the windows [N·H'·W', C·kh·kw] with Wᵀ [C·kh·kw, O]
  (value and tangent rows in one GEMM through ``matmul``'s joint rule).
* pools: a max or mean over the window axes of ``im2col``; the adaptive average pool is a
  product with two constant averaging matrices, y = A_h x A_wᵀ.

Max-pool ties: the derivative is shared evenly among the tied maxima (the rule of the
engine's ``max``), in forward and reverse mode alike, so the two modes stay exact transposes of
each other.  (PyTorch instead sends all of it to the first maximum.)
"""
import functools

import numpy

from .. import backend
from .. import primitives as P
from ..dual import value_of
from ..primitives import TABLE, Primitive

ns = backend.namespace


def _pair(value, what):
    pair = (value, value) if numpy.ndim(value) == 0 else tuple(value)
    if len(pair) != 2 or any(int(v) != v for v in pair):
        raise ValueError(f"{what}={value!r} must be an int or a pair of ints")
    return tuple(int(v) for v in pair)


def output_size(size, kernel, stride=1, padding=0):
    """Windows along one axis: ⌊(size + 2·padding − kernel)/stride⌋ + 1 (< 1: the image is too small)."""
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------
# the im2col primitive: value, jvp and vjp (col2im) side by side
# ---------------------------------------------------------------------------------------
def _windows_value(x, kernel, stride, padding):
    """x [N, C, H, W] -> cols [N, H', W', C, kh, kw]: one strided view of the padded image, one copy."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = ns(x)
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, height, width = x.shape
    ho, wo = output_size(height, kh, sh), output_size(width, kw, sw)
    if ho < 1 or wo < 1:
        raise ValueError(f"im2col: a {kh}x{kw} window does not fit the padded {height}x{width} image")
    s_n, s_c, s_h, s_w = x.strides
    view = xp.lib.stride_tricks.as_strided(
        x, (n, ho, wo, c, kh, kw), (s_n, sh * s_h, sw * s_w, s_c, s_h, s_w))
    return xp.ascontiguousarray(view)


def _windows_jvp(t, out, x, kernel, stride, padding):
    """Linear: the windows of each direction's tangent, K folded into the batch axis."""
    cols = _windows_value(t.reshape((-1,) + x.shape[1:]), kernel, stride, padding)
    return cols.reshape((t.shape[0],) + out.shape)


def col2im(g, image_shape, kernel, stride, padding):
    """The transpose of im2col: g [N, H', W', C, kh, kw] -> [N, C, H, W], each window added back.

    One strided add per kernel offset (kh·kw of them), each over the whole batch and image.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, height, width = image_shape
    _, ho, wo = g.shape[:3]
    xp = ns(g)
    image = xp.zeros((n, c, height + 2 * ph, width + 2 * pw), g.dtype)
    by_offset = g.transpose(4, 5, 0, 3, 1, 2)  # [kh, kw, N, C, H', W']
    for a in range(kh):
        for b in range(kw):
            image[:, :, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw] += by_offset[a, b]
    return image[:, :, ph:ph + height, pw:pw + width]


_im2col = Primitive(
    "im2col", _windows_value, jvp=(_windows_jvp,),
    vjp=(lambda g, out, x, kernel, stride, padding: col2im(g, x.shape, kernel, stride, padding),))
TABLE[_im2col.name] = _im2col


def im2col(x, kernel, stride=1, padding=0):
    """Sliding windows: x [N, C, H, W] -> [N, H', W', C, kh, kw] (see the module docstring).

    ``kernel``, ``stride``, ``padding``: an int or an (h, w) pair; padding is with zeros.
    """
    if value_of(x).ndim != 4:
        raise ValueError(f"im2col: expected an image batch [N, C, H, W], got shape {value_of(x).shape}")
    return _im2col(x, kernel=_pair(kernel, "kernel"), stride=_pair(stride, "stride"),
                   padding=_pair(padding, "padding"))


# ---------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------
def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation: x [N, C, H, W], W [O, C, kh, kw], b [O] -> z [N, O, H', W'],

        z[n, o, i, j] = b[o] + Σ_{c,a,b'} W[o, c, a, b'] · x_pad[n, c, s·i + a, s·j + b'].

    im2col + one GEMM: rows [N·H'·W', C·kh·kw] @ Wᵀ [C·kh·kw, O].  ``stride``/``padding``: int or pair.
    """
    shape, kernel_shape = value_of(x).shape, value_of(weight).shape
    if len(shape) != 4 or len(kernel_shape) != 4 or shape[1] != kernel_shape[1]:
        raise ValueError(f"conv2d: needs x [N, C, H, W] and weight [O, C, kh, kw] with the same C, "
                         f"got shapes {tuple(shape)} and {tuple(kernel_shape)}")
    n, (out_channels, _, kh, kw) = shape[0], kernel_shape
    cols = im2col(x, (kh, kw), stride, padding)
    ho, wo = value_of(cols).shape[1:3]
    rows = P.matmul(P.reshape(cols, (n * ho * wo, -1)), P.transpose(P.reshape(weight, (out_channels, -1))))
    if bias is not None:
        rows = rows + bias
    return P.transpose(P.reshape(rows, (n, ho, wo, out_channels)), (0, 3, 1, 2))


def conv2d_param_pullback(x, delta, kernel, stride=1, padding=0):
    """[W̄, b̄] of conv2d for a cotangent ``delta`` [N, O, H', W'] at its output (arrays only):
    W̄ = δ_rowsᵀ · im2col(x) reshaped to [O, C, kh, kw], b̄ = Σ_{n,i,j} δ — the windows are rebuilt,
    the forward GEMM is not re-run."""
    kernel = _pair(kernel, "kernel")
    cols = _windows_value(x, kernel, _pair(stride, "stride"), _pair(padding, "padding"))
    rows = delta.transpose(0, 2, 3, 1).reshape(-1, delta.shape[1])
    weight_grad = (rows.T @ cols.reshape(len(rows), -1)).reshape((delta.shape[1], x.shape[1]) + kernel)
    return [weight_grad, delta.sum(axis=(0, 2, 3))]


def conv2d_example_tangent(x, weight, bias, kernel, stride=1, padding=0):
    """ż [N, O, H', W'] of conv2d when example n's kernel and bias move along their own Ẇ_n
    (``weight`` [N, O, C, kh, kw]) and ḃ_n (``bias`` [N, O] or None): ż_n = conv2d(x_n, Ẇ_n) + ḃ_n,
    one batched GEMM over the examples of their windows [N, H'·W', C·kh·kw] with Ẇ_nᵀ (arrays only)."""
    cols = _windows_value(x, _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding"))
    n, ho, wo = cols.shape[:3]
    rows = cols.reshape(n, ho * wo, -1) @ weight.reshape(weight.shape[:2] + (-1,)).transpose(0, 2, 1)
    if bias is not None:
        rows = rows + bias[:, None, :]
    return rows.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def conv2d_example_pullback(x, delta, kernel, stride=1, padding=0):
    """[W̄, b̄], [N, O, C, kh, kw] and [N, O]: example n's share of ``conv2d_param_pullback``,
    W̄_n = δ_nᵀ · im2col(x_n) (one batched GEMM), b̄_n = Σ_{i,j} δ_n."""
    kernel = _pair(kernel, "kernel")
    cols = _windows_value(x, kernel, _pair(stride, "stride"), _pair(padding, "padding"))
    n = len(x)
    rows = delta.transpose(0, 2, 3, 1).reshape(n, -1, delta.shape[1])
    weight_grad = (rows.transpose(0, 2, 1) @ cols.reshape(n, rows.shape[1], -1))
    return [weight_grad.reshape((n, delta.shape[1], x.shape[1]) + kernel), delta.sum(axis=(2, 3))]


@functools.cache
def conv_layer(kernel, stride=1, padding=0):
    """``conv2d`` with its geometry bound, as a layer ``fn(x, weight, bias=None)`` for ``Model.hidden``
    (one function per geometry, so that what is built per layer function is built once).

    ``fn.param_pullback(x, delta) -> [W̄, b̄]`` (the geometry is needed to rebuild the windows,
    which is why plain ``conv2d`` has no pullback attribute); ``fn.example_tangent`` and
    ``fn.example_pullback``: their per-example forms (see ``dualnet/nn/layers.py``).
    """
    def conv(x, weight, bias=None):
        return conv2d(x, weight, bias, stride, padding)
    conv.param_pullback = lambda x, delta: conv2d_param_pullback(x, delta, kernel, stride, padding)
    conv.example_tangent = lambda x, weight, bias=None: conv2d_example_tangent(x, weight, bias, kernel, stride,
                                                                              padding)
    conv.example_pullback = lambda x, delta: conv2d_example_pullback(x, delta, kernel, stride, padding)
    conv.__name__ = f"conv2d[{kernel}/{stride}/{padding}]"
    return conv


# ---------------------------------------------------------------------------------------
# pooling and reshaping
# ---------------------------------------------------------------------------------------
def _pool(reduce, x, size, stride):
    windows = im2col(x, size, size if stride is None else stride)  # [N, H', W', C, kh, kw]
    return P.transpose(reduce(windows, axis=(4, 5)), (0, 3, 1, 2))


def max_pool2d(x, size, stride=None):
    """Max over size×size windows (stride defaults to size, no padding): [N, C, H, W] -> [N, C, H', W'].

    Ties share the derivative evenly (see the module docstring)."""
    return _pool(P.max, x, size, stride)


def avg_pool2d(x, size, stride=None):
    """Mean over size×size windows (stride defaults to size, no padding): [N, C, H, W] -> [N, C, H', W']."""
    return _pool(P.mean, x, size, stride)


def _averaging_matrix(size, out, dtype, like):
    """A [out, size]: row i averages the inputs ⌊i·size/out⌋ ≤ h < ⌈(i+1)·size/out⌉ (PyTorch's bins)."""
    i = numpy.arange(out)[:, None]
    h = numpy.arange(size)[None, :]
    inside = (h >= (i * size) // out) & (h < -((-(i + 1) * size) // out))
    matrix = (inside / inside.sum(axis=1, keepdims=True)).astype(dtype)
    return ns(like).asarray(matrix)


def adaptive_avg_pool2d(x, output_size):
    """Average over an output_size grid of bins: [N, C, H, W] -> [N, C, h_o, w_o], y = A_h x A_wᵀ.

    Bin i along an axis of length H covers ⌊iH/h_o⌋ ≤ h < ⌈(i+1)H/h_o⌉; an output larger than
    the input repeats values.  ``output_size``: an int or a pair.
    """
    (out_h, out_w), value = _pair(output_size, "output_size"), value_of(x)
    if value.ndim != 4 or min(out_h, out_w) < 1:
        raise ValueError(f"adaptive_avg_pool2d: needs x [N, C, H, W] and a positive output size, "
                         f"got shape {value.shape} and output_size={output_size!r}")
    rows = _averaging_matrix(value.shape[2], out_h, value.dtype, value)
    cols = _averaging_matrix(value.shape[3], out_w, value.dtype, value)
    return P.matmul(P.matmul(rows, x), cols.T)


def flatten(x):
    """[N, ...] -> [N, prod(...)]."""
    return P.reshape(x, (value_of(x).shape[0], -1))
