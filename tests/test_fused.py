"""Fused primitives: layer_norm, grouped_linear, grouped_linear_layer_norm; σ as their residual; and the
hidden layer to its activation, layer_norm_relu and grouped_linear_layer_norm_relu (injected tangent, residual).

Properties (float64 unless stated): JVP = central finite differences (h = 1e-6, rtol 1e-5,
atol 1e-6); VJP satisfies <J u, w> = <u, Jᵀ w> (rtol 1e-10); K directions at once = K single
passes (rtol 1e-12); each fused op = its composition of basic primitives in value, jvp and vjp
(rtol 1e-10); the taped (bind) path = the fused forward path.  Run with whatever kernels are
active (Numba when importable); the kernel-vs-reference checks live in tests/kernels/.
"""
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dualnet as dn
from dualnet import fused
from dualnet.dual import Node, add_tangent

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


# ---------------------------------------------------------------------------------------
# layer norm -> ReLU, fused: a = relu(h + r), h = LN(x) or LN(xW + b), ȧ = (J ż + u + ṙ)·[h + r > 0]
# ---------------------------------------------------------------------------------------
RELU_OPTIONALS = ("tangent", "bias", "bias_tangent", "injected", "residual", "residual_tangent")
TANGENTS_OF_THE_CONTRACT = ("tangent", "bias_tangent", "injected", "residual_tangent")


def normalize_relu_call(rng, groups, rows, width, directions, present):
    """Arguments of the normalize_relu contract (float64); ``present`` maps each of RELU_OPTIONALS to a flag.
    ``directions`` is 0 when no tangent-like input is present."""
    shapes = dict(tangent=(groups, directions, rows, width), bias=(groups, width),
                  bias_tangent=(directions, groups, width), injected=(directions, rows, groups, width),
                  residual=(rows, groups, width), residual_tangent=(directions, rows, groups, width))
    arrays = {name: draw(rng, *shapes[name]) * 2 if present[name] else None for name in RELU_OPTIONALS}
    k = directions if any(present[name] for name in TANGENTS_OF_THE_CONTRACT) else 0
    return (draw(rng, groups, rows, width) * 2, arrays["tangent"], arrays["bias"], arrays["bias_tangent"],
            arrays["injected"], arrays["residual"], arrays["residual_tangent"], 1e-5, k)


def naive_normalize_relu(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps, directions):
    """The contract written as its steps: the epilogue, + injected and + ṙ on the tangent, + r on the value,
    then the ReLU (np.maximum) and its derivative [pre > 0]."""
    normalized, normalized_tangent, sigma = fused.reference_normalize_epilogue(value, tangent, bias, bias_tangent,
                                                                               eps, directions)
    pre = normalized if residual is None else normalized + residual
    activated = np.maximum(pre, 0)
    if not directions:
        return normalized, activated, None, sigma
    total = normalized_tangent.copy()
    for extra in (injected, residual_tangent):
        if extra is not None:
            total = total + extra
    return normalized, activated, np.where(pre > 0, total, 0.0), sigma


@pytest.mark.parametrize("groups, rows, width, directions", [(3, 5, 7, 2), (1, 3, 1, 1), (2, 1, 5, 3)])
def test_reference_normalize_relu_equals_the_naive_composition_for_every_input_pattern(rng, groups, rows, width,
                                                                                        directions):
    for flags in itertools.product([False, True], repeat=len(RELU_OPTIONALS)):
        present = dict(zip(RELU_OPTIONALS, flags))
        call = normalize_relu_call(rng, groups, rows, width, directions, present)
        result = fused.reference_normalize_relu(*call)
        expected = naive_normalize_relu(*call)
        assert len(result) == 4
        normalized, activated, activated_tangent, sigma = result
        assert normalized.shape == activated.shape == (rows, groups, width)
        assert sigma.shape == (rows, groups, 1)
        for actual, wanted in zip(result, expected):
            if wanted is None:
                assert actual is None, present
            else:
                assert actual.shape == wanted.shape, present
                np.testing.assert_allclose(actual, wanted, **TIGHT, err_msg=str(present))
        if call[-1]:
            assert activated_tangent.shape == (directions, rows, groups, width)
            assert np.all(activated_tangent[:, activated <= 0] == 0)
        else:
            assert activated_tangent is None


