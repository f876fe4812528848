"""jvp / vjp / grad over pytrees, K directions, custom rules, and full Jacobians of composites.

The composite checks compare the whole Jacobian built by forward mode (basis tangents, all n
directions in one K = n pass) with the one built by reverse mode (m pullbacks), in float64 to
relative 1e-12, and against central finite differences (h = 1e-6, tolerance 1e-6).
"""
import numpy as np
import pytest

import dualnet as dn
from dualnet.primitives import TABLE, Primitive


# ---------------------------------------------------------------------------------------
# forward mode
# ---------------------------------------------------------------------------------------
def test_jvp_over_nested_pytrees_with_symbolic_zero_leaves(rng):
    params = {"w": rng.standard_normal((3, 2)), "layers": [rng.standard_normal(2), (rng.standard_normal(2),)]}
    tangents = {"w": rng.standard_normal((3, 2)), "layers": [None, (rng.standard_normal(2),)]}
    x = rng.standard_normal((4, 3))

    def f(p, inputs):
        hidden = inputs @ p["w"] + p["layers"][0]
        return {"out": hidden * p["layers"][1][0], "unused": inputs}

    out, tangent = dn.jvp(f, (params, x), (tangents, None))
    hidden = x @ params["w"] + params["layers"][0]
    np.testing.assert_allclose(out["out"], hidden * params["layers"][1][0], rtol=1e-14)
    expected = (x @ tangents["w"]) * params["layers"][1][0] + hidden * tangents["layers"][1][0]
    np.testing.assert_allclose(tangent["out"], expected, rtol=1e-13)
    np.testing.assert_array_equal(tangent["unused"], np.zeros_like(x))  # materialised for the user


def test_jvp_with_k_directions_gives_every_output_a_k_axis(rng):
    x, y = rng.standard_normal(3), rng.standard_normal(3)
    tangents = (rng.standard_normal((5, 3)), None)
    out, tangent = dn.jvp(lambda a, b: (a * b, b, 2.0), (x, y), tangents)
    assert [t.shape for t in tangent] == [(5, 3), (5, 3), (5,)]
    np.testing.assert_array_equal(tangent[0], tangents[0] * y)
    assert not tangent[1].any() and not tangent[2].any()


@pytest.mark.parametrize("tangents, message", [
    ((np.ones((2, 3)), np.ones((4, 3))), r"tangents disagree on the number of directions K: \[2, 4\]"),
    ((np.ones((2, 2)), None), r"tangent 0 has shape \(2, 2\); expected the primal shape \(3,\) or \(K,\) \+ \(3,\)"),
    ((np.ones((0, 3)), None), r"tangent 0 has shape \(0, 3\).*K >= 1"),
    ((np.ones(3),), r"2 primal leaves but 1 tangent leaves"),
])
def test_bad_tangents_get_clear_messages(tangents, message):
    with pytest.raises(ValueError, match=message):
        dn.jvp(lambda a, b: a * b, (np.ones(3), np.ones(3)), tangents)


def test_jvp_keeps_float32_and_float64(rng):
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((4, 3)).astype(dtype)
        out, tangent = dn.jvp(lambda a: dn.softmax(a @ a.T).sum(), (x,), (np.ones((2, 4, 3), dtype),))
        assert out.dtype == dtype and tangent.dtype == dtype and tangent.shape == (2,)


def test_linearize_reuses_the_primal_point(rng):
    x = rng.standard_normal(3)
    out, jvp_at_x = dn.linearize(lambda a: dn.tanh(a) * a, x)
    direction = rng.standard_normal(3)
    np.testing.assert_allclose(out, np.tanh(x) * x)
    np.testing.assert_allclose(jvp_at_x(direction), ((1 - np.tanh(x) ** 2) * x + np.tanh(x)) * direction)


