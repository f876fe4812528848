"""A test-only stand-in for the ``cupy`` module: NumPy arrays, and ``RawModule`` kernels that run
on the CPU through the harness (``harness.py``), so that the CUDA launchers in kernels/cuda run
unchanged on a machine without a GPU.

It covers what the launchers call: ``empty``, ``zeros``, ``asarray``, ``ascontiguousarray`` and
``RawModule(code=..., options=...).get_function(name)(grid, block, args)``.  Every array it
creates sits inside a buffer padded with NaN on both sides, and ``empty`` fills the array itself
with NaN: after each launch the padding is checked (a write out of bounds raises), and a read out
of bounds or an output element left unwritten shows up as NaN in the results.

What this proves: the kernels' arithmetic, indexing and warp shuffles, the launch geometry and the
launchers' argument lists (order, scalar types, dtypes, contiguity).  What it cannot: timing,
memory use, NVRTC itself, and hardware behaviour such as concurrent warps (the emulation runs
warps one after another).

Tests install it with the ``fake_cupy`` fixture (tests/kernels/conftest.py), which refuses to when
the real CuPy can be imported.
"""
import types
import weakref

import numpy

PADDING = 64
"""Elements of NaN on each side of every array the stand-in creates."""


class Device:
    """The state of one installed stand-in: the harness module, the compiled sources, a record of
    every launch ``(kernel, grid, block)`` as the launcher asked for it, and ``geometry``: None,
    or a function ``(grid, block) -> (grid, block)`` that replaces the launcher's geometry (to run
    the grid-stride loops with deliberately small or odd grids)."""

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
        buffer = numpy.full(size + 2 * PADDING, numpy.nan, dtype)
        array = buffer[PADDING:PADDING + size].reshape(shape)
        if fill is not None:
            array[...] = fill
        self._buffers[id(buffer)] = buffer
        return array

    def empty(self, shape, dtype=numpy.float64):
        """An array of NaN (so that an element a kernel fails to write is caught)."""
        return self._padded(shape, dtype, None)

    def zeros(self, shape, dtype=numpy.float64):
        """An array of zeros."""
        return self._padded(shape, dtype, 0)

    def asarray(self, array, dtype=None):
        """A padded copy of ``array`` (CuPy's host-to-device copy)."""
        array = numpy.asarray(array, dtype)
        return self._padded(array.shape, array.dtype, array)

    def ascontiguousarray(self, array, dtype=None):
        """``array`` itself when C-contiguous of ``dtype`` (as CuPy), else a padded copy."""
        if isinstance(array, numpy.ndarray) and array.flags.c_contiguous and (
                dtype is None or array.dtype == numpy.dtype(dtype)):
            return array
        return self.asarray(numpy.ascontiguousarray(array, dtype), dtype)

    def check_padding(self, arrays):
        """Raise AssertionError if a kernel wrote outside any of ``arrays`` (into its padding)."""
        for array in arrays:
            buffer = self._buffers.get(id(array.base)) if isinstance(array, numpy.ndarray) else None
            if buffer is None:
                continue
            for side in (buffer[:PADDING], buffer[-PADDING:]):
                assert numpy.isnan(side).all(), "a kernel wrote outside an array it was given"

    # kernels -------------------------------------------------------------------------------
    def module(self):
        """The stand-in as a module object, for ``sys.modules['cupy']``."""
        device = self
        fake = types.ModuleType("cupy", __doc__)
        fake.__file__ = __file__
        fake.float32, fake.float64, fake.ndarray = numpy.float32, numpy.float64, numpy.ndarray
        fake.empty, fake.zeros = self.empty, self.zeros
        fake.asarray, fake.ascontiguousarray = self.asarray, self.ascontiguousarray

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
                device.launches.append((self.name, grid, block))
                if device.geometry is not None:
                    grid, block = device.geometry(grid, block)
                self.library.launch(self.name, grid[0], block[0], list(args))
                device.check_padding(args)

        fake.RawModule = RawModule
        return fake
