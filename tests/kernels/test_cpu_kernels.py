"""Numba kernels (dualnet.kernels.cpu) against their NumPy references in dualnet.fused.

Tolerances: float64 rtol = atol = 1e-12; float32 rtol = atol = 1e-5 (the kernels accumulate
statistics in float64, the references in float32).  Shapes include width 1, odd widths, no rows,
K > 1, non-contiguous inputs, and runs on all threads (``PARALLEL_MIN_ELEMENTS`` lowered to 0).
"""
import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dualnet as dn
from dualnet import backend, fused
from dualnet.kernels import cpu

pytest.importorskip("numba")
layer_norm_kernels = cpu.load("layer_norm")
epilogue_kernels = cpu.load("normalize_epilogue")

TOLERANCE = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = [np.float64, np.float32]


def assert_close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    assert actual.shape == expected.shape and actual.dtype == np.dtype(dtype)
    np.testing.assert_allclose(actual, expected, **TOLERANCE[dtype])


def strided(rng, shape, dtype):
    """A non-contiguous array of ``shape`` (every other element of a wider array)."""
    wide = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dtype)
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, directions", [((5, 7), 1), ((2, 3, 1), 3), ((0, 4), 2), ((3, 33), 4),
                                                ((130, 512), 2)])
def test_layer_norm_forward_matches_reference(rng, dtype, shape, directions):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    tangent = rng.standard_normal((directions,) + shape).astype(dtype)
    for t in (tangent, None):
        expected = fused.reference_layer_norm_forward(x, t, 1e-5)
        actual = layer_norm_kernels.layer_norm_forward(x, t, 1e-5)
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, directions", [((6, 5), 1), ((2, 4, 1), 2), ((4, 3, 17), 3), ((300, 256), 1)])
def test_layer_norm_jacobian_matches_reference(rng, dtype, shape, directions):
    y, _, sigma = fused.reference_layer_norm_forward(rng.standard_normal(shape).astype(dtype), None, 1e-5)
    vectors = rng.standard_normal((directions,) + shape).astype(dtype)
    assert_close(layer_norm_kernels.layer_norm_jacobian(y, sigma, vectors),
                 fused.reference_layer_norm_jacobian(y, sigma, vectors), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_kernels_accept_non_contiguous_inputs(rng, dtype):
    x, tangent = strided(rng, (6, 9), dtype), strided(rng, (2, 6, 9), dtype)
    assert not x.flags.c_contiguous
    for a, e in zip(layer_norm_kernels.layer_norm_forward(x, tangent, 1e-5),
                    fused.reference_layer_norm_forward(x, tangent, 1e-5)):
        assert_close(a, e, dtype)
    y, _, sigma = fused.reference_layer_norm_forward(x, None, 1e-5)
    vectors = rng.standard_normal((9, 6, 2)).astype(dtype).transpose(2, 1, 0)  # [2, 6, 9], transposed
    assert_close(layer_norm_kernels.layer_norm_jacobian(y, sigma, vectors),
                 fused.reference_layer_norm_jacobian(y, sigma, vectors), dtype)


def epilogue_inputs(rng, dtype, groups, rows, width, directions, present):
    """Arguments of the normalize_epilogue contract; ``present`` flags the three optional arrays."""
    def make(*shape):
        return (rng.standard_normal(shape) * 2).astype(dtype)
    candidates = (make(groups, directions, rows, width), make(groups, width), make(directions, groups, width))
    tangent, bias, bias_tangent = (c if p else None for c, p in zip(candidates, present))
    has_tangent = tangent is not None or bias_tangent is not None
    return make(groups, rows, width), tangent, bias, bias_tangent, 1e-5, directions if has_tangent else 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_epilogue_every_combination_of_inputs(rng, dtype):
    for present in itertools.product([False, True], repeat=3):
        call = epilogue_inputs(rng, dtype, 3, 5, 7, 2, present)
        for a, e in zip(epilogue_kernels.normalize_epilogue(*call), fused.reference_normalize_epilogue(*call)):
            assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, rows, width, directions", [(1, 1, 1, 1), (16, 130, 32, 4), (1, 300, 257, 1),
                                                             (2, 0, 3, 1)])