# ---------------------------------------------------------------------------------------
# reverse mode
# ---------------------------------------------------------------------------------------
def test_vjp_accumulates_fan_out_and_zeroes_unused_inputs(rng):
    x, unused = rng.standard_normal(3), rng.standard_normal(2)
    out, pullback = dn.vjp(lambda a, b: a * a + dn.exp(a), x, unused)
    gx, gb = pullback(np.ones(3))
    np.testing.assert_allclose(gx, 2 * x + np.exp(x), rtol=1e-14)
    np.testing.assert_array_equal(gb, np.zeros(2))
    _, identity = dn.vjp(lambda a: a, x)
    np.testing.assert_array_equal(identity(np.arange(3.0))[0], np.arange(3.0))


def test_vjp_over_pytrees_and_cotangent_shape_errors(rng):
    params = {"a": rng.standard_normal(2), "b": [rng.standard_normal(2)]}
    out, pullback = dn.vjp(lambda p: (p["a"] * p["b"][0], dn.sum(p["a"])), params)
    (grads,) = pullback((np.ones(2), np.array(2.0)))
    np.testing.assert_allclose(grads["a"], params["b"][0] + 2)
    np.testing.assert_allclose(grads["b"][0], params["a"])
    with pytest.raises(ValueError, match=r"cotangent shape \(3,\) does not match output shape \(2,\)"):
        pullback((np.ones(3), np.array(1.0)))
    with pytest.raises(ValueError, match="cotangent has 1 leaves, output has 2"):
        pullback((np.ones(2),))


def test_grad_and_value_and_grad_with_argnums(rng):
    x, y = rng.standard_normal(3), rng.standard_normal(3)
    f = lambda a, b: dn.sum(a * a * b)
    np.testing.assert_allclose(dn.grad(f)(x, y), 2 * x * y)
    gx, gy = dn.grad(f, argnums=(0, 1))(x, y)
    np.testing.assert_allclose(gy, x * x)
    value, gy_only = dn.value_and_grad(f, argnums=1)(x, y)
    np.testing.assert_allclose(value, np.sum(x * x * y))
    np.testing.assert_allclose(gy_only, x * x)
    with pytest.raises(ValueError, match=r"grad: f must return a scalar, got shape \(3,\)"):
        dn.grad(lambda a: a * 2)(x)


def test_gradients_are_writeable_arrays_of_the_input_dtype(rng):
    x = rng.standard_normal(3).astype(np.float32)
    g = dn.grad(lambda a: dn.sum(a))(x)  # the sum's pullback broadcasts
    assert g.dtype == np.float32 and g.flags.writeable
    g *= 2


def _factored_pullback(f, *primals):
    """The cotangents of ``f``'s inputs with ``factored=True`` and without."""
    def cotangents(factored):
        out, pullback = dn.autodiff.vjp(f, *primals, factored=factored)
        return pullback(np.ones_like(dn.value_of(out)))
    return cotangents(True), cotangents(False)


def test_a_weight_multiplied_once_can_get_its_cotangent_as_factors(rng):
    """factored=True: W of x @ W comes back as Outer(x rows, g rows), equal bit for bit to the
    formed cotangent once formed; a weight used twice, or reshaped first, comes back formed."""
    from dualnet.gradients import Outer
    x, other = rng.standard_normal((2, 3, 8)), rng.standard_normal((6, 8))
    weight, bias = rng.standard_normal((8, 30)), rng.standard_normal(30)
    once = lambda w, b: dn.sum(dn.tanh(x @ w + b))
    (w_bar, b_bar), (w_dense, b_dense) = _factored_pullback(once, weight, bias)
    assert isinstance(w_bar, Outer) and w_bar.left.shape == (6, 8) and w_bar.right.shape == (6, 30)
    np.testing.assert_array_equal(w_bar.dense(), w_dense)
    np.testing.assert_array_equal(b_bar, b_dense)
    for f in (lambda w: dn.sum(dn.tanh(x @ w)) + dn.sum(other @ w),  # used twice: the sum is formed
              lambda w: dn.sum(dn.tanh(x @ dn.reshape(dn.reshape(w, (-1,)), (8, 30))))):  # a rule reads it
        (factored,), (dense,) = _factored_pullback(f, weight)
        assert isinstance(factored, np.ndarray)
        np.testing.assert_array_equal(factored, dense)
    rows = rng.standard_normal((40, 8))
    wide = lambda w: dn.sum(dn.tanh(rows @ w))  # 40·(8 + 30) > 8·30: formed at once
    assert isinstance(_factored_pullback(wide, weight)[0][0], np.ndarray)
    assert not isinstance(dn.grad(once)(weight, bias), Outer)  # the default: arrays


