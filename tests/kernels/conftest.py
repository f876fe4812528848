"""Fixtures of the CUDA-on-CPU harness (tests/kernels/cuda_harness; see docs/cuda_on_cpu.md).

``cuda_harness``: the harness module (build a .cu source for the CPU, launch its kernels), or a
skip when no C++ compiler is found.  ``fake_cupy``: installs the test-only ``cupy`` stand-in in
``sys.modules`` for one test and yields its ``Device``; it skips when the real CuPy can be
imported (the real one is then never replaced: tests/kernels/test_cuda_kernels.py runs the
kernels on the GPU instead).
"""
import importlib.util
import pathlib
import sys

import pytest

HARNESS_DIR = pathlib.Path(__file__).with_name("cuda_harness")


def _load(name):
    """Import ``cuda_harness/<name>.py`` (the tests run with --import-mode=importlib: no sys.path)."""
    module_name = f"dualnet_tests_cuda_harness_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HARNESS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def cuda_harness():
    """The harness module (``build``, ``kernel_signatures``, ``Library.launch``)."""
    harness = _load("harness")
    if harness.compiler() is None:
        pytest.skip("no C++ compiler ($CXX, g++, clang++ or c++) on PATH: cannot run the CUDA sources on the CPU")
    return harness


@pytest.fixture
def fake_cupy(cuda_harness, monkeypatch):
    """The ``cupy`` stand-in, installed for this test; yields its ``Device`` (launch record, geometry)."""
    if "cupy" in sys.modules or importlib.util.find_spec("cupy") is not None:
        pytest.skip("the real CuPy is importable: the stand-in is never installed over it")
    from dualnet.kernels import cuda
    device = _load("fake_cupy").Device(cuda_harness)
    monkeypatch.setitem(sys.modules, "cupy", device.module())
    cuda.raw_module.cache_clear()
    yield device
    cuda.raw_module.cache_clear()
