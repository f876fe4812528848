"""Local layer norm on the CPU (Numba): value and K tangents in one pass, and the Jacobian product.

Normalisation is over the last axis, without affine parameters:
``y = (x - mean) / sigma`` with ``sigma = sqrt(var + eps)`` (biased variance).  Its Jacobian is
symmetric, ``J v = (v - mean(v) - y mean(y v)) / sigma``, so the same product gives tangents
(forward mode) and cotangents (the pull-back).

``_normalize`` is the one row kernel behind every LN path; besides plain LN it adds a per-group
bias before and a shift after the normalisation, applies an optional ReLU, and reads the grouped
GEMM layout ``[G, M, c]`` while writing ``[M, G, c]`` (see ``grouped_linear.normalize_epilogue``).
Statistics are accumulated in float64 for both float32 and float64 inputs.

Public functions follow the contracts of the NumPy references in ``dualnet.fused``.
"""
import numba
import numpy as np

from . import threads_for


@numba.njit(cache=True, fastmath=False)
def _sum(a, a0, b, b0, width):
    """Σ_j (a[a0 + j] + b[b0 + j]) with four independent float64 accumulators (no long add chain)."""
    s0 = s1 = s2 = s3 = 0.0
    j = 0
    while j + 4 <= width:
        s0 += a[a0 + j] + b[b0 + j]
        s1 += a[a0 + j + 1] + b[b0 + j + 1]
        s2 += a[a0 + j + 2] + b[b0 + j + 2]
        s3 += a[a0 + j + 3] + b[b0 + j + 3]
        j += 4
    while j < width:
        s0 += a[a0 + j] + b[b0 + j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@numba.njit(cache=True, fastmath=False)
def _centred_squares(a, a0, b, b0, mean, width):
    """Σ_j (a[a0 + j] + b[b0 + j] − mean)², four accumulators."""
    s0 = s1 = s2 = s3 = 0.0
    j = 0
    while j + 4 <= width:
        d0 = a[a0 + j] + b[b0 + j] - mean
        d1 = a[a0 + j + 1] + b[b0 + j + 1] - mean
        d2 = a[a0 + j + 2] + b[b0 + j + 2] - mean
        d3 = a[a0 + j + 3] + b[b0 + j + 3] - mean
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        j += 4
    while j < width:
        d0 = a[a0 + j] + b[b0 + j] - mean
        s0 += d0 * d0
        j += 1
    return (s0 + s1) + (s2 + s3)


@numba.njit(cache=True, fastmath=False)
def _moments(u, u0, du, du0, w, w0, dw, dw0, mean, width):
    """(Σ_j v_j, Σ_j v_j (c_j − mean)) with v = u + du and c = w + dw (slices at the offsets)."""
    s0 = s1 = s2 = s3 = 0.0
    p0 = p1 = p2 = p3 = 0.0
    j = 0
    while j + 4 <= width:
        v0 = u[u0 + j] + du[du0 + j]
        v1 = u[u0 + j + 1] + du[du0 + j + 1]
        v2 = u[u0 + j + 2] + du[du0 + j + 2]
        v3 = u[u0 + j + 3] + du[du0 + j + 3]
        s0 += v0
        s1 += v1
        s2 += v2
        s3 += v3
        p0 += v0 * (w[w0 + j] + dw[dw0 + j] - mean)
        p1 += v1 * (w[w0 + j + 1] + dw[dw0 + j + 1] - mean)
        p2 += v2 * (w[w0 + j + 2] + dw[dw0 + j + 2] - mean)
        p3 += v3 * (w[w0 + j + 3] + dw[dw0 + j + 3] - mean)
        j += 4
    while j < width:
        v0 = u[u0 + j] + du[du0 + j]
        s0 += v0
        p0 += v0 * (w[w0 + j] + dw[dw0 + j] - mean)
        j += 1
    return (s0 + s1) + (s2 + s3), (p0 + p1) + (p2 + p3)


@numba.njit(parallel=True, cache=True, fastmath=False)
def _normalize(value, tangent, bias, bias_tangent, shift, shift_tangent, groups, rows, width, directions,
               has_tangent, has_shift, has_shift_tangent, eps, relu, out, out_tangent, sigma):
    """Row kernel on flat C-ordered arrays (an absent optional input is empty, its flag False):

    value [G, M, c]; tangent [G, K, M, c]; bias [G, c] (zeros when absent); bias_tangent
    [K, G, c] (zeros when absent); shift [M, G, c]; shift_tangent [K, M, G, c].  Writes
    out [M, G, c], out_tangent [K, M, G, c] and sigma [M, G].  Per row (m, g): a = value + bias,
    y = (a − mean a)/σ, out = relu?(y + shift), out_tangent_k = mask·(J(tangent_k +
    bias_tangent_k) + shift_tangent_k) with mask = 1[y + shift > 0] under ReLU.
    """
    plane = rows * groups * width
    for flat in numba.prange(rows * groups):
        m = flat // groups
        g = flat - m * groups
        v0 = (g * rows + m) * width
        b0 = g * width
        o0 = flat * width
        mean = _sum(value, v0, bias, b0, width) / width
        std = np.sqrt(_centred_squares(value, v0, bias, b0, mean, width) / width + eps)
        inverse = 1.0 / std
        sigma[flat] = std
        for k in range(directions):
            t0 = ((g * directions + k) * rows + m) * width
            bt0 = (k * groups + g) * width
            tangent_mean = 0.0
            projection = 0.0  # mean(y · tangent)
            if has_tangent:
                total, moment = _moments(tangent, t0, bias_tangent, bt0, value, v0, bias, b0, mean, width)
                tangent_mean = total / width
                projection = moment * inverse / width
            for j in range(width):
                y = (value[v0 + j] + bias[b0 + j] - mean) * inverse
                t = 0.0
                if has_tangent:
                    t = (tangent[t0 + j] + bias_tangent[bt0 + j] - tangent_mean - y * projection) * inverse
                if has_shift_tangent:
                    t += shift_tangent[k * plane + o0 + j]
                if relu:
                    if has_shift:
                        y += shift[o0 + j]
                    if not y > 0:
                        t = 0.0
                out_tangent[k * plane + o0 + j] = t
        for j in range(width):
            y = (value[v0 + j] + bias[b0 + j] - mean) * inverse
            if has_shift:
                y += shift[o0 + j]
            if relu and y < 0:
                y = 0.0
            out[o0 + j] = y


@numba.njit(parallel=True, cache=True, fastmath=False)
def _jacobian(normalized, sigma, vectors, zeros, directions, rows, width, out):
    """out[k, r] = (v − mean v − y·mean(y v))/σ[r] for v = vectors[k, r], y = normalized[r].

    Flat C-ordered normalized [R, c], sigma [R], vectors and out [K, R, c]; zeros [c].
    """
    for item in numba.prange(directions * rows):
        r = item % rows
        v0 = item * width
        y0 = r * width
        total, moment = _moments(vectors, v0, zeros, 0, normalized, y0, zeros, 0, 0.0, width)
        vector_mean = total / width
        projection = moment / width
        inverse = 1.0 / sigma[r]
        for j in range(width):
            out[v0 + j] = (vectors[v0 + j] - vector_mean - normalized[y0 + j] * projection) * inverse


def empty(dtype, ndim):
    """A zero-length array: how an absent optional input reaches ``_normalize``."""
    return np.empty((0,) * ndim, dtype)


def run_normalize(value, tangent, bias, bias_tangent, shift, shift_tangent, eps, relu, directions):
    """Call ``_normalize``; ``None`` marks an absent input.  Any layout, one float dtype.

    Shapes as in ``_normalize``; returns (out [M, G, c], out_tangent [K, M, G, c], sigma [M, G]).
    """
    dtype = value.dtype
    groups, rows, width = value.shape

    def flat(array):
        return empty(dtype, 1) if array is None else np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    if tangent is None and bias_tangent is not None:
        tangent = np.zeros((groups, directions, rows, width), dtype)
    bias = np.zeros((groups, width), dtype) if bias is None else bias
    bias_tangent = np.zeros((directions, groups, width), dtype) if bias_tangent is None else bias_tangent
    out = np.empty((rows, groups, width), dtype)
    out_tangent = np.empty((directions, rows, groups, width), dtype)
    sigma = np.empty((rows, groups), dtype)
    with threads_for(value.size * (1 + directions)):
        _normalize(flat(value), flat(tangent), flat(bias), flat(bias_tangent), flat(shift), flat(shift_tangent),
                   groups, rows, width, directions, tangent is not None, shift is not None,
                   shift_tangent is not None, float(eps), bool(relu),
                   out.reshape(-1), out_tangent.reshape(-1), sigma.reshape(-1))
    return out, out_tangent, sigma


def layer_norm_forward(x, tangent, eps):
    """Numba ``dualnet.fused.reference_layer_norm_forward``: LN value and K tangents in one pass.

    x [..., c]; tangent [K, ..., c] or None.  Returns (y [..., c], y_tangent [K, ..., c] or None,
    sigma [..., 1]).
    """
    width = x.shape[-1]
    rows = x.size // width
    directions = 0 if tangent is None else tangent.shape[0]
    rows_tangent = None if tangent is None else tangent.reshape(1, directions, rows, width)
    out, out_tangent, sigma = run_normalize(x.reshape(1, rows, width), rows_tangent, None, None, None, None,
                                            eps, False, directions)
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
