"""Local layer norm on the CPU (Numba): value and K tangents in one pass, and the Jacobian product.

Normalisation is over the last axis, without affine parameters:
``y = (x - mean) / sigma`` with ``sigma = sqrt(var + eps)`` (biased variance).  Its Jacobian is
symmetric, ``J v = (v - mean(v) - y mean(y v)) / sigma``, so the same product gives tangents
(forward mode) and cotangents (the pull-back).

``_normalize`` is the one row kernel behind every LN forward path; besides plain LN it adds a
per-group bias before the normalisation, reads the grouped GEMM layout ``[G, M, c]`` while
writing ``[M, G, c]``, and can go on through a hidden layer's activation (an injected tangent,
a residual, the ReLU: ``normalize_epilogue.normalize_relu``).
Statistics are accumulated in float64 for both float32 and float64 inputs.

Public functions follow the contracts of the NumPy references in ``dualnet.fused``.
"""
import numba
import numpy as np

from . import threads_for

_FASTMATH = {"reassoc", "contract", "arcp"}  # vectorise the row reductions; no finite-math assumptions


@numba.njit(cache=True, fastmath=_FASTMATH)
def _sum(a, b):
    """Σ_j (a_j + b_j) over two equal-length row views, accumulated in float64."""
    total = 0.0
    for j in range(a.shape[0]):
        total += a[j] + b[j]
    return total


@numba.njit(cache=True, fastmath=_FASTMATH)
def _centred_squares(a, b, mean):
    """Σ_j (a_j + b_j − mean)²."""
    total = 0.0
    for j in range(a.shape[0]):
        centred = a[j] + b[j] - mean
        total += centred * centred
    return total


@numba.njit(cache=True, fastmath=_FASTMATH)
def _moments(u, du, w, dw, mean):
    """(Σ_j v_j, Σ_j v_j (c_j − mean)) with v = u + du and c = w + dw (row views)."""
    total = 0.0
    moment = 0.0
    for j in range(u.shape[0]):
        v = u[j] + du[j]
        total += v
        moment += v * (w[j] + dw[j] - mean)
    return total, moment


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _normalize(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, groups, rows, width,
               directions, has_tangent, has_injected, has_residual, has_residual_tangent, relu, eps, out,
               out_tangent, sigma, activated):
    """Row kernel on flat C-ordered arrays (an absent input is a zero row [c], its flag False):

    value [G, M, c]; tangent [G, K, M, c]; bias [G, c] (zeros when absent); bias_tangent
    [K, G, c] (zeros when absent).  Writes out [M, G, c], out_tangent [K, M, G, c] and sigma
    [M, G].  Per row (m, g): a = value + bias, out = (a − mean a)/σ, out_tangent_k =
    J(tangent_k + bias_tangent_k).  With ``relu`` the row goes on through the activation:
    activated [M, G, c] = relu(out + residual) and out_tangent_k = (J(...) + injected_k +
    residual_tangent_k)·[out + residual > 0], the activation's tangent (injected and
    residual_tangent [K, M, G, c], residual [M, G, c]).  Every loop runs over a contiguous row
    view of length c, so LLVM vectorises it.
    """
    plane = rows * groups * width
    for flat in numba.prange(rows * groups):
        m = flat // groups
        g = flat - m * groups
        v = value[(g * rows + m) * width:(g * rows + m + 1) * width]
        b = bias[g * width:(g + 1) * width]
        o = out[flat * width:(flat + 1) * width]
        mean = _sum(v, b) / width
        std = np.sqrt(_centred_squares(v, b, mean) / width + eps)
        inverse = 1.0 / std
        sigma[flat] = std
        for j in range(width):
            o[j] = (v[j] + b[j] - mean) * inverse
        act = _row(activated, flat, width, relu)
        if relu:
            res = _row(residual, flat, width, has_residual)
            for j in range(width):
                pre = o[j] + res[j]
                act[j] = 0.0 if pre <= 0 else pre  # NaN stays NaN, as in relu
        for k in range(directions):
            ot = out_tangent[k * plane + flat * width:k * plane + (flat + 1) * width]
            shift = _row(injected, k * rows * groups + flat, width, has_injected)
            residual_shift = _row(residual_tangent, k * rows * groups + flat, width, has_residual_tangent)
            if has_tangent:
                t0 = ((g * directions + k) * rows + m) * width
                t = tangent[t0:t0 + width]
                bt = bias_tangent[(k * groups + g) * width:(k * groups + g + 1) * width]
                total, moment = _moments(t, bt, v, b, mean)
                tangent_mean = total / width
                projection = moment * inverse / width  # mean(y · tangent)
                if relu:
                    for j in range(width):
                        linear = (t[j] + bt[j] - tangent_mean - o[j] * projection) * inverse
                        pre = linear + shift[j] + residual_shift[j]
                        ot[j] = pre if act[j] > 0 else pre * 0.0  # as tangent·[pre > 0]: NaN stays NaN
                else:
                    for j in range(width):
                        ot[j] = (t[j] + bt[j] - tangent_mean - (v[j] + b[j] - mean) * inverse * projection) * inverse
            elif relu:
                for j in range(width):
                    pre = shift[j] + residual_shift[j]
                    ot[j] = pre if act[j] > 0 else pre * 0.0  # as tangent·[pre > 0]: NaN stays NaN
            else:
                ot[:] = 0.0


