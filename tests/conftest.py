"""Shared test settings: deterministic hypothesis, float64 by default for derivative checks; the
fixtures that run the CUDA kernels and the GPU path on the CPU (``cuda_harness``, ``fake_cupy``,
``cuda_device``)."""
import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dualnet", deadline=None, derandomize=True, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("dualnet")


@pytest.fixture
def rng():
    """A fixed-seed NumPy generator: statistical tests are deterministic."""
    return np.random.default_rng(0)


@pytest.fixture
def normalize_relu_arguments(rng):
    """``arguments(dtype, groups, rows, width, directions, present)``: random host arguments of the
    ``normalize_relu`` kernel contract (``dualnet.fused.reference_normalize_relu``); ``present``
    flags its six optional arrays (tangent, bias, bias_tangent, injected, residual,
    residual_tangent), and K becomes 0 when none of the four tangents is present."""
    def arguments(dtype, groups, rows, width, directions, present):
        def make(*shape):
            return (rng.standard_normal(shape) * 2).astype(dtype)
        per_direction = (directions, rows, groups, width)
        candidates = (make(groups, directions, rows, width), make(groups, width), make(directions, groups, width),
                      make(*per_direction), make(rows, groups, width), make(*per_direction))
        moving = any(present[i] for i in (0, 2, 3, 5))
        return (make(groups, rows, width), *(c if p else None for c, p in zip(candidates, present)), 1e-5,
                directions if moving else 0)
    return arguments


# ---------------------------------------------------------------------------------------
# CUDA on the CPU (tests/kernels/cuda_harness; docs/cuda_on_cpu.md)
# ---------------------------------------------------------------------------------------
CUDA_HARNESS_DIR = pathlib.Path(__file__).parent / "kernels" / "cuda_harness"
_STAND_IN_SHIM = '''"""Test-only: this {name} is replaced by the CuPy stand-in of the dualnet tests."""
import importlib.util
import sys


def _load(name, path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_harness = _load("{harness_name}", {harness_path!r})
_load("{fake_name}", {fake_path!r}).Device(_harness).install()
'''


def load_cuda_harness(name):
    """Import ``tests/kernels/cuda_harness/<name>.py`` (the tests run with --import-mode=importlib,
    which puts nothing on sys.path)."""
    module_name = f"dualnet_tests_cuda_harness_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, CUDA_HARNESS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def cuda_harness():
    """The harness module (``build``, ``kernel_signatures``, ``Library.launch``); skips the test
    when no C++ compiler is found."""
    harness = load_cuda_harness("harness")
    if harness.compiler() is None:
        pytest.skip("no C++ compiler ($CXX, g++, clang++ or c++) on PATH: cannot run the CUDA sources on the CPU")
    return harness


@pytest.fixture(scope="session")
def cupy_stand_in_path(tmp_path_factory, cuda_harness):
    """A directory whose ``cupy`` and ``cupyx`` packages install the stand-in, for subprocesses."""
    root = tmp_path_factory.mktemp("cupy-stand-in")
    names = dict(harness_name="dualnet_tests_cuda_harness_harness", harness_path=str(CUDA_HARNESS_DIR / "harness.py"),
                 fake_name="dualnet_tests_cuda_harness_fake_cupy",
                 fake_path=str(CUDA_HARNESS_DIR / "fake_cupy.py"))
    for package in ("cupy", "cupyx"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text(_STAND_IN_SHIM.format(name=package, **names))
    return root


@pytest.fixture
def fake_cupy(cuda_harness, cupy_stand_in_path, monkeypatch):
    """The ``cupy``/``cupyx`` stand-in, installed for this test in ``sys.modules`` and (through
    PYTHONPATH) for its subprocesses; yields its ``Device`` (launch record, geometry).  Skips when
    the real CuPy is importable: the stand-in is never installed over it."""
    if "cupy" in sys.modules or importlib.util.find_spec("cupy") is not None:
        pytest.skip("the real CuPy is importable: the stand-in is never installed over it")
    from dualnet.kernels import cuda
    device = load_cuda_harness("fake_cupy").Device(cuda_harness)
    for name, module in (("cupy", device.module()), ("cupyx", device.cupyx_module())):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(cupy_stand_in_path),
                                                                   os.environ.get("PYTHONPATH")])))
    cuda.raw_module.cache_clear()
    yield device
    cuda.raw_module.cache_clear()


@pytest.fixture
def cuda_device(request):
    """``'cuda'`` when CuPy has a usable GPU; else ``'stand-in'``, with the CuPy stand-in installed
    for the test (``fake_cupy``), or a skip saying why neither is possible."""
    from dualnet import backend
    if backend.cuda_available():
        return "cuda"
    request.getfixturevalue("fake_cupy")
    return "stand-in"
