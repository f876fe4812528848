"""Losses: cross-entropy, InfoNCE, and the fused replicated losses of Ren et al. (2023).

Plain losses (``cross_entropy``, ``info_nce``, ``symmetric_info_nce``) are compositions of
primitives, so forward mode (Duals, K directions) and reverse mode come for free.

Replicated losses (Ren et al. 2023, "feature aggregators"): features ``x`` of shape
``[N, P, G, c]`` (example, patch, channel group, channels per group) feed a linear head on the
patch-mean pooled features ``x̄_n = mean_p x[n, p]`` flattened to ``C = G·c``.  The loss is
*replicated* once per (patch, group): replica (p, g) computes the same pooled loss ``L_n`` but
sees every slice of ``x`` except its own ``x[n, p, g]`` through a stop-gradient::

    x̃^{(p,g)} = stop_gradient(x) + M_{p,g} ⊙ (x − stop_gradient(x)),   L_n^{(p,g)} = loss(x̃^{(p,g)})_n

so its value is ``[N, P, G]`` (all replicas of example n equal ``L_n``) and the tangent of
replica (p, g) only carries the perturbation of slice (p, g).  The fused primitives
``replicated_cross_entropy`` and ``replicated_info_nce`` compute exactly that without
replicating anything.  With ``e_n = ∂L_n/∂h_n`` the loss's derivative w.r.t. the head output
``h_n = x̄_n W + b`` and ``W_g = W[g·c:(g+1)·c]``:

    d[n,p,g]   = (1/P)·⟨ẋ[n,p,g], W_g e_n⟩ + ⟨x̄_n Ẇ + ḃ, e_n⟩                (tangent)
    x̄[n,p,g,:] = c[n,p,g]·(1/P)·W_g e_n                                      (vjp, any cotangent c)
    W̄ = Σ_n (Σ_{p,g} c[n,p,g]) x̄_nᵀ e_n,   b̄ = Σ_n (Σ_{p,g} c[n,p,g]) e_n

at cost O(N·G·c·K + N·P·G·c) instead of the O(N·P·G·G·c·K) of literal replication; no
``[N, P, G, G·c]`` or ``[N, P, G, K]`` intermediate is ever formed.  The two hot loops (the
contraction of ẋ with ``u[n,g] = W_g e_n`` and the vjp scatter) go to Numba
(``dualnet.kernels.cpu.replicated_loss``) or CUDA (``dualnet.kernels.cuda.replicated_loss``)
when available and ``backend.kernels_mode() == 'auto'``; ``replica_tangent_reference`` and
``replica_cotangent_reference`` are the NumPy/CuPy references they are tested against.
"""
import collections

import numpy

from . import backend
from .dual import Dual, value_of
from .primitives import TABLE, Primitive, array_mean, log_softmax, matmul, sqrt, stop_gradient, transpose
from .primitives import sum as sum_

REDUCTIONS = ("mean", "sum", "none")
NORM_EPS = 1e-12
"""ε in the L2 normalisation q = z / sqrt(‖z‖² + ε) used by every InfoNCE here."""


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def _reduce(op, losses, reduction):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _targets(op, labels, logits_shape, dtype, module):
    """Labels as target distributions of ``logits_shape`` ([..., classes]).

    Integer labels of shape ``logits_shape[:-1]`` with values in [0, classes) become one-hot
    rows; floating labels of ``logits_shape`` are used as they are (one-hot or soft targets).
    """
    if isinstance(labels, Dual):
        raise TypeError(f"{op}: labels are not differentiable; pass an array, not a Dual")
    labels = module.asarray(labels)
    classes = logits_shape[-1]
    if labels.dtype.kind in "iu":
        if labels.shape != tuple(logits_shape[:-1]):
            raise ValueError(f"{op}: integer labels must have shape {tuple(logits_shape[:-1])} "
                             f"for logits of shape {tuple(logits_shape)}, got {labels.shape}")
        if labels.size:
            low, high = module.stack([labels.min(), labels.max()]).tolist()  # one host sync on a GPU
            if low < 0 or high >= classes:
                raise ValueError(f"{op}: labels must lie in [0, {classes}) for {classes} classes, got values in "
                                 f"[{low}, {high}]")
        return (labels[..., None] == module.arange(classes)).astype(dtype)
    if labels.dtype.kind == "f":
        if labels.shape != tuple(logits_shape):
            raise ValueError(f"{op}: one-hot / soft labels must have the logits' shape {tuple(logits_shape)}, "
                             f"got {labels.shape}")
        return labels.astype(dtype, copy=False)
    raise TypeError(f"{op}: labels must be integer class indices or floating targets, got dtype {labels.dtype}")


