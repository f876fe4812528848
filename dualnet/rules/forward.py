"""Forward-gradient rules: weight perturbation (FG-W, Baydin et al.) and activity perturbation
(FG-A, Ren et al.), global or with local greedy losses (LG-FG-W, LG-FG-A).

Every directional derivative here comes from one genuine forward-mode pass (Dual tangents);
no reverse pass of the loss through the network is ever taken.  Heads (local and final) get
exact gradients from their own layer alone ("always backprop" for the last layer).

* FG-W: v ~ N(0, I) per weight tensor, shared by the batch (each tensor's from its own key: the
  step, its block and its name); ĝ_θ = (∇_θL·v) v, with ∇_θL·v the
  JVP of the batch-mean loss.  ``directions=K`` averages K directions from one K-batched pass.
  With local losses, a grouped weight's group g uses only the replicas of group g.
  ``readout='perturbed'`` (global only) perturbs the read-out's parameters too, as Bacho & Chu's
  and Baydin et al.'s code do, instead of giving them their exact gradient.  ``dense_groups='own'``
  (local only) updates a dense layer's group-g output columns from group g's replicas only, as
  Ren et al.'s code does; the default 'all' uses every replica of the block, which is unbiased
  where a norm over all channels follows the layer (then a column reaches every group).
  ``memory='store'`` (default) keeps each tangent from the forward pass for the update;
  ``memory='recompute'`` keeps none and draws each again from its key for the update (the same
  estimate, one more draw per tensor, peak memory flat in depth).
* FG-A: u ~ N(0, I) per example (and patch and unit) at every normalised pre-activation, all
  layers in one pass; d_n = JVP of example n's loss (or of replica (n, p, g)); the estimate
  at the site is d·u ⊙ relu_mask, pulled back through the exact norm Jacobian (``norm_grad``;
  False is the paper's "NG") and turned into ΔW = xᵀδ / N by the layer alone.  Where a later
  BatchNorm mixes the batch (``model.couples_examples_after``), example n's units reach every
  example's loss, so d_n is replaced by the batch total Σ_m d_m (unbiased, higher variance);
  ``batch_coupling='own'`` keeps d_n there (lower variance, biased: it misses the cross-example
  terms of the batch statistics).
  ``readout='perturbed'`` (global only): u ~ N(0, I) at the logits too (Bacho & Chu perturb every
  layer's output, the output layer's included); the read-out gets xᵀ(d·u)/N instead of its exact
  gradient.  ``loss_reduction='sum'`` (global only): the hidden layers follow the gradient of the
  batch *sum* of the per-example losses, as Ren et al.'s global FG-A does (a step N times larger
  at the same learning rate); the heads keep the batch mean.
  ``memory='recompute'``: the forward-mode pass keeps no layer; each site's noise comes from its
  own seed, and once the loss tangents are known a second, value-only pass regenerates every
  layer's input, mask and noise and forms its update on the spot — the same estimate, one more
  plain forward pass, peak memory flat in depth.
"""
import zlib

from .. import backend, noise
from ..dual import Dual, value_of
from ..nn.plan import Plan, Site
from .base import PLANS, Estimate, Rule, contrastive_plan, local_head_grads, mean_value, output_error, site_gradient


def _tangent(x, k):
    """A Dual's tangent with a leading direction axis (zeros for a symbolic zero)."""
    xp = backend.namespace(x.value)
    if x.tangent is None:
        return xp.zeros((k,) + x.shape, x.dtype)
    return x.tangent if x.tangent.ndim == x.value.ndim + 1 else x.tangent[None]


def _gaussian(rng, k, shape, dtype):
    """Standard normal draws [K, *shape] generated directly in ``dtype`` (float32 or float64)."""
    return rng.standard_normal((k,) + tuple(shape), dtype=dtype)


NOISES = ("gaussian", "rademacher")


def signs(gaussian):
    """Rademacher ±1 from Gaussian draws (in place): the sign of a standard normal is +1 or −1
    with probability 1/2 each, so the keyed Gaussian streams give keyed Rademacher ones."""
    gaussian[...] = 1 - 2 * (gaussian < 0)
    return gaussian


def _check_noise(rule, noise_kind):
    if noise_kind not in NOISES:
        raise ValueError(f"{rule}: noise={noise_kind!r}; allowed: 'gaussian' (N(0, I)) or 'rademacher' (±1: "
                         f"unbiased too, variance (d−1)‖g‖² instead of (d+1)‖g‖²)")


