"""Data parallelism: each rank estimates on its shard of the global batch; one Allreduce of the
weighted estimates gives the full-batch estimate on every rank.

Rule estimates are means over the examples of a batch, ĝ = (1/N) Σ_n c_n, so with shards S_r of
sizes N_r, ĝ = Σ_r (N_r/N) ĝ_r: each rank scales its shard's estimate by N_r/N and the ranks sum.
That needs every per-example term c_n to be the one the single process computes: noise is keyed
by the global example index (FG-A) or shared by all ranks (FG-W's per-tensor draws), and a
BatchNorm normalises with the whole batch's statistics, summed over the ranks by ``rank_sum``.
"""
import numpy

from .. import backend
from ..nn.layers import RankStatistics
from ..primitives import Primitive
from ..rules.base import Batch


def shard(n, rank, size):
    """Rows of rank ``rank`` of a batch of ``n``: contiguous, sizes differing by at most one
    (the first ``n % size`` ranks hold one more), as ``numpy.array_split`` splits."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def estimate_on_shard(world, rule, model, params, x, labels, rng, state, views=None, flag=0.0):
    """One step's estimate for the whole batch (x [N, ...], labels [N]) from this rank's shard:
    ``(shard estimate, grads, loss, state, flag)`` with grads, loss, BatchNorm state and the summed
    ``flag`` those of the whole batch (``combine``).  ``views`` (two augmented views of x, for the
    contrastive rules) are cut into the same rows and stacked [view 1; view 2].  A rank whose
    shard is empty (a last batch smaller than the ranks) computes on one row and adds nothing."""
    total = len(labels)
    rows, weight = shard(total, world.rank, world.size), 1.0
    if world.size > 1:
        weight = (rows.stop - rows.start) / total
        if weight == 0:
            rows = slice(0, 1)
    x, labels = x[rows], labels[rows]
    if views is not None:
        x = backend.namespace(x).concatenate([views[0][rows], views[1][rows]], axis=0)
    batch = Batch(rows.start, rows.stop, total, mean=batch_mean(world, weight))
    if world.size > 1:
        model = model.sharded(RankStatistics(rank_sum(world, weight), round(weight * total), total))
    estimate = rule(model, params, x, labels, rng, state, batch)
    return (estimate,) + combine(world, estimate, weight, flag)


def rank_sum(world, weight):
    """The primitive y = Σ_r x_r over the ranks (every rank holds y), for the statistics a
    BatchNorm shares across the ranks.  jvp: Σ_r t_r.  vjp: a rank's gradients are later scaled
    by its weight w_r = N_r/N (``combine``) while the true objective is Σ_r w_r L_r, so the
    cotangent of x_r is Σ_r' w_r' ḡ_r' / w_r.  A rank with an empty shard (w_r = 0) adds
    nothing and passes nothing back."""
    def reduce(array, scale=1.0):
        return world.allreduce(array * scale) if weight else world.allreduce(array * 0) * 0

    return Primitive("rank_sum", reduce,
                     jvp=(lambda tangent, out, x: reduce(tangent),),
                     vjp=(lambda cotangent, out, x: reduce(cotangent, weight) / (weight or 1),))


def batch_mean(world, weight):
    """``Batch.mean`` for this rank: x (a mean over the shard) ↦ Σ_r (N_r/N) x_r, one Allreduce."""
    if world.size == 1:
        return lambda x: x
    return lambda x: world.allreduce(weight * x)


def combine(world, estimate, weight, flag=0.0):
    """The full-batch (grads, loss, state, flag) from every rank's shard ``estimate`` weighted by
    ``weight`` = N_r/N: one Allreduce of one buffer (in the gradients' dtype, on their device, so
    that GPU gradients take the world's GPU transport) holding the weighted gradients (in sorted
    name order), the weighted loss, the weighted BatchNorm running statistics and ``flag``
    (summed: any rank's Ctrl-C stops every rank at the same step).  Gradients the rule already
    made the batch's (``estimate.batch_wide``) are kept as they are.  With one process, the
    estimate is returned as it is."""
    if world.size == 1:
        return estimate.grads, estimate.loss, estimate.state, flag
    names = sorted(name for name, g in estimate.grads.items() if g is not None and name not in estimate.batch_wide)
    states = sorted(estimate.state or {})
    parts = [estimate.grads[name] for name in names] + [a for key in states for a in estimate.state[key]]
    xp = backend.namespace(*parts) if parts else numpy
    dtype = numpy.result_type(*[p.dtype for p in parts]) if parts else numpy.dtype(numpy.float64)  # float32 stays
    buffer = xp.concatenate([xp.asarray(p, dtype).ravel() for p in parts] + [xp.zeros(2, dtype)]) * dtype.type(weight)
    buffer[-2], buffer[-1] = weight * estimate.loss, flag
    total = world.allreduce(buffer)
    grads, offset = {name: estimate.grads[name] for name in estimate.batch_wide}, 0
    for name in names:
        g = estimate.grads[name]
        grads[name] = backend.namespace(g).asarray(total[offset:offset + g.size].reshape(g.shape), dtype=g.dtype)
        offset += g.size
    state = {}
    for key in states:
        arrays = []
        for a in estimate.state[key]:
            arrays.append(backend.namespace(a).asarray(total[offset:offset + a.size].reshape(a.shape), dtype=a.dtype))
            offset += a.size
        state[key] = tuple(arrays)
    return grads, float(total[-2]), state or estimate.state, float(total[-1])


def checksum(params):
    """A float64 sum of every parameter's values and of their squares: equal on every rank while
    the ranks apply the same updates."""
    hosts = (backend.to_numpy(p) for _, p in sorted(params.items()))  # one device-to-host copy each
    return sum(float((h.astype(numpy.float64) ** 2).sum() + h.sum()) for h in hosts)