def test_reference_normalize_relu_value_is_relu_of_layer_norm_plus_residual(rng):
    """h and σ are the plain LN of value + bias in the layer's layout, independently of the epilogue reference."""
    value, bias, residual = draw(rng, 2, 4, 6), draw(rng, 2, 6), draw(rng, 4, 2, 6)
    h, a, a_tangent, sigma = fused.reference_normalize_relu(value, None, bias, None, None, residual, None, 1e-3, 0)
    z = (value + bias[:, None]).transpose(1, 0, 2)
    np.testing.assert_allclose(sigma, np.sqrt(z.var(axis=-1, keepdims=True) + 1e-3), **TIGHT)
    np.testing.assert_allclose(h, (z - z.mean(axis=-1, keepdims=True)) / sigma, **TIGHT)
    np.testing.assert_array_equal(a, np.maximum(h + residual, 0))
    assert a_tangent is None


def layer_norm_relu_value(x, residual=None, **options):
    return fused.layer_norm_relu(x, residual, **options)[0]


def grouped_relu_value(x, weight, bias=None, residual=None, **options):
    return fused.grouped_linear_layer_norm_relu(x, weight, bias, residual, **options)[0]


def assert_matches_finite_differences_away_from_the_kink(tangent, pre, expected, h=1e-6):
    """FD is valid where the pre-activation stays on one side of 0 over [−h, h] (|pre| well above h |ṗ|)."""
    away = np.abs(pre) > np.maximum(1e-3, 1e3 * h * np.abs(tangent))
    assert np.all(tangent[pre < 0] == 0)  # ReLU off: exactly zero, not just small
    np.testing.assert_allclose(tangent[away], expected[away], **FD)


@given(shapes, st.integers(1, 3), st.integers(0, 2**16))
def test_layer_norm_relu_jvp_matches_finite_differences(shape, subset, seed):
    lead, groups, width = shape
    rng = np.random.default_rng(seed)
    x, residual = draw(rng, *lead, groups, width + 1), draw(rng, *lead, groups, width + 1)
    tangents = [draw(rng, *x.shape) if subset >> i & 1 else None for i in range(2)]
    _, tangent = dn.jvp(layer_norm_relu_value, (x, residual), tangents)
    zeros = [np.zeros_like(x) if t is None else t for t in tangents]
    expected = central_difference(layer_norm_relu_value, [x, residual], zeros)
    assert_matches_finite_differences_away_from_the_kink(tangent, fused.layer_norm(x) + residual, expected)


@given(shapes, st.integers(1, 4), st.integers(1, 15), st.integers(0, 2**16))
def test_grouped_linear_layer_norm_relu_jvp_matches_finite_differences_for_every_subset(shape, c_out, subset, seed):
    lead, groups, c_in = shape
    rng = np.random.default_rng(seed)
    primals, tangents = grouped_problem(rng, lead, groups, c_in, c_out + 1)
    residual = draw(rng, *lead, groups, c_out + 1)
    primals, tangents = primals + (residual,), tangents + (draw(rng, *residual.shape),)
    chosen = tuple(t if subset >> i & 1 else None for i, t in enumerate(tangents))
    _, tangent = dn.jvp(grouped_relu_value, primals, chosen)
    zeros = [np.zeros_like(p) if t is None else t for p, t in zip(primals, chosen)]
    expected = central_difference(grouped_relu_value, primals, zeros)
    pre = fused.grouped_linear_layer_norm(*primals[:3]) + residual
    assert_matches_finite_differences_away_from_the_kink(tangent, pre, expected)