def example_noise(rng, batch, k, kind, layers="hidden", distribution="gaussian"):
    """site -> per-example noise [K, *site.shape] at the sites of ``kind`` (None elsewhere; with
    ``layers='hidden'`` not at the block-level 'block' sites), keyed by what it perturbs: direction
    j of the example in row n of the step's whole batch, at site (block, layer), is row n of
    ``noise.normal(key(step, block, layer, j), (N,) + unit shape)``, N = ``batch.total``.  A
    data-parallel shard draws exactly its rows of the single-process draw, and drawing a site
    again gives the same noise (FG-A's ``memory='recompute'``).  ``distribution='rademacher'``:
    the signs of those draws."""
    step = int(rng.integers(0, 2 ** 63 - 1))  # the step's generator is the same on every rank

    def draw(site):
        if site.kind != kind or (layers == "hidden" and site.name == "block"):
            return None
        rows, units = site.shape[0], tuple(site.shape[1:])
        out = backend.xp.empty((k,) + tuple(site.shape), dtype=site.dtype)
        layer = zlib.crc32(site.name.encode())
        for j in range(k):
            noise.normal_rows(noise.key(step, site.block, layer, j), (batch.total,) + units, batch.start,
                              batch.start + rows, out=out[j])
        return signs(out) if distribution == "rademacher" else out
    return draw


def _along(per_group, axis, ndim):
    """[K, G] reshaped to broadcast against [K] + a parameter of ``ndim`` axes whose groups lie on ``axis``."""
    k, groups = per_group.shape
    return per_group.reshape((k,) + (1,) * axis + (groups,) + (1,) * (ndim - axis - 1))


def _batch_means(batch, shard_means):
    """``batch.mean`` of every array of ``shard_means`` (a dict) in one call: one message."""
    arrays = list(shard_means.values())
    flat = batch.mean(backend.namespace(arrays[0]).concatenate([a.ravel() for a in arrays]))
    means, offset = {}, 0
    for key, a in shard_means.items():
        means[key] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size
    return means


def _plan(local, contrastive=False, temperature=0.5, **extra):
    options = dict(PLANS["local-greedy" if local else "global"])
    if local:
        options["replicated"] = True
    return Plan(**contrastive_plan(options, contrastive, temperature), **extra)


def _head_grads(model, params, trace, labels, local, contrastive=False, temperature=0.5):
    grads = {} if trace.logits is None else model.readout_grads(trace, output_error(trace.logits, labels))
    if local:
        grads.update(local_head_grads(model, params, trace, labels, contrastive, temperature))
    return grads


