"""CuPy launchers of ``layer_norm.cu``: local LN value + K tangents in one pass, Jacobian product.

Same contracts as ``dualnet.fused.reference_layer_norm_forward`` / ``reference_layer_norm_jacobian``
(and the Numba kernels), for CuPy arrays of float32 or float64.
"""
import numpy

from . import function, require, warp_grid


def layer_norm_forward(x, tangent, eps):
    """x [..., c]; tangent [K, ..., c] or None -> (y [..., c], y_tangent [K, ..., c] or None, sigma [..., 1])."""
    import cupy
    dtype = x.dtype
    width = x.shape[-1]
    rows = x.size // width
    directions = 0 if tangent is None else tangent.shape[0]
    require(tangent is None or tangent.shape[1:] == x.shape, "layer_norm.layer_norm_forward",
            f"tangent must be [K, *{x.shape}], got {getattr(tangent, 'shape', None)}")
    x = cupy.ascontiguousarray(x)
    tangent_rows = cupy.zeros(1, dtype) if tangent is None else cupy.ascontiguousarray(tangent, dtype=dtype)
    y = cupy.empty(x.shape, dtype)
    y_tangent = cupy.zeros(1, dtype) if tangent is None else cupy.empty((directions,) + x.shape, dtype)
    sigma = cupy.empty(x.shape[:-1] + (1,), dtype)
    grid, block = warp_grid(rows)
    function("layer_norm", "layer_norm_forward", dtype)(
        grid, block, (x, tangent_rows, numpy.int64(directions), numpy.int64(rows), numpy.int64(width),
                      dtype.type(eps), y, y_tangent, sigma))
    return y, (None if tangent is None else y_tangent), sigma


def layer_norm_jacobian(normalized, sigma, vectors):
    """normalized [..., c], sigma [..., 1], vectors [K, ..., c] -> J vectors [K, ..., c]."""
    import cupy
    dtype = normalized.dtype
    width = normalized.shape[-1]
    rows = normalized.size // width
    directions = vectors.shape[0]
    require(vectors.shape[1:] == normalized.shape and sigma.shape == normalized.shape[:-1] + (1,),
            "layer_norm.layer_norm_jacobian", f"normalized {normalized.shape}, sigma {sigma.shape} and vectors "
                                              f"{vectors.shape} disagree (expected [..., c], [..., 1], [K, ..., c])")
    out = cupy.empty(vectors.shape, dtype)
    grid, block = warp_grid(directions * rows)
    function("layer_norm", "layer_norm_jacobian", dtype)(
        grid, block, (cupy.ascontiguousarray(normalized), cupy.ascontiguousarray(sigma, dtype=dtype),
                      cupy.ascontiguousarray(vectors, dtype=dtype), numpy.int64(directions), numpy.int64(rows),
                      numpy.int64(width), out))
    return out