@pytest.mark.parametrize("directions", [1, 3])
def test_injected_tangent_on_plain_inputs_is_masked_exactly(rng, directions):
    x, residual = draw(rng, 4, 3, 6), draw(rng, 4, 3, 6)
    u = draw(rng, directions, 4, 3, 6)
    for r in (None, residual):
        a, h, sigma = fused.layer_norm_relu(x, r, injected=u)
        pre = h if r is None else h + r
        assert isinstance(a, dn.Dual) and a.tangent.shape == u.shape
        np.testing.assert_array_equal(a.value, np.maximum(pre, 0))
        np.testing.assert_array_equal(a.tangent, u * (pre > 0))
        h_ref, sigma_ref = fused.layer_norm(x, return_sigma=True)
        np.testing.assert_allclose(h, h_ref, **TIGHT)
        np.testing.assert_allclose(sigma, sigma_ref, **TIGHT)
    (x, weight, bias), _ = grouped_problem(rng, (5,), 3, 4, 6)
    residual, u = draw(rng, 5, 3, 6), draw(rng, directions, 5, 3, 6)
    a, h, sigma = fused.grouped_linear_layer_norm_relu(x, weight, bias, residual, injected=u)
    assert sigma.shape == (5, 3, 1)
    np.testing.assert_allclose(h, fused.grouped_linear_layer_norm(x, weight, bias), **TIGHT)
    np.testing.assert_array_equal(a.tangent, u * (h + residual > 0))
    # nothing injected and nothing moving: a plain array, no tangent work
    plain, _, _ = fused.grouped_linear_layer_norm_relu(x, weight, bias, residual)
    assert not isinstance(plain, dn.Dual)
    np.testing.assert_array_equal(plain, a.value)


def test_injected_tangent_adds_to_the_inputs_k_directions(rng, monkeypatch):
    calls = count_fallbacks(monkeypatch)
    k = 3
    x, t, residual, rt = draw(rng, 4, 2, 5), draw(rng, k, 4, 2, 5), draw(rng, 4, 2, 5), draw(rng, k, 4, 2, 5)
    u = draw(rng, k, 4, 2, 5)
    jx = fused.layer_norm(dn.Dual(x, t)).tangent
    a, h, _ = fused.layer_norm_relu(dn.Dual(x, t), dn.Dual(residual, rt), injected=u)
    np.testing.assert_allclose(a.tangent, (jx + u + rt) * (h + residual > 0), **TIGHT)
    a, h, _ = fused.layer_norm_relu(dn.Dual(x, t), residual, injected=u)  # only x moves
    np.testing.assert_allclose(a.tangent, (jx + u) * (h + residual > 0), **TIGHT)
    a, h, _ = fused.layer_norm_relu(x, dn.Dual(residual, rt), injected=u)  # only the residual moves
    np.testing.assert_allclose(a.tangent, (u + rt) * (h + residual > 0), **TIGHT)
    (x, weight, bias), (xt, wt, bt) = grouped_problem(rng, (4,), 2, 3, 5, directions=k)
    residual, rt, u = draw(rng, 4, 2, 5), draw(rng, k, 4, 2, 5), draw(rng, k, 4, 2, 5)
    moving = (dn.Dual(x, xt), dn.Dual(weight, wt), dn.Dual(bias, bt))
    jz = fused.grouped_linear_layer_norm(*moving).tangent
    a, h, _ = fused.grouped_linear_layer_norm_relu(*moving, dn.Dual(residual, rt), injected=u)
    np.testing.assert_allclose(a.tangent, (jz + u + rt) * (h + residual > 0), **TIGHT)
    assert calls == []  # the injection rode in the fused pass every time


def unfused_layer_norm_relu(x, residual, u):
    pre = add_tangent(fused.layer_norm(x), u)
    return dn.relu(pre if residual is None else pre + residual)


def unfused_grouped_relu(x, weight, bias, residual, u):
    pre = add_tangent(fused.grouped_linear_layer_norm(x, weight, bias), u)
    return dn.relu(pre if residual is None else pre + residual)


def count_fallbacks(monkeypatch):
    """Record every call of the unfused fallback of ``fused._activate``."""
    calls = []
    original = fused._unfused_activation

    def spy(*args):
        calls.append(args)
        return original(*args)
    monkeypatch.setattr(fused, "_unfused_activation", spy)
    return calls


