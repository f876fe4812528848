"""Derivatives of derivatives: every combination of forward and reverse mode, tagged perturbations.

* perturbation confusion: d/dx [x · (d/dy (x + y))(y = 1)] at x = 1 is 1 (an engine that lets the
  inner derivative see the outer perturbation answers 2), in all four mode combinations;
* second and third derivatives of elementary functions equal their closed forms;
* Hessian-vector products (forward-over-reverse, reverse-over-reverse, reverse-over-forward) equal
  central finite differences of the gradient;
* a fused op without a second-order rule refuses to be nested, naming itself.

Tolerances: closed forms are exact up to float64 rounding of a few operations (rtol 1e-12); the
finite-difference check of an HVP uses h = 1e-5, whose truncation error (h² × third derivative,
~1e-10 here) and rounding error (eps / h ~ 1e-11) stay well below rtol 1e-7.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dualnet as dn
from dualnet import fused

EXACT = 1e-12


def d_forward(f):
    """x -> f'(x) by forward mode (scalar x)."""
    return lambda x: dn.jvp(f, (x,), (np.ones_like(dn.value_of(x)),))[1]


def d_reverse(f):
    return dn.grad(f)


MODES = {"forward": d_forward, "reverse": d_reverse}


# ---------------------------------------------------------------------------------------
# perturbation confusion
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("outer", sorted(MODES))
@pytest.mark.parametrize("inner", sorted(MODES))
def test_inner_derivative_does_not_see_the_outer_perturbation(outer, inner):
    def g(x):
        return x * MODES[inner](lambda y: x + y)(np.float64(1.0))
    assert float(MODES[outer](g)(np.float64(1.0))) == 1.0


def test_a_dual_built_by_hand_is_a_constant_inside_a_transformation():
    x = dn.Dual(np.float64(3.0), np.float64(1.0))  # tag 0: d/dx
    inner = dn.grad(lambda y: x * y * y)(np.float64(2.0))  # d/dy (x y²) = 2 x y, still a function of x
    assert isinstance(inner, dn.Dual)
    assert float(inner.value) == 12.0 and float(inner.tangent) == 4.0  # 2xy and its d/dx, 2y


# ---------------------------------------------------------------------------------------
# higher derivatives against closed forms
# ---------------------------------------------------------------------------------------
CLOSED_FORMS = {  # f, then its first three derivatives, at x in the domain
    "exp": (dn.exp, np.exp, np.exp, np.exp),
    "log": (dn.log, lambda x: 1 / x, lambda x: -1 / x ** 2, lambda x: 2 / x ** 3),
    "sin": (dn.sin, np.cos, lambda x: -np.sin(x), lambda x: -np.cos(x)),
    "cos": (dn.cos, lambda x: -np.sin(x), lambda x: -np.cos(x), np.sin),
    "tanh": (dn.tanh, lambda x: 1 - np.tanh(x) ** 2, lambda x: -2 * np.tanh(x) * (1 - np.tanh(x) ** 2),
             lambda x: (6 * np.tanh(x) ** 2 - 2) * (1 - np.tanh(x) ** 2)),
    "sqrt": (dn.sqrt, lambda x: 0.5 * x ** -0.5, lambda x: -0.25 * x ** -1.5, lambda x: 0.375 * x ** -2.5),
    "x**3.5": (lambda x: x ** 3.5, lambda x: 3.5 * x ** 2.5, lambda x: 8.75 * x ** 1.5, lambda x: 13.125 * x ** 0.5),
    "2**x": (lambda x: 2.0 ** x, lambda x: np.log(2) * 2 ** x, lambda x: np.log(2) ** 2 * 2 ** x,
             lambda x: np.log(2) ** 3 * 2 ** x),
    "sigmoid": (dn.sigmoid, lambda x: _s(x) * (1 - _s(x)), lambda x: _s(x) * (1 - _s(x)) * (1 - 2 * _s(x)),
                lambda x: _s(x) * (1 - _s(x)) * (1 - 6 * _s(x) + 6 * _s(x) ** 2)),
    "arctan": (dn.arctan, lambda x: 1 / (1 + x * x), lambda x: -2 * x / (1 + x * x) ** 2,
               lambda x: (6 * x * x - 2) / (1 + x * x) ** 3),
    "log1p": (dn.log1p, lambda x: 1 / (1 + x), lambda x: -1 / (1 + x) ** 2, lambda x: 2 / (1 + x) ** 3),
    "sinh": (dn.sinh, np.cosh, np.sinh, np.cosh),
    "x/(1+x)": (lambda x: x / (1 + x), lambda x: 1 / (1 + x) ** 2, lambda x: -2 / (1 + x) ** 3,
                lambda x: 6 / (1 + x) ** 4),
}


