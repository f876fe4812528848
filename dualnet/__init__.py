"""dualnet: forward-mode automatic differentiation for NumPy/CuPy, and forward-gradient learning.

The engine in three names: ``Dual`` (value + tangent), the primitive table
(``dualnet.primitives.TABLE``; each op is also a function here: ``dualnet.exp``,
``dualnet.matmul``...), and the transformations ``jvp``, ``vjp``, ``grad``.
"""
from . import backend
from .autodiff import (custom_jvp, custom_vjp, grad, jvp, linearize, tree_flatten, tree_map, value_and_grad,
                       vjp)
from .dual import Dual
from .primitives import (TABLE, Primitive, abs, add, broadcast_to, clip, concatenate, div, einsum, exp,
                         expand_dims, getitem, log, log_softmax, logsumexp, matmul, max, maximum, mean, minimum,
                         mul, neg, pad, power, relu, reshape, sigmoid, softmax, sqrt, squeeze, stack, stop_gradient,
                         sub, sum, tanh, transpose, where)

__version__ = "0.1.0"
