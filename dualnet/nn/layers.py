"""Functional layers on Duals or arrays.  Parameters are plain arrays passed in by name.

Every function here is composed from primitives (so forward mode, K directions and reverse
mode come for free) except the fused ops it calls (``grouped_linear``, ``layer_norm``,
``grouped_linear_layer_norm``).
"""
import functools
from collections.abc import Callable
from typing import NamedTuple

from .. import autodiff, backend, fused
from .. import primitives as P
from ..dual import Dual, value_of
from ..gradients import outer
from ..primitives import Primitive


def linear(x, weight, bias=None):
    """``x @ W + b``: x [..., p], W [p, q], b [q] -> [..., q]."""
    z = P.matmul(x, weight)
    return z if bias is None else z + bias


def grouped(x, weight, bias=None):
    """Grouped linear: x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] -> [..., G, c_out]."""
    return fused.grouped_linear(x, weight, bias)


def token_mixing(x, weight, bias=None):
    """Linear over the token axis: x [N, P, C], W [P_out, P_in], b [P_out] -> [N, P_out, C]."""
    z = P.matmul(weight, x)
    return z if bias is None else z + P.reshape(bias, (-1, 1))


# Parameter pullbacks of the layers linear in their parameters: (x, delta) -> [W̄, b̄], the
# ``xᵀδ`` of FG-A/DFA without re-running the layer's forward pass (arrays only).  ``linear``'s W̄
# may come as its factors (``gradients.outer``: formed when first read, or added into W by the update).
linear.param_pullback = lambda x, delta: [
    outer(x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])),
    delta.reshape(-1, delta.shape[-1]).sum(axis=0)]
grouped.param_pullback = lambda x, delta: [  # W̄[g] = Σ_rows x_gᵀ δ_g as one batched GEMM over G
    x.reshape((-1,) + x.shape[-2:]).transpose(1, 2, 0) @ delta.reshape((-1,) + delta.shape[-2:]).transpose(1, 0, 2),
    delta.reshape((-1,) + delta.shape[-2:]).sum(axis=0)]
token_mixing.param_pullback = lambda x, delta: [
    (delta @ x.transpose(0, 2, 1)).sum(axis=0), delta.sum(axis=(0, 2))]


# Per-example pieces of the same layers (arrays; examples on axis 0 of x [N, ...]), for weights
# whose tangent or cotangent differs from example to example (Fournier's per-example weight guesses):
#   ``example_tangent(x, Ẇ, ḃ=None) -> ż`` [N, ...]: ż_n = fn(x_n, Ẇ_n, ḃ_n) − fn(x_n, 0, 0), the
#       output tangent when example n's copy of the weights moves along its own Ẇ_n [N, *W.shape]
#       (and ḃ_n [N, *b.shape]);
#   ``example_pullback(x, δ) -> [W̄, b̄]`` [N, *W.shape], [N, *b.shape]: example n's share of
#       ``param_pullback(x, δ)`` (the shares sum to it), e.g. W̄_n = x_nᵀ δ_n for ``linear``.
def _example_bias(z, bias, axis):
    """z [N, ...] plus per-example biases [N, *b] laid on z's axes ``axis:axis + b.ndim - 1``."""
    if bias is None:
        return z
    trailing = z.ndim - axis - (bias.ndim - 1)
    return z + bias.reshape(bias.shape[:1] + (1,) * (axis - 1) + bias.shape[1:] + (1,) * trailing)


