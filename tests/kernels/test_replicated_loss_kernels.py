"""Replicated-loss kernels (Numba, CUDA) against their NumPy references in ``dualnet.losses``.

Tolerances: float64 to 1e-12 (same sums, different order); float32 to rtol 1e-5 / atol 3e-5
for values of order sqrt(c) ≤ 6 (kernel and reference both sum in float32, in different
orders).  CUDA tests run on a GPU, or without one on the CuPy stand-in (the same sources on the
CPU; docs/cuda_on_cpu.md).
"""
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dualnet as dn
from dualnet import losses
from dualnet.kernels import cuda as cuda_package
from dualnet.kernels.cpu import replicated_loss as cpu
from dualnet.kernels.cuda import replicated_loss as cuda

TOLERANCE = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=3e-5)}
shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 37))


def _operands(rng, shape, dtype):
    directions, n, patches, groups, c = shape
    return (rng.normal(size=shape).astype(dtype), rng.normal(size=(n, groups, c)).astype(dtype),
            rng.normal(size=(directions, n)).astype(dtype))


@settings(max_examples=12)
@given(shape=shapes, dtype=st.sampled_from([np.float64, np.float32]), with_head=st.booleans())
def test_numba_tangent_matches_reference(shape, dtype, with_head):
    x_tangent, u, head = _operands(np.random.default_rng(sum(shape)), shape, dtype)
    head = head if with_head else None
    got = cpu.replica_tangent(x_tangent, u, 0.37, head)
    expected = losses.replica_tangent_reference(x_tangent, u, 0.37, head)
    assert got.shape == shape[:4] and got.dtype == dtype
    np.testing.assert_allclose(got, expected, **TOLERANCE[dtype])


