"""Numba kernels for the CPU, one module per fused op, loaded on demand (``outer_update`` binds
NumPy's own BLAS instead).

Importing this package imports neither Numba nor any kernel: ``load(name)`` imports the module
``dualnet.kernels.cpu.<name>`` the first time it is asked for, and Numba compiles a kernel on its
first call (``cache=True`` keeps the machine code on disk for the next process).  ``warm_up()``
triggers those compilations up front.

Contract of a kernel module: its public functions have exactly the signature and the return
shapes of the NumPy reference they replace (the references live in ``dualnet``; tests hold each
kernel to its reference), accept arrays of any layout and float32/float64 dtype, and provide
``warm_up(dtype)``.  Adding a module is one line in ``MODULES``.
"""
import contextlib
import importlib
import importlib.util
import pathlib

MODULES = (
    "layer_norm",          # local layer norm: value + K tangents in one pass, Jacobian product (pull-back)
    "normalize_epilogue",  # epilogue after the grouped GEMMs: bias, layout, LN; value + K tangents
    "replicated_loss",     # replicated local losses: the replicas' directional derivatives, the vjp scatter
    "site_gradient",       # FG-A's gradient at a layer's site: Σ_k d_k u_k, masked, in one pass
    "gaussian",            # counter-based N(0, 1) draws (dualnet.noise): hash, ziggurat, per-position rejection
    "sgd",                 # the SGD update: parameter, gradient and momentum buffer in one pass, in place
    "outer_update",        # a weight updated from its gradient factors: one GEMM with β, NumPy's BLAS
)

PARALLEL_MIN_ELEMENTS = 1 << 20
"""Below this many elements a kernel runs on one thread: waking the thread pool costs more than it
saves, and on a loaded machine a parallel region waits a scheduler slice (measured 8-10 ms on a
busy 2-core machine) for its worker.  ``NUMBA_NUM_THREADS=1`` makes every call single-threaded."""


def available():
    """True when Numba can be imported (checked without importing it)."""
    return importlib.util.find_spec("numba") is not None


def cached(names=MODULES):
    """True when Numba's on-disk cache holds an index for every cached kernel the modules of
    ``names`` define: a run then starts without compiling.  The cache is where Numba put it:
    ``__pycache__`` beside the sources, or the user-wide cache directory when the sources are
    read-only.  Helpers compiled into their callers (``inline='always'``, no ``cache=True``) have
    no index of their own."""
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher
    for name in names:
        module = load(name)
        for kernel in vars(module).values():
            if (isinstance(kernel, CPUDispatcher) and kernel.py_func.__module__ == module.__name__
                    and not isinstance(kernel._cache, NullCache)):
                cache = pathlib.Path(kernel._cache.cache_path)
                if not any(cache.glob(f"{name}.{kernel.py_func.__qualname__}-*.nbi")):
                    return False
    return True


def load(name):
    """The kernel module ``dualnet.kernels.cpu.<name>`` (imports Numba on first use)."""
    if name not in MODULES:
        raise ValueError(f"kernels.cpu: unknown kernel module {name!r}; known: {MODULES}")
    return importlib.import_module(f"{__name__}.{name}")


def parallel(elements):
    """Whether a kernel call over ``elements`` runs on every thread (at least
    ``PARALLEL_MIN_ELEMENTS``).  The first such call has OpenBLAS's idle workers sleep sooner
    (``dualnet.idle_threads.let_openblas_workers_sleep``), so they no longer spin on the cores the
    parallel kernels need."""
    if elements < PARALLEL_MIN_ELEMENTS:
        return False
    from dualnet.idle_threads import let_openblas_workers_sleep
    let_openblas_workers_sleep()
    return True


@contextlib.contextmanager
def threads_for(elements):
    """Run the enclosed kernel call on one thread when ``elements`` is small, else on all (``parallel``)."""
    if parallel(elements):
        yield
        return
    import numba
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def warm_up(names=MODULES, dtypes=("float32", "float64")):
    """Compile (or load from Numba's cache) every kernel of ``names`` for ``dtypes`` now."""
    for name in names:
        module = load(name)
        for dtype in dtypes:
            module.warm_up(dtype)