def test_normalize_epilogue_shapes(rng, dtype, groups, rows, width, directions):
    call = epilogue_inputs(rng, dtype, groups, rows, width, directions, (True, True, False))
    for a, e in zip(epilogue_kernels.normalize_epilogue(*call), fused.reference_normalize_epilogue(*call)):
        assert_close(a, e, dtype)


def test_kernels_on_all_threads_match_reference(rng, monkeypatch):
    monkeypatch.setattr(cpu, "PARALLEL_MIN_ELEMENTS", 0)
    x, tangent = rng.standard_normal((257, 33)), rng.standard_normal((3, 257, 33))
    for a, e in zip(layer_norm_kernels.layer_norm_forward(x, tangent, 1e-5),
                    fused.reference_layer_norm_forward(x, tangent, 1e-5)):
        assert_close(a, e, np.float64)
    y, _, sigma = fused.reference_layer_norm_forward(x, None, 1e-5)
    assert_close(layer_norm_kernels.layer_norm_jacobian(y, sigma, tangent),
                 fused.reference_layer_norm_jacobian(y, sigma, tangent), np.float64)
    call = epilogue_inputs(rng, np.float64, 4, 65, 9, 2, (True,) * 3)
    for a, e in zip(epilogue_kernels.normalize_epilogue(*call), fused.reference_normalize_epilogue(*call)):
        assert_close(a, e, np.float64)


def test_normalize_epilogue_non_contiguous_gemm_layout(rng):
    value = rng.standard_normal((5, 3, 4)).transpose(1, 0, 2)          # [G=3, M=5, c=4], not contiguous
    tangent = rng.standard_normal((2, 5, 3, 4)).transpose(2, 0, 1, 3)   # [G, K, M, c]
    call = (value, tangent, None, None, 1e-5, 2)
    for a, e in zip(epilogue_kernels.normalize_epilogue(*call), fused.reference_normalize_epilogue(*call)):
        assert_close(a, e, np.float64)


def assert_normalize_relu_agrees(call, dtype):
    actual, expected = epilogue_kernels.normalize_relu(*call), fused.reference_normalize_relu(*call)
    assert len(actual) == len(expected) == 4
    for a, e in zip(actual, expected):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("directions", [1, 3])
def test_normalize_relu_every_combination_of_inputs(normalize_relu_arguments, dtype, directions):
    for present in itertools.product([False, True], repeat=6):
        assert_normalize_relu_agrees(normalize_relu_arguments(dtype, 3, 5, 7, directions, present), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, rows, width, directions", [(1, 1, 1, 1), (1, 6, 33, 3), (4, 3, 1, 3),
                                                             (2, 0, 3, 1), (16, 130, 32, 3), (1, 300, 257, 1)])
def test_normalize_relu_shapes(normalize_relu_arguments, dtype, groups, rows, width, directions):
    for present in [(True,) * 6, (False, True, False, True, True, False), (True, False, True, False, False, True)]:
        assert_normalize_relu_agrees(normalize_relu_arguments(dtype, groups, rows, width, directions, present),
                                     dtype)


def test_normalize_relu_on_all_threads_and_non_contiguous_inputs(rng, normalize_relu_arguments, monkeypatch):
    monkeypatch.setattr(cpu, "PARALLEL_MIN_ELEMENTS", 0)
    assert_normalize_relu_agrees(normalize_relu_arguments(np.float64, 4, 65, 9, 2, (True,) * 6), np.float64)
    value = rng.standard_normal((5, 3, 4)).transpose(1, 0, 2)          # [G=3, M=5, c=4], not contiguous
    tangent = rng.standard_normal((2, 5, 3, 4)).transpose(2, 0, 1, 3)   # [G, K, M, c]
    injected, residual, residual_tangent = (strided(rng, shape, np.float64)
                                            for shape in ((2, 5, 3, 4), (5, 3, 4), (2, 5, 3, 4)))
    assert_normalize_relu_agrees((value, tangent, None, None, injected, residual, residual_tangent, 1e-5, 2),
                                 np.float64)