@pytest.mark.parametrize("case", ["single direction", "K mismatch", "K=1 meets K"])
def test_injected_tangent_falls_back_to_the_unfused_composition(rng, monkeypatch, case):
    """A tangent without its own K axis, or a K other than u's: ``_activate`` runs ``unfused()``, which
    broadcasts like ``add_tangent`` (one direction meets K)."""
    calls = count_fallbacks(monkeypatch)
    x, residual = draw(rng, 3, 2, 5), draw(rng, 3, 2, 5)
    x_tangent, u = {"single direction": (draw(rng, 3, 2, 5), draw(rng, 1, 3, 2, 5)),
                    "K mismatch": (draw(rng, 2, 3, 2, 5), draw(rng, 1, 3, 2, 5)),
                    "K=1 meets K": (draw(rng, 1, 3, 2, 5), draw(rng, 2, 3, 2, 5))}[case]
    jx = fused.layer_norm(dn.Dual(x, x_tangent)).tangent
    for r in (None, residual):
        a, h, sigma = fused.layer_norm_relu(dn.Dual(x, x_tangent), r, injected=u)
        pre = h if r is None else h + r
        np.testing.assert_allclose(a.tangent, ((jx[None] if jx.ndim == x.ndim else jx) + u) * (pre > 0), **TIGHT)
        expected = unfused_layer_norm_relu(dn.Dual(x, x_tangent), r, u)
        np.testing.assert_allclose(a.value, expected.value, **TIGHT)
        assert a.tangent.shape == expected.tangent.shape
        np.testing.assert_allclose(a.tangent, expected.tangent, **TIGHT)
        np.testing.assert_allclose(h, fused.layer_norm(x), **TIGHT)
        assert not isinstance(h, dn.Dual) and not isinstance(sigma, dn.Dual)
    (x, weight, bias), _ = grouped_problem(rng, (3,), 2, 4, 5)
    moving = dn.Dual(x, draw(rng, *x_tangent.shape[:-1], 4))
    a, h, _ = fused.grouped_linear_layer_norm_relu(moving, weight, bias, residual, injected=u)
    expected = unfused_grouped_relu(moving, weight, bias, residual, u)
    np.testing.assert_allclose(a.value, expected.value, **TIGHT)
    assert a.tangent.shape == expected.tangent.shape
    np.testing.assert_allclose(a.tangent, expected.tangent, **TIGHT)
    np.testing.assert_allclose(h, fused.grouped_linear_layer_norm(x, weight, bias), **TIGHT)
    assert len(calls) == 3  # every call above took the fallback


@given(shapes, st.integers(0, 2**16))
def test_layer_norm_relu_vjp_dot_product_identity(shape, seed):
    lead, groups, width = shape
    rng = np.random.default_rng(seed)
    x, residual = draw(rng, *lead, groups, width + 1), draw(rng, *lead, groups, width + 1)
    tangents = (draw(rng, *x.shape), draw(rng, *x.shape))
    _, jv = dn.jvp(layer_norm_relu_value, (x, residual), tangents)
    out, pullback = dn.vjp(layer_norm_relu_value, x, residual)
    w = draw(rng, *out.shape)
    cotangents = pullback(w)
    np.testing.assert_allclose(np.vdot(jv, w), sum(np.vdot(t, c) for t, c in zip(tangents, cotangents)),
                               rtol=1e-10, atol=1e-12)
    x_bar, = dn.vjp(layer_norm_relu_value, x)[1](w)  # no residual
    _, jx = dn.jvp(layer_norm_relu_value, (x,), tangents[:1])
    np.testing.assert_allclose(np.vdot(jx, w), np.vdot(tangents[0], x_bar), rtol=1e-10, atol=1e-12)


