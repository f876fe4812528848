"""CuPy launcher of ``normalize_epilogue.cu``: the epilogue after the grouped cuBLAS GEMMs.

Same contract as ``dualnet.fused.reference_normalize_epilogue`` (and the Numba kernel), for CuPy
arrays of float32 or float64: bias, layout [G, M, c] -> [M, G, c] and local LN for the value and
K tangents in one pass.  ``normalize_relu`` (``dualnet.fused.reference_normalize_relu``) goes on
through the activation in the same pass: the injected tangent, the residual and the ReLU.
"""
import numpy

from . import function, require, warp_grid


def normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions):
    """value [G, M, c]; tangent [G, K, M, c]; bias [G, c]; bias_tangent [K, G, c] (each may be None);
    ``directions`` = K (0: no tangent).  Returns (out [M, G, c], out_tangent [K, M, G, c] or None,
    sigma [M, G, 1])."""
    import cupy
    dtype = value.dtype
    groups, rows, width = value.shape
    expected = ((groups, directions, rows, width), (groups, width), (directions, groups, width))
    operands = (tangent, bias, bias_tangent)
    names = ("tangent", "bias", "bias_tangent")
    for name, array, shape in zip(names, operands, expected):
        require(array is None or array.shape == shape or (directions == 0 and name.endswith("tangent")),
                "normalize_epilogue.normalize_epilogue",
                f"{name} must be {shape}, got {getattr(array, 'shape', None)}")
    placeholder = cupy.zeros(1, dtype)

    def operand(array):
        return placeholder if array is None else cupy.ascontiguousarray(array, dtype=dtype)
    out = cupy.empty((rows, groups, width), dtype)
    out_tangent = cupy.empty((directions, rows, groups, width), dtype) if directions else placeholder
    sigma = cupy.empty((rows, groups, 1), dtype)
    present = [numpy.int32(a is not None) for a in operands]
    grid, block = warp_grid(rows * groups)
    function("normalize_epilogue", "normalize_epilogue", dtype)(
        grid, block,
        (cupy.ascontiguousarray(value), operand(tangent), operand(bias), operand(bias_tangent), numpy.int64(groups),
         numpy.int64(rows), numpy.int64(width), numpy.int64(directions), *present, dtype.type(eps), out,
         out_tangent, sigma))
    return out, (out_tangent if directions else None), sigma


def normalize_relu(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps, directions):
    """The inputs of ``normalize_epilogue``, and injected [K, M, G, c], residual [M, G, c],
    residual_tangent [K, M, G, c] (each may be None).  Returns (normalized [M, G, c], activated
    [M, G, c], activated_tangent [K, M, G, c] or None, sigma [M, G, 1])."""
    import cupy
    dtype = value.dtype
    groups, rows, width = value.shape
    expected = ((groups, directions, rows, width), (groups, width), (directions, groups, width),
                (directions, rows, groups, width), (rows, groups, width), (directions, rows, groups, width))
    operands = (tangent, bias, bias_tangent, injected, residual, residual_tangent)
    names = ("tangent", "bias", "bias_tangent", "injected", "residual", "residual_tangent")
    for name, array, shape in zip(names, operands, expected):
        require(array is None or array.shape == shape, "normalize_epilogue.normalize_relu",
                f"{name} must be {shape}, got {getattr(array, 'shape', None)}")
    placeholder = cupy.zeros(1, dtype)

    def operand(array):
        return placeholder if array is None else cupy.ascontiguousarray(array, dtype=dtype)
    normalized = cupy.empty((rows, groups, width), dtype)
    activated = cupy.empty((rows, groups, width), dtype)
    activated_tangent = cupy.empty((directions, rows, groups, width), dtype) if directions else placeholder
    sigma = cupy.empty((rows, groups, 1), dtype)
    present = [numpy.int32(a is not None) for a in operands]
    grid, block = warp_grid(rows * groups)
    function("normalize_epilogue", "normalize_relu", dtype)(
        grid, block,
        (cupy.ascontiguousarray(value), *[operand(a) for a in operands], numpy.int64(groups), numpy.int64(rows),
         numpy.int64(width), numpy.int64(directions), *present, dtype.type(eps), normalized, activated,
         activated_tangent, sigma))
    return normalized, activated, (activated_tangent if directions else None), sigma
