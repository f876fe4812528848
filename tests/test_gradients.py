"""Gradients held as factors: the Outer product, the Gradients mapping that forms it when read, and
the update out ← α·leftᵀright + β·out (the NumPy reference and the BLAS kernel)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualnet import gradients
from dualnet.gradients import Gradients, Outer, outer_update, reference_outer_update
from dualnet.kernels.cpu import outer_update as cpu_outer_update


def _factors(rng, rows, p, q, dtype=np.float64):
    return rng.standard_normal((rows, p)).astype(dtype), rng.standard_normal((rows, q)).astype(dtype)


def _gemm_bound(left, right, out, alpha, beta):
    """|computed − exact| ≤ γ·(|α|·|left|ᵀ|right| + |β|·|out|) elementwise, γ = (M + 2)·ε: the
    standard error bound of a dot product of length M, plus the scaling and the final add."""
    eps = np.finfo(out.dtype).eps
    magnitude = abs(alpha) * (np.abs(left.astype(np.float64)).T @ np.abs(right.astype(np.float64)))
    scale = magnitude + abs(beta) * np.abs(out.astype(np.float64))
    return (left.shape[0] + 2) * eps * scale + np.finfo(out.dtype).tiny


def _exact(left, right, out, alpha, beta):
    return alpha * (left.astype(np.float64).T @ right.astype(np.float64)) + beta * out.astype(np.float64)


# ------------------------------------------------------------------------------------------- Outer
def test_outer_is_left_transposed_times_right(rng):
    left, right = _factors(rng, 7, 3, 5)
    product = Outer(left, right)
    assert product.shape == (3, 5)
    np.testing.assert_array_equal(product.dense(), left.T @ right)


@pytest.mark.parametrize("left_shape, right_shape", [((4, 3), (5, 2)), ((4,), (4, 2)), ((2, 4, 3), (2, 4, 2))])
def test_outer_refuses_anything_but_row_matrices_of_one_height(left_shape, right_shape):
    with pytest.raises(ValueError, match="row matrices with the same number of rows"):
        Outer(np.zeros(left_shape), np.zeros(right_shape))


@pytest.mark.parametrize("rows, p, q, held", [(128, 784, 800, True), (128, 800, 10, False), (4, 8, 8, True),
                                               (5, 8, 8, False), (8192, 512, 512, False)])
def test_factors_are_held_only_when_no_larger_than_the_product(rng, rows, p, q, held):
    left, right = np.ones((rows, p), np.float32), np.ones((rows, q), np.float32)
    value = gradients.outer(left, right)
    assert isinstance(value, Outer) is held
    np.testing.assert_array_equal(gradients.formed(value), np.full((p, q), rows, np.float32))


# --------------------------------------------------------------------------------------- Gradients
def test_reading_an_entry_forms_it_once_and_ends_its_factors(rng):
    left, right = _factors(rng, 6, 3, 4)
    bias = rng.standard_normal(4)
    grads = Gradients({"w": Outer(left, right), "b": bias, "frozen": None})
    assert grads.factors("w") is not None and grads.factors("b") is None and grads.factors("frozen") is None
    assert grads.factors("absent") is None
    first = grads["w"]
    np.testing.assert_array_equal(first, left.T @ right)
    assert grads["w"] is first  # formed once
    assert grads.factors("w") is None  # read: an optimiser now gets the array
    assert grads["b"] is bias and grads["frozen"] is None


def test_every_generic_read_gives_arrays(rng):
    left, right = _factors(rng, 5, 2, 3)
    grads = Gradients({"w": Outer(left, right), "b": np.ones(3)})
    assert sorted(grads) == ["b", "w"] and len(grads) == 2
    for name, value in dict(grads).items():
        assert isinstance(value, np.ndarray), name
    assert all(isinstance(value, np.ndarray) for value in grads.values())
    grads["w"] = np.zeros((2, 3))
    del grads["b"]
    assert list(grads) == ["w"] and not grads["w"].any()


def test_an_estimate_carries_its_gradients_as_a_gradients_mapping(rng):
    from dualnet.rules.base import Estimate
    left, right = _factors(rng, 5, 2, 3)
    estimate = Estimate({"w": Outer(left, right)}, 0.5, {})
    assert isinstance(estimate.grads, Gradients) and estimate.grads.factors("w") is not None
    assert Estimate(estimate.grads, 0.5, {}).grads is estimate.grads


# -------------------------------------------------------------------------------- the reference
def test_the_reference_rounds_like_an_update_from_the_dense_gradient(rng):
    """α = −lr, β = 1 is ``param −= lr·g`` bit for bit; β = μ, α = 1 is ``b *= μ; b += g``."""
    left, right = _factors(rng, 9, 4, 6, np.float32)
    grad = left.T @ right
    param = rng.standard_normal((4, 6)).astype(np.float32)
    updated = param.copy()
    reference_outer_update(left, right, updated, -0.01, 1.0)
    expected = param.copy()
    expected -= np.float32(0.01) * grad
    np.testing.assert_array_equal(updated, expected)
    buffer = param.copy()
    reference_outer_update(left, right, buffer, 1.0, 0.9)
    expected = param.copy()
    expected *= 0.9
    expected += grad
    np.testing.assert_array_equal(buffer, expected)


# ----------------------------------------------------------------------------------- the kernel
def test_numpy_s_own_blas_is_bound_where_numpy_ships_it():
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if not str(blas.get("name", "")).startswith("scipy-openblas"):
        pytest.skip(f"NumPy's BLAS is {blas.get('name')!r}, not the scipy-openblas of NumPy's wheels")
    functions = cpu_outer_update.gemm_functions()
    assert set(functions) == {np.dtype(np.float32), np.dtype(np.float64)}


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), p=st.integers(1, 40), q=st.integers(1, 40),
       dtype=st.sampled_from(["float32", "float64"]), alpha=st.floats(-3, 3),
       beta=st.sampled_from([1.0, 0.9, 0.0, -0.5]), seed=st.integers(0, 2**16))
def test_the_blas_kernel_equals_the_reference_to_rounding(rows, p, q, dtype, alpha, beta, seed):
    rng = np.random.default_rng(seed)
    left, right = _factors(rng, rows, p, q, dtype)
    out = rng.standard_normal((p, q)).astype(dtype)
    exact, bound = _exact(left, right, out, alpha, beta), _gemm_bound(left, right, out, alpha, beta)
    for update in (reference_outer_update, cpu_outer_update.outer_update):
        result = out.copy()
        update(left, right, result, alpha, beta)
        assert result.dtype == out.dtype
        assert np.all(np.abs(result - exact) <= bound), update


def test_the_kernel_takes_strided_factors_and_a_strided_out(rng):
    """Factors with a row stride or no unit column stride, and ``out`` a block of a wider array
    (its row stride goes to BLAS as ldc): the numbers of the contiguous case, nothing outside touched."""
    left, right = _factors(rng, 24, 5, 7, np.float32)
    wide = rng.standard_normal((5, 11)).astype(np.float32)
    expected = wide.copy()
    block = expected[:, 2:9]
    cpu_outer_update.outer_update(left[::2].copy(), right[::2].copy(), block, -0.5, 1.0)
    strided = wide.copy()
    cpu_outer_update.outer_update(left[::2], np.asfortranarray(right[::2]), strided[:, 2:9], -0.5, 1.0)
    np.testing.assert_array_equal(strided, expected)
    np.testing.assert_array_equal(strided[:, :2], wide[:, :2])
    np.testing.assert_array_equal(strided[:, 9:], wide[:, 9:])


@pytest.mark.parametrize("case", ["mixed dtypes", "out overlaps a factor", "no rows", "out column-strided"])
def test_what_blas_cannot_take_goes_to_the_reference(rng, case):
    left, right = _factors(rng, 6, 4, 4, np.float32)
    out = rng.standard_normal((4, 4)).astype(np.float32)
    if case == "mixed dtypes":
        right = right.astype(np.float64)
    elif case == "out overlaps a factor":
        storage = rng.standard_normal((8, 4)).astype(np.float32)
        out, left = storage[:4], storage[2:]  # rows 2 and 3 of out are rows 0 and 1 of left
    elif case == "no rows":
        left, right = left[:0], right[:0]
    else:
        out = np.asfortranarray(out)
    expected = out.copy()
    reference_outer_update(left.copy(), right.copy(), expected, -0.25, 0.5)
    cpu_outer_update.outer_update(left, right, out, -0.25, 0.5)
    np.testing.assert_array_equal(out, expected)


def test_outer_update_dispatches_and_honours_reference_mode(rng, monkeypatch):
    left, right = _factors(rng, 33, 6, 5, np.float32)
    out = rng.standard_normal((6, 5)).astype(np.float32)
    calls = []
    monkeypatch.setattr(cpu_outer_update, "outer_update", lambda *args: calls.append(args))
    outer_update(Outer(left, right), out.copy(), -0.1)
    assert len(calls) == 1 and calls[0][3:] == (-0.1, 1.0)
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    result, expected = out.copy(), out.copy()
    outer_update(Outer(left, right), result, -0.1)
    reference_outer_update(left, right, expected, -0.1, 1.0)
    np.testing.assert_array_equal(result, expected)
    assert len(calls) == 1


def test_outer_update_refuses_an_out_of_another_shape(rng):
    left, right = _factors(rng, 3, 2, 4)
    with pytest.raises(ValueError, match=r"out has shape \(4, 2\), the product \(2, 4\)"):
        outer_update(Outer(left, right), np.zeros((4, 2)), -1.0)