# ---------------------------------------------------------------------------------------
# user-defined rules
# ---------------------------------------------------------------------------------------
def test_custom_vjp_replaces_reverse_mode_only(rng):
    """Feedback-alignment style: the backward pass uses fixed B instead of Wᵀ."""
    x, w, feedback = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal((2, 3))

    @dn.custom_vjp
    def linear(inputs, weight):
        return inputs @ weight

    @linear.defvjp
    def _(g, out, inputs, weight):
        return g @ feedback, inputs.T @ g

    g = rng.standard_normal((4, 2))
    gx, gw = dn.vjp(linear, x, w)[1](g)
    np.testing.assert_allclose(gx, g @ feedback)
    np.testing.assert_allclose(gw, x.T @ g)
    tx = rng.standard_normal((2, 4, 3))
    _, tangent = dn.jvp(linear, (x, w), (tx, None))  # forward mode differentiates the body
    np.testing.assert_allclose(tangent, tx @ w, rtol=1e-14)


def test_checkpoint_keeps_only_inputs_and_output_and_recomputes_in_the_backward_pass(rng):
    """A checkpointed segment is one tape node (its interior is not recorded); its backward pass
    re-runs the body (counted) and gives the plain gradient; forward mode goes through the body."""
    x, w1, w2 = rng.standard_normal((5, 4)), rng.standard_normal((4, 6)), rng.standard_normal((6, 3))
    calls = []

    def segment(h, a, b):
        calls.append(1)
        return dn.tanh(dn.tanh(h @ a) @ b)

    def loss(x, w1, w2, wrap):
        return dn.sum(wrap(segment)(x, w1, w2) ** 2)

    plain = dn.grad(lambda *p: loss(*p, lambda f: f), argnums=(0, 1, 2))(x, w1, w2)
    calls.clear()
    dn.vjp(lambda *p: dn.checkpoint(segment)(*p), x, w1, w2)
    assert len(calls) == 1  # taping the segment ran its body once
    checkpointed = dn.grad(lambda *p: loss(*p, dn.checkpoint), argnums=(0, 1, 2))(x, w1, w2)
    assert len(calls) == 3  # the vjp above, then forward and recomputation for grad
    for a, b in zip(checkpointed, plain):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    nodes = []
    dn.vjp(lambda *p: nodes.append(dn.checkpoint(segment)(*p)) or nodes[-1], x, w1, w2)
    node = nodes[0].node
    assert node.primitive.name == "checkpoint(segment)"
    assert all(parent.primitive is None for parent in node.parents)  # its parents are the inputs: nothing inside
    tangent = tuple(rng.standard_normal(a.shape) for a in (x, w1, w2))
    np.testing.assert_allclose(dn.jvp(dn.checkpoint(segment), (x, w1, w2), tangent)[1],
                               dn.jvp(segment, (x, w1, w2), tangent)[1], rtol=1e-13)


def test_custom_jvp_replaces_forward_mode_only(rng):
    x = rng.standard_normal(3)

    @dn.custom_jvp
    def square(a):
        return a * a

    @square.defjvp
    def _(tangents, out, a):
        return 3 * tangents[0] * a  # deliberately not 2x: shows which rule runs

    _, tangent = dn.jvp(square, (x,), (np.ones(3),))
    np.testing.assert_allclose(tangent, 3 * x)
    np.testing.assert_allclose(dn.grad(lambda a: dn.sum(square(a)))(x), 2 * x)  # reverse: the body


def test_a_new_primitive_registered_in_the_table(rng, monkeypatch):
    cube = Primitive("cube", lambda x: x ** 3,
                     jvp=(lambda t, out, x: t * (3 * x * x),), vjp=(lambda g, out, x: g * (3 * x * x),))
    monkeypatch.setitem(TABLE, "cube", cube)
    x = rng.standard_normal(4)
    np.testing.assert_allclose(dn.jvp(TABLE["cube"], (x,), (np.ones((2, 4)),))[1], np.stack([3 * x * x] * 2))
    np.testing.assert_allclose(dn.grad(lambda a: dn.sum(cube(a)))(x), 3 * x * x)