def nan_call(arguments, dtype):
    """normalize_relu arguments (from the ``normalize_relu_arguments`` fixture) with a NaN in one value row (its
    whole LN row is NaN) and one in the residual."""
    call = list(arguments(dtype, 2, 4, 5, 2, (True, True, False, True, True, True)))
    call[0][1, 2, 3] = np.nan   # value [G, M, c]: row (m=2, g=1)
    call[5][0, 0, 1] = np.nan   # residual [M, G, c]: one element of row (m=0, g=0)
    return call


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_relu_nan_stays_nan_in_the_value(normalize_relu_arguments, dtype):
    call = nan_call(normalize_relu_arguments, dtype)
    h, a, _, sigma = epilogue_kernels.normalize_relu(*call)
    h_ref, a_ref, _, sigma_ref = fused.reference_normalize_relu(*call)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(a_ref))
    assert np.isnan(a[2, 1]).all() and np.isnan(a[0, 0, 1]) and np.isnan(a).sum() == 6
    for actual, expected in ((h, h_ref), (a, a_ref), (sigma, sigma_ref)):
        assert_close(actual, expected, dtype)


def test_normalize_relu_nan_rows_tangent_agrees_with_the_reference(normalize_relu_arguments):
    call = nan_call(normalize_relu_arguments, np.float64)
    assert_close(epilogue_kernels.normalize_relu(*call)[2], fused.reference_normalize_relu(*call)[2], np.float64)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------
def test_auto_mode_dispatches_to_the_kernels(monkeypatch):
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    x = np.ones((2, 3), np.float32)
    assert fused.implementation("layer_norm_forward", x) is layer_norm_kernels.layer_norm_forward
    assert fused.implementation("layer_norm_jacobian", x) is layer_norm_kernels.layer_norm_jacobian
    assert fused.implementation("normalize_epilogue", x) is epilogue_kernels.normalize_epilogue
    assert fused.implementation("normalize_relu", x) is epilogue_kernels.normalize_relu
    assert fused.implementation("normalize_relu", x.astype(np.float16)) is fused.reference_normalize_relu
    assert fused.implementation("layer_norm_forward", x.astype(np.float16)) is fused.reference_layer_norm_forward
    monkeypatch.setattr(cpu, "available", lambda: False)
    assert fused.implementation("layer_norm_forward", x) is fused.reference_layer_norm_forward


def _forbid_kernels(monkeypatch):
    """Make every kernel raise; return the list that records attempted kernel calls."""
    calls = []

    def forbidden(name):
        def kernel(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"kernel {name} called")
        return kernel
    for module, name in [(layer_norm_kernels, "layer_norm_forward"), (layer_norm_kernels, "layer_norm_jacobian"),
                         (epilogue_kernels, "normalize_epilogue"), (epilogue_kernels, "normalize_relu")]:
        monkeypatch.setattr(module, name, forbidden(name))
    return calls


def _exercise_every_fused_op(rng):
    x, t = rng.standard_normal((4, 2, 3)), rng.standard_normal((2, 4, 2, 3))
    weight = rng.standard_normal((2, 3, 3))
    fused.layer_norm(dn.Dual(x, t))
    dn.vjp(fused.layer_norm, x)[1](x)
    fused.grouped_linear_layer_norm(dn.Dual(x, t), weight)
    dn.vjp(fused.grouped_linear_layer_norm, x, weight)[1](x)
    y, sigma = fused.layer_norm(x, return_sigma=True)
    fused.layer_norm_pullback(y, sigma, x)
    fused.layer_norm_relu(dn.Dual(x, t), x, injected=t)
    fused.layer_norm_relu(x, injected=t[:1])
    dn.vjp(lambda a, r: fused.layer_norm_relu(a, r)[0], x, x)[1](x)
    fused.grouped_linear_layer_norm_relu(dn.Dual(x, t), weight, None, x, injected=t)
    dn.vjp(lambda a, w: fused.grouped_linear_layer_norm_relu(a, w)[0], x, weight)[1](x)


