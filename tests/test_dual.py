"""The Dual type: construction rules, dtypes, operators, methods, and error messages."""
import numpy as np
import pytest

import dualnet as dn
from dualnet import Dual
from dualnet.primitives import Primitive


# ---------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, dtype", [
    (1.5, np.float32), ([1, 2], np.float32), (np.arange(3), np.float32), (np.ones(2, np.float32), np.float32),
    (np.ones(2), np.float64), (np.float64(2.0), np.float64), (np.float32(2.0), np.float32), (True, np.float32)])
def test_values_are_float32_by_default_and_float64_is_kept(value, dtype):
    d = Dual(value)
    assert d.dtype == dtype and isinstance(d.value, np.ndarray)
    assert d.tangent is None and d.num_directions is None


def test_tangent_shapes_single_and_k_directions(rng):
    x = rng.standard_normal((2, 3))
    assert Dual(x, np.ones((2, 3))).num_directions is None
    assert Dual(x, np.ones((5, 2, 3))).num_directions == 5
    assert Dual(np.float64(1.0), np.ones(4)).num_directions == 4  # K directions on a scalar
    assert Dual(np.ones(2, np.float32), np.ones(2)).tangent.dtype == np.float32  # tangent follows the value


@pytest.mark.parametrize("tangent", [np.ones((3, 2)), np.ones((2, 2, 2)), np.ones((2,)), np.ones((1, 1, 2, 3))])
def test_tangent_shape_mismatch_names_both_shapes(tangent):
    with pytest.raises(ValueError) as error:
        Dual(np.ones((2, 3)), tangent)
    message = str(error.value)
    assert message.startswith("Dual: tangent shape") and str(tangent.shape) in message and "(2, 3)" in message


def test_zero_directions_are_refused():
    with pytest.raises(ValueError, match="direction axis K must be >= 1"):
        Dual(np.ones(3), np.ones((0, 3)))


@pytest.mark.parametrize("tangent", [np.ones(3, int), np.ones(3, complex), np.ones(3, bool)])
def test_integer_complex_and_boolean_tangents_raise_type_error(tangent):
    with pytest.raises(TypeError, match="tangent must be real floating point"):
        Dual(np.ones(3), tangent)


@pytest.mark.parametrize("value", [np.ones(3, complex), np.array(["a"])])
def test_non_real_values_raise_type_error(value):
    with pytest.raises(TypeError, match="value must be real floating point"):
        Dual(value)


def test_a_dual_cannot_hold_a_dual():
    with pytest.raises(TypeError, match="cannot itself be a Dual"):
        Dual(Dual(1.0))


def test_shape_attributes_len_and_repr():
    d = Dual(np.ones((4, 3)), np.ones((2, 4, 3)))
    assert (d.shape, d.ndim, d.size, len(d)) == ((4, 3), 2, 12, 4)
    assert "tangent=array(2, 4, 3)" in repr(d) and "tangent=zero" in repr(Dual(1.0))


# ---------------------------------------------------------------------------------------
# operators: values and tangents against the analytic derivatives
# ---------------------------------------------------------------------------------------
X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
Y = np.array([[1.25, 0.5, -2.0], [0.75, 1.5, 3.0]])
TX = np.array([[1.0, 2.0, -1.0], [0.5, -0.5, 0.25]])
TY = np.array([[-1.0, 0.5, 1.0], [2.0, 1.0, -0.5]])