def _rows(a):
    """[N, ..., c] -> [N, M, c] (the middle axes flattened)."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


linear.example_tangent = lambda x, weight, bias=None: _example_bias(
    (_rows(x) @ weight).reshape(x.shape[:-1] + weight.shape[-1:]), bias, x.ndim - 1)
linear.example_pullback = lambda x, delta: [_rows(x).transpose(0, 2, 1) @ _rows(delta), _rows(delta).sum(axis=1)]


def _by_group(a):
    """[N, ..., G, c] -> [N, G, M, c]."""
    return a.reshape((a.shape[0], -1) + a.shape[-2:]).transpose(0, 2, 1, 3)


grouped.example_tangent = lambda x, weight, bias=None: _example_bias(
    (_by_group(x) @ weight).transpose(0, 2, 1, 3).reshape(x.shape[:-1] + weight.shape[-1:]), bias, x.ndim - 2)
grouped.example_pullback = lambda x, delta: [_by_group(x).transpose(0, 1, 3, 2) @ _by_group(delta),
                                             _by_group(delta).sum(axis=2)]
token_mixing.example_tangent = lambda x, weight, bias=None: _example_bias(weight @ x, bias, 1)
token_mixing.example_pullback = lambda x, delta: [delta @ x.transpose(0, 2, 1), delta.sum(axis=2)]


def _normalised(normalize, z):
    """x̂ = normalize(z, 1, 0) (values) for an affine norm y = x̂·γ + β with channels on axis 1."""
    xp = backend.namespace(z)
    ones, zeros = xp.ones(z.shape[1], z.dtype), xp.zeros(z.shape[1], z.dtype)
    return value_of(normalize(z, ones, zeros))


def norm_example_tangent(normalize, z, gamma, beta):
    """ẏ [N, C, ...] of an affine norm y = normalize(z, γ, β) = x̂·γ + β (channels on axis 1) when
    example n's scale and shift move along their own γ̇_n, β̇_n (``gamma``, ``beta`` [N, C]):
    ẏ_n = γ̇_n x̂_n + β̇_n, x̂ = normalize(z, 1, 0) at the value z [N, C, ...]."""
    shape = gamma.shape + (1,) * (z.ndim - 2)
    return _normalised(normalize, z) * gamma.reshape(shape) + beta.reshape(shape)


def norm_example_pullback(normalize, z, delta):
    """[γ̄, β̄], each [N, C]: example n's share of the scale's and shift's cotangents for a cotangent
    ``delta`` [N, C, ...] at the norm's output: γ̄_n = Σ_spatial δ_n x̂_n, β̄_n = Σ_spatial δ_n."""
    axes = tuple(range(2, z.ndim))
    return [(delta * _normalised(normalize, z)).sum(axis=axes), delta.sum(axis=axes)]


def layer_norm(x, eps=1e-5):
    """LayerNorm over the last axis without affine parameters (Ren's local LN)."""
    return fused.layer_norm(x, eps=eps)


# Layers with a fused form of "the layer, then its local LN": (x, W, b) -> (LN(fn(x, W, b)), σ).
grouped.layer_norm = lambda x, weight, bias=None: fused.grouped_linear_layer_norm(x, weight, bias, return_sigma=True)
grouped.layer_norm_relu = fused.grouped_linear_layer_norm_relu
grouped.output_shape = fused.grouped_output_shape


def normalized(fn, x, weights, feedback=None):
    """``(h, sigma)``: h = LN(fn(x, *weights)) (local LN over the last axis) and its σ [..., 1].

    One fused op when ``fn`` has a fused form (``fn.layer_norm``: a grouped layer runs its GEMMs
    and then bias, layout and LN in one epilogue pass) and no ``feedback`` matrix replaces its
    reverse pass; otherwise ``linear_map(fn, ...)`` then ``layer_norm``.  σ is the LN's residual:
    with h it gives the exact pull-back to z = fn(x, ·), ``fused.layer_norm_pullback(h, σ, δ)``.
    """
    fused_form = getattr(fn, "layer_norm", None)
    if fused_form is not None and feedback is None:
        return fused_form(x, *weights)
    return fused.layer_norm(linear_map(fn, x, weights, feedback), return_sigma=True)


def normalized_relu(fn, x, weights, feedback=None, residual=None, perturb=None):
    """``((a, h, sigma), u)``: a = relu(h + residual) with h = LN(fn(x, *weights)) and σ [..., 1]
    as in ``normalized``, and u = ``perturb(shape, dtype)`` (None or a [K, ...] tangent) added to
    h's tangent between the norm and the activation (FG-A's 'pre' site).

    The norm, u, the residual add and the ReLU run as one fused op, for the value and all
    tangents (``fused.layer_norm_relu``); a grouped layer without ``feedback`` folds its GEMMs in
    too (``fn.layer_norm_relu``).  h and σ are plain arrays: the exact pull-back to z is
    ``fused.layer_norm_pullback(h, σ, δ)``.
    """
    fused_form = getattr(fn, "layer_norm_relu", None)
    if fused_form is not None and feedback is None:
        dtype = P.result_dtype(x, weights[0])
        u = None if perturb is None else perturb(fn.output_shape(x, weights[0]), dtype)
        return fused_form(x, *weights, residual=residual, injected=u), u
    z = linear_map(fn, x, weights, feedback)
    u = None if perturb is None else perturb(value_of(z).shape, value_of(z).dtype)
    return fused.layer_norm_relu(z, residual, injected=u), u


