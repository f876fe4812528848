"""Fused primitives: layer_norm, grouped_linear, grouped_linear_layer_norm; σ as their residual.

Properties (float64 unless stated): JVP = central finite differences (h = 1e-6, rtol 1e-5,
atol 1e-6); VJP satisfies <J u, w> = <u, Jᵀ w> (rtol 1e-10); K directions at once = K single
passes (rtol 1e-12); each fused op = its composition of basic primitives in value, jvp and vjp
(rtol 1e-10); the taped (bind) path = the fused forward path.  Run with whatever kernels are
active (Numba when importable); the kernel-vs-reference checks live in tests/kernels/.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dualnet as dn
from dualnet import fused
from dualnet.dual import Node

TIGHT = dict(rtol=1e-10, atol=1e-12)
FD = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def central_difference(f, primals, tangents, h=1e-6):
    plus = f(*[p + h * t for p, t in zip(primals, tangents)])
    minus = f(*[p - h * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * h)


def taped(value, tangent):
    """A Dual with a tangent *and* a reverse-mode node: forces the primitive's bind path."""
    d = dn.Dual(value, tangent)
    d.node = Node(None, (), (), {}, d.value)
    return d


def naive_layer_norm(x, eps=1e-5):
    centred = x - dn.mean(x, axis=-1, keepdims=True)
    return centred / dn.sqrt(dn.mean(centred * centred, axis=-1, keepdims=True) + eps)


def naive_grouped_linear(x, weight, bias=None):
    z = dn.einsum("...gi,gio->...go", x, weight)
    return z if bias is None else z + bias


shapes = st.tuples(st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(1, 3), st.integers(1, 5))


def draw(rng, *shape):
    return rng.standard_normal(shape)


# ---------------------------------------------------------------------------------------
# layer_norm
# ---------------------------------------------------------------------------------------
@given(shapes, st.integers(0, 2**16))
def test_layer_norm_jvp_matches_finite_differences(shape, seed):
    lead, groups, width = shape
    rng = np.random.default_rng(seed)
    x, t = draw(rng, *lead, groups, width + 1), draw(rng, *lead, groups, width + 1)
    _, tangent = dn.jvp(fused.layer_norm, (x,), (t,))
    np.testing.assert_allclose(tangent, central_difference(fused.layer_norm, [x], [t]), **FD)


@given(shapes, st.integers(0, 2**16))
def test_layer_norm_vjp_dot_product_identity_and_pullback(shape, seed):
    lead, groups, width = shape
    rng = np.random.default_rng(seed)
    x = draw(rng, *lead, groups, width)
    u, w = draw(rng, *x.shape), draw(rng, *x.shape)
    _, ju = dn.jvp(fused.layer_norm, (x,), (u,))
    y, pullback = dn.vjp(fused.layer_norm, x)
    jtw, = pullback(w)
    np.testing.assert_allclose(np.vdot(ju, w), np.vdot(u, jtw), rtol=1e-10, atol=1e-12)
    _, sigma = fused.layer_norm(x, return_sigma=True)
    np.testing.assert_allclose(fused.layer_norm_pullback(y, sigma, w), jtw, **TIGHT)


def test_layer_norm_value_and_sigma(rng):
    x = draw(rng, 4, 3, 7) * 3 + 1
    y, sigma = fused.layer_norm(x, eps=1e-3, return_sigma=True)
    np.testing.assert_allclose(sigma, np.sqrt(x.var(axis=-1, keepdims=True) + 1e-3), **TIGHT)
    np.testing.assert_allclose(y, (x - x.mean(axis=-1, keepdims=True)) / sigma, **TIGHT)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)


def test_layer_norm_k_directions_equal_single_passes(rng):
    x, t = draw(rng, 5, 2, 6), draw(rng, 3, 5, 2, 6)
    together = fused.layer_norm(dn.Dual(x, t)).tangent
    for k in range(3):
        np.testing.assert_allclose(together[k], fused.layer_norm(dn.Dual(x, t[k])).tangent, rtol=1e-12, atol=1e-14)


