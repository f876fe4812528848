"""dualnet: forward-mode automatic differentiation for NumPy/CuPy, and forward-gradient learning.

The engine in three names: ``Dual`` (value + tangent), the primitive table
(``dualnet.primitives.TABLE``; each op is also a function here: ``dualnet.exp``,
``dualnet.matmul``...), and the transformations ``jvp``, ``vjp``, ``grad``.
"""


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
from .autodiff import (custom_jvp, custom_vjp, grad, jvp, linearize, tree_flatten, tree_map, value_and_grad,
                       vjp)
from .dual import Dual
from .primitives import (TABLE, Primitive, abs, add, broadcast_to, clip, concatenate, div, einsum, exp,
                         expand_dims, getitem, log, log_softmax, logsumexp, matmul, max, maximum, mean, minimum,
                         mul, neg, pad, power, relu, reshape, sigmoid, softmax, sqrt, squeeze, stack, stop_gradient,
                         sub, sum, tanh, transpose, where)

__version__ = "0.1.0"
