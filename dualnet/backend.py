"""Array backends: ``xp`` is NumPy or CuPy; everything else in dualnet is written against it.

``namespace(*arrays)`` returns the module that owns the arrays (CuPy if any is a CuPy array),
so primitive rules never hold a stale module.  ``use('cupy')`` switches the default used for
*creating* arrays (parameters, RNG, batches); ``using('cupy')`` does so for a ``with`` block.
GPU use is gated on ``cupy.is_available()``, never on import success: asking for CUDA without
a usable device raises ``DeviceUnavailable`` (with ``DUALNET_BACKEND=cupy`` set, at the first
array the backend is asked to create, so that ``import dualnet`` itself never fails).
"""
import contextlib
import os
import sys

import numpy

xp = numpy
DEFAULT_DTYPE = numpy.float32
_BACKENDS = ("numpy", "cupy")
DEVICES = {"cpu": "numpy", "cuda": "cupy"}
"""Device names (``--device``, ``Config.device``) and their backends."""


class DeviceUnavailable(RuntimeError):
    """CUDA was requested but CuPy is missing or ``cupy.is_available()`` is False."""


MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 64 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20)}
"""glibc ``mallopt`` parameters (number, value): keep up to 1 GiB of freed heap, grow the heap
64 MiB at a time, and serve every block up to 32 MiB (glibc's largest mmap threshold) from it."""


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back (``MALLOC_SETTINGS``).

    A training step allocates and frees the same large arrays every step (activations, tangents,
    gradients).  With glibc's defaults, blocks above its mmap threshold are mapped and unmapped on
    every allocation, and the heap is given back to the system at the end of a step and taken
    again during the next; every page taken again is a page fault and a zeroing.  Measured per
    step: ~3,400 faults (13 MB) for the MLP FG-A step, 6,000-11,000 for LocalMixer M/8/16 (and
    49,000-63,000 with only the heap's top pad kept, which turns off glibc's adaptive threshold).
    With these settings both take under 50.  The resident memory stays at the run's peak.  Called
    once on ``import dualnet`` (``DUALNET_MALLOC=default`` leaves malloc alone).  Returns True when
    the settings were applied (glibc), False elsewhere.
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):  # glibc's mallopt; elsewhere nothing to set
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return all([bool(mallopt(number, value)) for number, value in MALLOC_SETTINGS.values()])


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def cuda_available():
    """True when CuPy is installed *and* a CUDA device can be used."""
    cupy = _cupy()
    if cupy is None:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # a broken driver counts as "no GPU", not a crash
        return False


def use(name):
    """Select the array backend: ``'numpy'`` (CPU) or ``'cupy'`` (CUDA GPU).

    Raises ``RuntimeError`` with a clear message when CUDA is requested but unavailable.
    """
    global xp
    if name not in _BACKENDS:
        raise ValueError(f"backend.use: unknown backend {name!r}; choose one of {_BACKENDS}")
    if name == "cupy":
        if not cuda_available():
            raise DeviceUnavailable(_UNAVAILABLE)
        xp = _cupy()
    else:
        xp = numpy
    return xp


_UNAVAILABLE = ("backend.use('cupy'): no usable CUDA device (cupy missing or cupy.is_available() is False). "
                "Install the extra `pip install -e .[cuda]` on a machine with an NVIDIA GPU, or use the "
                "'numpy' backend (--device cpu; unset DUALNET_BACKEND).")


@contextlib.contextmanager
def using(name):
    """``with backend.using('cupy'): ...`` runs the block on backend ``name`` and then restores the
    previous one (also when the block raises)."""
    global xp
    previous = xp
    use(name)
    try:
        yield xp
    finally:
        xp = previous


def current():
    """Name of the active backend."""
    return "numpy" if xp is numpy else "cupy"


def device():
    """The active backend's device: ``'cpu'`` or ``'cuda'``."""
    return "cpu" if xp is numpy else "cuda"


def namespace(*arrays):
    """The array module owning ``arrays``: CuPy if any of them lives on the GPU, else NumPy."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return _cupy()
    return numpy


def is_array(x):
    """True for a NumPy or CuPy array."""
    return isinstance(x, numpy.ndarray) or type(x).__module__.startswith("cupy")


def to_numpy(x):
    """Copy an array to host memory (identity for NumPy arrays)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, numpy.ndarray) else numpy.asarray(x)


def to_device(x):
    """Move a host array to the active backend."""
    return xp.asarray(x)


def rng(seed=None):
    """A Generator on the active backend (``numpy.random.default_rng`` or CuPy's)."""
    return xp.random.default_rng(seed)


def scatter_add(target, index, values):
    """``target[index] += values`` with repeated indices accumulated (NumPy ``add.at``)."""
    module = namespace(target)
    if module is numpy:
        numpy.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)
    return target


def kernels_mode():
    """``'auto'`` (use fused kernels when available) or ``'reference'`` (force NumPy paths).

    Set with the environment variable ``DUALNET_KERNELS``.
    """
    mode = os.environ.get("DUALNET_KERNELS", "auto").lower()
    if mode not in ("auto", "reference"):
        raise ValueError(f"DUALNET_KERNELS={mode!r}: expected 'auto' or 'reference'")
    return mode


KERNEL_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def kernel(module, contract, reference, *arrays):
    """The function that runs ``contract`` on ``arrays`` — the one kernel dispatcher.

    ``reference`` is the NumPy/CuPy function the kernels are held to; ``module`` names the kernel
    module (``dualnet.kernels.cpu.<module>``, ``dualnet.kernels.cuda.<module>``) that defines
    ``contract`` with the reference's signature and results.  The kernel is chosen when
    ``kernels_mode() == 'auto'`` and every array is float32 or float64: the Numba kernel for NumPy
    arrays (if Numba is importable), the CUDA kernel for CuPy arrays.  Otherwise the reference.
    """
    if kernels_mode() != "auto" or any(a.dtype not in KERNEL_DTYPES for a in arrays):
        return reference
    if namespace(*arrays) is numpy:
        from .kernels import cpu
        return getattr(cpu.load(module), contract) if cpu.available() else reference
    from .kernels import cuda
    return getattr(cuda.load(module), contract)


def warm_up_kernels(dtypes=("float32", "float64")):
    """Compile (or load from Numba's on-disk cache) every CPU kernel now rather than on first use.

    Does nothing when the kernels would not be used (reference mode, no Numba).
    """
    from .kernels import cpu
    if kernels_mode() == "auto" and cpu.available():
        cpu.warm_up(cpu.MODULES, dtypes)


class _Unavailable:
    """Stands in for ``xp`` when ``DUALNET_BACKEND=cupy`` but no GPU can be used: any use raises."""

    def __init__(self, error):
        self.error = error

    def __getattr__(self, name):
        raise DeviceUnavailable(f"DUALNET_BACKEND=cupy: {self.error}")


if os.environ.get("DUALNET_BACKEND"):
    try:
        use(os.environ["DUALNET_BACKEND"].lower())
    except DeviceUnavailable as error:
        xp = _Unavailable(error)
