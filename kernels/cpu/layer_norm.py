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


@numba.njit(parallel=True, cache=True, fastmath=False)
def _normalize(value, tangent, bias, bias_tangent, shift, shift_tangent, eps, relu, out, out_tangent, sigma):
    """Row kernel.  Shapes (an absent optional input has a zero-length first axis):

    value [G, M, c]; tangent [G, K, M, c] or empty; bias [G, c] (zeros when absent);
    bias_tangent [K, G, c] (zeros when absent); shift [M, G, c] or empty;
    shift_tangent [K, M, G, c] or empty.  Writes out [M, G, c], out_tangent [K, M, G, c] and
    sigma [M, G].  Per row (m, g): a = value + bias, y = (a - mean(a)) / sigma,
    out = relu?(y + shift), out_tangent_k = mask * (J (tangent_k + bias_tangent_k) + shift_tangent_k)
    with mask = 1[y + shift > 0] under ReLU.
    """
    groups, rows, width = value.shape
    directions = out_tangent.shape[0]
    has_tangent = tangent.shape[1] > 0
    has_shift = shift.shape[0] > 0
    has_shift_tangent = shift_tangent.shape[0] > 0
    for flat in numba.prange(rows * groups):
        m = flat // groups
        g = flat - m * groups
        mean = 0.0
        for j in range(width):
            mean += value[g, m, j] + bias[g, j]
        mean /= width
        var = 0.0
        for j in range(width):
            centred = value[g, m, j] + bias[g, j] - mean
            var += centred * centred
        std = np.sqrt(var / width + eps)
        sigma[m, g] = std
        for k in range(directions):
            tangent_mean = 0.0
            projection = 0.0  # mean(y * tangent)
            if has_tangent:
                for j in range(width):
                    t = tangent[g, k, m, j] + bias_tangent[k, g, j]
                    tangent_mean += t
                    projection += t * (value[g, m, j] + bias[g, j] - mean)
                tangent_mean /= width
                projection /= width * std
            for j in range(width):
                y = (value[g, m, j] + bias[g, j] - mean) / std
                t = 0.0
                if has_tangent:
                    t = (tangent[g, k, m, j] + bias_tangent[k, g, j] - tangent_mean - y * projection) / std
                if has_shift_tangent:
                    t += shift_tangent[k, m, g, j]
                if relu:
                    if has_shift:
                        y += shift[m, g, j]
                    if not y > 0:
                        t = 0.0
                out_tangent[k, m, g, j] = t
        for j in range(width):
            y = (value[g, m, j] + bias[g, j] - mean) / std
            if has_shift:
                y += shift[m, g, j]
            if relu and y < 0:
                y = 0.0
            out[m, g, j] = y


@numba.njit(parallel=True, cache=True, fastmath=False)
def _jacobian(normalized, sigma, vectors, out):
    """out[k, r] = (v - mean(v) - y mean(y v)) / sigma[r] for v = vectors[k, r], y = normalized[r].

    normalized [R, c], sigma [R], vectors and out [K, R, c].
    """
    directions, rows, width = vectors.shape
    for flat in numba.prange(directions * rows):
        k = flat // rows
        r = flat - k * rows
        vector_mean = 0.0
        projection = 0.0
        for j in range(width):
            vector_mean += vectors[k, r, j]
            projection += vectors[k, r, j] * normalized[r, j]
        vector_mean /= width
        projection /= width
        for j in range(width):
            out[k, r, j] = (vectors[k, r, j] - vector_mean - normalized[r, j] * projection) / sigma[r]


def empty(dtype, ndim):
    """A zero-length C-contiguous array: how an absent optional input reaches ``_normalize``."""
    return np.empty((0,) * ndim, dtype)


def run_normalize(value, tangent, bias, bias_tangent, shift, shift_tangent, eps, relu, directions):
    """Call ``_normalize`` on C-contiguous inputs of one dtype; ``None`` marks an absent input.

    Shapes as in ``_normalize``; returns (out [M, G, c], out_tangent [K, M, G, c], sigma [M, G]).
    """
    dtype = value.dtype
    groups, rows, width = value.shape
    value = np.ascontiguousarray(value)
    if tangent is None and bias_tangent is not None:
        tangent = np.zeros((groups, directions, rows, width), dtype)
    tangent = empty(dtype, 4) if tangent is None else np.ascontiguousarray(tangent, dtype=dtype)
    bias = np.zeros((groups, width), dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    bias_tangent = (np.zeros((directions, groups, width), dtype) if bias_tangent is None
                    else np.ascontiguousarray(bias_tangent, dtype=dtype))
    shift = empty(dtype, 3) if shift is None else np.ascontiguousarray(shift, dtype=dtype)
    shift_tangent = empty(dtype, 4) if shift_tangent is None else np.ascontiguousarray(shift_tangent, dtype=dtype)
    out = np.empty((rows, groups, width), dtype)
    out_tangent = np.empty((directions, rows, groups, width), dtype)
    sigma = np.empty((rows, groups), dtype)
    with threads_for(value.size * (1 + directions)):
        _normalize(value, tangent, bias, bias_tangent, shift, shift_tangent, float(eps), bool(relu),
                   out, out_tangent, sigma)
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
    out = np.empty((directions, rows, width), dtype)
    with threads_for(out.size):
        _jacobian(np.ascontiguousarray(normalized).reshape(rows, width),
                  np.ascontiguousarray(sigma, dtype=dtype).reshape(rows),
                  np.ascontiguousarray(vectors, dtype=dtype).reshape(directions, rows, width), out)
    return out.reshape(vectors.shape)


def warm_up(dtype):
    """Compile (or load from cache) this module's kernels for ``dtype``."""
    x = np.ones((2, 3), dtype)
    layer_norm_forward(x, np.ones((1, 2, 3), dtype), 1e-5)
    layer_norm_jacobian(x, np.ones((2, 1), dtype), np.ones((1, 2, 3), dtype))
