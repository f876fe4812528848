"""out ← α·leftᵀright + β·out as one GEMM, through NumPy's own BLAS (ctypes).

NumPy offers no GEMM that adds into an existing array, so the update of a weight from its
gradient factors (``dualnet.gradients``) would otherwise form the product, then pass over the
weights again.  BLAS's ``cblas_?gemm`` takes β: the product is added into ``out`` tile by tile.
The library is the one NumPy's ``matmul`` runs on, found with threadpoolctl among the loaded
libraries (a second BLAS, such as SciPy's, would bring a second pool of threads spinning beside
NumPy's: 1.14× slower there).  Where it cannot be bound (NumPy built against a BLAS outside its
own package, a library without the symbols), or for operands BLAS cannot take as they are (mixed
dtypes, ``out`` without unit column stride, or overlapping the factors), the call goes to
``dualnet.gradients.reference_outer_update``.  The GEMM rounds differently from the reference
(the product is added inside the GEMM, possibly with fused multiply-adds): equal to rounding.
"""
import ctypes
import functools
import os

import numpy as np

from dualnet.gradients import reference_outer_update

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOLS = (("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
            ("scipy_cblas_{}gemm", ctypes.c_int32), ("cblas_{}gemm", ctypes.c_int32))
"""cblas_?gemm as NumPy's wheels name it (scipy-openblas, 64-bit or 32-bit integers; older wheels
with a ``64_`` suffix), then the plain CBLAS name."""


def _inside_numpy(path):
    """Whether ``path`` lies inside NumPy's package or the ``numpy.libs`` folder beside it."""
    package = os.path.dirname(os.path.realpath(np.__file__))
    folders = (package, os.path.join(os.path.dirname(package), "numpy.libs"))
    return any(os.path.realpath(path).startswith(folder + os.sep) for folder in folders)


@functools.cache
def gemm_functions():
    """``{dtype: cblas_?gemm}`` for float32 and float64 from NumPy's BLAS; empty
    when it cannot be bound."""
    from threadpoolctl import ThreadpoolController
    for controller in ThreadpoolController().select(user_api="blas").lib_controllers:
        library = getattr(controller, "dynlib", None)
        if library is None or not _inside_numpy(controller.filepath):
            continue
        for template, integer in _SYMBOLS:
            functions = {}
            for dtype, letter, scalar in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
                function = getattr(library, template.format(letter), None)
                if function is None:
                    break
                function.restype = None
                function.argtypes = [ctypes.c_int] * 3 + [integer] * 3 + [scalar, ctypes.c_void_p, integer,
                                                                           ctypes.c_void_p, integer, scalar,
                                                                           ctypes.c_void_p, integer]
                functions[np.dtype(dtype)] = function
            if len(functions) == 2:
                return functions
    return {}


def _row_major(a, dtype):
    """``a`` with unit column stride (a copy only when needed) and its row stride in elements."""
    if a.strides[1] != a.itemsize or a.strides[0] % a.itemsize or a.strides[0] < a.shape[1] * a.itemsize:
        a = np.ascontiguousarray(a, dtype)
    return a, max(a.strides[0] // a.itemsize, a.shape[1], 1)


def outer_update(left, right, out, alpha, beta):
    """``dualnet.gradients.reference_outer_update`` as one ``cblas_?gemm`` (same arguments, in place)."""
    functions, dtype = gemm_functions(), out.dtype
    usable = (dtype in functions and left.dtype == dtype and right.dtype == dtype and left.shape[0] > 0
              and out.ndim == 2 and out.flags.aligned and out.strides[1] == out.itemsize
              and out.strides[0] % out.itemsize == 0 and out.strides[0] >= out.shape[1] * out.itemsize
              and not np.may_share_memory(out, left) and not np.may_share_memory(out, right))
    if not usable:
        return reference_outer_update(left, right, out, alpha, beta)
    (left, lda), (right, ldb) = _row_major(left, dtype), _row_major(right, dtype)
    rows, columns, depth = out.shape[0], out.shape[1], left.shape[0]
    functions[dtype](_ROW_MAJOR, _TRANS, _NO_TRANS, rows, columns, depth, alpha, left.ctypes.data, lda,
                     right.ctypes.data, ldb, beta, out.ctypes.data, out.strides[0] // out.itemsize)


def warm_up(dtype):
    """Bind the library (once per process)."""
    gemm_functions()