@given(shapes, st.integers(1, 4), st.integers(0, 2**16))
def test_grouped_linear_layer_norm_relu_vjp_dot_product_identity(shape, c_out, seed):
    lead, groups, c_in = shape
    rng = np.random.default_rng(seed)
    primals, tangents = grouped_problem(rng, lead, groups, c_in, c_out + 1)
    residual = draw(rng, *lead, groups, c_out + 1)
    primals, tangents = primals + (residual,), tangents + (draw(rng, *residual.shape),)
    _, jv = dn.jvp(grouped_relu_value, primals, tangents)
    out, pullback = dn.vjp(grouped_relu_value, *primals)
    w = draw(rng, *out.shape)
    cotangents = pullback(w)
    assert [c.shape for c in cotangents] == [p.shape for p in primals]
    np.testing.assert_allclose(np.vdot(jv, w), sum(np.vdot(t, c) for t, c in zip(tangents, cotangents)),
                               rtol=1e-10, atol=1e-12)


def test_layer_norm_relu_k_directions_equal_single_passes(rng):
    k = 3
    x, t, residual, rt, u = (draw(rng, 5, 2, 6), draw(rng, k, 5, 2, 6), draw(rng, 5, 2, 6), draw(rng, k, 5, 2, 6),
                             draw(rng, k, 5, 2, 6))
    together = fused.layer_norm_relu(dn.Dual(x, t), dn.Dual(residual, rt))[0].tangent
    injected = fused.layer_norm_relu(dn.Dual(x, t), dn.Dual(residual, rt), injected=u)[0].tangent
    for j in range(k):
        single = fused.layer_norm_relu(dn.Dual(x, t[j]), dn.Dual(residual, rt[j]))[0].tangent
        assert single.shape == x.shape
        np.testing.assert_allclose(together[j], single, rtol=1e-12, atol=1e-14)
        one = fused.layer_norm_relu(dn.Dual(x, t[j:j + 1]), dn.Dual(residual, rt[j:j + 1]), injected=u[j:j + 1])
        np.testing.assert_allclose(injected[j], one[0].tangent[0], rtol=1e-12, atol=1e-14)


def test_grouped_linear_layer_norm_relu_k_directions_equal_single_passes(rng):
    k = 3
    primals, tangents = grouped_problem(rng, (4,), 3, 2, 5, directions=k)
    residual, rt, u = draw(rng, 4, 3, 5), draw(rng, k, 4, 3, 5), draw(rng, k, 4, 3, 5)
    primals, tangents = primals + (residual,), tangents + (rt,)
    _, together = dn.jvp(grouped_relu_value, primals, tangents)
    injected = fused.grouped_linear_layer_norm_relu(*map(dn.Dual, primals, tangents), injected=u)[0].tangent
    for j in range(k):
        _, single = dn.jvp(grouped_relu_value, primals, [t[j] for t in tangents])
        np.testing.assert_allclose(together[j], single, rtol=1e-12, atol=1e-13)
        one = fused.grouped_linear_layer_norm_relu(*[dn.Dual(p, t[j:j + 1]) for p, t in zip(primals, tangents)],
                                                   injected=u[j:j + 1])[0]
        np.testing.assert_allclose(injected[j], one.tangent[0], rtol=1e-12, atol=1e-13)


def composed_layer_norm_relu(x, residual):
    return dn.relu(fused.layer_norm(x) + residual)


def composed_grouped_relu(x, weight, bias, residual):
    return dn.relu(fused.grouped_linear_layer_norm(x, weight, bias) + residual)


def test_layer_norm_relu_equals_composition_of_primitives(rng):
    x, residual = draw(rng, 3, 4, 9), draw(rng, 3, 4, 9)
    tangents = (draw(rng, 2, 3, 4, 9), draw(rng, 2, 3, 4, 9))
    out, tangent = dn.jvp(layer_norm_relu_value, (x, residual), tangents)
    naive_out, naive_tangent = dn.jvp(composed_layer_norm_relu, (x, residual), tangents)
    np.testing.assert_array_equal(out, naive_out)
    np.testing.assert_allclose(tangent, naive_tangent, **TIGHT)
    c = draw(rng, 3, 4, 9)
    mine = dn.grad(lambda a, r: dn.sum(layer_norm_relu_value(a, r) * c), argnums=(0, 1))(x, residual)
    theirs = dn.grad(lambda a, r: dn.sum(composed_layer_norm_relu(a, r) * c), argnums=(0, 1))(x, residual)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a, b, **TIGHT)
    a, h, sigma = fused.layer_norm_relu(x, residual, eps=1e-3)
    h_ref, sigma_ref = fused.layer_norm(x, eps=1e-3, return_sigma=True)
    np.testing.assert_allclose(h, h_ref, **TIGHT)
    np.testing.assert_allclose(sigma, sigma_ref, **TIGHT)
    np.testing.assert_array_equal(a, np.maximum(h + residual, 0))