# ---------------------------------------------------------------------------------------
# plain losses (compositions of primitives)
# ---------------------------------------------------------------------------------------
def cross_entropy(logits, labels, reduction="mean"):
    """Softmax cross-entropy over the last axis: ``ℓ = −Σ_j t_j log softmax(logits)_j``.

    ``logits``: Dual or array [..., classes].  ``labels``: integer [...] (class indices, one-hot
    targets t) or floating [..., classes] (one-hot or soft targets).  ``reduction``: 'mean'
    (over all leading positions), 'sum' or 'none' (shape [...]).  Stable for large logits
    (log-sum-exp with the max subtracted).  Built from ``log_softmax``, so its tangent is
    ⟨softmax·Σt − t, ḣ⟩ and its cotangent (softmax·Σt − t)·ḡ, in both modes, K-aware.
    """
    values = value_of(logits)
    if numpy.ndim(values) < 1:
        raise ValueError(f"cross_entropy: logits need a class axis, got shape {numpy.shape(values)}")
    module = backend.namespace(values)
    targets = _targets("cross_entropy", labels, values.shape, values.dtype, module)
    losses = -sum_(targets * log_softmax(logits, axis=-1), axis=-1)
    return _reduce("cross_entropy", losses, reduction)


def l2_normalize(z, eps=NORM_EPS):
    """``z / sqrt(‖z‖² + eps)`` along the last axis (Dual or array)."""
    return z / sqrt(sum_(z * z, axis=-1, keepdims=True) + eps)


def info_nce(queries, keys, temperature=0.5, reduction="mean", stop_gradient_keys=True):
    """InfoNCE with in-batch negatives: ``ℓ_n = −log softmax_m(q̂_n·k̂_m / τ)[m = n]``.

    ``queries``, ``keys``: [N, D] embeddings (Dual or array), L2-normalised here (q̂, k̂);
    the positive of query n is key n (the diagonal of the N×N logits), the other N−1 keys are
    its negatives.  With ``stop_gradient_keys`` (default, Ren et al.'s setting) the keys carry
    no tangent and receive no cotangent.  ``reduction`` as in ``cross_entropy``.
    """
    q_shape, k_shape = numpy.shape(value_of(queries)), numpy.shape(value_of(keys))
    if len(q_shape) != 2 or q_shape != k_shape:
        raise ValueError(f"info_nce: queries and keys must both be [N, D], got {q_shape} and {k_shape}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be positive, got {temperature}")
    query = l2_normalize(queries)
    key = l2_normalize(stop_gradient(keys) if stop_gradient_keys else keys)
    logits = matmul(query, transpose(key)) * (1.0 / temperature)
    positives = numpy.arange(q_shape[0])
    return cross_entropy(logits, backend.namespace(value_of(queries)).asarray(positives), reduction)


def symmetric_info_nce(view1, view2, temperature=0.5, reduction="mean"):
    """Ren et al.'s contrastive loss: ``L_n = ½[ℓ(z1_n | sg z2) + ℓ(z2_n | sg z1)]``.

    ``view1``, ``view2``: [N, D] embeddings of two views of the same N examples.  Each direction
    is an ``info_nce`` whose keys (the other view) are under stop-gradient, so only the query
    side carries tangents (the learning rule gives both views the same perturbation).  This is
    the N-way form (negatives are the other view's embeddings only), not SimCLR's 2N−2-negative
    NT-Xent.  ``reduction='none'`` returns the per-example ``L_n`` [N].
    """
    forward = info_nce(view1, view2, temperature, reduction="none")
    backward = info_nce(view2, view1, temperature, reduction="none")
    return _reduce("symmetric_info_nce", (forward + backward) * 0.5, reduction)


