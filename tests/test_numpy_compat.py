"""What a NumPy user reaches for: edge-case derivatives, NumPy's functions on Duals, Dual methods,
composite functions against NumPy's values, and the transformations' argument checks."""
import subprocess
import sys

import numpy as np
import pytest

import dualnet as dn
from dualnet import Dual

RTOL = 1e-12  # float64, a handful of operations


# ---------------------------------------------------------------------------------------
# derivatives that used to be wrong or broken
# ---------------------------------------------------------------------------------------
def test_x_to_the_zero_has_derivative_zero_at_zero_in_both_modes():
    zero = np.zeros(3)
    _, tangent = dn.jvp(lambda x: x ** 0, (zero,), (np.ones(3),))
    np.testing.assert_array_equal(tangent, 0.0)
    np.testing.assert_array_equal(dn.grad(lambda x: dn.sum(x ** 0))(zero), 0.0)
    np.testing.assert_array_equal(dn.grad(lambda x: dn.sum(dn.power(x, np.zeros(3))))(zero), 0.0)


def test_power_broadcasts_a_larger_exponent_and_differentiates_both_operands(rng):
    base, exponent = rng.uniform(0.5, 2, 3), rng.uniform(-1, 2, (2, 3))
    tb, te = rng.standard_normal(3), rng.standard_normal((2, 3))
    out, tangent = dn.jvp(dn.power, (base, exponent), (tb, te))
    np.testing.assert_allclose(out, base ** exponent, rtol=RTOL)
    expected = exponent * base ** (exponent - 1) * tb + base ** exponent * np.log(base) * te
    np.testing.assert_allclose(tangent, expected, rtol=RTOL)
    _, pullback = dn.vjp(dn.power, base, exponent)
    g_base, g_exponent = pullback(np.ones((2, 3)))
    np.testing.assert_allclose(g_base, (exponent * base ** (exponent - 1)).sum(0), rtol=RTOL)
    np.testing.assert_allclose(g_exponent, base ** exponent * np.log(base), rtol=RTOL)


def test_reflected_power_of_a_number_to_a_dual():
    x = np.array([0.5, 1.0, 2.0])
    out, tangent = dn.jvp(lambda e: 2.0 ** e, (x,), (np.ones(3),))
    np.testing.assert_allclose(out, 2.0 ** x, rtol=RTOL)
    np.testing.assert_allclose(tangent, np.log(2.0) * 2.0 ** x, rtol=RTOL)
    np.testing.assert_allclose(dn.grad(lambda e: dn.sum(np.float64(3.0) ** e))(x), np.log(3) * 3 ** x, rtol=RTOL)


def test_derivative_in_the_exponent_at_a_zero_base_is_zero():
    _, pullback = dn.vjp(lambda e: dn.power(np.zeros(2), e), np.array([1.0, 2.0]))
    np.testing.assert_array_equal(pullback(np.ones(2))[0], 0.0)


@pytest.mark.parametrize("spec, shapes", [
    ("ij->ji", [(2, 3)]), ("ij->", [(2, 3)]), ("i,ij,j->", [(2,), (2, 3), (3,)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]), ("...i,...i,i->...", [(2, 3), (2, 3), (3,)])])
def test_einsum_with_one_or_three_operands_in_both_modes(spec, shapes, rng):
    xs = [rng.standard_normal(s) for s in shapes]
    ts = [rng.standard_normal(s) for s in shapes]
    out, tangent = dn.jvp(lambda *a: dn.einsum(spec, *a), xs, ts)
    np.testing.assert_allclose(out, np.einsum(spec, *xs), rtol=RTOL)
    expected = sum(np.einsum(spec, *(t if j == i else x for j, x in enumerate(xs))) for i, t in enumerate(ts))
    np.testing.assert_allclose(tangent, expected, rtol=RTOL, atol=1e-13)
    weights = rng.standard_normal(np.shape(out))
    cotangents = dn.vjp(lambda *a: dn.einsum(spec, *a), *xs)[1](weights)
    left, right = np.sum(tangent * weights), sum(np.sum(t * c) for t, c in zip(ts, cotangents))
    np.testing.assert_allclose(left, right, rtol=1e-10)