@numba.njit(inline="always")
def _row(array, index, width, present):
    """Row ``index`` of a flat [..., c] array, or the zero row [c] that stands for an absent one."""
    return array[index * width:(index + 1) * width] if present else array[:width]


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _jacobian(normalized, sigma, vectors, zeros, directions, rows, width, out):
    """out[k, r] = (v − mean v − y·mean(y v))/σ[r] for v = vectors[k, r], y = normalized[r].

    Flat C-ordered normalized [R, c], sigma [R], vectors and out [K, R, c]; zeros [c].
    """
    for item in numba.prange(directions * rows):
        r = item % rows
        v = vectors[item * width:(item + 1) * width]
        y = normalized[r * width:(r + 1) * width]
        o = out[item * width:(item + 1) * width]
        total, moment = _moments(v, zeros, y, zeros, 0.0)
        vector_mean = total / width
        projection = moment / width
        inverse = 1.0 / sigma[r]
        for j in range(width):
            o[j] = (v[j] - vector_mean - y[j] * projection) * inverse


def run_normalize(value, tangent, bias, bias_tangent, eps, directions, injected=None, residual=None,
                  residual_tangent=None, relu=False):
    """Call ``_normalize``; ``None`` marks an absent input.  Any layout, one float dtype.

    Shapes as in ``_normalize``; returns (out [M, G, c], out_tangent [K, M, G, c], sigma [M, G],
    activated [M, G, c] or None); with ``relu`` out_tangent is the activation's tangent.
    """
    dtype = value.dtype
    groups, rows, width = value.shape

    def flat(array):
        return np.zeros(width, dtype) if array is None else np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    if tangent is None and bias_tangent is not None:
        tangent = np.zeros((groups, directions, rows, width), dtype)
    bias = np.zeros((groups, width), dtype) if bias is None else bias
    bias_tangent = np.zeros((directions, groups, width), dtype) if bias_tangent is None else bias_tangent
    out = np.empty((rows, groups, width), dtype)
    out_tangent = np.empty((directions, rows, groups, width), dtype)
    sigma = np.empty((rows, groups), dtype)
    activated = np.empty((rows, groups, width), dtype) if relu else None
    with threads_for(value.size * (1 + directions)):
        _normalize(flat(value), flat(tangent), flat(bias), flat(bias_tangent), flat(injected), flat(residual),
                   flat(residual_tangent), groups, rows, width, directions, tangent is not None,
                   injected is not None, residual is not None, residual_tangent is not None, relu, float(eps),
                   out.reshape(-1), out_tangent.reshape(-1), sigma.reshape(-1),
                   flat(None) if activated is None else activated.reshape(-1))
    return out, out_tangent, sigma, activated


def layer_norm_forward(x, tangent, eps):
    """Numba ``dualnet.fused.reference_layer_norm_forward``: LN value and K tangents in one pass.

    x [..., c]; tangent [K, ..., c] or None.  Returns (y [..., c], y_tangent [K, ..., c] or None,
    sigma [..., 1]).
    """
    width = x.shape[-1]
    rows = x.size // width
    directions = 0 if tangent is None else tangent.shape[0]
    rows_tangent = None if tangent is None else tangent.reshape(1, directions, rows, width)
    out, out_tangent, sigma, _ = run_normalize(x.reshape(1, rows, width), rows_tangent, None, None, eps,
                                               directions)
    y_tangent = None if tangent is None else out_tangent.reshape((directions,) + x.shape)
    return out.reshape(x.shape), y_tangent, sigma.reshape(x.shape[:-1] + (1,))


def layer_norm_jacobian(normalized, sigma, vectors):
    """Numba ``dualnet.fused.reference_layer_norm_jacobian``: J v for each of K vectors.

    normalized [..., c] (the LN output), sigma [..., 1], vectors [K, ..., c] -> [K, ..., c].
    """
    dtype = normalized.dtype
    width = normalized.shape[-1]
    rows = normalized.size // width
    directions = vectors.shape[0]
    out = np.empty(vectors.shape, dtype)
    with threads_for(out.size):
        _jacobian(np.ascontiguousarray(normalized).reshape(-1), np.ascontiguousarray(sigma, dtype=dtype).reshape(-1),
                  np.ascontiguousarray(vectors, dtype=dtype).reshape(-1), np.zeros(width, dtype),
                  directions, rows, width, out.reshape(-1))
    return out


def warm_up(dtype):
    """Compile (or load from cache) this module's kernels for ``dtype``."""
    x = np.ones((2, 3), dtype)
    layer_norm_forward(x, np.ones((1, 2, 3), dtype), 1e-5)
    layer_norm_jacobian(x, np.ones((2, 1), dtype), np.ones((1, 2, 3), dtype))