def _same_for_both_views(draw):
    """Ren's contrastive FG-A: both views of an example get the same perturbation.

    With keys under stop-gradient, d_n = ⟨∇_{h1}ℓ¹_n, u_n⟩ + ⟨∇_{h2}ℓ²_n, u_n⟩, so the estimate
    d_n u_n at either view's units has mean ∇_{h1}ℓ¹_n + ∇_{h2}ℓ²_n: shared noise trades this bias
    for the paper's finding that the loss does not go down otherwise.
    """
    def sample(site):
        half = (site.shape[0] // 2,) + tuple(site.shape[1:])
        u = draw(site.__class__(site.block, site.name, site.kind, half, site.dtype))
        return None if u is None else backend.namespace(u).concatenate([u, u], axis=1)
    return sample


READOUTS = ("exact", "perturbed")


def _check_readout(rule, readout, local):
    if readout not in READOUTS:
        raise ValueError(f"{rule}: readout={readout!r}; allowed: 'exact' (the read-out's exact gradient) or "
                         f"'perturbed' (perturbed like every other layer, as Bacho & Chu and Baydin et al. do)")
    if readout == "perturbed" and local:
        raise ValueError(f"lg-{rule}: readout='perturbed' is for the global rule ({rule}); local rules train the "
                         f"read-out on stop-gradient features, with its exact gradient")


def _with_logits_noise(draw, rng, batch, k, distribution):
    """``draw`` plus the rule's noise u [K, N, classes] (Gaussian or ±1) at the logits (the
    'logits' site), keyed per example like the hidden layers' noise."""
    logits = example_noise(rng, batch, k, "logits", distribution=distribution)

    def sample(site):  # the read-out's site has no block index: keyed as block 0, layer 'readout'
        return logits(site.__class__(0, site.name, site.kind, site.shape, site.dtype)) if site.kind == "logits" \
            else draw(site)
    return sample


def _perturbed_readout_grads(model, trace, k):
    """FG-A's read-out estimate from the noise u at the logits: the cotangent Σ_K d·u / (K·N) at the
    logits, carried to the read-out's parameters by the read-out layer alone."""
    d = _tangent(trace.loss, k)  # [K, N]: no BatchNorm after the read-out, so d_n is example n's own
    u = trace.logits_tangent
    cotangent = (d[..., None] * u).sum(axis=0) / (k * d.shape[1])
    return model.readout_grads(trace, cotangent)


class ActivityPerturbation(Rule):
    """FG-A (``local=False``) and LG-FG-A (``local=True``)."""

    @property
    def pipeline(self):  # global FG-A: every block needs only the final loss's tangent d [K, N]
        return "local" if self.local else "signal"

    @property
    def pipeline_tangents(self):
        return not self.local

    def __init__(self, local=False, directions=1, norm_grad=True, site="pre", contrastive=False, temperature=0.5,
                 memory="store", batch_coupling="total", readout="exact", loss_reduction="mean", noise="gaussian",
                 diagnostics=False):
        super().__init__(diagnostics)
        _check_readout("fg-a", readout, local)
        _check_noise("fg-a", noise)
        self.noise = noise
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"fg-a: loss_reduction={loss_reduction!r}; allowed: 'mean' (the batch-mean loss) or "
                             f"'sum' (the batch sum, Ren et al.'s global FG-A)")
        if loss_reduction == "sum" and local:
            raise ValueError("lg-fg-a: loss_reduction='sum' is Ren et al.'s convention for global FG-A; use fg-a")
        self.readout, self.loss_reduction = readout, loss_reduction
        if contrastive and not local:
            raise ValueError("fg-a: contrastive=True is Ren's local setting; use lg-fg-a")
        if site not in ("pre", "post"):
            raise ValueError(f"fg-a: site={site!r}; allowed: 'pre' (normalised pre-activation) or 'post'")
        if directions < 1:
            raise ValueError(f"fg-a: directions={directions} must be >= 1")
        if memory not in ("store", "recompute"):
            raise ValueError(f"fg-a: memory={memory!r}; allowed: 'store' (keep every layer for the update) or "
                             f"'recompute' (a second, value-only pass; peak memory flat in depth)")
        if batch_coupling not in ("total", "own"):
            raise ValueError(f"fg-a: batch_coupling={batch_coupling!r}; allowed: 'total' (Σ_m d_m where a later "
                             f"BatchNorm mixes the batch; unbiased) or 'own' (d_n only; biased, lower variance)")
        self.local, self.directions, self.norm_grad, self.site = local, directions, norm_grad, site
        self.contrastive, self.temperature = contrastive, temperature
        self.memory, self.batch_coupling = memory, batch_coupling
        self.target = "local-greedy" if local else "global"

    def estimate(self, model, params, x, labels, rng, state, batch):
        forward = self.forward_pass(model, params, x, labels, rng, state, batch)
        return self.updates(model, params, forward, self.signal(forward, labels), batch)

    def forward_pass(self, model, params, x, labels, rng, state, batch):
        """The forward-mode pass (the block pipeline runs it on each stage's blocks, ``x`` then being
        the previous stage's output with its tangent); returns what ``updates`` needs."""
        recompute = self.memory == "recompute"
        sample = example_noise(rng, batch, self.directions, self.site, distribution=self.noise)
        if self.readout == "perturbed":
            sample = _with_logits_noise(sample, rng, batch, self.directions, self.noise)
        if self.contrastive:
            sample = _same_for_both_views(sample)
        plan = _plan(self.local, self.contrastive, self.temperature, perturb=sample,
                     record_points=not recompute, record_outputs=self.local or not recompute)
        trace = model.forward(params, x, labels, plan, state)
        return {"trace": trace, "plan": plan, "sample": sample, "x": value_of(x), "labels": labels,
                "state": state}

    def signal(self, forward, labels):
        """What the blocks of a global estimate need from the end of the network, a tuple of arrays:
        FG-A's loss derivatives d [K, N] (the final loss's tangent); () for LG-FG-A (each block has
        its own)."""
        return () if self.local else (_tangent(forward["trace"].loss, self.directions),)

    def updates(self, model, params, forward, signal, batch):
        """The estimate from a ``forward_pass`` and the ``signal`` (FG-A: the final loss's tangent)."""
        loss_tangent = signal[0] if signal else None
        trace, plan, sample, x, labels, state = (forward[key] for key in ("trace", "plan", "sample", "x", "labels",
                                                                          "state"))
        n, recompute = len(labels), self.memory == "recompute"
        derivatives = {}

        def layer_grads(point, u):
            if point.block not in derivatives:  # scaled by 1/(K·N): the mean over directions and examples
                derivatives[point.block] = self._loss_derivatives(model, plan, trace, point.block, batch,
                                                                  loss_tangent) / (len(u) * n)
                if self.loss_reduction == "sum":  # Ren's global FG-A: d of the whole batch's sum, no 1/N
                    derivatives[point.block] = derivatives[point.block] * batch.total
            # Σ_k d_k u_k, masked: at 'pre' the ReLU-sparsity trick (zero where the unit is off,
            # unbiased since the true gradient is zero there); at 'post' the chain rule from the
            # post-activation back to h.
            site_grad = site_gradient(derivatives[point.block], u, point.replica, point.mask)
            return point.weight_grads(site_grad, through_norm=self.norm_grad)

        grads = {}
        if recompute:  # the same values again; each layer is used and dropped, its noise drawn again
            def use(point):
                grads.update(layer_grads(point, sample(Site(point.block, point.name, self.site, point.h.shape,
                                                            point.h.dtype))))
            model.forward(params, x, None, Plan(record_points=False, record_outputs=False, on_point=use), state)
        else:
            for point in trace.points:
                grads.update(layer_grads(point, point.u_pre if self.site == "pre" else point.u_post))
        grads.update(_head_grads(model, params, trace, labels, self.local, self.contrastive, self.temperature))
        if self.readout == "perturbed" and trace.logits is not None:  # the stage that holds the read-out
            grads.update(_perturbed_readout_grads(model, trace, self.directions))
        return Estimate(grads, mean_value(trace.loss), trace.state)

    def _loss_derivatives(self, model, plan, trace, block, batch, loss_tangent=None):
        """d [K, N] (or replicas [K, N, P, G]) that block ``block``'s noise reaches (``loss_tangent``:
        the final loss's, for FG-A); under a later BatchNorm, the total over the whole batch (all
        ranks' shards, whose statistics it shares)."""
        d = _tangent(trace.local_losses[block], self.directions) if self.local else loss_tangent
        if self.batch_coupling == "total" and model.couples_examples_after(block, plan):  # E[d_m u_n] = ∂ℓ_m/∂h_n
            total = d.sum(axis=1, keepdims=True)
            if batch.stop - batch.start != batch.total:
                total = batch.mean(total / (batch.stop - batch.start)) * batch.total
            d = backend.namespace(d).broadcast_to(total, d.shape)
        if self.contrastive:  # replica derivatives reach the units of both views
            d = backend.namespace(d).concatenate([d, d], axis=1)
        return d


