"""CuPy launcher of ``site_gradient.cu``: FG-A's gradient at a layer's site in one pass.

Same contract as ``dualnet.rules.base.reference_site_gradient`` (and the Numba kernel), for CuPy
arrays of float32 or float64: Σ_k factors_k · values_k over the K directions, times the mask.
"""
import numpy

from . import function, require, thread_grid


def site_gradient(factors, values, mask):
    """factors [K, N, A]; values [K, N, A, B]; mask [N, A, B] bool or None.  Returns [N, A, B]."""
    import cupy
    dtype = numpy.result_type(factors.dtype, values.dtype)
    directions, rows, blocks, width = values.shape
    require(factors.shape == (directions, rows, blocks), "site_gradient.site_gradient",
            f"factors must be {(directions, rows, blocks)}, got {factors.shape}")
    require(mask is None or (mask.shape == (rows, blocks, width) and mask.dtype == numpy.bool_),
            "site_gradient.site_gradient",
            f"mask must be a bool array {(rows, blocks, width)}, got {getattr(mask, 'shape', None)} "
            f"{getattr(mask, 'dtype', '')}")
    out = cupy.empty((rows, blocks, width), dtype)
    grid, block = thread_grid(out.size)
    function("site_gradient", "site_gradient", dtype)(
        grid, block,
        (cupy.ascontiguousarray(factors, dtype=dtype), cupy.ascontiguousarray(values, dtype=dtype),
         cupy.zeros(1, numpy.bool_) if mask is None else cupy.ascontiguousarray(mask),
         numpy.int64(directions), numpy.int64(rows), numpy.int64(blocks), numpy.int64(width),
         numpy.int32(mask is not None), out))
    return out
