"""dualnet: forward-mode automatic differentiation for NumPy/CuPy, and forward-gradient learning.

The engine in three names: ``Dual`` (value + tangent), the primitive table
(``dualnet.primitives.TABLE``; each op is also a function here: ``dualnet.exp``,
``dualnet.matmul``...), and the transformations ``jvp``, ``vjp``, ``grad``, which nest
(``grad(grad(f))``, ``jvp`` of ``grad``...).  Built on it: ``dualnet.nn``, ``dualnet.models``,
``dualnet.losses``, ``dualnet.rules``, ``dualnet.optim``, ``dualnet.data``, ``dualnet.train``.
"""
import os as _os

from . import idle_threads as _idle_threads

_idle_threads.let_idle_threads_sleep()  # before any kernel starts OpenMP


def _bind_kernels():
    """Make ``dualnet.kernels`` the ``kernels/`` directory of the checkout this package came from.

    An installed wheel carries ``dualnet/kernels/``; a checkout keeps it at the top level, and an
    editable install of another checkout must not supply it.
    """
    import importlib.util
    import pathlib
    import sys
    here = pathlib.Path(__file__).resolve().parent
    if (here / "kernels" / "__init__.py").is_file():
        return
    init = here.parent / "kernels" / "__init__.py"
    if not init.is_file():
        raise ImportError(f"dualnet: no kernels package beside {here} (expected {init}); reinstall dualnet")
    spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_bind_kernels()

from . import backend  # noqa: E402

if _os.environ.get("DUALNET_MALLOC", "keep") != "default":
    backend.keep_freed_memory()

from .autodiff import (checkpoint, custom_jvp, custom_vjp, grad, jvp, linearize, tree_flatten,  # noqa: E402
                       tree_map, value_and_grad, vjp)
from .dual import Dual, value_of  # noqa: E402
from .primitives import (TABLE, Primitive, abs, add, arctan, astype, broadcast_to, ceil, clip,  # noqa: E402
                         concatenate, cos, cosh, cumsum, diagonal, div, dot, einsum, exp, expand_dims, expm1,
                         floor, getitem, log, log1p, log2, log10, log_softmax, logaddexp, logsumexp, matmul, max,
                         maximum, mean, min, minimum, moveaxis, mul, neg, pad, power, prod, relu, repeat, reshape,
                         roll, sigmoid, sign, sin, sinh, softmax, sort, split, sqrt, squeeze, stack, std,
                         stop_gradient, sub, sum, swapaxes, take_along_axis, tan, tanh, tensordot, tile, topk, trace,
                         transpose, var, where)

__version__ = "0.1.0"

__all__ = [
    "Dual", "value_of", "TABLE", "Primitive", "backend",
    "jvp", "vjp", "grad", "value_and_grad", "linearize", "custom_jvp", "custom_vjp", "checkpoint", "tree_flatten",
    "tree_map",
    "abs", "add", "arctan", "astype", "broadcast_to", "ceil", "clip", "concatenate", "cos", "cosh", "cumsum",
    "diagonal", "div", "dot", "einsum", "exp", "expand_dims", "expm1", "floor", "getitem", "log", "log1p", "log2",
    "log10", "log_softmax", "logaddexp", "logsumexp", "matmul", "max", "maximum", "mean", "min", "minimum",
    "moveaxis", "mul", "neg", "pad", "power", "prod", "relu", "repeat", "reshape", "roll", "sigmoid", "sign", "sin",
    "sinh", "softmax", "sort", "split", "sqrt", "squeeze", "stack", "std", "stop_gradient", "sub", "sum",
    "swapaxes", "take_along_axis", "tan", "tanh", "tensordot", "tile", "topk", "trace", "transpose", "var", "where",
]
"""The engine's names.  The subpackages below are public too, imported on first use."""

_SUBMODULES = ("models", "rules", "losses", "nn", "optim", "data", "fused", "train", "compare")


def __getattr__(name):
    """``dn.models``, ``dn.rules``, ``dn.losses``...: imported when first touched, so that
    ``import dualnet`` stays light (no model, rule or kernel code runs until it is used)."""
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