@settings(max_examples=12)
@given(shape=shapes, dtype=st.sampled_from([np.float64, np.float32]))
def test_numba_cotangent_matches_reference(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    _, u, _ = _operands(rng, shape, dtype)
    cotangent = rng.normal(size=shape[1:4]).astype(dtype)
    got = cpu.replica_cotangent(cotangent, u, 0.37)
    assert got.shape == shape[1:] and got.dtype == dtype
    np.testing.assert_allclose(got, losses.replica_cotangent_reference(cotangent, u, 0.37), **TOLERANCE[dtype])


def test_numba_kernels_take_non_contiguous_and_broadcast_operands(rng):
    """Transposed, strided and stride-0 (broadcast) views give the same numbers as copies."""
    base = rng.normal(size=(5, 2, 6, 3, 4))  # [c, K, N, G, P]-ordered storage
    x_tangent = base.transpose(1, 2, 4, 3, 0)[:, ::2]  # [K=2, N=3, P=4, G=3, c=5], non-contiguous
    u = rng.normal(size=(5, 3, 3)).transpose(2, 1, 0)  # [N=3, G=3, c=5] (transposed)
    head = np.broadcast_to(rng.normal(size=(1, 3)), (2, 3))  # stride-0 over K
    np.testing.assert_allclose(cpu.replica_tangent(x_tangent, u, 0.5, head),
                               cpu.replica_tangent(x_tangent.copy(), u.copy(), 0.5, head.copy()), rtol=1e-14)
    cotangent = np.broadcast_to(np.float64(0.25), (3, 4, 3))  # what sum's vjp hands down
    np.testing.assert_allclose(cpu.replica_cotangent(cotangent, u, 0.5),
                               losses.replica_cotangent_reference(cotangent.copy(), u, 0.5), rtol=1e-14)


def test_numba_tangent_accumulates_and_broadcasts_a_single_head_direction(rng):
    x_tangent, u, head = _operands(rng, (3, 2, 4, 3, 5), np.float64)
    start = rng.normal(size=(3, 2, 4, 3))
    got = cpu.replica_tangent(x_tangent, u, 0.25, head[:1], out=start.copy())
    expected = start + losses.replica_tangent_reference(x_tangent, u, 0.25, head[:1])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_numba_kernels_match_reference_on_all_threads(rng, monkeypatch):
    """Sizes above the single-thread threshold take the parallel path: same numbers."""
    import dualnet.kernels.cpu as cpu_package
    monkeypatch.setattr(cpu_package, "PARALLEL_MIN_ELEMENTS", 0)
    x_tangent, u, head = _operands(rng, (2, 3, 4, 5, 6), np.float64)
    np.testing.assert_allclose(cpu.replica_tangent(x_tangent, u, 0.5, head),
                               losses.replica_tangent_reference(x_tangent, u, 0.5, head), rtol=1e-12, atol=1e-12)
    cotangent = rng.normal(size=(3, 4, 5))
    np.testing.assert_allclose(cpu.replica_cotangent(cotangent, u, 0.5),
                               losses.replica_cotangent_reference(cotangent, u, 0.5), rtol=1e-14)


def test_numba_warm_up_compiles_both_dtypes():
    for dtype in ("float32", "float64"):
        cpu.warm_up(dtype)
    for kernel in (cpu._tangent_rows, cpu._cotangent_rows):
        compiled = {str(signature[0].dtype) for signature in kernel.signatures}
        assert {"float32", "float64"} <= compiled


def test_numba_kernels_reject_mismatched_operands(rng):
    x_tangent, u, head = _operands(rng, (2, 3, 4, 5, 6), np.float64)
    with pytest.raises(ValueError, match=r"replica_tangent: x_tangent \[K, N, P, G, c\] and u \[N, G, c\] disagree"):
        cpu.replica_tangent(x_tangent, u[:, :, :5], 1.0)
    with pytest.raises(ValueError, match="replica_tangent: need float32/float64 of one dtype"):
        cpu.replica_tangent(x_tangent, u.astype(np.float32), 1.0)
    with pytest.raises(ValueError, match=r"replica_tangent: head must be \[K or 1, N\]"):
        cpu.replica_tangent(x_tangent, u, 1.0, head[:, :2])
    with pytest.raises(ValueError, match=r"replica_cotangent: cotangent \[N, P, G\] and u \[N, G, c\] disagree"):
        cpu.replica_cotangent(np.zeros((3, 4, 4)), u, 1.0)


def test_losses_dispatch_to_numba_unless_reference_is_forced(rng, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "replica_tangent", lambda *a, **k: calls.append("tangent") or
                        losses.replica_tangent_reference(*a, **k))
    monkeypatch.setattr(cpu, "replica_cotangent", lambda *a, **k: calls.append("cotangent") or
                        losses.replica_cotangent_reference(*a, **k))
    x_tangent, u, _ = _operands(rng, (2, 3, 4, 5, 6), np.float32)
    cotangent = rng.normal(size=(3, 4, 5)).astype(np.float32)
    losses.replica_tangent(x_tangent, u, 1.0)
    losses.replica_cotangent(cotangent, u, 1.0)
    assert calls == ["tangent", "cotangent"]
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    losses.replica_tangent(x_tangent, u, 1.0)
    losses.replica_cotangent(cotangent, u, 1.0)
    losses.replica_tangent(x_tangent.astype(np.float16), u.astype(np.float16), 1.0)
    assert calls == ["tangent", "cotangent"]


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------
def test_cuda_source_compiles_to_ptx(tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if shutil.which("/usr/local/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not installed")
    source = cuda_package.SOURCE_DIR / "replicated_loss.cu"
    assert "#include" not in source.read_text()  # NVRTC: no host headers
    ptx = tmp_path / "replicated_loss.ptx"
    subprocess.run([nvcc, "--ptx", "-arch=sm_80", str(source), "-o", str(ptx)], check=True,
                   capture_output=True, timeout=120)
    entries = {line.split()[2].rstrip("(") for line in ptx.read_text().splitlines() if ".entry" in line}
    assert entries == {"replica_tangent_f32", "replica_tangent_f64", "replica_cotangent_f32", "replica_cotangent_f64"}


on_cuda_device = pytest.mark.usefixtures("cuda_device")  # a GPU, or the CuPy stand-in on the CPU


@on_cuda_device
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 2, 5, 4, 37), (2, 4, 3, 16, 32)])
def test_cuda_kernels_match_reference(rng, dtype, shape):
    import cupy
    x_tangent, u, head = _operands(rng, shape, dtype)
    cotangent = rng.normal(size=shape[1:4]).astype(dtype)
    got = cuda.replica_tangent(cupy.asarray(x_tangent), cupy.asarray(u), 0.37, cupy.asarray(head))
    np.testing.assert_allclose(got.get(), losses.replica_tangent_reference(x_tangent, u, 0.37, head),
                               **TOLERANCE[dtype])
    start = rng.normal(size=shape[:4]).astype(dtype)
    got = cuda.replica_tangent(cupy.asarray(x_tangent), cupy.asarray(u), 0.37, out=cupy.asarray(start))
    np.testing.assert_allclose(got.get(), start + losses.replica_tangent_reference(x_tangent, u, 0.37),
                               **TOLERANCE[dtype])
    got = cuda.replica_cotangent(cupy.asarray(cotangent), cupy.asarray(u), 0.37)
    np.testing.assert_allclose(got.get(), losses.replica_cotangent_reference(cotangent, u, 0.37), **TOLERANCE[dtype])


@on_cuda_device
def test_cuda_replicated_cross_entropy_matches_numpy(rng):
    import cupy
    x = rng.normal(size=(4, 3, 2, 5))
    W, b, labels = rng.normal(size=(10, 6)), rng.normal(size=6), rng.integers(0, 6, size=4)
    x_tangent, cotangent = rng.normal(size=(3,) + x.shape), rng.normal(size=x.shape[:3])
    on_cpu = dn.jvp(lambda x: losses.replicated_cross_entropy(x, W, b, labels), (x,), (x_tangent,))
    on_gpu = dn.jvp(lambda x: losses.replicated_cross_entropy(x, cupy.asarray(W), cupy.asarray(b), labels),
                    (cupy.asarray(x),), (cupy.asarray(x_tangent),))
    for a, b_ in zip(on_cpu, on_gpu):
        np.testing.assert_allclose(b_.get(), a, rtol=1e-12, atol=1e-12)
    grads_cpu = dn.vjp(lambda x: losses.replicated_cross_entropy(x, W, b, labels), x)[1](cotangent)
    grads_gpu = dn.vjp(lambda x: losses.replicated_cross_entropy(x, cupy.asarray(W), cupy.asarray(b), labels),
                       cupy.asarray(x))[1](cupy.asarray(cotangent))
    np.testing.assert_allclose(grads_gpu[0].get(), grads_cpu[0], rtol=1e-12, atol=1e-12)
