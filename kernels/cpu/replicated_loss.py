"""Numba kernels of the fused replicated losses (``dualnet.losses.replicated_*``).

Two loops, each held to its NumPy reference in ``dualnet.losses``:

* ``replica_tangent``: ``d[k,n,p,g] = scale·Σ_c ẋ[k,n,p,g,c]·u[n,g,c] + head[k,n]`` — the
  directional derivative of every replica, one pass over the features' tangent
  (reference ``replica_tangent_reference``, an einsum);
* ``replica_cotangent``: ``x̄[n,p,g,:] = scale·c[n,p,g]·u[n,g,:]`` — the vjp scatter
  (reference ``replica_cotangent_reference``).

float32 and float64, computed in the arrays' dtype (the sum over c may be reassociated, which
lets it vectorise; NaN/inf semantics are kept); any strides, including the stride-0 views that
broadcasting produces.  Numba compiles each signature on first call and caches it on disk
(``warm_up(dtype)`` does it up front); calls on fewer than ``PARALLEL_MIN_ELEMENTS`` elements run
on one thread (``dualnet.kernels.cpu.threads_for``).
"""
import numba
import numpy

from . import threads_for

_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_FASTMATH = {"reassoc", "contract"}  # reorder/fuse the dot products; no finite-math assumptions


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _tangent_rows(x_tangent, u, head, has_head, scale, zero, out, accumulate):
    directions, n_examples, patches, groups, channels = x_tangent.shape
    head_directions = head.shape[0]
    for row in numba.prange(directions * n_examples * patches):
        k = row // (n_examples * patches)
        n = (row // patches) % n_examples
        p = row % patches
        hk = k if head_directions > 1 else 0
        for g in range(groups):
            total = zero
            for c in range(channels):
                total += x_tangent[k, n, p, g, c] * u[n, g, c]
            value = scale * total
            if has_head:
                value += head[hk, n]
            if accumulate:
                out[k, n, p, g] += value
            else:
                out[k, n, p, g] = value


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _cotangent_rows(cotangent, u, scale, out):
    n_examples, patches, groups = cotangent.shape
    channels = u.shape[2]
    for row in numba.prange(n_examples * patches):
        n = row // patches
        p = row % patches
        for g in range(groups):
            weight = scale * cotangent[n, p, g]
            for c in range(channels):
                out[n, p, g, c] = weight * u[n, g, c]


def _check(op, condition, message):
    if not condition:
        raise ValueError(f"kernels.cpu.replicated_loss.{op}: {message}")


def replica_tangent(x_tangent, u, scale, head=None, out=None):
    """``d[k,n,p,g] = scale·Σ_c ẋ[k,n,p,g,c]·u[n,g,c] (+ head[k,n])``, added into ``out`` if given.

    ``x_tangent`` [K, N, P, G, c], ``u`` [N, G, c], ``head`` None or [K or 1, N],
    ``out`` None or [K, N, P, G]; all of one dtype (float32 or float64).  Returns [K, N, P, G].
    """
    dtype = x_tangent.dtype
    _check("replica_tangent", dtype in _DTYPES and u.dtype == dtype,
           f"need float32/float64 of one dtype, got {dtype} and {u.dtype}")
    _check("replica_tangent", x_tangent.ndim == 5 and u.shape == (x_tangent.shape[1], x_tangent.shape[3],
                                                                   x_tangent.shape[4]),
           f"x_tangent [K, N, P, G, c] and u [N, G, c] disagree: {x_tangent.shape} and {u.shape}")
    result_shape = x_tangent.shape[:4]
    if head is None:
        head_array = numpy.zeros((1, 1), dtype)
    else:
        _check("replica_tangent", head.dtype == dtype and head.ndim == 2 and head.shape[1] == x_tangent.shape[1]
               and head.shape[0] in (1, x_tangent.shape[0]),
               f"head must be [K or 1, N] = [{x_tangent.shape[0]} or 1, {x_tangent.shape[1]}] of dtype {dtype}, "
               f"got {head.shape} of {head.dtype}")
        head_array = head
    accumulate = out is not None
    if accumulate:
        _check("replica_tangent", out.shape == result_shape and out.dtype == dtype,
               f"out must be {result_shape} of {dtype}, got {out.shape} of {out.dtype}")
    else:
        out = numpy.empty(result_shape, dtype)
    with threads_for(x_tangent.size):
        _tangent_rows(x_tangent, u, head_array, head is not None, dtype.type(scale), dtype.type(0), out,
                      accumulate)
    return out


def replica_cotangent(cotangent, u, scale):
    """``x̄[n,p,g,:] = scale·cotangent[n,p,g]·u[n,g,:]``: [N, P, G] × [N, G, c] → [N, P, G, c]."""
    dtype = u.dtype
    _check("replica_cotangent", dtype in _DTYPES and cotangent.dtype == dtype,
           f"need float32/float64 of one dtype, got {cotangent.dtype} and {dtype}")
    _check("replica_cotangent", cotangent.ndim == 3 and u.ndim == 3 and u.shape[:2] == (cotangent.shape[0],
                                                                                       cotangent.shape[2]),
           f"cotangent [N, P, G] and u [N, G, c] disagree: {cotangent.shape} and {u.shape}")
    out = numpy.empty(cotangent.shape + (u.shape[2],), dtype)
    with threads_for(out.size):
        _cotangent_rows(cotangent, u, dtype.type(scale), out)
    return out


def warm_up(dtype):
    """Compile (or load from Numba's cache) both kernels for ``dtype`` on contiguous operands."""
    x_tangent = numpy.ones((1, 1, 2, 1, 3), dtype)
    u = numpy.ones((1, 1, 3), dtype)
    replica_tangent(x_tangent, u, 1.0, head=numpy.ones((1, 1), dtype))
    replica_cotangent(numpy.ones((1, 2, 1), dtype), u, 1.0)
