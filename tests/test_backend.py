"""Backend helpers: the Gaussian draw that large perturbations go through."""
import numpy as np
import pytest

from dualnet import backend

LARGE = (3, backend.PARALLEL_DRAW_MIN // 2 + 7)  # above the split threshold, odd total size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 4), LARGE])
def test_draw_depends_only_on_the_generator_state(shape, dtype):
    first = backend.standard_normal(np.random.default_rng(11), shape, dtype)
    again = backend.standard_normal(np.random.default_rng(11), shape, dtype)
    assert first.shape == shape and first.dtype == dtype
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, backend.standard_normal(np.random.default_rng(12), shape, dtype))


def test_large_draw_is_standard_normal_with_independent_halves():
    u = backend.standard_normal(np.random.default_rng(3), LARGE, np.float64).ravel()
    n = u.size  # ~2^16: the mean's standard error is 1/√n ≈ 0.004, the variance's √(2/n) ≈ 0.006
    assert abs(u.mean()) < 5 / np.sqrt(n)
    assert abs(u.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(u ** 4) - 3) < 5 * np.sqrt(96 / n)  # Gaussian fourth moment (Var(u⁴) = 96)
    half = n // 2
    first, second = u[:half], u[half:2 * half]
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / np.sqrt(half)  # two streams, not one repeated


def test_successive_draws_from_one_generator_differ():
    rng = np.random.default_rng(0)
    a, b = (backend.standard_normal(rng, LARGE, np.float32) for _ in range(2))
    assert not np.array_equal(a, b)