def test_grouped_linear_layer_norm_relu_equals_composition_of_primitives(rng):
    primals, tangents = grouped_problem(rng, (3, 2), 4, 5, 6, directions=2)
    residual = draw(rng, 3, 2, 4, 6)
    primals, tangents = primals + (residual,), tangents + (draw(rng, 2, *residual.shape),)
    out, tangent = dn.jvp(grouped_relu_value, primals, tangents)
    naive_out, naive_tangent = dn.jvp(composed_grouped_relu, primals, tangents)
    np.testing.assert_allclose(out, naive_out, **TIGHT)
    np.testing.assert_allclose(tangent, naive_tangent, **TIGHT)
    for chosen in [(tangents[0], None, None, None), (None, tangents[1], tangents[2], None),
                   (None, None, None, tangents[3])]:
        _, tangent = dn.jvp(grouped_relu_value, primals, chosen)
        _, naive = dn.jvp(composed_grouped_relu, primals, chosen)
        np.testing.assert_allclose(tangent, naive, **TIGHT)
    c = draw(rng, *out.shape)
    argnums = (0, 1, 2, 3)
    mine = dn.grad(lambda *a: dn.sum(grouped_relu_value(*a) * c), argnums=argnums)(*primals)
    theirs = dn.grad(lambda *a: dn.sum(composed_grouped_relu(*a) * c), argnums=argnums)(*primals)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a, b, **TIGHT)
    no_bias = dn.grad(lambda a, w: dn.sum(fused.grouped_linear_layer_norm_relu(a, w)[0] * c), argnums=(0, 1))
    naive = dn.grad(lambda a, w: dn.sum(dn.relu(fused.grouped_linear_layer_norm(a, w)) * c), argnums=(0, 1))
    for a, b in zip(no_bias(*primals[:2]), naive(*primals[:2])):
        np.testing.assert_allclose(a, b, **TIGHT)


def test_layer_norm_relu_taped_path_equals_fused_forward(rng):
    x, t, u = draw(rng, 6, 5), draw(rng, 2, 6, 5), draw(rng, 2, 6, 5)
    residual = draw(rng, 6, 5)
    fast = fused.layer_norm_relu(dn.Dual(x, t), residual, injected=u)[0]
    bound = fused.layer_norm_relu(taped(x, t), residual, injected=u)[0]
    assert bound.node is not None and fast.node is None
    np.testing.assert_array_equal(bound.value, fast.value)
    np.testing.assert_allclose(bound.tangent, fast.tangent, **TIGHT)


def test_layer_norm_relu_injected_under_jvp_agrees_with_and_without_a_k_axis(rng):
    x, t, u = draw(rng, 3, 2, 5), draw(rng, 3, 2, 5), draw(rng, 1, 3, 2, 5)
    out_k, tangent_k = dn.jvp(lambda a: layer_norm_relu_value(a, injected=u), (x,), (t[None],))
    out_1, tangent_1 = dn.jvp(lambda a: layer_norm_relu_value(a, injected=u), (x,), (t,))
    assert not isinstance(out_1, dn.Dual)
    np.testing.assert_allclose(out_1, out_k, **TIGHT)
    np.testing.assert_allclose(np.reshape(tangent_1, tangent_k.shape), tangent_k, **TIGHT)


