"""CUDA kernels for CuPy arrays: ``<name>.cu`` sources with a Python launcher module ``<name>.py``.

Nothing here imports CuPy or compiles at import time.  ``load(name)`` imports the launcher module
``dualnet.kernels.cuda.<name>``; a launcher gets its compiled kernels from ``function(name,
kernel, dtype)``, which builds ``<name>.cu`` once per process with ``cupy.RawModule`` (NVRTC;
CuPy also caches the binary on disk).  Sources are self-contained (no headers) and define
``extern "C"`` kernels in float and double variants named ``<kernel>_f32`` / ``<kernel>_f64``.
Launchers have exactly the signature and results of the CPU kernels and of the references in
``dualnet`` they replace, and take their launch geometry from ``warp_grid`` / ``thread_grid``
(pure functions: the kernels are grid-stride loops, correct for any grid).  Adding a kernel module
is one line in ``MODULES`` (``LIBRARY_MODULES`` for a launcher that calls cuBLAS instead).

Without a GPU, the sources and launchers run on the CPU under a C++ emulation of warps
(docs/cuda_on_cpu.md): ``PYTHONPATH=$PWD python -m pytest tests/kernels/test_cuda_on_cpu.py``.
"""
import functools
import importlib
import pathlib

import numpy

MODULES = (
    "layer_norm",          # local layer norm: value + K tangents in one pass, Jacobian product (pull-back)
    "normalize_epilogue",  # epilogue after the grouped cuBLAS GEMMs: bias, layout, LN
    "replicated_loss",     # replicated local losses: the replicas' directional derivatives, the vjp scatter
    "site_gradient",       # FG-A's gradient at a layer's site: Σ_k d_k u_k, masked, in one pass
    "sgd",                 # the SGD update: parameter, gradient and momentum buffer in one pass, in place
)
LIBRARY_MODULES = (
    "outer_update",        # a weight updated from its gradient factors: one cuBLAS GEMM with β
)
"""Launchers with no source of their own: they call a CUDA library through CuPy."""
SOURCE_DIR = pathlib.Path(__file__).parent
OPTIONS = ("--std=c++14",)
"""NVRTC options used for every source (the architecture is chosen by CuPy for the device)."""
WARPS_PER_BLOCK = 8

_SUFFIX = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64"}


def source(name):
    """The CUDA source text of ``<name>.cu``."""
    return (SOURCE_DIR / f"{name}.cu").read_text()


@functools.cache
def raw_module(name):
    """``<name>.cu`` compiled by CuPy (once per process)."""
    import cupy
    return cupy.RawModule(code=source(name), options=OPTIONS)


def function(name, kernel, dtype):
    """The compiled kernel ``<kernel>_f32`` or ``<kernel>_f64`` of ``<name>.cu`` for ``dtype``."""
    dtype = numpy.dtype(dtype)
    if dtype not in _SUFFIX:
        raise ValueError(f"kernels.cuda.{name}.{kernel}: needs float32 or float64, got {dtype}")
    return raw_module(name).get_function(f"{kernel}_{_SUFFIX[dtype]}")


MAX_BLOCKS = 1 << 20
"""Cap on the grid: the kernels' grid-stride loops cover any excess items."""


def thread_grid(items):
    """``(grid, block)`` for grid-stride kernels that give one thread to each of ``items``: enough
    blocks of ``32 * WARPS_PER_BLOCK`` threads for all items, at least one, at most ``MAX_BLOCKS``.
    A pure function of ``items`` (no CuPy), shared by the launchers and the CPU test harness."""
    threads = 32 * WARPS_PER_BLOCK
    blocks = max(1, min((items + threads - 1) // threads, MAX_BLOCKS))
    return (blocks,), (threads,)


def require(condition, op, message):
    """Raise ``ValueError('kernels.cuda.<op>: <message>')`` unless ``condition``: launchers check
    shapes before a launch, since a kernel given a wrong shape reads or writes out of bounds."""
    if not condition:
        raise ValueError(f"kernels.cuda.{op}: {message}")


def warp_grid(items):
    """``(grid, block)`` for grid-stride kernels that give one warp (32 threads) to each of ``items``."""
    return thread_grid(32 * items)


def load(name):
    """The launcher module ``dualnet.kernels.cuda.<name>`` (imports CuPy lazily on first launch)."""
    if name not in MODULES + LIBRARY_MODULES:
        raise ValueError(f"kernels.cuda: unknown kernel module {name!r}; known: {MODULES + LIBRARY_MODULES}")
    return importlib.import_module(f"{__name__}.{name}")
