"""CUDA kernels (dualnet.kernels.cuda) against the NumPy references, on the GPU.

On a GPU when ``dualnet.backend.cuda_available()``; otherwise on the CuPy stand-in, which runs
the same sources on the CPU (``cuda_device`` fixture; docs/cuda_on_cpu.md).  Tolerances: float64 rtol = atol =
1e-12; float32 rtol = atol = 1e-5.  Inputs are drawn on the host, the kernels run on CuPy
arrays, and results are compared with the references evaluated by NumPy on the same data.
"""
import itertools

import numpy as np
import pytest

import dualnet as dn
from dualnet import backend, fused

pytestmark = pytest.mark.usefixtures("cuda_device")

TOLERANCE = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = [np.float64, np.float32]


@pytest.fixture
def cp():
    import cupy
    return cupy


@pytest.fixture
def kernels():
    from dualnet.kernels import cuda
    return cuda.load("layer_norm"), cuda.load("normalize_epilogue")


def assert_close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    actual = backend.to_numpy(actual)
    assert actual.shape == expected.shape and actual.dtype == np.dtype(dtype)
    np.testing.assert_allclose(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, directions", [((5, 7), 1), ((2, 3, 1), 3), ((3, 33), 4), ((130, 512), 2),
                                                ((4, 2048), 1)])
