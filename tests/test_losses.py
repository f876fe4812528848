"""Losses: cross-entropy, InfoNCE, and the fused replicated losses against literal replication.

Tolerances: derivative identities and fused-vs-naive comparisons in float64 to 1e-10 (relative
to the quantities' scale, ~1); finite differences (central, step 1e-6) to 1e-7.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dualnet as dn
from dualnet import losses

TIGHT = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def central_difference(f, primals, tangents, step=1e-6):
    """(f(p + h t) − f(p − h t)) / 2h for one direction ``tangents`` (a tuple like ``primals``)."""
    plus = f(*[p + step * t for p, t in zip(primals, tangents)])
    minus = f(*[p - step * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * step)


def jvp_k(f, primals, tangents):
    """dualnet.jvp with K directions; tangents with a leading K axis (None = symbolic zero)."""
    return dn.jvp(f, primals, tangents)


def replicas_live(x, p, g):
    """x̃^{(p,g)} = sg(x) + M_{p,g} ⊙ (x − sg(x)): only slice (p, g) of x carries derivatives."""
    frozen = dn.stop_gradient(x)
    mask = np.zeros((1,) + np.shape(x.value if isinstance(x, dn.Dual) else x)[1:3] + (1,))
    mask[0, p, g, 0] = 1.0
    return frozen + mask * (x - frozen)


def pooled_logits(x, W, b):
    n, _, g, c = np.shape(x.value if isinstance(x, dn.Dual) else x)
    pooled = x.mean(axis=1).reshape((n, g * c))
    return pooled @ W if b is None else pooled @ W + b


def naive_replicated_cross_entropy(x, W, b, labels):
    """Literal replication: P·G copies of the pooled CE, copy (p, g) live only on slice (p, g)."""
    n, patches, groups, _ = np.shape(x.value if isinstance(x, dn.Dual) else x)
    replicas = [losses.cross_entropy(pooled_logits(replicas_live(x, p, g), W, b), labels, reduction="none")
                for p in range(patches) for g in range(groups)]
    return dn.stack(replicas, axis=1).reshape((n, patches, groups))


def naive_replicated_cross_entropy_vectorised(x, W, b, labels):
    """The same replication in one go: replicated pooled features [N, P, G, G·c] (Ren's naive)."""
    n, patches, groups, c = np.shape(x.value if isinstance(x, dn.Dual) else x)
    frozen = dn.stop_gradient(x)
    own_slice = dn.einsum("npgc,gh->npghc", x - frozen, np.eye(groups)).reshape((n, patches, groups, groups * c))
    features = frozen.mean(axis=1).reshape((n, 1, 1, groups * c)) + own_slice * (1.0 / patches)
    logits = features @ W if b is None else features @ W + b
    return losses.cross_entropy(logits, np.broadcast_to(labels[:, None, None], (n, patches, groups)),
                                reduction="none")


def naive_replicated_info_nce(x1, x2, W, b, temperature):
    """Literal replication of the symmetric InfoNCE: copy (p, g) live on slice (p, g) of both views."""
    n, patches, groups, _ = np.shape(x1.value if isinstance(x1, dn.Dual) else x1)
    replicas = [losses.symmetric_info_nce(pooled_logits(replicas_live(x1, p, g), W, b),
                                          pooled_logits(replicas_live(x2, p, g), W, b),
                                          temperature, reduction="none")
                for p in range(patches) for g in range(groups)]
    return dn.stack(replicas, axis=1).reshape((n, patches, groups))


def problem(rng, n=3, patches=2, groups=3, c=2, classes=4, directions=3):
    x = rng.normal(size=(n, patches, groups, c))
    W = rng.normal(size=(groups * c, classes)) * 0.5
    b = rng.normal(size=classes)
    labels = rng.integers(0, classes, size=n)
    tangents = (rng.normal(size=(directions,) + x.shape), rng.normal(size=(directions,) + W.shape),
                rng.normal(size=(directions,) + b.shape))
    return x, W, b, labels, tangents


# ---------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------
def test_cross_entropy_is_minus_log_softmax_at_the_label(rng):
    logits = rng.normal(size=(5, 7)) * 3
    labels = rng.integers(0, 7, size=5)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(5), labels]
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, reduction="none"), expected, **TIGHT)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected.mean(), **TIGHT)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, reduction="sum"), expected.sum(), **TIGHT)
    np.testing.assert_allclose(losses.cross_entropy(logits, np.eye(7)[labels], reduction="none"), expected, **TIGHT)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-3e4, 3e4, 0.0]], dtype=np.float32)
    out = losses.cross_entropy(logits, np.array([0, 0]), reduction="none")
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [0.0, 6e4], rtol=1e-6)