# ---------------------------------------------------------------------------------------
# full Jacobians of composite functions: forward (n basis directions, one K = n pass)
# against reverse (m pullbacks) and finite differences
# ---------------------------------------------------------------------------------------
def flatten(params):
    leaves, rebuild = dn.tree_flatten(params)
    sizes = [leaf.size for leaf in leaves]

    def unflatten(vector):
        parts = np.split(vector, np.cumsum(sizes)[:-1], axis=-1)
        return rebuild([p.reshape(p.shape[:-1] + leaf.shape) for p, leaf in zip(parts, leaves)])
    return np.concatenate([leaf.ravel() for leaf in leaves]), unflatten


def jacobian_forward(f, params):
    vector, unflatten = flatten(params)
    basis = np.eye(vector.size)  # K = n basis directions, one pass
    _, tangent = dn.jvp(f, (params,), (unflatten(basis),))
    return tangent.reshape(vector.size, -1).T


def jacobian_reverse(f, params):
    out, pullback = dn.vjp(f, params)
    rows = []
    for i in range(out.size):
        cotangent = np.zeros(out.size)
        cotangent[i] = 1
        rows.append(flatten(pullback(cotangent.reshape(out.shape))[0])[0])
    return np.array(rows)


def jacobian_central_differences(f, params, step=1e-6):
    vector, unflatten = flatten(params)
    columns = []
    for i in range(vector.size):
        shift = np.zeros(vector.size)
        shift[i] = step
        plus, minus = f(unflatten(vector + shift)), f(unflatten(vector - shift))
        columns.append((np.ravel(plus) - np.ravel(minus)) / (2 * step))
    return np.array(columns).T


def mlp_losses(params, images, labels):
    """Per-example softmax cross-entropy of a 2-layer tanh/ReLU MLP: shape (N,)."""
    hidden = dn.relu(images @ params["w1"] + params["b1"])
    hidden = dn.tanh(hidden @ params["w2"] + params["b2"])
    logits = hidden @ params["w3"]
    return -dn.getitem(dn.log_softmax(logits, axis=-1), (np.arange(len(labels)), labels))


def layer_norm(params, eps=1e-5):
    """Layer norm written from primitives: (x - mean) / sqrt(var + eps) * gamma + beta."""
    x = params["x"]
    centred = x - dn.mean(x, axis=-1, keepdims=True)
    variance = dn.mean(centred * centred, axis=-1, keepdims=True)
    return centred / dn.sqrt(variance + eps) * params["gamma"] + params["beta"]


def _mlp_case(rng):
    params = {"w1": rng.standard_normal((5, 4)), "b1": rng.standard_normal(4) * 0.1,
              "w2": rng.standard_normal((4, 4)) * 0.5, "b2": rng.standard_normal(4) * 0.1,
              "w3": rng.standard_normal((4, 3))}
    images, labels = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    return (lambda p: mlp_losses(p, images, labels)), params


def _layer_norm_case(rng):
    params = {"x": rng.standard_normal((3, 5)) * 2 + 1, "gamma": rng.standard_normal(5), "beta": rng.standard_normal(5)}
    return layer_norm, params


@pytest.mark.parametrize("case", [_mlp_case, _layer_norm_case], ids=["mlp_cross_entropy", "layer_norm"])
def test_forward_jacobian_equals_reverse_jacobian(case, rng):
    f, params = case(rng)
    forward, reverse = jacobian_forward(f, params), jacobian_reverse(f, params)
    assert forward.shape == reverse.shape == (np.size(f(params)), flatten(params)[0].size)
    np.testing.assert_allclose(forward, reverse, rtol=1e-12, atol=1e-12 * np.abs(reverse).max())
    np.testing.assert_allclose(forward, jacobian_central_differences(f, params), rtol=1e-6, atol=1e-6)