def test_reference_mode_bypasses_the_kernels(monkeypatch, rng):
    calls = _forbid_kernels(monkeypatch)
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    _exercise_every_fused_op(rng)
    assert calls == []
    monkeypatch.setenv("DUALNET_KERNELS", "auto")  # the same calls reach the (forbidden) kernels
    with pytest.raises(AssertionError, match="kernel layer_norm_forward called"):
        _exercise_every_fused_op(rng)


def test_kernels_and_reference_agree_through_the_public_ops(monkeypatch, rng):
    x, t = rng.standard_normal((8, 4, 6)).astype(np.float32), rng.standard_normal((3, 8, 4, 6)).astype(np.float32)
    weight = rng.standard_normal((4, 6, 6)).astype(np.float32)
    bias = rng.standard_normal((4, 6)).astype(np.float32)
    residual, u, c = (rng.standard_normal(shape).astype(np.float32) for shape in ((8, 4, 6), (3, 8, 4, 6), (8, 4, 6)))

    def run():
        out = fused.grouped_linear_layer_norm(dn.Dual(x, t), weight, bias)
        a, h, sigma = fused.layer_norm_relu(dn.Dual(x, t), dn.Dual(residual, u), injected=u)
        b, g, tau = fused.grouped_linear_layer_norm_relu(dn.Dual(x, t), weight, bias, residual, injected=u)
        first, _, _ = fused.layer_norm_relu(x, residual, injected=u)
        grads = dn.grad(lambda p, w, r: dn.sum(fused.grouped_linear_layer_norm_relu(p, w, bias, r)[0] * c),
                        argnums=(0, 1, 2))(x, weight, residual)
        return (out.value, out.tangent, a.value, a.tangent, h, sigma, b.value, b.tangent, g, tau, first.value,
                first.tangent, *grads)
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    expected = run()
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    actual = run()
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, np.float32)


def test_the_public_relu_ops_run_the_normalize_relu_kernel(monkeypatch, rng):
    calls = []
    kernel = epilogue_kernels.normalize_relu

    def spy(*args):
        calls.append(args[0].dtype)
        return kernel(*args)
    monkeypatch.setattr(epilogue_kernels, "normalize_relu", spy)
    monkeypatch.setenv("DUALNET_KERNELS", "auto")
    x, t = rng.standard_normal((4, 2, 3)).astype(np.float32), rng.standard_normal((2, 4, 2, 3)).astype(np.float32)
    fused.layer_norm_relu(dn.Dual(x, t), x, injected=t)
    weight, u = rng.standard_normal((2, 3, 5)).astype(np.float32), rng.standard_normal((2, 4, 2, 5)).astype(np.float32)
    fused.grouped_linear_layer_norm_relu(x, weight, injected=u)
    assert calls == [np.float32, np.float32]


def test_small_calls_run_on_one_thread_and_restore_the_pool():
    import numba
    before = numba.get_num_threads()
    with cpu.threads_for(10):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with cpu.threads_for(cpu.PARALLEL_MIN_ELEMENTS):
        assert numba.get_num_threads() == before


def test_warm_up_and_registry():
    backend.warm_up_kernels()
    assert set(cpu.MODULES) >= {"layer_norm", "normalize_epilogue"}
    with pytest.raises(ValueError, match="unknown kernel module"):
        cpu.load("no_such_kernel")


def test_the_registry_lists_every_kernel_module():
    modules = {path.stem for path in pathlib.Path(cpu.__file__).parent.glob("*.py") if path.stem != "__init__"}
    assert set(cpu.MODULES) == modules
    for name in cpu.MODULES:
        assert hasattr(cpu.load(name), "warm_up")


# ---------------------------------------------------------------------------------------
# the SGD update: bit for bit the reference's operations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (0, 4), (33, 65)])
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_sgd_update_is_bit_identical_to_the_reference(rng, dtype, shape, momentum, nesterov, weight_decay):
    from dualnet.optim import reference_sgd_update
    sgd = cpu.load("sgd")
    param, buffer = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    grad = strided(rng, shape, dtype) if shape[-1] else rng.standard_normal(shape).astype(dtype)
    with_buffer = momentum > 0
    expected = [param.copy(), buffer.copy() if with_buffer else None]
    reference_sgd_update(expected[0], grad, expected[1], 0.037, momentum, weight_decay, nesterov)
    actual = [param.copy(), buffer.copy() if with_buffer else None]
    sgd.sgd_update(actual[0], grad, actual[1], 0.037, momentum, weight_decay, nesterov)
    np.testing.assert_array_equal(actual[0], expected[0])
    if with_buffer:
        np.testing.assert_array_equal(actual[1], expected[1])


