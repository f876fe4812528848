"""The SGD update on the CPU (Numba): parameter, gradient and momentum buffer in one pass.

NumPy makes two to four passes over the parameters for one update, each with a temporary
(``p -= lr * g``; with momentum ``b *= m; b += g`` first).  Here each element is read once and
written once, with the same operations in the same order as ``dualnet.optim.reference_sgd_update``
(no fused multiply-add), so the results are bit-identical.  One thread: the update is bound by
memory, is called for every tensor at every step, and a parallel region there started the OpenMP
runtime in processes (MPI ranks) that otherwise never use it.
"""
import numba
import numpy as np

from dualnet.optim import reference_sgd_update


@numba.njit(cache=True)
def _update(param, grad, buffer, lr, momentum, weight_decay, has_buffer, nesterov):
    for i in range(param.shape[0]):
        g = grad[i]
        if weight_decay != 0:
            g = g + weight_decay * param[i]
        if has_buffer:
            b = buffer[i] * momentum
            b = b + g
            buffer[i] = b
            g = g + momentum * b if nesterov else b
        param[i] = param[i] - lr * g


def sgd_update(param, grad, buffer, lr, momentum, weight_decay, nesterov):
    """Numba ``dualnet.optim.reference_sgd_update`` (same arguments, in place).  A parameter or
    buffer that is not contiguous goes to the reference (a flat view of it would be a copy)."""
    if not param.flags.c_contiguous or (buffer is not None and not buffer.flags.c_contiguous):
        return reference_sgd_update(param, grad, buffer, lr, momentum, weight_decay, nesterov)
    kind = param.dtype.type
    flat = param.reshape(-1)
    _update(flat, np.ascontiguousarray(grad, param.dtype).reshape(-1), flat if buffer is None else buffer.reshape(-1),
            kind(lr), kind(momentum), kind(weight_decay), buffer is not None, bool(nesterov))


def warm_up(dtype):
    """Compile (or load from cache) the update kernel for ``dtype``."""
    ones = np.ones(3, dtype)
    sgd_update(ones.copy(), ones, ones.copy(), 0.1, 0.9, 0.01, True)
