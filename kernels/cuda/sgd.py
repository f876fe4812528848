"""CuPy launcher of ``sgd.cu``: the SGD update in place, one pass over parameter, gradient and buffer.

Same contract as ``dualnet.optim.reference_sgd_update`` (and the Numba kernel), for CuPy arrays of
float32 or float64; equal to it to rounding (the GPU may fuse a multiply and an add).
"""
import numpy

from . import function, require, thread_grid


def sgd_update(param, grad, buffer, lr, momentum, weight_decay, nesterov):
    """param, grad, buffer (or None): one shape and dtype; param and buffer are updated in place."""
    import cupy
    dtype = param.dtype
    for name, array in (("grad", grad), ("buffer", buffer)):
        require(array is None or array.shape == param.shape, "sgd.sgd_update",
                f"{name} must be {param.shape} like the parameter, got {getattr(array, 'shape', None)}")
    require(param.flags.c_contiguous and (buffer is None or buffer.flags.c_contiguous), "sgd.sgd_update",
            "the parameter and the buffer must be contiguous (they are updated in place)")
    grid, block = thread_grid(param.size)
    function("sgd", "sgd_update", dtype)(
        grid, block,
        (param, cupy.ascontiguousarray(grad, dtype=dtype), param if buffer is None else buffer,
         numpy.int64(param.size), dtype.type(lr), dtype.type(momentum), dtype.type(weight_decay),
         numpy.int32(buffer is not None), numpy.int32(bool(nesterov))))