def test_sgd_update_of_a_non_contiguous_parameter_updates_it_in_place(rng):
    wide = rng.standard_normal((4, 10))
    param, grad = wide[:, ::2], rng.standard_normal((4, 5))
    expected = param - 0.5 * grad
    cpu.load("sgd").sgd_update(param, grad, None, 0.5, 0.0, 0.0, False)
    np.testing.assert_array_equal(wide[:, ::2], expected)


def test_cached_looks_where_numba_keeps_its_cache(tmp_path):
    """With NUMBA_CACHE_DIR set (or read-only sources) Numba keeps its cache away from the sources:
    ``cached()`` must look there, False in a fresh directory and True after the warm-up (else the
    runner announces a compilation on every run)."""
    code = ("from dualnet.kernels import cpu; before = cpu.cached(('sgd',)); cpu.warm_up(('sgd',), ('float32',)); "
            "print(before, cpu.cached(('sgd',)))")
    root = str(pathlib.Path(__file__).parents[2])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": root})
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# FG-A's site gradient: bit for bit the reference's products and sums
# ---------------------------------------------------------------------------------------
def site_gradient_inputs(rng, shape, dtype, masked, factor_dtype=None):
    directions, rows, blocks, width = shape
    factors = rng.standard_normal((directions, rows, blocks)).astype(factor_dtype or dtype)
    values = rng.standard_normal(shape).astype(dtype)
    mask = rng.random((rows, blocks, width)) < 0.6 if masked else None
    return factors, values, mask


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(directions=st.integers(1, 4), rows=st.integers(0, 6), blocks=st.integers(1, 5), width=st.integers(1, 70),
       dtype=st.sampled_from(DTYPES), masked=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_site_gradient_is_bit_identical_to_the_reference(directions, rows, blocks, width, dtype, masked, seed):
    from dualnet.rules.base import reference_site_gradient
    call = site_gradient_inputs(np.random.default_rng(seed), (directions, rows, blocks, width), dtype, masked)
    actual, expected = cpu.load("site_gradient").site_gradient(*call), reference_site_gradient(*call)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


def test_site_gradient_on_all_threads_non_contiguous_and_mixed_dtypes(rng, monkeypatch):
    from dualnet.rules.base import reference_site_gradient
    kernel = cpu.load("site_gradient").site_gradient
    monkeypatch.setattr(cpu, "PARALLEL_MIN_ELEMENTS", 0)
    for call in (site_gradient_inputs(rng, (3, 37, 4, 33), np.float32, True),
                 site_gradient_inputs(rng, (2, 5, 3, 7), np.float32, True, factor_dtype=np.float64)):
        np.testing.assert_array_equal(kernel(*call), reference_site_gradient(*call))
    factors, _, mask = site_gradient_inputs(rng, (2, 6, 3, 5), np.float64, True)
    values = strided(rng, (2, 6, 3, 5), np.float64)
    np.testing.assert_array_equal(kernel(factors, values, mask[:, :, ::-1]),
                                  reference_site_gradient(factors, values, mask[:, :, ::-1]))


def test_site_gradient_masks_by_multiplying_as_numpy_does(rng):
    """NaN and ±inf stay NaN under a False mask entry (inf · 0), as NumPy's float · bool gives."""
    from dualnet.rules.base import reference_site_gradient
    factors, values, _ = site_gradient_inputs(rng, (1, 1, 1, 4), np.float32, False)
    values[0, 0, 0] = [np.nan, np.inf, -np.inf, 2.0]
    mask = np.zeros((1, 1, 4), bool)
    actual = cpu.load("site_gradient").site_gradient(factors, values, mask)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(actual, reference_site_gradient(factors, values, mask))
    assert np.isnan(actual[0, 0, :3]).all() and actual[0, 0, 3] == 0
