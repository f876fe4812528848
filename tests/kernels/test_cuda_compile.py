"""Every CUDA source in kernels/cuda builds with nvcc (PTX for sm_80), without a GPU.

Skipped when nvcc is not on PATH.  Also checks that each kernel a CuPy launcher of this package
asks for is exported (``extern "C"``) in float and double variants.
"""
import pathlib
import shutil
import subprocess

import pytest

from dualnet.kernels import cuda

NVCC = shutil.which("nvcc")
SOURCES = sorted(pathlib.Path(cuda.SOURCE_DIR).glob("*.cu"))
LAUNCHED = {  # source -> kernels its launcher module fetches with cuda.function
    "layer_norm": ("layer_norm_forward", "layer_norm_jacobian"),
    "normalize_epilogue": ("normalize_epilogue", "normalize_relu"),
    "replicated_loss": ("replica_tangent", "replica_cotangent"),
    "sgd": ("sgd_update",),
}

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def test_sources_are_found():
    assert {p.stem for p in SOURCES} >= set(LAUNCHED)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_compiles_to_ptx(source, tmp_path):
    ptx = tmp_path / f"{source.stem}.ptx"
    result = subprocess.run([NVCC, "--ptx", "-arch=sm_80", "--std=c++14", str(source), "-o", str(ptx)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    text = ptx.read_text()
    for kernel in LAUNCHED.get(source.stem, ()):
        for suffix in ("f32", "f64"):
            assert f".entry {kernel}_{suffix}(" in text, f"{source.name} does not export {kernel}_{suffix}"