@pytest.mark.parametrize("join", [dn.stack, dn.concatenate])
def test_stack_and_concatenate_accept_python_constants_among_duals(join):
    x = np.array([1.0, 2.0])
    pieces = lambda d: [d, [5.0, 6.0], d * 2]  # noqa: E731
    out, tangent = dn.jvp(lambda d: join(pieces(d)), (x,), (np.ones(2),))
    np.testing.assert_array_equal(out, join([x, np.array([5.0, 6.0]), 2 * x]))
    np.testing.assert_array_equal(tangent, join([np.ones(2), np.zeros(2), 2 * np.ones(2)]))
    np.testing.assert_array_equal(dn.grad(lambda d: dn.sum(join(pieces(d))))(x), [3.0, 3.0])
    scalar = dn.stack([Dual(np.float64(1.0), np.float64(1.0)), 2.0])
    np.testing.assert_array_equal(scalar.tangent, [1.0, 0.0])


def test_a_reduction_of_a_list_of_duals_stacks_it():
    x = Dual(np.array([1.0, 3.0]), np.array([1.0, 1.0]))
    out = dn.mean([x, x + 2])
    assert float(out.value) == 3.0 and float(out.tangent) == 1.0
    np.testing.assert_array_equal(dn.sum([x, x], axis=0).tangent, [2.0, 2.0])


# ---------------------------------------------------------------------------------------
# NumPy's functions on Duals; NumPy arrays on the left of an operator
# ---------------------------------------------------------------------------------------
X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
TX = np.array([[1.0, 2.0, -1.0], [0.5, -0.5, 0.25]])

NUMPY_CALLS = {  # numpy call on the Dual, the same dualnet call
    "sum": (lambda d: np.sum(d, axis=1), lambda d: dn.sum(d, axis=1)),
    "mean": (lambda d: np.mean(d, axis=0, keepdims=True), lambda d: dn.mean(d, axis=0, keepdims=True)),
    "max": (np.max, dn.max), "std": (lambda d: np.std(d, axis=-1), lambda d: dn.std(d, axis=-1)),
    "where": (lambda d: np.where(X > 0, d, 0.0), lambda d: dn.where(X > 0, d, 0.0)),
    "concatenate": (lambda d: np.concatenate([d, d], axis=1), lambda d: dn.concatenate([d, d], axis=1)),
    "reshape": (lambda d: np.reshape(d, (3, 2)), lambda d: dn.reshape(d, (3, 2))),
    "transpose": (np.transpose, dn.transpose),
    "clip": (lambda d: np.clip(d, -0.5, 1.0), lambda d: dn.clip(d, -0.5, 1.0)),
    "einsum": (lambda d: np.einsum("ij,ij->i", d, X), lambda d: dn.einsum("ij,ij->i", d, X)),
    "sort": (lambda d: np.sort(d, axis=1), lambda d: dn.sort(d, axis=1)),
    "cumsum": (lambda d: np.cumsum(d, axis=0), lambda d: dn.cumsum(d, axis=0)),
    "tensordot": (lambda d: np.tensordot(d, X, axes=2), lambda d: dn.tensordot(d, X, axes=2)),
    "array op dual": (lambda d: X * d - X / (d * d + 1), lambda d: dn.sub(dn.mul(X, d), dn.div(X, d * d + 1))),
    "array @ dual": (lambda d: X.T @ d, lambda d: dn.matmul(X.T, d)),
    "array ** dual": (lambda d: np.float64(2.0) ** d, lambda d: dn.power(2.0, d)),
}


@pytest.mark.parametrize("name", sorted(NUMPY_CALLS))
def test_numpy_functions_on_a_dual_run_the_dualnet_function(name):
    on_numpy, on_dualnet = NUMPY_CALLS[name]
    d = Dual(X, TX)
    got, expected = on_numpy(d), on_dualnet(d)
    assert isinstance(got, Dual)
    np.testing.assert_array_equal(got.value, expected.value)
    np.testing.assert_array_equal(got.tangent, expected.tangent)


def test_numpy_queries_answer_from_the_values():
    d = Dual(X, TX)
    assert np.shape(d) == (2, 3) and np.ndim(d) == 2 and np.size(d) == 6
    np.testing.assert_array_equal(np.argsort(d, axis=1), np.argsort(X, axis=1))