class _PerturbedParams(dict):
    """Parameters whose tangents are drawn on access from a per-tensor key (the counter-based
    ``dualnet.noise``, the same on every rank).

    ``store=False``: never kept.  The forward pass holds a weight's tangent only while the layer
    uses it, so FG-W's memory does not grow with depth; the same key regenerates the tangent for
    the update.  ``store=True``: each tangent drawn once and kept for the update (one draw per
    tensor instead of two; the tangents of every layer stay in memory until the update).
    """

    def __init__(self, params, seeds, directions, distribution="gaussian", store=False):
        super().__init__(params)
        self.seeds, self.directions, self.distribution = seeds, directions, distribution
        self.stored = {} if store else None

    def tangent(self, name):
        if self.stored is not None and name in self.stored:
            return self.stored[name]
        value = value_of(dict.__getitem__(self, name))
        drawn = noise.normal(self.seeds[name], (self.directions,) + tuple(value.shape), value.dtype,
                             xp=backend.namespace(value))
        drawn = signs(drawn) if self.distribution == "rademacher" else drawn
        if self.stored is not None:
            self.stored[name] = drawn
        return drawn

    def __getitem__(self, name):
        value = value_of(dict.__getitem__(self, name))
        return Dual._make(value, self.tangent(name) if name in self.seeds else None)


