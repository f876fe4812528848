"""A test-only stand-in for the ``cupy`` (and ``cupyx``) modules, so that dualnet's GPU path runs
on a machine without a GPU: the backend switch, ``DUALNET_BACKEND=cupy``, the CUDA launchers in
kernels/cuda, and their kernels, which run on the CPU through the harness (``harness.py``).

Device arrays are ``ndarray``: a NumPy array subclass whose type says it comes from module
``cupy``, which is how ``dualnet.backend.namespace`` tells device arrays from host ones.  As with
CuPy, NumPy functions and ufuncs applied to them return device arrays (reductions: 0-d arrays),
mixing them with NumPy arrays raises TypeError, and ``.get()`` / ``asnumpy`` copy to the host.
Any other ``cupy.<name>`` is NumPy's function, with its results moved to the "device".
``RawModule(code=..., options=...).get_function(name)(grid, block, args)`` runs a kernel of a
CUDA source through the harness, which checks the arguments against the kernel's parameters.

Every array made by ``empty``, ``zeros``, ``asarray`` or ``ascontiguousarray`` sits inside a buffer
padded with NaN on both sides, and ``empty`` fills the array itself with NaN: after each launch
the padding of every array argument is checked (a write out of bounds raises AssertionError),
and a read out of bounds or an output element left unwritten shows up as NaN in the results.

What this proves: the kernels' arithmetic, indexing and warp shuffles, the launch geometry, the
launchers' argument lists (order, scalar types, dtypes, contiguity), and that dualnet keeps its
arrays on the device.  What it cannot: timing, memory use, NVRTC itself, cuRAND's numbers
(``random`` draws NumPy's), concurrent warps (the emulation runs warps one after another), and
host conversions that NumPy allows a subclass but CuPy refuses (``numpy.asarray(device_array)``).

Tests install it with the ``fake_cupy`` fixture (tests/conftest.py), never over a real CuPy.
"""
import sys
import types
import weakref

import numpy

PADDING = 64
"""Elements of NaN on each side of every array the stand-in allocates."""


class ndarray(numpy.ndarray):  # noqa: N801 - the name CuPy gives it
    """A device array of the stand-in (a NumPy array whose type's module is ``cupy``)."""

    __module__ = "cupy"

    def get(self):
        """A host copy (``numpy.ndarray``)."""
        return numpy.array(self.view(numpy.ndarray))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(not isinstance(x, numpy.ndarray) and getattr(x, "__array_ufunc__", 0) is None for x in inputs):
            return NotImplemented  # CuPy defers ``array (op) x`` to x's reflected operator for such an x
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_host(inputs), **_host(kwargs))
        return out[0] if out is not None and len(out) == 1 else (out if out is not None else _device(result))

    def __array_function__(self, function, types, args, kwargs):
        return _device(function(*_host(args), **_host(kwargs)))


def _host(value):
    """``value`` with device arrays replaced by host views; TypeError for a NumPy array (as CuPy)."""
    if isinstance(value, ndarray):
        return value.view(numpy.ndarray)
    if isinstance(value, numpy.ndarray):
        raise TypeError(f"fake cupy: a numpy.ndarray {value.shape} mixed with device arrays (CuPy refuses "
                        f"implicit host-device conversion)")
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    return value


def _device(value):
    """NumPy results as device arrays (scalars from reductions as 0-d arrays, as CuPy returns)."""
    if isinstance(value, numpy.ndarray):
        return value if isinstance(value, ndarray) else value.view(ndarray)
    if isinstance(value, numpy.generic):
        return numpy.asarray(value).view(ndarray)
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    if isinstance(value, list):
        return [_device(v) for v in value]
    return value


def _on_device(function):
    """NumPy's ``function``, taking and returning device arrays."""
    def call(*args, **kwargs):
        return _device(function(*_host(args), **_host(kwargs)))
    call.__name__ = call.__qualname__ = getattr(function, "__name__", "function")
    call.__doc__ = f"numpy.{call.__name__} on device arrays"
    return call