def test_cross_entropy_jvp_matches_finite_differences(rng):
    logits = rng.normal(size=(4, 5))
    labels = rng.integers(0, 5, size=4)
    tangents = rng.normal(size=(3, 4, 5))
    f = lambda z: losses.cross_entropy(z, labels, reduction="none")
    _, out_tangent = jvp_k(f, (logits,), (tangents,))
    for k in range(3):
        np.testing.assert_allclose(out_tangent[k], central_difference(f, (logits,), (tangents[k],)), atol=1e-7)


def test_cross_entropy_vjp_satisfies_the_dot_product_identity(rng):
    logits = rng.normal(size=(4, 6))
    soft = rng.dirichlet(np.ones(6), size=4)  # soft targets exercise softmax·Σt − t
    u, w = rng.normal(size=logits.shape), rng.normal(size=4)
    f = lambda z: losses.cross_entropy(z, soft, reduction="none")
    _, ju = dn.jvp(f, (logits,), (u,))
    _, pullback = dn.vjp(f, logits)
    (jtw,) = pullback(w)
    np.testing.assert_allclose(np.dot(ju, w), np.sum(u * jtw), **TIGHT)


def test_cross_entropy_rejects_bad_labels():
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"cross_entropy: labels must lie in \[0, 4\)"):
        losses.cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"cross_entropy: integer labels must have shape \(3,\).*\(2,\)"):
        losses.cross_entropy(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"cross_entropy: one-hot / soft labels must have the logits' shape"):
        losses.cross_entropy(logits, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="cross_entropy: reduction must be one of"):
        losses.cross_entropy(logits, np.array([0, 1, 2]), reduction="avg")


# ---------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------
def _explicit_info_nce(q, k, temperature):
    q = q / np.sqrt((q * q).sum(1, keepdims=True) + losses.NORM_EPS)
    k = k / np.sqrt((k * k).sum(1, keepdims=True) + losses.NORM_EPS)
    logits = q @ k.T / temperature
    return np.log(np.exp(logits).sum(1)) - np.diag(logits)


def test_info_nce_value_matches_the_formula(rng):
    z1, z2 = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    np.testing.assert_allclose(losses.info_nce(z1, z2, 0.5, reduction="none"), _explicit_info_nce(z1, z2, 0.5),
                               **TIGHT)
    symmetric = 0.5 * (_explicit_info_nce(z1, z2, 0.3) + _explicit_info_nce(z2, z1, 0.3))
    np.testing.assert_allclose(losses.symmetric_info_nce(z1, z2, 0.3), symmetric.mean(), **TIGHT)


def test_info_nce_keys_are_under_stop_gradient(rng):
    z1, z2 = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    f = lambda q, k: losses.info_nce(q, k, reduction="none")
    _, tangent = dn.jvp(f, (z1, z2), (None, rng.normal(size=z2.shape)))
    assert np.all(tangent == 0)
    _, key_grad = dn.grad(lambda q, k: losses.info_nce(q, k), argnums=(0, 1))(z1, z2)
    assert np.all(key_grad == 0)
    _, live_key_grad = dn.grad(lambda q, k: losses.info_nce(q, k, stop_gradient_keys=False), argnums=(0, 1))(z1, z2)
    assert np.abs(live_key_grad).max() > 1e-3


def test_symmetric_info_nce_jvp_matches_finite_differences_with_keys_held(rng):
    z1, z2 = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    t1, t2 = rng.normal(size=z1.shape), rng.normal(size=z2.shape)
    _, tangent = dn.jvp(lambda a, b: losses.symmetric_info_nce(a, b, 0.5, "none"), (z1, z2), (t1, t2))
    # the query of each direction moves, its keys stay where they are
    expected = 0.5 * (central_difference(lambda a: _explicit_info_nce(a, z2, 0.5), (z1,), (t1,))
                      + central_difference(lambda b: _explicit_info_nce(b, z1, 0.5), (z2,), (t2,)))
    np.testing.assert_allclose(tangent, expected, atol=1e-7)


def test_info_nce_rejects_bad_shapes():
    expected = r"info_nce: queries and keys must both be \[N, D\], got \(3, 4\) and \(3, 5\)"
    with pytest.raises(ValueError, match=expected):
        losses.info_nce(np.zeros((3, 4)), np.zeros((3, 5)))