class WeightPerturbation(Rule):
    """FG-W (``local=False``) and LG-FG-W (``local=True``)."""

    def __init__(self, local=False, directions=1, readout="exact", dense_groups="all", noise="gaussian",
                 memory="store", diagnostics=False):
        super().__init__(diagnostics)
        _check_noise("fg-w", noise)
        self.noise = noise
        if memory not in ("store", "recompute"):
            raise ValueError(f"fg-w: memory={memory!r}; allowed: 'store' (keep each tangent from the forward pass "
                             f"for the update) or 'recompute' (draw it again from its key; memory flat in depth)")
        self.memory = memory
        if directions < 1:
            raise ValueError(f"fg-w: directions={directions} must be >= 1")
        _check_readout("fg-w", readout, local)
        if dense_groups not in ("all", "own"):
            raise ValueError(f"lg-fg-w: dense_groups={dense_groups!r}; allowed: 'all' (every replica of the block) "
                             f"or 'own' (group g's columns from group g's replicas, Ren et al.'s code)")
        if dense_groups == "own" and not local:
            raise ValueError("fg-w: dense_groups='own' applies to local losses' replicas; use lg-fg-w")
        self.local, self.directions, self.readout, self.dense_groups = local, directions, readout, dense_groups
        self.target = "local-greedy" if local else "global"

    def _perturbed_names(self, model, params):
        """The parameters this rule perturbs: the backbone's, and the read-out's with ``readout='perturbed'``."""
        spec = model.specs
        return sorted(name for name in params
                      if not spec[name].head or (self.readout == "perturbed" and spec[name].readout))

    def estimate(self, model, params, x, labels, rng, state, batch):
        k = self.directions
        names = self._perturbed_names(model, params)
        step = int(rng.integers(0, 2 ** 63 - 1))  # each tensor's key: (step, its block, its name)
        seeds = {name: noise.key(step, _key_block(model, name), zlib.crc32(name.encode())) for name in names}
        perturbed = _PerturbedParams(params, seeds, k, self.noise, store=self.memory == "store")
        plan = _plan(self.local, record_points=False, record_outputs=self.local)  # local heads read the outputs
        trace = model.forward(perturbed, x, labels, plan, state)
        n, grads = len(labels), {}
        keys = {name: self._shared_by(model.specs[name], trace) for name in names}
        shard_means = {}
        for key in keys.values():
            if key not in shard_means:
                shard_means[key] = self._directional(trace, key, k, n)
        # the batch's directional derivatives: K (or K·G) numbers per block are all that ranks exchange
        directional = _batch_means(batch, shard_means)
        for name in names:
            v, spec, d = perturbed.tangent(name), model.specs[name], directional[keys[name]]
            if d.ndim == 2 and spec.group_axis is not None:  # group g's slice reaches only group g's replicas
                grads[name] = _mean_over_directions(_along(d, spec.group_axis, v.ndim - 1) * v)
            elif d.ndim == 2:  # dense_groups='own': channel block g from group g's replicas
                grads[name] = _own_group_columns(d, spec.channel_group_axis, v)
            else:
                grads[name] = _mean_over_directions(d.reshape((k,) + (1,) * (v.ndim - 1)) * v)
        batch_wide = frozenset(grads)  # the read-out's too, when it is perturbed
        head_grads = _head_grads(model, params, trace, labels, self.local)
        grads.update({name: g for name, g in head_grads.items() if name not in grads})
        return Estimate(grads, mean_value(trace.loss), trace.state, batch_wide=batch_wide)

    def _shared_by(self, spec, trace):
        """Which directional derivative a perturbed tensor's estimate uses: None (the global loss's),
        (block, 'block') (the sum of the block's replicas) or (block, 'grouped') (per group: a grouped
        layer's tensors, and with ``dense_groups='own'`` a dense layer's channel blocks)."""
        if not self.local:
            return None
        if trace.local_losses[spec.block].shape[-1] > 1 and (
                spec.group_axis is not None or (self.dense_groups == "own" and spec.channel_group_axis is not None)):
            return spec.block, "grouped"
        return spec.block, "block"

    def _directional(self, trace, key, k, n):
        """The mean directional derivative over this shard: [K] for the global loss or a block's
        replicas, [K, G] per group of a grouped block."""
        if key is None:
            return _tangent(trace.loss, k).mean(axis=1)
        d = _tangent(trace.local_losses[key[0]], k)  # [K, N, P, G]
        if key[1] == "grouped":
            return d.sum(axis=(1, 2)) / n
        return d.reshape(k, -1).sum(axis=1) / n


def _mean_over_directions(products):
    """The mean over the leading K axis (for K = 1 the single slice itself, without a pass)."""
    return products[0] if len(products) == 1 else products.mean(axis=0)


def _key_block(model, name):
    """The block index in a perturbed tensor's noise key; the read-out (no block) keys as one past the last."""
    block = model.specs[name].block
    return model.num_blocks if block is None else block


def _own_group_columns(per_group, axis, v):
    """Ren et al.'s LG-FG-W for a dense layer whose output channels (``axis`` of the tangent v
    [K, ...]) split into G contiguous groups: channel block g is scaled by group g's total
    derivative ``per_group`` [K, G]; the mean over the K directions."""
    k, groups = per_group.shape
    shape = v.shape[1:]
    split = shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1:]
    scale = per_group.reshape((k,) + (1,) * axis + (groups, 1) + (1,) * (len(shape) - axis - 1))
    return _mean_over_directions(scale * v.reshape((k,) + split)).reshape(shape)