# ---------------------------------------------------------------------------------------
# references of the two fused loops (and dispatch to the kernels)
# ---------------------------------------------------------------------------------------
def replica_tangent_reference(x_tangent, u, scale, head=None, out=None):
    """``d[k,n,p,g] = scale·Σ_c ẋ[k,n,p,g,c]·u[n,g,c] + head[k,n]`` (added into ``out`` if given).

    ``x_tangent`` [K, N, P, G, c], ``u`` [N, G, c], ``head`` None or [K, N] → [K, N, P, G].
    """
    module = backend.namespace(x_tangent, u)
    d = module.einsum("knpgc,ngc->knpg", x_tangent, u)
    d *= scale
    if head is not None:
        d += head[:, :, None, None]
    if out is None:
        return d
    out += d
    return out


def replica_cotangent_reference(cotangent, u, scale):
    """``x̄[n,p,g,:] = scale·cotangent[n,p,g]·u[n,g,:]``: [N, P, G] × [N, G, c] → [N, P, G, c]."""
    return (scale * cotangent)[..., None] * u[:, None]


def replica_tangent(x_tangent, u, scale, head=None, out=None):
    """Dispatching form of ``replica_tangent_reference`` (same arguments and result).

    A direction axis of length 1 on ``x_tangent`` or ``head`` broadcasts against K.
    """
    directions = max(x_tangent.shape[0], 1 if head is None else head.shape[0],
                     1 if out is None else out.shape[0])
    module = backend.namespace(x_tangent)
    if x_tangent.shape[0] != directions:
        x_tangent = module.broadcast_to(x_tangent, (directions,) + x_tangent.shape[1:])
    u = u.astype(x_tangent.dtype, copy=False)
    if head is not None:
        head = head.astype(x_tangent.dtype, copy=False)
    run = backend.kernel("replicated_loss", "replica_tangent", replica_tangent_reference, x_tangent, u)
    return run(x_tangent, u, scale, head, out)


def replica_cotangent(cotangent, u, scale):
    """Dispatching form of ``replica_cotangent_reference`` (same arguments and result)."""
    cotangent = cotangent.astype(u.dtype, copy=False)
    return backend.kernel("replicated_loss", "replica_cotangent", replica_cotangent_reference, cotangent, u)(
        cotangent, u, scale)


# ---------------------------------------------------------------------------------------
# the shared machinery of replicated losses on a pooled linear head
# ---------------------------------------------------------------------------------------
_View = collections.namedtuple("_View", "pooled error")
"""One input view of a replicated loss: pooled features x̄ [N, C] and e = ∂L/∂h [N, D]."""


class _FusedLoss(Primitive):
    """A Primitive whose joint vjp rule is told which arguments need a cotangent."""

    def vjp(self, cotangent, out, args, params, needed, residuals=None):
        if self.vjp_rule is None:
            raise NotImplementedError(f"{self.name}: no vjp rule (reverse mode) is defined")
        return self.vjp_rule(cotangent, out, *args, needed=tuple(needed), **params)


def _check_head(op, features, W, b):
    """Validate ``features`` [N, P, G, c] (one or more views), W [G·c, D], b None or [D]."""
    shape = features[0].shape
    if len(shape) != 4:
        raise ValueError(f"{op}: features must be [N, P, G, c], got shape {shape}")
    for other in features[1:]:
        if other.shape != shape:
            raise ValueError(f"{op}: both views must have the same shape, got {shape} and {other.shape}")
    n, p, g, c = shape
    if min(n, p, g, c) == 0:
        raise ValueError(f"{op}: features of shape {shape} are empty")
    if numpy.ndim(W) != 2 or W.shape[0] != g * c:
        raise ValueError(f"{op}: W must be [G·c, D] = [{g * c}, D] for features of shape {shape}, "
                         f"got {numpy.shape(W)}")
    if b is not None and numpy.shape(b) != (W.shape[1],):
        raise ValueError(f"{op}: b must be None or [D] = [{W.shape[1]}] for W of shape {W.shape}, "
                         f"got {numpy.shape(b)}")


def _pooled_head(x, W, b):
    """``x̄ = mean_p x`` flattened to [N, G·c] and the head output ``h = x̄ W + b`` [N, D]."""
    n, _, g, c = x.shape
    pooled = array_mean(x, axis=1).reshape(n, g * c)
    h = pooled @ W
    return pooled, (h if b is None else h + b)