# ---------------------------------------------------------------------------------------
# fused replicated cross-entropy
# ---------------------------------------------------------------------------------------
def _fused_ce(labels):
    return lambda x, W, b: losses.replicated_cross_entropy(x, W, b, labels)


def _naive_ce(labels):
    return lambda x, W, b: naive_replicated_cross_entropy(x, W, b, labels)


@settings(max_examples=8)
@given(n=st.integers(1, 3), patches=st.integers(1, 3), groups=st.integers(1, 3), c=st.integers(1, 3),
       classes=st.integers(2, 4), directions=st.integers(1, 3))
def test_replicated_cross_entropy_equals_naive_replication(n, patches, groups, c, classes, directions):
    rng = np.random.default_rng(n * 1000 + patches * 100 + groups * 10 + c)
    x, W, b, labels, tangents = problem(rng, n, patches, groups, c, classes, directions)
    fused_out, fused_tangent = dn.jvp(_fused_ce(labels), (x, W, b), tangents)
    naive_out, naive_tangent = dn.jvp(_naive_ce(labels), (x, W, b), tangents)
    assert fused_out.shape == (n, patches, groups) and fused_tangent.shape == (directions, n, patches, groups)
    np.testing.assert_allclose(fused_out, naive_out, **TIGHT)
    np.testing.assert_allclose(fused_tangent, naive_tangent, **TIGHT)
    cotangent = rng.normal(size=(n, patches, groups))  # not uniform: each replica weighted differently
    _, fused_pullback = dn.vjp(_fused_ce(labels), x, W, b)
    _, naive_pullback = dn.vjp(_naive_ce(labels), x, W, b)
    for fused, naive in zip(fused_pullback(cotangent), naive_pullback(cotangent)):
        np.testing.assert_allclose(fused, naive, **TIGHT)


def test_vectorised_naive_replication_equals_the_loop(rng):
    """The benchmark's naive form (replicated [N, P, G, G·c] features) is the same function."""
    x, W, b, labels, tangents = problem(rng)
    loop = dn.jvp(_naive_ce(labels), (x, W, b), tangents)
    vectorised = dn.jvp(lambda x, W, b: naive_replicated_cross_entropy_vectorised(x, W, b, labels),
                        (x, W, b), tangents)
    for a, b_ in zip(loop, vectorised):
        np.testing.assert_allclose(a, b_, **TIGHT)


def test_replicated_cross_entropy_without_bias_and_with_symbolic_zeros(rng):
    x, W, _, labels, (x_tangent, W_tangent, _) = problem(rng)
    f_fused = lambda x, W: losses.replicated_cross_entropy(x, W, None, labels)
    f_naive = lambda x, W: naive_replicated_cross_entropy(x, W, None, labels)
    for tangents in [(x_tangent, None), (None, W_tangent), (x_tangent[0], W_tangent)]:  # last: K=1 meets K=3
        fused = dn.jvp(f_fused, (x, W), tangents)[1]
        naive = dn.jvp(f_naive, (x, W), tangents)[1]
        np.testing.assert_allclose(fused, naive, **TIGHT)
    out = losses.replicated_cross_entropy(dn.Dual(x), W, None, labels)
    assert out.tangent is None  # no tangent in, no tangent work


def test_replica_tangents_sum_to_the_pooled_tangent(rng):
    """Σ_{p,g} d[n,p,g] = ∂L_n·ẋ + P·G·(∂L_n/∂W·Ẇ + ∂L_n/∂b·ḃ).

    The x-part of the pooled tangent is split among the replicas; every replica sees the whole
    head tangent, so the head part appears P·G times.
    """
    x, W, b, labels, (x_tangent, W_tangent, b_tangent) = problem(rng, patches=3, groups=2)
    patches, groups = x.shape[1:3]
    pooled = lambda x, W, b: losses.cross_entropy(pooled_logits(x, W, b), labels, reduction="none")
    _, replica = dn.jvp(_fused_ce(labels), (x, W, b), (x_tangent, None, None))
    _, pooled_x = dn.jvp(pooled, (x, W, b), (x_tangent, None, None))
    np.testing.assert_allclose(replica.sum(axis=(2, 3)), pooled_x, **TIGHT)
    _, replica = dn.jvp(_fused_ce(labels), (x, W, b), (x_tangent, W_tangent, b_tangent))
    _, pooled_head = dn.jvp(pooled, (x, W, b), (None, W_tangent, b_tangent))
    np.testing.assert_allclose(replica.sum(axis=(2, 3)), pooled_x + patches * groups * pooled_head, **TIGHT)