@pytest.mark.parametrize("call, fragment", [
    (lambda d: np.median(d), "numpy.median has no derivative rule in dualnet"),
    (lambda d: np.sum(d, out=np.empty(())), "numpy.sum: out= is not supported on a Dual")])
def test_numpy_functions_without_a_rule_raise_a_type_error_naming_the_way_out(call, fragment):
    with pytest.raises(TypeError, match="dualnet") as error:
        call(Dual(X, TX))
    assert str(error.value).startswith(fragment)


def test_numpy_ufuncs_run_the_dualnet_function_and_cupy_defers_to_the_dual():
    """``numpy.tanh(d)`` and ``array * d`` go through the table; CuPy, which reads
    ``__array_ufunc__`` on the instance, sees None and defers to the Dual's reflected operator."""
    d = Dual(X, TX)
    for ufunc, function in ((np.tanh, dn.tanh), (np.exp, dn.exp), (np.log1p, dn.log1p)):
        np.testing.assert_allclose(ufunc(d).tangent, function(d).tangent)
    np.testing.assert_allclose((X * d).tangent, (d * X).tangent)
    np.testing.assert_allclose(np.add(X, d).tangent, TX)
    assert d.__array_ufunc__ is None and Dual.__array_ufunc__ is not None
    with pytest.raises(TypeError, match="numpy.arccosh has no derivative rule in dualnet"):
        np.arccosh(d)
    with pytest.raises(TypeError, match="numpy.add.reduce on a Dual"):
        np.add.reduce(d)


def test_a_dual_does_not_silently_become_an_array():
    with pytest.raises(TypeError, match=r"Dual: no implicit conversion .* dualnet.value_of\(d\)"):
        np.asarray(Dual(X, TX))