def test_layer_norm_forward_and_jacobian(cp, kernels, rng, dtype, shape, directions):
    layer_norm_kernels, _ = kernels
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    tangent = rng.standard_normal((directions,) + shape).astype(dtype)
    for t in (tangent, None):
        actual = layer_norm_kernels.layer_norm_forward(cp.asarray(x), None if t is None else cp.asarray(t), 1e-5)
        for a, e in zip(actual, fused.reference_layer_norm_forward(x, t, 1e-5)):
            assert_close(a, e, dtype)
    y, _, sigma = fused.reference_layer_norm_forward(x, None, 1e-5)
    actual = layer_norm_kernels.layer_norm_jacobian(cp.asarray(y), cp.asarray(sigma), cp.asarray(tangent))
    assert_close(actual, fused.reference_layer_norm_jacobian(y, sigma, tangent), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, rows, width, directions", [(3, 5, 7, 2), (16, 130, 32, 4), (1, 9, 300, 1)])
def test_normalize_epilogue_every_combination(cp, kernels, rng, dtype, groups, rows, width, directions):
    _, epilogue_kernels = kernels

    def make(*shape):
        return (rng.standard_normal(shape) * 2).astype(dtype)
    value = make(groups, rows, width)
    candidates = (make(groups, directions, rows, width), make(groups, width), make(directions, groups, width))
    for present in itertools.product([False, True], repeat=3):
        optional = [c if p else None for c, p in zip(candidates, present)]
        k = directions if (optional[0] is not None or optional[2] is not None) else 0
        expected = fused.reference_normalize_epilogue(value, *optional, 1e-5, k)
        actual = epilogue_kernels.normalize_epilogue(
            cp.asarray(value), *[None if a is None else cp.asarray(a) for a in optional], 1e-5, k)
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, rows, width, directions", [(3, 5, 7, 2), (16, 130, 32, 1), (1, 9, 300, 1)])
def test_normalize_relu_every_combination(cp, kernels, normalize_relu_arguments, dtype, groups, rows, width,
                                          directions):
    _, epilogue_kernels = kernels
    for present in itertools.product([False, True], repeat=6):
        call = normalize_relu_arguments(dtype, groups, rows, width, directions, present)
        actual = epilogue_kernels.normalize_relu(*[cp.asarray(a) if isinstance(a, np.ndarray) else a for a in call])
        for a, e in zip(actual, fused.reference_normalize_relu(*call)):
            assert_close(a, e, dtype)


def test_public_ops_on_cupy_match_numpy(cp, rng, monkeypatch):
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    x, t = rng.standard_normal((8, 4, 6)), rng.standard_normal((3, 8, 4, 6))
    weight, bias = rng.standard_normal((4, 6, 5)), rng.standard_normal((4, 5))
    host = fused.grouped_linear_layer_norm(dn.Dual(x, t), weight, bias)
    device = fused.grouped_linear_layer_norm(dn.Dual(cp.asarray(x), cp.asarray(t)), cp.asarray(weight),
                                             cp.asarray(bias))
    assert_close(device.value, host.value, np.float64)
    assert_close(device.tangent, host.tangent, np.float64)
    y, sigma = fused.layer_norm(cp.asarray(x), return_sigma=True)
    g = cp.asarray(rng.standard_normal((2, 8, 4, 6)))
    expected = fused.layer_norm_pullback(backend.to_numpy(y), backend.to_numpy(sigma), backend.to_numpy(g))
    assert_close(fused.layer_norm_pullback(y, sigma, g), expected, np.float64)


def test_cupy_arrays_dispatch_to_cuda_unless_reference(cp, monkeypatch):
    from dualnet.kernels import cuda
    x = cp.ones((2, 3), cp.float32)
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    assert fused.implementation("layer_norm_forward", x) is cuda.load("layer_norm").layer_norm_forward
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    assert fused.implementation("layer_norm_forward", x) is fused.reference_layer_norm_forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("directions, rows, blocks, width", [(1, 128, 16, 32), (3, 5, 3, 7), (2, 130, 1, 800)])
def test_site_gradient(cp, rng, dtype, directions, rows, blocks, width):
    """FG-A's site gradient on CuPy arrays: the CUDA kernel through ``rules.base.site_gradient``'s
    dispatch, against the reference on the host (a GPU may fuse a multiply and an add)."""
    from dualnet.rules.base import reference_site_gradient, site_gradient
    d = rng.standard_normal((directions, rows, blocks)).astype(dtype)
    u = rng.standard_normal((directions, rows, blocks * width)).astype(dtype)
    mask = rng.random((rows, blocks * width)) < 0.6
    expected = reference_site_gradient(d, u.reshape(directions, rows, blocks, width),
                                       mask.reshape(rows, blocks, width)).reshape(rows, blocks * width)
    d_replicas = d.reshape(directions, rows, 1, blocks)  # replicas [K, N, P = 1, G]: each group owns its units
    actual = site_gradient(cp.asarray(d_replicas), cp.asarray(u.reshape(directions, rows, 1, blocks * width)),
                           "own", cp.asarray(mask.reshape(rows, 1, blocks * width)))
    assert_close(actual.reshape(rows, blocks * width), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_adds_factored_gradients_on_cupy_arrays(cp, rng, dtype, momentum):
    """SGD from gradient factors on CuPy arrays: the cuBLAS launcher of ``outer_update`` through
    the optimiser, against the dense step on the host; the gradient is never formed."""
    from dualnet import optim
    from dualnet.gradients import Gradients, Outer
    weight = rng.standard_normal((6, 5)).astype(dtype)
    host, device = {"w": weight.copy()}, {"w": cp.asarray(weight)}
    host_opt, device_opt = optim.SGD(0.1, momentum=momentum), optim.SGD(0.1, momentum=momentum)
    for _ in range(2):
        left, right = rng.standard_normal((33, 6)).astype(dtype), rng.standard_normal((33, 5)).astype(dtype)
        host_opt.step(host, {"w": left.T @ right})
        grads = Gradients({"w": Outer(cp.asarray(left), cp.asarray(right))})
        device_opt.step(device, grads)
        assert grads.factors("w") is not None
    assert_close(device["w"], host["w"], dtype)


def test_the_cublas_launcher_checks_shapes_and_dispatches(cp, monkeypatch):
    from dualnet.gradients import reference_outer_update
    from dualnet.kernels import cuda
    launcher = cuda.load("outer_update")
    left, right = cp.ones((4, 3), cp.float32), cp.ones((4, 2), cp.float32)
    with pytest.raises(ValueError, match="kernels.cuda.outer_update.outer_update: out must be"):
        launcher.outer_update(left, right, cp.zeros((2, 3), cp.float32), 1.0, 1.0)
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    chosen = backend.kernel("outer_update", "outer_update", reference_outer_update, left, right)
    assert chosen is launcher.outer_update