class RankStatistics(NamedTuple):
    """How a data-parallel shard's BatchNorm finds the whole batch's statistics: ``rank_sum`` (a
    primitive summing an array over the ranks, differentiable both ways) and the shard's place in
    the batch, ``examples`` of its ``total`` examples (0: a rank that computes on a stand-in row
    and contributes nothing).  Made by ``distributed.estimate_on_shard``; reaches a BatchNorm
    through ``Model.sharded`` and the pass's ``Context``."""
    rank_sum: Callable
    examples: int
    total: int


def _batch_moments(x, axes, over_ranks=None):
    """(mean, x − mean, biased variance, count) over ``axes``: of this batch or, given
    ``over_ranks`` (a ``RankStatistics``), of the whole batch across the ranks."""
    count = value_of(x).size // value_of(x).shape[1]
    if over_ranks is None:
        mean = P.mean(x, axis=axes, keepdims=True)
        centred = x - mean
        return mean, centred, P.mean(centred * centred, axis=axes, keepdims=True), count
    rank_sum, examples, total = over_ranks
    count = count // max(examples, 1) * total  # per example (× views for contrastive), × the batch
    mean = rank_sum(P.sum(x, axis=axes, keepdims=True)) / count
    centred = x - mean
    return mean, centred, rank_sum(P.sum(centred * centred, axis=axes, keepdims=True)) / count, count


def batch_norm(x, gamma, beta, running, train, momentum=0.1, eps=1e-5, over_ranks=None):
    """BatchNorm over every axis but the channel axis 1: x [N, C, ...] (or [N, C]).

    Training: batch statistics (biased variance to normalise; tangents and cotangents flow
    through the statistics) and returns the updated running averages (unbiased variance, as
    PyTorch).  Evaluation: the running averages.  Returns ``(y, new_running)``.  ``over_ranks`` (a
    ``RankStatistics``, during a data-parallel estimate): the statistics are the whole batch's.
    """
    axes = (0,) + tuple(range(2, value_of(x).ndim))
    shape = (1, -1) + (1,) * (value_of(x).ndim - 2)
    if train:
        mean, centred, var, count = _batch_moments(x, axes, over_ranks)
        batch_mean = value_of(mean).reshape(-1)
        batch_var = value_of(var).reshape(-1) * (count / max(count - 1, 1))
        new_running = (running[0] * (1 - momentum) + momentum * batch_mean,
                       running[1] * (1 - momentum) + momentum * batch_var)
        y = centred / P.sqrt(var + eps)
    else:
        new_running = running
        y = (x - running[0].reshape(shape)) / (running[1].reshape(shape) + eps) ** 0.5
    return y * P.reshape(gamma, shape) + P.reshape(beta, shape), new_running


def linear_map(fn, x, weights, feedback=None):
    """The layer ``fn(x, W, *rest)`` with ``weights`` = [W, *rest] — or, given a ``feedback`` matrix B
    of W's shape, the same value and tangent with the reverse pass of ``x`` through B in place of W
    (feedback alignment, see ``feedback_alignment``).  Every layer that a plan's feedback weights
    may reach is applied through here."""
    weight, *rest = weights
    if feedback is None:
        return fn(x, weight, *rest)
    return feedback_alignment(fn)(x, weight, feedback, *rest)


@functools.cache
def feedback_alignment(fn):
    """Feedback alignment for a layer ``fn(x, W, *rest)`` linear in ``x``: returns
    ``fa(x, W, B, *rest)`` (one primitive per layer function, built on first use).

    Value and forward mode are those of ``fn(x, W, *rest)``; in reverse mode the cotangent of
    ``x`` is sent back through the fixed random ``B`` in place of ``W`` (Lillicrap et al.), while
    ``W`` and ``rest`` (e.g. the bias) get their usual cotangents.  ``B`` has ``W``'s shape and
    never gets a gradient.
    """
    def value(x, weight, feedback, *rest):
        return fn(x, weight, *rest)

    def jvp(tangents, out, x, weight, feedback, *rest):
        duals = [Dual._make(a, t) for a, t in zip((x, weight) + rest, tangents[:2] + tangents[3:])]
        return fn(*duals).tangent

    def vjp(g, out, x, weight, feedback, *rest):
        _, through_feedback = autodiff.vjp(lambda inp: fn(inp, feedback, *rest), x)
        _, through_params = autodiff.vjp(lambda *w: fn(x, *w), weight, *rest)
        weight_grad, *rest_grads = through_params(g)
        return [through_feedback(g)[0], weight_grad, None, *rest_grads]

    return Primitive(f"feedback_alignment[{getattr(fn, '__name__', 'linear')}]", value, jvp=jvp, vjp=vjp)