# ---------------------------------------------------------------------------------------
# Dual methods
# ---------------------------------------------------------------------------------------
METHODS = {  # method call, the NumPy call on value and tangent alike
    "ravel": (lambda v: v.ravel(), np.ravel), "flatten": (lambda v: v.flatten(), lambda v: v.reshape(-1)),
    "squeeze": (lambda v: v[:, None].squeeze(1), lambda v: v), "min": (lambda v: v.min(axis=1), None),
    "astype": (lambda v: v.astype(np.float32), lambda v: v.astype(np.float32)),
    "dot": (lambda v: v.dot(X.T), lambda v: v.dot(X.T)), "abs": (abs, None),
    "swapaxes": (lambda v: v.swapaxes(0, 1), None),
    "var": (lambda v: v.var(axis=0), None), "prod": (lambda v: v.prod(axis=1), None),
    "cumsum": (lambda v: v.cumsum(axis=1), lambda v: v.cumsum(axis=1 if v.ndim == 2 else 2)),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_dual_methods_follow_numpy_values_and_finite_differences(name):
    call, linear = METHODS[name]
    out = call(Dual(X, TX))
    np.testing.assert_allclose(out.value, call(X), rtol=RTOL)
    step = 1e-6
    expected = (call(X + step * TX).astype(np.float64) - call(X - step * TX).astype(np.float64)) / (2 * step)
    tolerance = 1e-6 if out.dtype == np.float64 else 1e-1  # float32 output: rounding / h dominates
    np.testing.assert_allclose(out.tangent, expected if linear is None else linear(TX), rtol=tolerance, atol=tolerance)


def test_astype_to_an_integer_dtype_is_refused():
    with pytest.raises(TypeError, match="astype: a Dual stays real floating point"):
        Dual(X).astype(int)


# ---------------------------------------------------------------------------------------
# composite functions against NumPy's values
# ---------------------------------------------------------------------------------------
A = np.arange(24.0).reshape(2, 3, 4) * 0.37 % 1.9

COMPOSITES = [
    (lambda m, x: m.sort(x, axis=0), "sort"), (lambda m, x: m.repeat(x, 2, axis=1), "repeat"),
    (lambda m, x: m.repeat(x, [1, 0, 2], axis=1), "repeat counts"), (lambda m, x: m.repeat(x, 2), "repeat flat"),
    (lambda m, x: m.tile(x, (2, 1, 1)), "tile"), (lambda m, x: m.tile(x, 2), "tile int"),
    (lambda m, x: m.tile(x, (1, 2, 1, 3)), "tile more reps"), (lambda m, x: m.roll(x, 1, axis=2), "roll"),
    (lambda m, x: m.roll(x, -5), "roll flat"), (lambda m, x: m.roll(x, (1, 2), axis=(0, 2)), "roll tuple"),
    (lambda m, x: m.split(x, 2, axis=2)[1], "split sections"), (lambda m, x: m.split(x, [1, 3], axis=-1)[2], "split"),
    (lambda m, x: m.diagonal(x), "diagonal"), (lambda m, x: m.diagonal(x, 1, 1, 2), "diagonal offset"),
    (lambda m, x: m.diagonal(x, -1, 2, 1), "diagonal negative"), (lambda m, x: m.trace(x, 0, 1, 2), "trace"),
    (lambda m, x: m.tensordot(x, A, axes=([1, 2], [1, 2])), "tensordot pairs"),
    (lambda m, x: m.tensordot(x[0], A[0].T, axes=1), "tensordot int"),
    (lambda m, x: m.dot(x, A[0].T), "dot"), (lambda m, x: m.dot(x[0, 0], A[0, 0]), "dot vectors"),
    (lambda m, x: m.dot(x, A.transpose(0, 2, 1)), "dot n-d"),
    (lambda m, x: m.take_along_axis(x, np.argsort(A, axis=1), axis=1), "take_along_axis"),
    (lambda m, x: m.moveaxis(x, 0, -1), "moveaxis"), (lambda m, x: m.swapaxes(x, 0, 2), "swapaxes"),
]


@pytest.mark.parametrize("case", COMPOSITES, ids=[c[1] for c in COMPOSITES])
def test_composites_equal_numpy_on_arrays_and_duals(case):
    call, _ = case
    expected = call(np, A)
    np.testing.assert_allclose(call(dn, A), expected, rtol=RTOL)
    np.testing.assert_allclose(call(dn, Dual(A)).value, expected, rtol=RTOL)


def test_topk_returns_the_largest_values_first_with_their_indices():
    x = np.array([[3.0, 1.0, 4.0, 1.5], [9.0, 2.0, 6.0, 5.0]])
    values, indices = dn.topk(Dual(x, np.eye(2, 4)), 2)
    np.testing.assert_array_equal(values.value, [[4.0, 3.0], [9.0, 6.0]])
    np.testing.assert_array_equal(indices, [[2, 0], [0, 2]])
    np.testing.assert_array_equal(values.tangent, [[0.0, 1.0], [0.0, 0.0]])


# ---------------------------------------------------------------------------------------
# the transformations' arguments
# ---------------------------------------------------------------------------------------
def test_jvp_with_a_bare_array_instead_of_a_tuple_is_a_type_error():
    x = np.ones(3)
    expected = r"jvp: primals must be a tuple or list .* jvp\(f, \(x,\), \(v,\)\); got ndarray"
    with pytest.raises(TypeError, match=expected):
        dn.jvp(dn.exp, x, x)
    with pytest.raises(TypeError, match="jvp: tangents must be a tuple or list"):
        dn.jvp(dn.exp, (x,), x)


def test_a_tangent_is_cast_to_its_primals_precision():
    _, tangent = dn.jvp(dn.exp, (np.ones(2, np.float32),), (np.ones(2, np.float64),))
    assert tangent.dtype == np.float32
    _, tangent = dn.jvp(dn.exp, (np.ones(2),), (np.ones(2, np.float32),))
    assert tangent.dtype == np.float64
    with pytest.raises(TypeError, match="jvp: tangent 0 must be real floating point, got dtype int"):
        dn.jvp(dn.exp, (np.ones(2),), (np.ones(2, int),))


def test_importing_dualnet_is_light_and_its_subpackages_are_reachable():
    code = ("import sys, dualnet as dn; heavy = [m for m in ('numba', 'mpi4py', 'dualnet.models', 'dualnet.rules') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert callable(dn.models.create) and callable(dn.rules.create) and callable(dn.losses.cross_entropy); "
            "assert set(dn.__all__) <= set(dir(dn)); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
