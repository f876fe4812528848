"""Run a CUDA source of kernels/cuda on the CPU: compile it with the host C++ compiler after
``cuda_emulation.h`` and call its kernels through ctypes.

``build(source_text)`` returns a ``Library``: the unchanged source, #included after the emulation
header, with one exported entry point per ``extern "C" __global__`` kernel, compiled into a shared
library.  Libraries are cached on disk under ``$DUALNET_CUDA_HARNESS_CACHE`` (default: a
directory in the system temp dir), keyed by the hash of the source, the header and the compiler
command, so only the first run pays for compilation.  ``Library.launch(kernel, grid, block,
args)`` checks ``args`` against the kernel's parameters parsed from the source (as CuPy would
pack them: arrays as pointers, NumPy scalars by their dtype) and runs the kernel.

Run the tests that use it with
``PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_on_cpu.py``;
they skip when no C++ compiler (``$CXX``, g++, clang++ or c++) is found.
"""
import ctypes
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy

HEADER = pathlib.Path(__file__).with_name("cuda_emulation.h")
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC")
CACHE = pathlib.Path(os.environ.get("DUALNET_CUDA_HARNESS_CACHE",
                                    pathlib.Path(tempfile.gettempdir()) / "dualnet-cuda-harness"))

SCALARS = {  # C parameter type -> the NumPy scalar type CuPy must be given for it
    "int": numpy.int32, "long long": numpy.int64, "float": numpy.float32, "double": numpy.float64,
}
POINTEES = {"float": numpy.float32, "double": numpy.float64, "bool": numpy.bool_}
_CTYPES = {numpy.int32: ctypes.c_int32, numpy.int64: ctypes.c_int64, numpy.float32: ctypes.c_float,
           numpy.float64: ctypes.c_double}
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def compiler():
    """The host C++ compiler to use (``$CXX``, then g++, clang++, c++), or None."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class Parameter:
    """One kernel parameter: ``name``, ``dtype`` (scalar type, or element type of a pointer),
    ``pointer`` (True for ``T*``) and ``const`` (True for a pointer to const)."""

    def __init__(self, declaration):
        words = declaration.replace("*", " * ").split()
        self.name = words[-1]
        self.pointer = "*" in words
        self.const = self.pointer and "const" in words[:words.index("*")]
        base = " ".join(w for w in words[:-1] if w not in ("const", "*", "__restrict__"))
        table = POINTEES if self.pointer else SCALARS
        if base not in table:
            raise ValueError(f"cuda harness: unsupported parameter type in {declaration!r}")
        self.dtype = numpy.dtype(table[base])

    def __repr__(self):
        return f"{'const ' if self.const else ''}{self.dtype}{'*' if self.pointer else ''} {self.name}"


def kernel_signatures(source_text):
    """``{kernel name: [Parameter, ...]}`` of every ``extern "C" __global__`` kernel in a CUDA
    source, after the compiler's preprocessor has expanded its macros."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda harness: no C++ compiler found")
    expanded = subprocess.run([cxx, "-E", "-P", "-x", "c++", "-"], input=source_text, capture_output=True,
                              text=True, check=True, timeout=60).stdout
    return {name: [Parameter(p) for p in params.split(",")] for name, params in _KERNEL.findall(expanded)}


class LaunchError(RuntimeError):
    """A kernel launch the emulation refused or aborted (bad geometry, divergent warp shuffle)."""


class Library:
    """A CUDA source compiled for the CPU: ``signatures`` and ``launch``."""

    def __init__(self, path, signatures):
        self.path = path
        self.signatures = signatures
        self._library = ctypes.CDLL(str(path))
        self._library.cuda_emulation_error.restype = ctypes.c_char_p

    def check_arguments(self, kernel, args):
        """Raise TypeError unless ``args`` match ``kernel``'s parameters one for one: a C-contiguous
        NumPy array of the pointee dtype for each pointer, a NumPy scalar of the exact type for
        each scalar (what CuPy's RawKernel packs: a mismatch is garbage on the GPU, silently)."""
        params = self.signatures[kernel]
        if len(args) != len(params):
            raise TypeError(f"{kernel}: {len(args)} arguments for {len(params)} parameters {params}")
        for position, (arg, param) in enumerate(zip(args, params)):
            where = f"{kernel} argument {position} ({param!r})"
            if param.pointer:
                if not isinstance(arg, numpy.ndarray):
                    raise TypeError(f"{where}: expected an array, got {type(arg).__name__}")
                if arg.dtype != param.dtype:
                    raise TypeError(f"{where}: array of {arg.dtype}")
                if not arg.flags.c_contiguous:
                    raise TypeError(f"{where}: array is not C-contiguous (strides {arg.strides})")
                if not param.const and not arg.flags.writeable:
                    raise TypeError(f"{where}: output array is read-only")
            elif not isinstance(arg, numpy.generic) or arg.dtype != param.dtype:
                raise TypeError(f"{where}: expected a numpy.{param.dtype} scalar, got {type(arg).__name__}"
                                f"{'' if not isinstance(arg, numpy.generic) else ' of ' + str(arg.dtype)}")

    def launch(self, kernel, grid, block, args):
        """Run ``kernel`` with a 1-D ``grid`` of blocks of ``block`` threads on ``args``."""
        self.check_arguments(kernel, args)
        cells = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, numpy.ndarray) else _CTYPES[a.dtype.type](a)
                 for a in args]
        params = (ctypes.c_void_p * max(1, len(cells)))(*[ctypes.cast(ctypes.pointer(c), ctypes.c_void_p)
                                                         for c in cells])
        entry = getattr(self._library, f"emulate_{kernel}")
        entry.argtypes = (ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p)
        if entry(int(grid), int(block), params) != 0:
            raise LaunchError(f"{kernel} <<<{grid}, {block}>>>: {self._library.cuda_emulation_error().decode()}")


def build(source_text, name="kernels", flags=()):
    """The CUDA source ``source_text`` compiled for the CPU (cached on disk; see the module doc),
    with extra compiler ``flags`` (e.g. ``-DCUDA_EMULATION_UCONTEXT``: the portable fibers)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda harness: no C++ compiler found")
    signatures = kernel_signatures(source_text)
    command = [cxx, *FLAGS, *flags]
    key = hashlib.sha256("\0".join([source_text, HEADER.read_text(), *command]).encode()).hexdigest()[:24]
    directory = CACHE / f"{name}-{key}"
    library = directory / f"{name}.so"
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.cu").write_text(source_text)
        exports = "".join(f"CUDA_EMULATION_EXPORT({kernel})\n" for kernel in signatures)
        unit = directory / "unit.cpp"
        unit.write_text(f'#include "{HEADER}"\n#include "{name}.cu"\n{exports}')
        partial = directory / f"{name}.{os.getpid()}.so"
        result = subprocess.run([*command, "-o", str(partial), str(unit)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"cuda harness: {cxx} failed on {name}.cu:\n{result.stderr}")
        os.replace(partial, library)  # atomic: concurrent test processes never load half a file
    return Library(library, signatures)