def test_layer_norm_relu_injected_tangent_leaves_the_gradient_alone(rng):
    """u is a tangent only: a taped input (no tangent of its own, so the fallback runs) has the gradient it has
    without u."""
    x, residual, c, u = draw(rng, 3, 4, 9), draw(rng, 3, 4, 9), draw(rng, 3, 4, 9), draw(rng, 1, 3, 4, 9)
    plain = dn.grad(lambda a: dn.sum(layer_norm_relu_value(a, residual) * c))(x)
    with_u = dn.grad(lambda a: dn.sum(layer_norm_relu_value(a, residual, injected=u) * c))(x)
    np.testing.assert_allclose(with_u, plain, **TIGHT)


def test_layer_norm_relu_float32_stays_float32(rng):
    x, residual, u = (draw(rng, *shape).astype(np.float32) for shape in ((4, 8), (4, 8), (2, 4, 8)))
    for a, h, sigma in (fused.layer_norm_relu(dn.Dual(x, u), residual, injected=u),
                        fused.grouped_linear_layer_norm_relu(x.reshape(4, 2, 4), np.ones((2, 4, 4), np.float32),
                                                             None, residual.reshape(4, 2, 4),
                                                             injected=u.reshape(2, 4, 2, 4))):
        assert a.value.dtype == a.tangent.dtype == h.dtype == sigma.dtype == np.float32
    a, h, _ = fused.layer_norm_relu(x, residual)
    np.testing.assert_allclose(a, np.maximum(fused.layer_norm(x.astype(np.float64)) + residual, 0), rtol=1e-5,
                               atol=1e-5)


def test_layer_norm_relu_injected_tangent_keeps_the_values_dtype(rng):
    """The value's dtype is the computation's (as Dual and add_tangent do): a tangent of another precision is cast."""
    x, u = draw(rng, 4, 8).astype(np.float32), draw(rng, 1, 4, 8)
    a, h, sigma = fused.layer_norm_relu(x, injected=u)
    unfused = unfused_layer_norm_relu(x, None, u)
    assert a.value.dtype == h.dtype == sigma.dtype == unfused.value.dtype == np.float32


def test_layer_norm_relu_errors_name_the_op(rng):
    with pytest.raises(ValueError, match="^layer_norm_relu: residual has shape"):
        fused.layer_norm_relu(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="^layer_norm_relu: residual has shape"):
        fused.layer_norm_relu(dn.Dual(np.ones((2, 3)), np.ones((2, 3))), dn.Dual(np.ones((3, 2))))
    with pytest.raises(ValueError, match="^grouped_linear_layer_norm_relu: residual has shape"):
        fused.grouped_linear_layer_norm_relu(np.ones((2, 3, 4)), np.ones((3, 4, 5)), None, np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="^grouped_linear_layer_norm_relu"):
        fused.grouped_linear_layer_norm_relu(np.ones((2, 3, 4)), np.ones((3, 5, 2)))
    with pytest.raises(ValueError, match="^layer_norm_relu.*eps"):
        fused.layer_norm_relu(np.ones((2, 3)), eps=-1.0)
    with pytest.raises(TypeError, match="^layer_norm_relu"):
        fused.layer_norm_relu(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"^layer_norm_relu: injected has shape \(2, 3, 4\)"):
        fused.layer_norm_relu(np.ones((4, 3)), injected=np.ones((2, 3, 4)))  # same size, other layout
    with pytest.raises(ValueError, match="^layer_norm_relu: injected has shape"):
        fused.layer_norm_relu(np.ones((4, 3)), injected=np.ones((4, 3)))  # no K axis
    with pytest.raises(ValueError, match="^grouped_linear_layer_norm_relu: injected has shape"):
        fused.grouped_linear_layer_norm_relu(np.ones((2, 3, 4)), np.ones((3, 4, 5)), injected=np.ones((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="^layer_norm_relu: the inputs carry 2 tangent directions and injected 3"):
        fused.layer_norm_relu(dn.Dual(np.ones((4, 3)), np.ones((2, 4, 3))), injected=np.ones((3, 4, 3)))
    assert dn.primitives.TABLE["layer_norm_relu"] is fused._layer_norm_relu
    assert dn.primitives.TABLE["grouped_linear_layer_norm_relu"] is fused._grouped_linear_layer_norm_relu