def _replicated(value, shape):
    """A per-example value [N] repeated over replicas: [N, P, G] (a new contiguous array)."""
    module = backend.namespace(value)
    return module.ascontiguousarray(module.broadcast_to(value[:, None, None], shape))


def _head_tangent(views, W_tangent, b_tangent):
    """Σ_views ⟨x̄_n Ẇ_k + ḃ_k, e_n⟩ → [K, N], or None when the head has no tangent."""
    total = None
    for view in views:
        if W_tangent is not None:
            term = ((view.pooled @ W_tangent) * view.error).sum(axis=-1)
            total = term if total is None else total + term
        if b_tangent is not None:
            term = backend.namespace(b_tangent).einsum("kd,nd->kn", b_tangent, view.error)
            total = term if total is None else total + term
    return total


def _slice_directions(W, error, groups):
    """``u[n, g] = W_g e_n``: [N, G, c], the direction a replica's own slice is scored along."""
    n = error.shape[0]
    W_transposed = backend.namespace(W).ascontiguousarray(W.T)  # OpenBLAS is erratic on a transposed operand
    return (error @ W_transposed).reshape(n, groups, W.shape[0] // groups)


def _replicated_jvp(views, x_tangents, W, W_tangent, b_tangent, shape):
    """Tangent [K, N, P, G] of a replicated loss (see the module docstring for the formula)."""
    _, patches, groups = shape
    head = _head_tangent(views, W_tangent, b_tangent)
    given = [t for t in (*x_tangents, head) if t is not None]
    directions = max(t.shape[0] for t in given) if given else 1
    out = None
    for view, x_tangent in zip(views, x_tangents):
        if x_tangent is not None:
            module = backend.namespace(x_tangent)
            x_tangent = module.broadcast_to(x_tangent, (directions,) + x_tangent.shape[1:])
            u = _slice_directions(W, view.error, groups)
            out = replica_tangent(x_tangent, u, 1.0 / patches, head=head if out is None else None, out=out)
    if out is None and head is not None:
        module = backend.namespace(head)
        out = module.ascontiguousarray(module.broadcast_to(head[:, :, None, None], head.shape + (patches, groups)))
    return out


def _replicated_vjp(views, cotangent, W, needed_x, need_W, need_b):
    """Cotangents (x per view, W, b) of a replicated loss for any cotangent [N, P, G]."""
    _, patches, groups = cotangent.shape
    x_grads = [replica_cotangent(cotangent, _slice_directions(W, view.error, groups), 1.0 / patches)
               if need else None for view, need in zip(views, needed_x)]
    weight = cotangent.sum(axis=(1, 2))[:, None]
    W_grad = sum(view.pooled.T @ (weight * view.error) for view in views) if need_W else None
    b_grad = sum((weight * view.error).sum(axis=0) for view in views) if need_b else None
    return x_grads, W_grad, b_grad


# ---------------------------------------------------------------------------------------
# fused replicated cross-entropy
# ---------------------------------------------------------------------------------------
def _ce_forward(x, W, b, labels):
    """Per-example pooled CE [N] and its view (x̄, δ = softmax(h)·Σt − t)."""
    op = "replicated_cross_entropy"
    _check_head(op, (x,), W, b)
    pooled, h = _pooled_head(x, W, b)
    module = backend.namespace(h)
    targets = _targets(op, labels, h.shape, h.dtype, module)
    shifted = h - h.max(axis=-1, keepdims=True)
    log_probs = shifted - module.log(module.exp(shifted).sum(axis=-1, keepdims=True))
    loss = -(targets * log_probs).sum(axis=-1)
    error = module.exp(log_probs) * targets.sum(axis=-1, keepdims=True) - targets
    return loss, _View(pooled, error)


def _ce_value(x, W, b, labels):
    loss, _ = _ce_forward(x, W, b, labels)
    return _replicated(loss, x.shape[:3])


def _ce_value_and_jvp(tangents, x, W, b, labels):
    """Value and tangent from one forward pass (the engine's joint hook)."""
    x_tangent, W_tangent, b_tangent = tangents[:3]
    loss, view = _ce_forward(x, W, b, labels)
    tangent = _replicated_jvp((view,), (x_tangent,), W, W_tangent, b_tangent, x.shape[:3])
    return _replicated(loss, x.shape[:3]), tangent


def _ce_jvp(tangents, out, x, W, b, labels):
    return _ce_value_and_jvp(tangents, x, W, b, labels)[1]


def _ce_vjp(cotangent, out, x, W, b, labels, needed):
    _, view = _ce_forward(x, W, b, labels)
    cotangent = cotangent.astype(out.dtype, copy=False)
    (x_grad,), W_grad, b_grad = _replicated_vjp((view,), cotangent, W, needed[:1], needed[1], needed[2])
    return [x_grad, W_grad, b_grad, None]


_replicated_cross_entropy = _FusedLoss("replicated_cross_entropy", _ce_value, jvp=_ce_jvp, vjp=_ce_vjp,
                                       value_and_jvp=_ce_value_and_jvp)
TABLE[_replicated_cross_entropy.name] = _replicated_cross_entropy


def replicated_cross_entropy(x, W, b, labels):
    """Fused replicated cross-entropy (Ren et al. 2023), one loss per (example, patch, group).

    Shapes: ``x`` [N, P, G, c] (Dual or array), ``W`` [C = G·c, classes], ``b`` [classes] or
    None, ``labels`` integer [N] (or floating targets [N, classes]).  Head:
    ``h_n = x̄_n W + b`` with ``x̄_n = mean_p x[n, p]`` flattened to [C]; ``L_n = CE(h_n, y_n)``;
    ``δ_n = softmax(h_n) − onehot(y_n)`` (generally ``softmax·Σt − t``); ``W_g = W[g·c:(g+1)·c]``.

    * value [N, P, G]: ``L_n`` for every replica (p, g);
    * tangent [K, N, P, G]: ``(1/P)·⟨ẋ[n,p,g], W_g δ_n⟩ + ⟨x̄_n Ẇ + ḃ, δ_n⟩`` — replica (p, g)
      sees only its own slice's tangent; the head's tangent reaches every replica;
    * vjp for any cotangent c [N, P, G]: ``x̄[n,p,g] = c[n,p,g]·(1/P)·W_g δ_n``,
      ``W̄ = Σ_n (Σ_{p,g} c[n,p,g]) x̄_nᵀ δ_n``, ``b̄ = Σ_n (Σ_{p,g} c[n,p,g]) δ_n``.

    Equal to literally replicating the features with stop-gradient masks (module docstring);
    cost O(N·G·c·K + N·P·G·c).  Summing the tangent over (p, g) gives the pooled loss's tangent
    in x plus P·G times its tangent in (W, b); a uniform cotangent 1/(P·G) gives (W, b) the
    gradient of Σ_n L_n and x 1/(P·G) of it.  Registered as ``TABLE['replicated_cross_entropy']``.
    """
    if isinstance(labels, Dual):
        raise TypeError("replicated_cross_entropy: labels are not differentiable; pass an array, not a Dual")
    return _replicated_cross_entropy(x, W, b, labels)


# ---------------------------------------------------------------------------------------
# fused replicated InfoNCE
# ---------------------------------------------------------------------------------------
def _normalized(z):
    """``q = z / s`` with ``s = sqrt(‖z‖² + ε)`` per row; returns (q, s [N, 1])."""
    module = backend.namespace(z)
    norm = module.sqrt((z * z).sum(axis=-1, keepdims=True) + NORM_EPS)
    return z / norm, norm


def _query_error(query, norm, keys, temperature):
    """∂ℓ_n/∂z_n for ``ℓ_n = −log softmax_m(q_n·k_m/τ)[n]`` with q = z/s and keys fixed.

    With A = softmax_m(q_n·k_m/τ): r_n = ∂ℓ_n/∂q_n = (Σ_m A_nm k_m − k_n)/τ, and the
    normalisation's Jacobian ∂q/∂z = (I − q qᵀ)/s gives e_n = (r_n − (q_n·r_n) q_n)/s_n.
    Returns (ℓ [N], e [N, D]).
    """
    module = backend.namespace(query)
    logits = (query @ keys.T) / temperature
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - module.log(module.exp(shifted).sum(axis=-1, keepdims=True))
    loss = -module.diagonal(log_probs)
    r = (module.exp(log_probs) @ keys - keys) / temperature
    return loss, (r - (query * r).sum(axis=-1, keepdims=True) * query) / norm


def _nce_forward(x1, x2, W, b, temperature):
    """Per-example symmetric loss [N] and the two views with e halved (the ½ of the average)."""
    op = "replicated_info_nce"
    _check_head(op, (x1, x2), W, b)
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be positive, got {temperature}")
    pooled1, z1 = _pooled_head(x1, W, b)
    pooled2, z2 = _pooled_head(x2, W, b)
    q1, s1 = _normalized(z1)
    q2, s2 = _normalized(z2)
    loss1, error1 = _query_error(q1, s1, q2, temperature)
    loss2, error2 = _query_error(q2, s2, q1, temperature)
    return 0.5 * (loss1 + loss2), (_View(pooled1, 0.5 * error1), _View(pooled2, 0.5 * error2))


def _nce_value(x1, x2, W, b, temperature):
    loss, _ = _nce_forward(x1, x2, W, b, temperature)
    return _replicated(loss, x1.shape[:3])


def _nce_value_and_jvp(tangents, x1, x2, W, b, temperature):
    """Value and tangent from one forward pass (the engine's joint hook)."""
    x1_tangent, x2_tangent, W_tangent, b_tangent = tangents
    loss, views = _nce_forward(x1, x2, W, b, temperature)
    tangent = _replicated_jvp(views, (x1_tangent, x2_tangent), W, W_tangent, b_tangent, x1.shape[:3])
    return _replicated(loss, x1.shape[:3]), tangent


def _nce_jvp(tangents, out, x1, x2, W, b, temperature):
    return _nce_value_and_jvp(tangents, x1, x2, W, b, temperature)[1]


def _nce_vjp(cotangent, out, x1, x2, W, b, temperature, needed):
    _, views = _nce_forward(x1, x2, W, b, temperature)
    cotangent = cotangent.astype(out.dtype, copy=False)
    x_grads, W_grad, b_grad = _replicated_vjp(views, cotangent, W, needed[:2], needed[2], needed[3])
    return x_grads + [W_grad, b_grad]


_replicated_info_nce = _FusedLoss("replicated_info_nce", _nce_value, jvp=_nce_jvp, vjp=_nce_vjp,
                                  value_and_jvp=_nce_value_and_jvp)
TABLE[_replicated_info_nce.name] = _replicated_info_nce


def replicated_info_nce(x1, x2, W, b=None, temperature=0.5):
    """Fused replicated symmetric InfoNCE (Ren et al.'s contrastive loss), one per (n, p, g).

    Shapes: ``x1``, ``x2`` [N, P, G, c] (two views; Duals or arrays), ``W`` [C = G·c, D]
    (linear projector, D = 128 in the paper), ``b`` [D] or None.  Embeddings
    ``z_v = x̄_v W + b``, ``q_v = z_v / s_v`` with ``s_v = sqrt(‖z_v‖² + ε)``.  Per example:

        ℓ¹_n = −log softmax_m(q1_n·sg(q2_m)/τ)[n],  ℓ²_n = the same with the views swapped,
        L_n = ½(ℓ¹_n + ℓ²_n)

    (keys under stop-gradient, including the projector inside them).  Query-side derivative:
    ``r¹_n = (Σ_m A_nm q2_m − q2_n)/τ`` (A the softmax above) and through the normalisation
    ``e¹_n = ∂ℓ¹_n/∂z1_n = (r¹_n − (q1_n·r¹_n) q1_n)/s1_n``; e² likewise.  Replica (p, g) of each
    view sees only its own slice live:

    * value [N, P, G]: ``L_n`` for every replica;
    * tangent: ``½Σ_v [(1/P)⟨ẋ_v[n,p,g], W_g e^v_n⟩ + ⟨x̄_v,n Ẇ + ḃ, e^v_n⟩]``;
    * vjp for any cotangent c: ``x̄_v[n,p,g] = c[n,p,g]·(1/(2P))·W_g e^v_n``,
      ``W̄ = ½Σ_v Σ_n (Σ_{p,g} c) x̄_v,nᵀ e^v_n``, ``b̄ = ½Σ_v Σ_n (Σ_{p,g} c) e^v_n``.

    The learning rule gives both views the same perturbation; this primitive takes their
    tangents separately.  Registered as ``TABLE['replicated_info_nce']``.
    """
    return _replicated_info_nce(x1, x2, W, b, temperature=temperature)