def test_uniform_cotangent_gives_the_pooled_gradients(rng):
    """Cotangent 1/(P·G) on every replica: (W, b) get ∇ Σ_n L_n exactly, x gets 1/(P·G) of it.

    (Cotangent 1 instead gives x the pooled gradient and the head P·G times it.)
    """
    x, W, b, labels, _ = problem(rng, patches=3, groups=2)
    replicas = np.prod(x.shape[1:3])
    pooled_sum = lambda x, W, b: losses.cross_entropy(pooled_logits(x, W, b), labels, reduction="sum")
    expected = dn.grad(pooled_sum, argnums=(0, 1, 2))(x, W, b)
    _, pullback = dn.vjp(_fused_ce(labels), x, W, b)
    x_grad, W_grad, b_grad = pullback(np.full(x.shape[:3], 1.0 / replicas))
    np.testing.assert_allclose(W_grad, expected[1], **TIGHT)
    np.testing.assert_allclose(b_grad, expected[2], **TIGHT)
    np.testing.assert_allclose(x_grad * replicas, expected[0], **TIGHT)
    x_grad, W_grad, _ = pullback(np.ones(x.shape[:3]))
    np.testing.assert_allclose(x_grad, expected[0], **TIGHT)
    np.testing.assert_allclose(W_grad, replicas * expected[1], **TIGHT)


def test_replicated_cross_entropy_float32_and_reference_mode_agree(rng, monkeypatch):
    x, W, b, labels, tangents = problem(rng, n=4, patches=3, groups=2, c=5)
    x32, W32, b32 = (a.astype(np.float32) for a in (x, W, b))
    tangents32 = tuple(t.astype(np.float32) for t in tangents)
    out, tangent = dn.jvp(_fused_ce(labels), (x32, W32, b32), tangents32)
    assert out.dtype == np.float32 and tangent.dtype == np.float32
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    ref_out, ref_tangent = dn.jvp(_fused_ce(labels), (x, W, b), tangents)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-4, atol=1e-4)


def test_reverse_mode_skips_the_feature_cotangent_when_not_needed(rng, monkeypatch):
    """Heads trained on detached features (the local-greedy case) cost no [N, P, G, c] scatter."""
    x, W, b, labels, _ = problem(rng)
    scatters = []
    original = losses.replica_cotangent
    monkeypatch.setattr(losses, "replica_cotangent", lambda *a: scatters.append(1) or original(*a))
    head_only = dn.grad(lambda W, b: losses.replicated_cross_entropy(x, W, b, labels).sum(), argnums=(0, 1))(W, b)
    assert scatters == []
    everything = dn.grad(lambda x, W, b: losses.replicated_cross_entropy(x, W, b, labels).sum(),
                         argnums=(0, 1, 2))(x, W, b)
    assert scatters == [1]
    for a, b_ in zip(head_only, everything[1:]):
        np.testing.assert_allclose(a, b_, **TIGHT)


def test_replicated_cross_entropy_accepts_one_hot_labels(rng):
    x, W, b, labels, tangents = problem(rng)
    by_index = dn.jvp(_fused_ce(labels), (x, W, b), tangents)
    by_one_hot = dn.jvp(_fused_ce(np.eye(W.shape[1])[labels]), (x, W, b), tangents)
    for a, b_ in zip(by_index, by_one_hot):
        np.testing.assert_allclose(a, b_, **TIGHT)


def test_replicated_cross_entropy_errors_name_the_op_and_shapes():
    x, W, b = np.zeros((2, 3, 4, 5)), np.zeros((20, 6)), np.zeros(6)
    labels = np.array([0, 1])
    op = "replicated_cross_entropy"
    with pytest.raises(ValueError, match=rf"{op}: features must be \[N, P, G, c\], got shape \(2, 3, 20\)"):
        losses.replicated_cross_entropy(np.zeros((2, 3, 20)), W, b, labels)
    with pytest.raises(ValueError, match=rf"{op}: W must be \[G·c, D\] = \[20, D\].*got \(21, 6\)"):
        losses.replicated_cross_entropy(x, np.zeros((21, 6)), b, labels)
    with pytest.raises(ValueError, match=rf"{op}: b must be None or \[D\] = \[6\].*got \(5,\)"):
        losses.replicated_cross_entropy(x, W, np.zeros(5), labels)
    with pytest.raises(ValueError, match=rf"{op}: labels must lie in \[0, 6\)"):
        losses.replicated_cross_entropy(x, W, b, np.array([0, 6]))
    with pytest.raises(ValueError, match=rf"{op}: integer labels must have shape \(2,\)"):
        losses.replicated_cross_entropy(x, W, b, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match=rf"{op}: labels are not differentiable"):
        losses.replicated_cross_entropy(x, W, b, dn.Dual(np.array([0.0, 1.0])))