def test_layer_norm_equals_composition_of_primitives(rng):
    x, t, g = draw(rng, 3, 4, 9), draw(rng, 2, 3, 4, 9), draw(rng, 3, 4, 9)
    fused_out, fused_tangent = dn.jvp(fused.layer_norm, (x,), (t,))
    naive_out, naive_tangent = dn.jvp(naive_layer_norm, (x,), (t,))
    np.testing.assert_allclose(fused_out, naive_out, **TIGHT)
    np.testing.assert_allclose(fused_tangent, naive_tangent, **TIGHT)
    np.testing.assert_allclose(dn.vjp(fused.layer_norm, x)[1](g)[0], dn.vjp(naive_layer_norm, x)[1](g)[0], **TIGHT)


def test_layer_norm_taped_path_equals_fused_forward(rng):
    x, t = draw(rng, 6, 5), draw(rng, 2, 6, 5)
    fast = fused.layer_norm(dn.Dual(x, t))
    bound = fused.layer_norm(taped(x, t))
    assert bound.node is not None
    np.testing.assert_allclose(bound.value, fast.value, **TIGHT)
    np.testing.assert_allclose(bound.tangent, fast.tangent, **TIGHT)


def test_layer_norm_pullback_takes_k_cotangents(rng):
    x = draw(rng, 4, 8)
    y, sigma = fused.layer_norm(x, return_sigma=True)
    g = draw(rng, 3, 4, 8)
    together = fused.layer_norm_pullback(y, sigma, g)
    assert together.shape == g.shape
    for k in range(3):
        np.testing.assert_allclose(together[k], fused.layer_norm_pullback(y, sigma, g[k]), **TIGHT)


