"""CuPy launcher of ``normalize_epilogue.cu``: the epilogue after the grouped cuBLAS GEMMs.

Same contract as ``dualnet.fused.reference_normalize_epilogue`` (and the Numba kernel), for CuPy
arrays of float32 or float64: bias, layout [G, M, c] -> [M, G, c] and local LN for the value and
K tangents in one pass.  ``normalize_relu`` (``dualnet.fused.reference_normalize_relu``) goes on
through the activation in the same pass: the injected tangent, the residual and the ReLU.
"""
import numpy

from . import function, require, warp_grid


def _operands(op, value, named, directions, lenient_tangents=False):
    """Check each optional operand of ``named`` (name, array or None, expected shape) and return the
    placeholder of the absent ones, the operands as the kernel takes them and their presence
    flags.  ``lenient_tangents``: with ``directions`` = 0 a tangent of any shape passes (it is not read)."""
    import cupy
    for name, array, shape in named:
        require(array is None or array.shape == shape
                or (lenient_tangents and directions == 0 and name.endswith("tangent")),
                op, f"{name} must be {shape}, got {getattr(array, 'shape', None)}")
    placeholder = cupy.zeros(1, value.dtype)
    operands = [placeholder if array is None else cupy.ascontiguousarray(array, dtype=value.dtype)
                for _, array, _ in named]
    return placeholder, operands, [numpy.int32(array is not None) for _, array, _ in named]


def normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions):
    """value [G, M, c]; tangent [G, K, M, c]; bias [G, c]; bias_tangent [K, G, c] (each may be None);
    ``directions`` = K (0: no tangent).  Returns (out [M, G, c], out_tangent [K, M, G, c] or None,
    sigma [M, G, 1])."""
    import cupy
    dtype = value.dtype
    groups, rows, width = value.shape
    placeholder, operands, present = _operands(
        "normalize_epilogue.normalize_epilogue", value,
        (("tangent", tangent, (groups, directions, rows, width)), ("bias", bias, (groups, width)),
         ("bias_tangent", bias_tangent, (directions, groups, width))), directions, lenient_tangents=True)
    out = cupy.empty((rows, groups, width), dtype)
    out_tangent = cupy.empty((directions, rows, groups, width), dtype) if directions else placeholder
    sigma = cupy.empty((rows, groups, 1), dtype)
    grid, block = warp_grid(rows * groups)
    function("normalize_epilogue", "normalize_epilogue", dtype)(
        grid, block,
        (cupy.ascontiguousarray(value), *operands, numpy.int64(groups), numpy.int64(rows), numpy.int64(width),
         numpy.int64(directions), *present, dtype.type(eps), out, out_tangent, sigma))
    return out, (out_tangent if directions else None), sigma


def normalize_relu(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps, directions):
    """The inputs of ``normalize_epilogue``, and injected [K, M, G, c], residual [M, G, c],
    residual_tangent [K, M, G, c] (each may be None).  Returns (normalized [M, G, c], activated
    [M, G, c], activated_tangent [K, M, G, c] or None, sigma [M, G, 1])."""
    import cupy
    dtype = value.dtype
    groups, rows, width = value.shape
    per_direction = (directions, rows, groups, width)
    placeholder, operands, present = _operands(
        "normalize_epilogue.normalize_relu", value,
        (("tangent", tangent, (groups, directions, rows, width)), ("bias", bias, (groups, width)),
         ("bias_tangent", bias_tangent, (directions, groups, width)), ("injected", injected, per_direction),
         ("residual", residual, (rows, groups, width)), ("residual_tangent", residual_tangent, per_direction)),
        directions)
    normalized = cupy.empty((rows, groups, width), dtype)
    activated = cupy.empty((rows, groups, width), dtype)
    activated_tangent = cupy.empty(per_direction, dtype) if directions else placeholder
    sigma = cupy.empty((rows, groups, 1), dtype)
    grid, block = warp_grid(rows * groups)
    function("normalize_epilogue", "normalize_relu", dtype)(
        grid, block,
        (cupy.ascontiguousarray(value), *operands, numpy.int64(groups), numpy.int64(rows), numpy.int64(width),
         numpy.int64(directions), *present, dtype.type(eps), normalized, activated, activated_tangent, sigma))
    return normalized, activated, (activated_tangent if directions else None), sigma