def _s(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
@given(x=st.floats(0.2, 1.8), modes=st.lists(st.sampled_from(sorted(MODES)), min_size=3, max_size=3))
def test_second_and_third_derivatives_equal_closed_forms(name, x, modes):
    f, *derivatives = CLOSED_FORMS[name]
    x = np.float64(x)
    nested = f
    for order, (mode, expected) in enumerate(zip(modes, derivatives), start=1):
        nested = MODES[mode](nested)
        np.testing.assert_allclose(float(nested(x)), expected(x), rtol=EXACT * 10 ** order, err_msg=f"order {order}")


def test_second_derivative_of_x_cubed_by_reverse_over_reverse():
    assert float(dn.grad(dn.grad(lambda x: x ** 3))(np.float64(2.0))) == 12.0


def test_hyper_dual_second_derivative_in_one_pass_with_k_outer_directions():
    """d²/dx² e^x at 0 is 1; K = 3 outer directions scale it by each direction."""
    directions = np.array([1.0, 2.0, -1.0])
    _, second = dn.jvp(d_forward(dn.exp), (np.float64(0.0),), (directions,))
    np.testing.assert_allclose(second, directions, rtol=EXACT)


# ---------------------------------------------------------------------------------------
# Hessian-vector products
# ---------------------------------------------------------------------------------------
def _loss(w, x, labels):
    """A small network's loss touching matmul, tanh, softmax cross-entropy, max, mean and getitem."""
    h = dn.tanh(x @ w[:12].reshape(3, 4))
    logits = h @ w[12:].reshape(4, 2)
    log_p = dn.log_softmax(logits, axis=-1)
    return -dn.mean(log_p[np.arange(len(labels)), labels]) + 0.1 * dn.max(dn.abs(w)) + dn.sum(w ** 2) / 8


HVP_WAYS = {
    "forward over reverse": lambda f, w, v: dn.jvp(dn.grad(f), (w,), (v,))[1],
    "reverse over reverse": lambda f, w, v: dn.grad(lambda u: dn.sum(dn.grad(f)(u) * v))(w),
    "reverse over forward": lambda f, w, v: dn.grad(lambda u: dn.jvp(f, (u,), (v,))[1])(w),
    "vjp of jvp": lambda f, w, v: dn.vjp(lambda u: dn.jvp(f, (u,), (v,))[1], w)[1](np.float64(1.0))[0],
}


@pytest.mark.parametrize("way", sorted(HVP_WAYS))
def test_hessian_vector_product_equals_finite_differences_of_the_gradient(way, rng):
    x, labels = rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    w, v = rng.standard_normal(20), rng.standard_normal(20)
    f = lambda u: _loss(u, x, labels)  # noqa: E731
    step = 1e-5
    expected = (dn.grad(f)(w + step * v) - dn.grad(f)(w - step * v)) / (2 * step)
    np.testing.assert_allclose(HVP_WAYS[way](f, w, v), expected, rtol=1e-7, atol=1e-9)


def test_hessian_vector_product_of_a_sum_of_cubes():
    hvp = dn.jvp(dn.grad(lambda x: dn.sum(x ** 3)), (np.array([1.0, 0.0]),), (np.array([1.0, 0.0]),))[1]
    np.testing.assert_array_equal(hvp, [6.0, 0.0])


def test_vjp_of_jvp_and_jvp_of_jvp_agree_with_the_hessian(rng):
    a = rng.standard_normal((3, 3))
    f = lambda x: dn.sum(dn.exp(a @ x))  # noqa: E731   Hessian: aᵀ diag(exp(a x)) a
    x, u, v = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3)
    hessian = a.T @ np.diag(np.exp(a @ x)) @ a
    second = dn.jvp(lambda y: dn.jvp(f, (y,), (u,))[1], (x,), (v,))[1]
    np.testing.assert_allclose(second, v @ hessian @ u, rtol=EXACT)


# ---------------------------------------------------------------------------------------
# where nesting is impossible
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("transform", [
    lambda f, x: dn.grad(lambda y: dn.sum(dn.grad(f)(y)))(x),
    lambda f, x: dn.jvp(dn.grad(f), (x,), (np.ones_like(x),)),
    lambda f, x: dn.jvp(lambda y: dn.jvp(f, (y,), (np.ones_like(y),))[1], (x,), (np.ones_like(x),)),
])
def test_a_fused_op_without_second_order_rule_refuses_nesting_by_name(transform, rng):
    x = rng.standard_normal((2, 4))
    f = lambda y: dn.sum(fused.layer_norm(y) ** 3)  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"^layer_norm: no second-order rule"):
        transform(f, x)
    dn.grad(f)(x)  # one level is fine


def test_k_hessian_vector_products_in_one_forward_over_reverse_pass(rng):
    a = rng.standard_normal((4, 3))
    f = lambda u: dn.sum(dn.exp(a @ u))  # noqa: E731
    w, directions = rng.standard_normal(3), rng.standard_normal((5, 3))
    hessian = a.T @ np.diag(np.exp(a @ w)) @ a
    batched = dn.jvp(dn.grad(f), (w,), (directions,))[1]
    assert batched.shape == (5, 3)
    np.testing.assert_allclose(batched, directions @ hessian, rtol=EXACT, atol=EXACT)