BINARY = {  # name: (operator, value, tangent from (x, y, ẋ, ẏ))
    "add": (lambda a, b: a + b, lambda x, y: x + y, lambda x, y, tx, ty: tx + ty),
    "sub": (lambda a, b: a - b, lambda x, y: x - y, lambda x, y, tx, ty: tx - ty),
    "mul": (lambda a, b: a * b, lambda x, y: x * y, lambda x, y, tx, ty: tx * y + x * ty),
    "div": (lambda a, b: a / b, lambda x, y: x / y, lambda x, y, tx, ty: tx / y - x * ty / y ** 2),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("left, right", [("dual", "dual"), ("dual", "array"), ("array", "dual"),
                                         ("dual", "scalar"), ("scalar", "dual")])
def test_binary_operators_with_mixed_operands(name, left, right):
    operator, value, tangent = BINARY[name]
    operands = {"dual": (Dual(X, TX), X, TX), "array": (Y, Y, 0 * TY), "scalar": (1.75, 1.75, 0.0)}
    a, x, tx = operands[left]
    b, y, ty = operands[right] if right != "dual" else (Dual(Y, TY), Y, TY)
    out = operator(a, b)
    assert isinstance(out, Dual)
    np.testing.assert_allclose(out.value, value(x, y), rtol=1e-15)
    np.testing.assert_allclose(out.tangent, tangent(x, y, tx, ty), rtol=1e-14, atol=1e-15)


def test_matmul_power_and_negation_operators():
    a, w = Dual(X, TX), Dual(Y.T, TY.T)
    product = a @ w
    np.testing.assert_allclose(product.tangent, TX @ Y.T + X @ TY.T, rtol=1e-14)
    left = X @ w  # ndarray @ Dual defers to Dual.__rmatmul__
    assert isinstance(left, Dual)
    np.testing.assert_allclose(left.tangent, X @ TY.T, rtol=1e-14)
    cube = Dual(Y, TY) ** 3
    np.testing.assert_allclose(cube.tangent, 3 * Y ** 2 * TY, rtol=1e-14)
    negated = -Dual(X, TX)
    np.testing.assert_array_equal(negated.tangent, -TX)
    assert (+a) is a


def test_indexing_and_shape_methods_follow_numpy():
    d = Dual(X, np.stack([TX, 2 * TX]))  # K = 2
    cases = [(lambda v: v[1], lambda v: v[1]), (lambda v: v[:, ::-1], lambda v: v[:, ::-1]),
             (lambda v: v[X > 0], lambda v: v[X > 0]), (lambda v: v[[1, 0, 1]], lambda v: v[[1, 0, 1]]),
             (lambda v: v.reshape(3, 2), lambda v: v.reshape(3, 2)),
             (lambda v: v.reshape((-1,)), lambda v: v.reshape(-1)),
             (lambda v: v.transpose(), lambda v: v.T), (lambda v: v.transpose(1, 0), lambda v: v.T),
             (lambda v: v.transpose((1, 0)), lambda v: v.T), (lambda v: v.T, lambda v: v.T),
             (lambda v: v.sum(axis=1), lambda v: v.sum(axis=1)),
             (lambda v: v.mean(axis=0, keepdims=True), lambda v: v.mean(axis=0, keepdims=True)),
             (lambda v: v.sum(), lambda v: v.sum())]
    for on_dual, on_array in cases:
        out = on_dual(d)
        np.testing.assert_allclose(out.value, on_array(X), rtol=1e-15)
        np.testing.assert_allclose(out.tangent, np.stack([on_array(TX), on_array(2 * TX)]), rtol=1e-15)
    top = d.max(axis=1)  # unique maxima: the tangent of the arg-max entry
    np.testing.assert_array_equal(top.tangent, np.stack([TX[[0, 1], X.argmax(1)], 2 * TX[[0, 1], X.argmax(1)]]))


def test_comparisons_give_plain_boolean_arrays():
    d = Dual(X, TX)
    for result, expected in [(d < Y, X < Y), (d <= 0.5, X <= 0.5), (d > Dual(Y), X > Y), (d >= Y, X >= Y),
                             (d == X, X == X), (d != Y, X != Y)]:
        assert type(result) is np.ndarray and result.dtype == bool
        np.testing.assert_array_equal(result, expected)


def test_duals_are_hashable_by_identity():
    a, b = Dual(1.0), Dual(1.0)
    assert len({a, b}) == 2


# ---------------------------------------------------------------------------------------
# errors of one application
# ---------------------------------------------------------------------------------------
def test_operands_with_different_numbers_of_directions_are_refused():
    with pytest.raises(ValueError, match=r"mul: inputs carry different numbers of directions K: \[2, 3\]"):
        Dual(X, np.stack([TX] * 2)) * Dual(Y, np.stack([TY] * 3))


def test_a_single_direction_broadcasts_against_k_directions():
    out = Dual(X, np.stack([TX, 2 * TX])) + Dual(Y, TY)
    np.testing.assert_array_equal(out.tangent, np.stack([TX + TY, 2 * TX + TY]))


def test_operands_that_do_not_broadcast_name_the_op_and_shapes():
    with pytest.raises(ValueError, match=r"add: operand shapes \(\(2, 3\), \(2,\)\) do not broadcast"):
        Dual(X) + np.ones(2)


def test_a_rule_returning_the_wrong_shape_names_the_op_and_both_shapes():
    bad = Primitive("bad_shape", lambda x: x, jvp=(lambda t, out, x: t[..., :1],))
    with pytest.raises(ValueError, match=r"bad_shape: jvp produced tangent shape \(1, 2, 1\) for value shape \(2, 3\)"):
        bad(Dual(X, TX))


def test_missing_rules_name_the_op_and_the_mode():
    no_forward = Primitive("no_forward", lambda x: 2 * x, vjp=(lambda g, out, x: 2 * g,))
    with pytest.raises(NotImplementedError, match=r"no_forward: no jvp rule \(forward mode\)"):
        no_forward(Dual(X, TX))
    assert no_forward(Dual(X)).tangent is None  # a symbolic zero needs no rule
    no_reverse = Primitive("no_reverse", lambda x: 2 * x, jvp=(lambda t, out, x: 2 * t,))
    _, pullback = dn.vjp(lambda x: no_reverse(x), X)
    with pytest.raises(NotImplementedError, match=r"no_reverse: no vjp rule \(reverse mode\)"):
        pullback(np.ones_like(X))
    half = Primitive("half", lambda x, y: x * y, jvp=(lambda t, out, x, y: t * y, None))
    with pytest.raises(NotImplementedError, match="half: argument 1 is not differentiable in forward mode"):
        half(X, Dual(Y, TY))