class Generator:
    """``cupy.random.Generator``: NumPy's generator for the same seed, drawing device arrays."""

    def __init__(self, seed=None):
        self._numpy = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        return _on_device(getattr(self._numpy, name))


class Device:
    """The state of one installed stand-in: the harness module, the compiled sources, a record of
    every launch ``(kernel, grid, block)`` as the launcher asked for it, the NVRTC options each
    source was compiled with, and ``geometry``: None, or a function ``(grid, block) -> (grid,
    block)`` that replaces the launcher's geometry (to run the grid-stride loops with small or odd
    grids)."""

    def __init__(self, harness):
        self.harness = harness
        self.launches = []
        self.options = []
        self.geometry = None
        self._buffers = weakref.WeakValueDictionary()

    # arrays --------------------------------------------------------------------------------
    def _padded(self, shape, dtype, fill):
        shape = (shape,) if numpy.isscalar(shape) else tuple(shape)
        dtype = numpy.dtype(dtype)
        size = int(numpy.prod(shape, dtype=numpy.int64))
        buffer = numpy.full(size + 2 * PADDING, numpy.nan if dtype.kind in "fc" else 0, dtype)
        array = buffer[PADDING:PADDING + size].reshape(shape).view(ndarray)
        if fill is not None:
            array.view(numpy.ndarray)[...] = fill
        self._buffers[id(buffer)] = buffer
        return array

    def empty(self, shape, dtype=numpy.float64):
        """A device array of NaN (so that an element a kernel fails to write is caught)."""
        return self._padded(shape, dtype, None)

    def zeros(self, shape, dtype=numpy.float64):
        """A device array of zeros."""
        return self._padded(shape, dtype, 0)

    def asarray(self, array, dtype=None):
        """``array`` itself if already a device array of ``dtype``, else a padded device copy."""
        if isinstance(array, ndarray) and (dtype is None or array.dtype == numpy.dtype(dtype)):
            return array
        host = numpy.asarray(array.view(numpy.ndarray) if isinstance(array, ndarray) else array, dtype)
        return self._padded(host.shape, host.dtype, host)

    def ascontiguousarray(self, array, dtype=None):
        """``array`` itself when a C-contiguous device array of ``dtype`` (as CuPy), else a copy."""
        if isinstance(array, ndarray) and array.flags.c_contiguous and (
                dtype is None or array.dtype == numpy.dtype(dtype)):
            return array
        return self.asarray(numpy.ascontiguousarray(_host(array), dtype))

    def check_padding(self, arrays):
        """Raise AssertionError if a kernel wrote into the padding around any of ``arrays``."""
        for array in arrays:
            owner = array
            while isinstance(owner, numpy.ndarray) and id(owner) not in self._buffers:
                owner = owner.base
            if not isinstance(owner, numpy.ndarray):
                continue
            dtype = owner.dtype
            for side in (owner[:PADDING], owner[-PADDING:]):
                intact = numpy.isnan(side).all() if dtype.kind in "fc" else not side.any()
                assert intact, f"a kernel wrote outside an array {array.shape} it was given"

    # the modules ---------------------------------------------------------------------------
    def module(self):
        """The stand-in ``cupy`` module object (for ``sys.modules['cupy']``)."""
        device = self
        cupy = types.ModuleType("cupy", __doc__)
        cupy.__file__ = __file__
        cupy.__version__ = "stand-in"
        cupy.ndarray = ndarray
        cupy.empty, cupy.zeros, cupy.asarray, cupy.ascontiguousarray = (
            self.empty, self.zeros, self.asarray, self.ascontiguousarray)
        cupy.is_available = lambda: True

        def asnumpy(array):
            """A host copy of ``array``."""
            return array.get() if isinstance(array, ndarray) else numpy.asarray(array)
        cupy.asnumpy = asnumpy
        cupy.cuda = types.ModuleType("cupy.cuda")  # one device, number 0
        cupy.cuda.runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1)
        cupy.random = types.ModuleType("cupy.random")
        cupy.random.Generator = Generator
        cupy.random.default_rng = Generator

        def numpy_attribute(name):
            value = getattr(numpy, name)  # AttributeError for names NumPy lacks too
            return _on_device(value) if callable(value) and not isinstance(value, type) else value
        cupy.__getattr__ = numpy_attribute

        class RawModule:
            """A CUDA source compiled for the CPU by the harness (``code`` must be self-contained)."""

            def __init__(self, code, options=()):
                device.options.append(tuple(options))
                self.library = device.harness.build(code)

            def get_function(self, name):
                """The kernel ``name`` of this source (KeyError if the source does not define it)."""
                if name not in self.library.signatures:
                    raise KeyError(f"fake cupy: the source defines no kernel {name!r}")
                return RawKernel(self.library, name)

        class RawKernel:
            """One kernel; called as CuPy's: ``kernel(grid, block, args)``."""

            def __init__(self, library, name):
                self.library, self.name = library, name

            def __call__(self, grid, block, args, shared_mem=0):
                if not (isinstance(grid, tuple) and isinstance(block, tuple) and len(grid) == len(block) == 1):
                    raise TypeError(f"{self.name}: grid and block must be 1-tuples, got {grid!r}, {block!r}")
                if shared_mem:
                    raise TypeError(f"{self.name}: the kernels use no dynamic shared memory")
                for position, arg in enumerate(args):
                    if isinstance(arg, numpy.ndarray) and not isinstance(arg, ndarray):
                        raise TypeError(f"{self.name} argument {position}: a host numpy.ndarray (CuPy refuses it)")
                device.launches.append((self.name, grid, block))
                if device.geometry is not None:
                    grid, block = device.geometry(grid, block)
                self.library.launch(self.name, grid[0], block[0],
                                    [a.view(numpy.ndarray) if isinstance(a, ndarray) else a for a in args])
                device.check_padding(args)

        cupy.RawModule = RawModule
        cupy.cublas = self.cublas_module()
        return cupy

    def cublas_module(self):
        """The stand-in ``cupy.cublas`` (``gemm``), computed by NumPy on the host views."""
        cublas = types.ModuleType("cupy.cublas")

        def gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
            """out ← α·op(a)·op(b) + β·out, op 'N' or 'T', with the checks of CuPy's: device arrays,
            2-D operands of one dtype, ``out`` of the product's shape and dtype (not read when β = 0)."""
            for name, array in (("a", a), ("b", b), ("out", out)):
                if array is not None and not isinstance(array, ndarray):
                    raise TypeError(f"cublas.gemm {name}: not a device array")
            assert a.ndim == b.ndim == 2 and a.dtype == b.dtype
            operation = {"N": lambda m: m, "T": lambda m: m.T}
            product = operation[transa](a.view(numpy.ndarray)) @ operation[transb](b.view(numpy.ndarray))
            if out is None:
                out, beta = self.empty(product.shape, a.dtype), 0.0
            assert out.shape == product.shape and out.dtype == a.dtype
            host = out.view(numpy.ndarray)
            host[...] = alpha * product if beta == 0 else alpha * product + beta * host
            return out
        cublas.gemm = gemm
        return cublas

    def cupyx_module(self):
        """The stand-in ``cupyx`` module (``scatter_add``)."""
        cupyx = types.ModuleType("cupyx")

        def scatter_add(target, index, values):
            """``target[index] += values``, repeated indices accumulated."""
            numpy.add.at(target.view(numpy.ndarray), _host(index), _host(values))
        cupyx.scatter_add = scatter_add
        return cupyx

    def install(self, modules=None):
        """Put the stand-in ``cupy`` and ``cupyx`` in ``modules`` (default ``sys.modules``)."""
        modules = sys.modules if modules is None else modules
        modules["cupy"], modules["cupyx"] = self.module(), self.cupyx_module()