def test_layer_norm_float32_stays_float32(rng):
    x = draw(rng, 4, 8).astype(np.float32)
    out = fused.layer_norm(dn.Dual(x, np.ones_like(x)))
    assert out.value.dtype == np.float32 and out.tangent.dtype == np.float32
    np.testing.assert_allclose(out.value, fused.layer_norm(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_layer_norm_is_registered_and_symbolic_zero_costs_nothing(rng):
    assert dn.primitives.TABLE["layer_norm"] is fused._layer_norm
    assert fused.layer_norm(dn.Dual(draw(rng, 2, 3))).tangent is None


def test_layer_norm_errors_name_the_op():
    with pytest.raises(ValueError, match="layer_norm.*eps"):
        fused.layer_norm(np.ones((2, 3)), eps=-1.0)
    with pytest.raises(ValueError, match="layer_norm"):
        fused.layer_norm(np.ones((2, 0)))
    with pytest.raises(TypeError, match="layer_norm"):
        fused.layer_norm(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="layer_norm_pullback.*sigma"):
        fused.layer_norm_pullback(np.ones((2, 3)), np.ones((2,)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="layer_norm_pullback.*cotangent"):
        fused.layer_norm_pullback(np.ones((2, 3)), np.ones((2, 1)), np.ones((2, 4)))


# ---------------------------------------------------------------------------------------
# grouped_linear
# ---------------------------------------------------------------------------------------
def grouped_problem(rng, lead, groups, c_in, c_out, directions=None):
    k = () if directions is None else (directions,)
    x, weight, bias = draw(rng, *lead, groups, c_in), draw(rng, groups, c_in, c_out), draw(rng, groups, c_out)
    tangents = (draw(rng, *k, *x.shape), draw(rng, *k, *weight.shape), draw(rng, *k, *bias.shape))
    return (x, weight, bias), tangents


@given(shapes, st.integers(1, 4), st.integers(0, 7), st.integers(0, 2**16))
def test_grouped_linear_jvp_matches_finite_differences_for_every_subset(shape, c_out, subset, seed):
    lead, groups, c_in = shape
    primals, tangents = grouped_problem(np.random.default_rng(seed), lead, groups, c_in, c_out)
    chosen = tuple(t if subset >> i & 1 else None for i, t in enumerate(tangents))
    _, tangent = dn.jvp(fused.grouped_linear, primals, chosen)
    zeros = [np.zeros_like(p) if t is None else t for p, t in zip(primals, chosen)]
    np.testing.assert_allclose(tangent, central_difference(fused.grouped_linear, primals, zeros), **FD)


@given(shapes, st.integers(1, 4), st.integers(0, 2**16))
def test_grouped_linear_vjp_dot_product_identity(shape, c_out, seed):
    lead, groups, c_in = shape
    rng = np.random.default_rng(seed)
    primals, tangents = grouped_problem(rng, lead, groups, c_in, c_out)
    out, pullback = dn.vjp(fused.grouped_linear, *primals)
    w = draw(rng, *out.shape)
    _, ju = dn.jvp(fused.grouped_linear, primals, tangents)
    cotangents = pullback(w)
    np.testing.assert_allclose(np.vdot(ju, w), sum(np.vdot(u, c) for u, c in zip(tangents, cotangents)),
                               rtol=1e-10, atol=1e-12)


def test_grouped_linear_value_and_composition(rng):
    primals, tangents = grouped_problem(rng, (3, 2), 4, 5, 6, directions=2)
    np.testing.assert_allclose(fused.grouped_linear(*primals),
                               np.einsum("npgi,gio->npgo", primals[0], primals[1]) + primals[2], **TIGHT)
    fused_out, fused_tangent = dn.jvp(fused.grouped_linear, primals, tangents)
    naive_out, naive_tangent = dn.jvp(naive_grouped_linear, primals, tangents)
    np.testing.assert_allclose(fused_out, naive_out, **TIGHT)
    np.testing.assert_allclose(fused_tangent, naive_tangent, **TIGHT)
    g = draw(rng, *fused_out.shape)
    for mine, theirs in zip(dn.vjp(fused.grouped_linear, *primals)[1](g), dn.vjp(naive_grouped_linear, *primals)[1](g)):
        np.testing.assert_allclose(mine, theirs, **TIGHT)


def test_grouped_linear_k_directions_equal_single_passes(rng):
    primals, tangents = grouped_problem(rng, (4,), 3, 2, 5, directions=3)
    _, together = dn.jvp(fused.grouped_linear, primals, tangents)
    for k in range(3):
        _, single = dn.jvp(fused.grouped_linear, primals, [t[k] for t in tangents])
        np.testing.assert_allclose(together[k], single, rtol=1e-12, atol=1e-13)


def test_grouped_linear_bias_only_tangent_and_no_bias(rng):
    (x, weight, bias), (_, _, bias_tangent) = grouped_problem(rng, (2,), 3, 4, 2, directions=2)
    _, tangent = dn.jvp(lambda b: fused.grouped_linear(x, weight, b), (bias,), (bias_tangent,))
    np.testing.assert_allclose(tangent, np.broadcast_to(bias_tangent[:, None], tangent.shape), **TIGHT)
    out, pullback = dn.vjp(lambda a, w: fused.grouped_linear(a, w), x, weight)
    x_bar, w_bar = pullback(np.ones_like(out))
    np.testing.assert_allclose(w_bar, np.einsum("ngi,ngo->gio", x, np.ones_like(out)), **TIGHT)


def test_grouped_linear_errors_name_the_op():
    with pytest.raises(ValueError, match="grouped_linear"):
        fused.grouped_linear(np.ones((2, 3, 4)), np.ones((3, 5, 2)))
    with pytest.raises(ValueError, match="grouped_linear.*b has shape"):
        fused.grouped_linear(np.ones((2, 3, 4)), np.ones((3, 4, 2)), np.ones((3, 3)))


# ---------------------------------------------------------------------------------------
# grouped linear -> LN (the epilogue)
# ---------------------------------------------------------------------------------------
def naive_grouped_linear_layer_norm(x, weight, bias):
    return naive_layer_norm(naive_grouped_linear(x, weight, bias))


def assert_same_jvp_and_vjp(mine, theirs, primals, tangents, rng):
    out, tangent = dn.jvp(mine, primals, tangents)
    naive_out, naive_tangent = dn.jvp(theirs, primals, tangents)
    np.testing.assert_allclose(out, naive_out, **TIGHT)
    np.testing.assert_allclose(tangent, naive_tangent, **TIGHT)
    g = draw(rng, *out.shape)
    for a, b in zip(dn.vjp(mine, *primals)[1](g), dn.vjp(theirs, *primals)[1](g)):
        np.testing.assert_allclose(a, b, **TIGHT)


@pytest.mark.parametrize("directions", [None, 2])
def test_grouped_linear_layer_norm_equals_composition(rng, directions):
    primals, tangents = grouped_problem(rng, (3, 2), 4, 5, 6, directions)
    assert_same_jvp_and_vjp(fused.grouped_linear_layer_norm, naive_grouped_linear_layer_norm, primals, tangents,
                            rng)
    # any subset of tangents (FG-A: only x moves; FG-W: only W and b; a bias alone)
    for chosen in [(tangents[0], None, None), (None, tangents[1], tangents[2]), (None, None, tangents[2])]:
        _, tangent = dn.jvp(fused.grouped_linear_layer_norm, primals, chosen)
        _, naive = dn.jvp(naive_grouped_linear_layer_norm, primals, chosen)
        np.testing.assert_allclose(tangent, naive, **TIGHT)
    no_bias = lambda a, w: fused.grouped_linear_layer_norm(a, w)  # noqa: E731
    assert_same_jvp_and_vjp(no_bias, lambda a, w: naive_grouped_linear_layer_norm(a, w, None), primals[:2],
                            tangents[:2], rng)


def test_grouped_linear_layer_norm_jvp_matches_finite_differences(rng):
    (x, weight, bias), tangents = grouped_problem(rng, (5,), 3, 4, 4)
    _, tangent = dn.jvp(fused.grouped_linear_layer_norm, (x, weight, bias), tangents)
    expected = central_difference(fused.grouped_linear_layer_norm, [x, weight, bias], tangents)
    np.testing.assert_allclose(tangent, expected, **FD)


def test_grouped_linear_layer_norm_vjp_dot_product_identity(rng):
    primals, tangents = grouped_problem(rng, (4,), 3, 5, 6)
    out, tangent = dn.jvp(fused.grouped_linear_layer_norm, primals, tangents)
    w = draw(rng, *out.shape)
    cotangents = dn.vjp(fused.grouped_linear_layer_norm, *primals)[1](w)
    np.testing.assert_allclose(np.vdot(tangent, w), sum(np.vdot(t, c) for t, c in zip(tangents, cotangents)),
                               rtol=1e-10)


def test_grouped_linear_layer_norm_sigma_feeds_the_pullback(rng):
    (x, weight, bias), _ = grouped_problem(rng, (5,), 3, 4, 6)
    y, sigma = fused.grouped_linear_layer_norm(x, weight, bias, return_sigma=True)
    z = fused.grouped_linear(x, weight, bias)
    y_ref, sigma_ref = fused.layer_norm(z, return_sigma=True)
    np.testing.assert_allclose(y, y_ref, **TIGHT)
    np.testing.assert_allclose(sigma, sigma_ref, **TIGHT)
    g = draw(rng, *y.shape)
    np.testing.assert_allclose(fused.layer_norm_pullback(y, sigma, g), dn.vjp(fused.layer_norm, z)[1](g)[0], **TIGHT)


def test_epilogue_taped_path_equals_fused_forward(rng):
    (x, weight, bias), (t, _, _) = grouped_problem(rng, (3,), 2, 3, 5, directions=2)
    fast = fused.grouped_linear_layer_norm(dn.Dual(x, t), weight, bias)
    bound = fused.grouped_linear_layer_norm(taped(x, t), weight, bias)
    assert bound.node is not None and fast.node is None
    np.testing.assert_allclose(bound.value, fast.value, **TIGHT)
    np.testing.assert_allclose(bound.tangent, fast.tangent, **TIGHT)


def test_fused_ops_reject_mismatched_directions_and_shapes(rng):
    x, weight = draw(rng, 2, 1, 3), draw(rng, 1, 3, 4)
    with pytest.raises(ValueError, match="grouped_linear_layer_norm.*directions"):
        fused.grouped_linear_layer_norm(dn.Dual(x, draw(rng, 2, 2, 1, 3)), dn.Dual(weight, draw(rng, 3, 1, 3, 4)))
    with pytest.raises(ValueError, match="grouped_linear_layer_norm"):
        fused.grouped_linear_layer_norm(x, draw(rng, 1, 4, 4))


# ---------------------------------------------------------------------------------------
# σ is a residual of the LN primitives: kept on the tape node, handed to the vjp
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op, make", [
    ("layer_norm", lambda rng: ((draw(rng, 4, 3, 6),), fused.layer_norm)),
    ("grouped_linear_layer_norm",
     lambda rng: (grouped_problem(rng, (4,), 3, 5, 6)[0], fused.grouped_linear_layer_norm)),
])
def test_sigma_is_the_tape_nodes_residual_and_the_vjp_does_not_recompute_it(rng, monkeypatch, op, make):
    primals, f = make(rng)
    nodes = []

    def record(*args):
        out = f(*args)
        nodes.append(out.node)
        return out
    out, pullback = dn.vjp(record, *primals)
    node, = nodes
    assert node.primitive.name == op
    _, sigma = f(*primals, return_sigma=True)
    np.testing.assert_array_equal(node.residuals, sigma)  # σ of the forward pass, on the node
    # the vjp reads σ from the node: no LN forward contract runs again (only the Jacobian is
    # reachable), and a σ changed on the node changes the cotangent as the Jacobian (∝ 1/σ) says
    monkeypatch.setattr(fused, "implementation", lambda contract, array: {
        "layer_norm_jacobian": fused.reference_layer_norm_jacobian}[contract])
    g = draw(rng, *out.shape)
    first = pullback(g)[0]
    node.residuals = 2 * node.residuals
    np.testing.assert_allclose(pullback(g)[0], first / 2, **TIGHT)


def test_residuals_of_a_generic_primitive_reach_caller_tape_and_rules_and_nesting_recomputes():
    """A nestable primitive that declares a residual: its rules get it from the forward pass (or the
    tape), and ``None`` inside a nested derivative, where they recompute it — so second derivatives
    stay exact."""
    from dualnet.primitives import Primitive
    seen = []

    def rule_input(x, residuals):
        seen.append(residuals)
        return dn.exp(x) if residuals is None else residuals  # e^x, the residual of the forward pass

    square_exp = Primitive(  # f(x) = e^{2x}, residual e^x
        "square_exp", lambda x: (np.exp(x) ** 2, np.exp(x)),
        jvp=lambda tangents, out, x, residuals: 2 * rule_input(x, residuals) ** 2 * tangents[0],
        vjp=lambda g, out, x, residuals: [2 * rule_input(x, residuals) ** 2 * g], nested=True, residuals=True)
    x = np.array([0.3, -1.2])
    out, residuals = square_exp.apply(x)
    np.testing.assert_allclose(out, np.exp(2 * x), **TIGHT)
    np.testing.assert_allclose(residuals, np.exp(x), **TIGHT)
    dual_out, dual_residuals = square_exp.apply(dn.Dual(x, np.ones(2)))
    np.testing.assert_allclose(dual_out.tangent, 2 * np.exp(2 * x), **TIGHT)
    np.testing.assert_allclose(dual_residuals, np.exp(x), **TIGHT)
    seen.clear()
    np.testing.assert_allclose(dn.grad(lambda a: dn.sum(square_exp(a)))(x), 2 * np.exp(2 * x), **TIGHT)
    assert seen and all(r is not None for r in seen)  # the vjp read the tape's residual
    seen.clear()
    second = dn.grad(lambda a: dn.sum(dn.grad(lambda b: dn.sum(square_exp(b)))(a)))(x)
    np.testing.assert_allclose(second, 4 * np.exp(2 * x), **TIGHT)
    assert None in seen  # nested: the rule recomputed e^x in differentiable operations
    _, hvp = dn.jvp(dn.grad(lambda a: dn.sum(square_exp(a))), (x,), (np.ones(2),))
    np.testing.assert_allclose(hvp, 4 * np.exp(2 * x), **TIGHT)