def test_replicated_losses_are_in_the_primitive_table():
    assert dn.primitives.TABLE["replicated_cross_entropy"].name == "replicated_cross_entropy"
    assert dn.primitives.TABLE["replicated_info_nce"].name == "replicated_info_nce"


# ---------------------------------------------------------------------------------------
# fused replicated InfoNCE
# ---------------------------------------------------------------------------------------
def nce_problem(rng, n=4, patches=2, groups=2, c=3, dim=5, directions=3):
    x1, x2 = rng.normal(size=(2, n, patches, groups, c))
    W, b = rng.normal(size=(groups * c, dim)), rng.normal(size=dim)
    tangents = tuple(rng.normal(size=(directions,) + a.shape) for a in (x1, x2, W, b))
    return (x1, x2, W, b), tangents


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("directions", [1, 3])
def test_replicated_info_nce_equals_naive_replication(rng, with_bias, directions):
    primals, tangents = nce_problem(rng, directions=directions)
    if not with_bias:
        primals, tangents = primals[:3], tangents[:3]
    temperature = 0.5
    fused = lambda *a: losses.replicated_info_nce(*a, temperature=temperature)
    naive = lambda x1, x2, W, b=None: naive_replicated_info_nce(x1, x2, W, b, temperature)
    fused_out, fused_tangent = dn.jvp(fused, primals, tangents)
    naive_out, naive_tangent = dn.jvp(naive, primals, tangents)
    np.testing.assert_allclose(fused_out, naive_out, **TIGHT)
    np.testing.assert_allclose(fused_tangent, naive_tangent, **TIGHT)
    cotangent = rng.normal(size=fused_out.shape)
    fused_grads = dn.vjp(fused, *primals)[1](cotangent)
    naive_grads = dn.vjp(naive, *primals)[1](cotangent)
    for a, b_ in zip(fused_grads, naive_grads):
        np.testing.assert_allclose(a, b_, **TIGHT)


def test_replicated_info_nce_tangents_sum_to_the_pooled_tangent(rng):
    """Σ_{p,g} d[n,p,g] = the pooled symmetric InfoNCE's tangent for tangents on x1, x2 only."""
    (x1, x2, W, b), (t1, t2, _, _) = nce_problem(rng, patches=3)
    _, replica = dn.jvp(lambda a, c: losses.replicated_info_nce(a, c, W, b, 0.7), (x1, x2), (t1, t2))
    _, pooled = dn.jvp(lambda a, c: losses.symmetric_info_nce(pooled_logits(a, W, b), pooled_logits(c, W, b),
                                                              0.7, reduction="none"), (x1, x2), (t1, t2))
    np.testing.assert_allclose(replica.sum(axis=(2, 3)), pooled, **TIGHT)


def test_replicated_info_nce_float32_matches_float64(rng):
    primals, tangents = nce_problem(rng)
    exact = dn.jvp(losses.replicated_info_nce, primals, tangents)
    single = dn.jvp(losses.replicated_info_nce, [a.astype(np.float32) for a in primals],
                    [t.astype(np.float32) for t in tangents])
    for a, b_ in zip(exact, single):
        assert b_.dtype == np.float32
        np.testing.assert_allclose(b_, a, rtol=1e-4, atol=1e-4)


def test_replicated_info_nce_errors_name_the_op_and_shapes():
    x = np.zeros((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"replicated_info_nce: both views must have the same shape"):
        losses.replicated_info_nce(x, np.zeros((2, 3, 4, 6)), np.zeros((20, 8)))
    with pytest.raises(ValueError, match=r"replicated_info_nce: W must be \[G·c, D\] = \[20, D\]"):
        losses.replicated_info_nce(x, x, np.zeros((8, 20)))
    with pytest.raises(ValueError, match=r"replicated_info_nce: temperature must be positive"):
        losses.replicated_info_nce(x, x, np.zeros((20, 8)), temperature=0.0)
