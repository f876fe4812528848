"""The structure every model exposes to the learning rules.

A model is an ordered list of blocks, local heads (one per block, optional), and a final
read-out.  ``Model.forward(params, x, labels, plan)`` runs them in one pass and returns a
``Trace``: logits, per-example losses, local losses, the perturbation points of every hidden
layer and the block outputs.  Parameters are a flat dict ``{name: array}``.

What a parameter *is* — which block it belongs to, whether it is part of a local head or of
the read-out, its group axis, whether feedback alignment gives it a feedback matrix — is
declared by the model in its ``ParamSpec`` (``model.specs[name]``), and asked of it by rules,
the runner and the partitioners of scale-out (``model.blocks()``, ``model.parameters_of(k)``).
Names are labels (checkpoint keys, the plan's feedback keys); nothing outside a model reads
structure from them.  See docs/architecture.md.
"""
import copy
from dataclasses import dataclass, field

import numpy

from .. import autodiff, backend, fused, losses
from .. import primitives as P
from ..dual import value_of
from . import init as initialisers
from .layers import layer_norm, linear, linear_map, normalized, normalized_relu
from .plan import Context, Layer, Plan, Point

ROLES = ("weight", "bias", "norm")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as its model declares it.

    ``shape``, ``fan_in``, ``init``: what the initialiser ``init`` draws it from.
    ``block``: the index of the block it belongs to (blocks run in index order), or ``None`` for
    the read-out.
    ``role``: ``'weight'`` — the weight of a linear map (dense [p, q], token mixing [P, P],
    grouped [G, c_in, c_out], conv [c_out, c_in, k, k]); ``'bias'``; ``'norm'`` — a normalisation's
    scale or shift.
    ``local_head``: part of block ``block``'s local head (a linear head or an aux net), not of its
    backbone.
    ``group_axis``: for a grouped layer's tensors, the axis that indexes the groups (slice g acts on
    group g's units only); ``None`` otherwise.
    ``channel_group_axis``: for a dense layer whose output channels the following grouped layers
    split into G contiguous blocks (channel block g feeds group g), the axis of those channels;
    ``None`` otherwise.  (Whether channel block g reaches *only* group g also depends on the norms
    after the layer: an LN over all channels mixes the groups.)
    ``module``: the layer or norm the tensor belongs to (a conv's or linear map's weight and bias
    share one; a norm's scale and shift another) — the unit of Fournier's per-module weight-space
    projection; ``None``: the tensor alone.
    """
    shape: tuple
    fan_in: int
    init: str
    block: int | None
    role: str
    local_head: bool = False
    group_axis: int | None = None
    channel_group_axis: int | None = None
    module: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"ParamSpec: role={self.role!r}; allowed: {', '.join(ROLES)}")
        if self.local_head and self.block is None:
            raise ValueError("ParamSpec: a local head belongs to a block; the read-out has block=None")

    @property
    def readout(self):
        """Part of the final read-out."""
        return self.block is None

    @property
    def head(self):
        """A head (the read-out or a local head): every rule trains it on its exact gradient."""
        return self.readout or self.local_head

    @property
    def feedback(self):
        """Whether feedback alignment sends this tensor's layer's reverse pass through a fixed random
        matrix of its shape: true for the weights of linear maps."""
        return self.role == "weight"


@dataclass
class Trace:
    """What one forward pass produced (values may be Duals when tangents or a tape are live).

    ``logits`` [N, classes]; ``loss`` per-example cross-entropy [N] (None without labels);
    ``local_losses``: one entry per block — [N, P, G] replicas when the plan asks for
    replicated losses, else the pooled per-example loss [N]; ``points``: the hidden layers
    (see ``Point``); ``outputs``: block outputs (empty unless the plan records them);
    ``readout_input``: the read-out's input feature value; ``state``: updated running statistics;
    ``last_output``, ``last_tangent``: the value and tangent (None: none) of the last block's output
    (see ``Model.forward``'s ``blocks``); ``logits_tangent``: the tangent the plan injected at the
    logits (the ``'logits'`` site), or None.
    """
    logits: object
    loss: object
    local_losses: list
    points: list
    outputs: list
    output_tangents: list
    readout_input: object
    state: dict = field(default_factory=dict)
    last_output: object = None
    last_tangent: object = None
    logits_tangent: object = None


@dataclass(frozen=True)
class RunningSpec:
    """The running statistics of one BatchNorm as its model declares them: ``state[key]`` =
    (mean, variance), each [``width``], of block ``block`` (``local_head``: of its local head)."""
    width: int
    block: int
    local_head: bool = False


class Model:
    """Base class.  Subclasses fill ``self.specs`` and implement ``embed``, ``block``,
    ``pooled_features`` and say how many blocks they have."""
    name = "model"
    num_blocks = 0
    has_local_heads = False
    linear_local_heads = True  # a local head is one linear map of ``local_head_input`` (False: an aux net)
    use_batch_norm = False  # a BatchNorm in every block (see ``couples_examples_after``)
    over_ranks = None  # a layers.RankStatistics in a data-parallel shard's copy (see ``sharded``)

    def __init__(self):
        self.specs = {}
        self.running_specs = {}  # state key -> RunningSpec

    # --- parameters --------------------------------------------------------------------
    def add_param(self, name, shape, fan_in, init, *, block, role, local_head=False, group_axis=None,
                  channel_group_axis=None, module=None):
        """Declare parameter ``name`` (see ``ParamSpec``); declaration order is the parameters' order."""
        if name in self.specs:
            raise ValueError(f"{self.name}: parameter {name!r} is declared twice")
        self.specs[name] = ParamSpec(tuple(shape), int(fan_in), init, block, role, local_head, group_axis,
                                     channel_group_axis, module)

    def add_linear_head(self, prefix, features, classes, init, block=None, bias_init=None):
        """A linear head ``{prefix}.weight`` [features, classes] and ``{prefix}.bias`` [classes]
        (initialised by ``bias_init``, default ``init``): block ``block``'s local head, or the read-out
        (``block=None``)."""
        where = dict(block=block, local_head=block is not None, module=prefix)
        self.add_param(f"{prefix}.weight", (features, classes), features, init, role="weight", **where)
        self.add_param(f"{prefix}.bias", (classes,), features, bias_init or init, role="bias", **where)

    def init(self, seed=0, dtype=backend.DEFAULT_DTYPE):
        """Fresh parameters ``{name: array}`` drawn from ``seed`` (deterministic)."""
        rng = numpy.random.default_rng(seed)
        return {name: backend.to_device(initialisers.get(spec.init)(rng, spec.shape, spec.fan_in, dtype))
                for name, spec in self.specs.items()}

    def add_running(self, key, width, *, block, local_head=False):
        """Declare the running statistics ``state[key]`` of a BatchNorm of ``width`` channels."""
        self.running_specs[key] = RunningSpec(int(width), block, local_head)

    def init_state(self, dtype=backend.DEFAULT_DTYPE):
        """Fresh running statistics {key: (mean zeros, variance ones)} of every declared BatchNorm
        (empty for models without one)."""
        xp = backend.xp
        return {key: (xp.zeros(spec.width, dtype), xp.ones(spec.width, dtype))
                for key, spec in self.running_specs.items()}

    def num_params(self):
        return int(sum(numpy.prod(s.shape) for s in self.specs.values()))

    def blocks(self):
        """The block indices, in the order a forward pass runs them."""
        return range(self.num_blocks)

    def parameters_of(self, block, local_head=None):
        """Names of block ``block``'s parameters (``None``: the read-out's), in declaration order;
        ``local_head=True`` / ``False`` keeps only its local head's / only its backbone's."""
        return [name for name, spec in self.specs.items()
                if spec.block == block and (local_head is None or spec.local_head == local_head)]

    def state_of(self, block, local_head=None):
        """Keys of block ``block``'s running statistics in ``state``, in declaration order
        (``local_head`` as in ``parameters_of``)."""
        return [key for key, spec in self.running_specs.items()
                if spec.block == block and (local_head is None or spec.local_head == local_head)]

    def block_of(self, name):
        """Block index of a parameter, ``'head'`` for the read-out."""
        block = self.specs[name].block
        return "head" if block is None else block

    def is_local_head(self, name):
        return self.specs[name].local_head

    def param_counts(self):
        """Parameter count per block (local heads included) and for the read-out."""
        counts = {}
        for name, spec in self.specs.items():
            key = self.block_of(name)
            counts[key] = counts.get(key, 0) + int(numpy.prod(spec.shape))
        return counts

    # --- one pass ----------------------------------------------------------------------
    def sharded(self, over_ranks):
        """This model as one data-parallel shard sees it: a shallow copy whose BatchNorms normalise
        with the whole batch's statistics, summed over the ranks as ``over_ranks`` (a
        ``layers.RankStatistics``) says.  The model itself is left as it is."""
        shard = copy.copy(self)
        shard.over_ranks = over_ranks
        return shard

    def context(self, plan, state=None):
        """A fresh ``Context`` for one pass (or part of one) under ``plan``, reading the running
        statistics ``state`` (default: fresh ones)."""
        return Context(plan, state if state is not None else self.init_state(), self.over_ranks)

    def forward(self, params, x, labels=None, plan=None, state=None, blocks=None):
        """Run the whole model once under ``plan``; returns a ``Trace``.

        ``blocks``: run only this contiguous range of block indices (a stage of the block
        pipeline).  ``x`` is then the output of block ``blocks.start − 1`` (the raw input when the
        range starts at 0); ``outputs``, ``output_tangents`` and ``local_losses`` hold None for the
        blocks before the range, so that they stay indexed by block; the read-out runs only when the
        range ends at the last block (else ``logits`` and ``loss`` are None).  ``Trace.last_output``
        and ``last_tangent`` are the value and tangent of the last block run, the next stage's input
        (``x`` may be a ``Dual`` carrying the tangent of the previous stages).
        """
        plan = plan or Plan()
        ctx = self.context(plan, state)
        blocks = range(self.num_blocks) if blocks is None else blocks
        h = self.embed(x) if blocks.start == 0 else x
        outputs, output_tangents, local = [None] * blocks.start, [None] * blocks.start, [None] * blocks.start
        if not plan.record_outputs:
            outputs, output_tangents = [], []
        for k in blocks:
            if plan.greedy and k > 0:
                h = ctx.stop(h)
            h = self.block(k, params, h, ctx)
            h, u = ctx.inject(k, "block", "output", h)
            if plan.record_outputs:
                outputs.append(h)
                output_tangents.append(u)
            if plan.contrastive and (plan.local_losses or k == self.num_blocks - 1):
                local.append(self.contrastive_loss(k, params, h, plan.replicated, plan.temperature))
            elif plan.local_losses:
                local.append(self.local_loss(k, params, h, labels, plan.replicated, plan.feedback, ctx))
        if blocks.stop < self.num_blocks:  # a pipeline stage before the last: no read-out
            state = {**ctx.state, **ctx.new_state}
            return Trace(None, None, local, ctx.points, outputs, output_tangents, None, state, value_of(h),
                         getattr(h, "tangent", None))
        last_output, last_tangent = value_of(h), getattr(h, "tangent", None)
        if plan.contrastive:  # the online linear probe reads view 1 under stop-gradient
            h = ctx.stop(P.getitem(h, slice(0, value_of(h).shape[0] // 2)))
        features = self.pooled_features(ctx.stop(h) if plan.readout_stop_gradient else h)
        logits, logits_tangent = ctx.inject(None, "readout", "logits", self.readout(params, features, ctx))
        loss = None if labels is None else losses.cross_entropy(logits, labels, reduction="none")
        state = {**ctx.state, **ctx.new_state}
        return Trace(logits, loss, local, ctx.points, outputs, output_tangents, value_of(features), state,
                     last_output, last_tangent, logits_tangent)

    def readout(self, params, features, ctx):
        return linear_map(linear, features, [params["head.weight"], params["head.bias"]],
                          ctx.plan.feedback.get("head.weight"))

    def readout_grads(self, trace, error):
        """Exact read-out gradients from the logits' cotangent ``error`` [N, classes]."""
        return dict(zip(("head.weight", "head.bias"), linear.param_pullback(trace.readout_input, error)))

    def local_loss(self, k, params, h, labels, replicated, feedback=None, ctx=None):
        """Block k's local loss: replicas [N, P, G] or the pooled per-example loss [N].

        ``feedback`` ({weight name: B}) sends the head's reverse pass through B (pooled loss only);
        ``ctx``: the pass's ``Context`` when called inside ``forward`` (heads with BatchNorm read
        and update its running statistics; outside a pass they use batch statistics).
        """
        if not self.has_local_heads:
            raise ValueError(f"{self.name}: local losses need local heads; build the model with local_heads=True")
        weight, bias = params[f"blocks.{k}.head.weight"], params[f"blocks.{k}.head.bias"]
        if replicated:
            return losses.replicated_cross_entropy(self.replica_grid(h), weight, bias, labels)
        logits = linear_map(linear, self.local_head_input(h), [weight, bias],
                            (feedback or {}).get(f"blocks.{k}.head.weight"))
        return losses.cross_entropy(logits, labels, reduction="none")

    def local_head_input(self, h):
        """What a linear local head reads from its block's output h: the replica grid averaged over
        its P patches, [N, G·c] (the pooled local loss's features)."""
        grid = self.replica_grid(h)
        return P.reshape(P.mean(grid, axis=1), (value_of(grid).shape[0], -1))

    def contrastive_loss(self, k, params, h, replicated, temperature=0.5):
        """Block k's symmetric InfoNCE between the two views stacked in ``h`` [2N, ...]:
        replicas [N, P, G] (fused, Ren's replicated aggregator) or the pooled loss [N]."""
        weight, bias = params[f"blocks.{k}.head.weight"], params[f"blocks.{k}.head.bias"]
        grid = self.replica_grid(h)
        half = value_of(grid).shape[0] // 2
        first, second = P.getitem(grid, slice(0, half)), P.getitem(grid, slice(half, None))
        if replicated:
            return losses.replicated_info_nce(first, second, weight, bias, temperature)
        project = lambda view: linear(P.reshape(P.mean(view, axis=1), (half, -1)), weight, bias)
        return losses.symmetric_info_nce(project(first), project(second), temperature, reduction="none")

    def couples_examples_after(self, block, plan):
        """Whether the loss of one example depends on other examples' units of ``block`` (a later
        BatchNorm in training mode mixes the batch).  Then the per-example loss derivative d_n no
        longer isolates example n's path, and FG-A must use the batch total Σ_m d_m to stay unbiased.

        With a BatchNorm in every block (``use_batch_norm``): the later blocks' BatchNorms, in training
        mode, unless a greedy plan stops the path at the next block's input."""
        return self.use_batch_norm and plan.train and not plan.greedy and block < self.num_blocks - 1

    def couples_examples_after_output(self, block, plan):
        """Whether a BatchNorm in training mode mixes the batch between block ``block``'s *output* and
        the plan's losses (the site of Fournier's activity guesses): as ``couples_examples_after``
        without the block's own layers, which lie before its output.  Here (a BatchNorm in every
        block, before its output) the two agree; models whose blocks hold several layers override it."""
        return self.couples_examples_after(block, plan)

    # --- hidden layers -----------------------------------------------------------------
    def hidden(self, ctx, k, name, fn, x, params, param_names, normalize=None, norm_param_names=(),
               replica="example", residual=None, activation=P.relu):
        """One hidden layer: z = fn(x, *θ) → normalize(z, *θ_norm) → ['pre' site] → (+ residual)
        → activation → ['post' site].

        Records a ``Point`` so rules can read the layer; applies the plan's feedback weights to
        ``fn`` when the plan names this layer's weight (feedback alignment).  With the local
        ``layer_norm`` as ``normalize`` and ReLU as ``activation``, everything from the norm to the
        activation ('pre' tangent and residual included) is one fused pass,
        ``layers.normalized_relu`` (a grouped layer's GEMMs folded in); with another activation the
        layer and its LN run as ``layers.normalized``.  Either way the point keeps the LN's σ, not
        z: its pull-back to z is ``layer_norm_pullback(h, σ, δ)``, no second LN pass.
        """
        if ctx.plan.layer_hook is not None:
            fn, normalize = ctx.plan.layer_hook(Layer(k, name, fn, normalize, tuple(param_names),
                                                      tuple(norm_param_names)))
        weights = [params[p] for p in param_names]
        norm_weights = [params[p] for p in norm_param_names]
        feedback = ctx.plan.feedback.get(param_names[0])
        if normalize is layer_norm and activation is P.relu:  # one fused pass from the norm to the activation
            (a, h, sigma), u_pre = normalized_relu(
                fn, x, weights, feedback, residual, lambda shape, dtype: ctx.tangent_at(k, name, "pre", shape, dtype))
            to_z, pre_activation = _layer_norm_pullback(h, sigma), a  # a > 0 exactly where h + residual > 0
        else:
            if normalize is layer_norm:
                h, sigma = normalized(fn, x, weights, feedback)
                to_z = _layer_norm_pullback(value_of(h), sigma)
            else:
                z = linear_map(fn, x, weights, feedback)
                h = normalize(z, *norm_weights) if normalize is not None else z
                to_z = None if normalize is None else _pullback(normalize, value_of(z),
                                                                [value_of(w) for w in norm_weights],
                                                                list(norm_param_names))
            # the fused LN makes its output tangent afresh: the noise goes into it in place
            h, u_pre = ctx.inject(k, name, "pre", h, fresh=normalize is layer_norm)
            pre_activation = h if residual is None else h + residual
            a = activation(pre_activation)
        # relu and the fused pass make their output tangents afresh
        a, u_post = ctx.inject(k, name, "post", a, fresh=activation is P.relu)
        if not ctx.plan.record_points and ctx.plan.on_point is None:
            return a
        point = Point(
            block=k, name=name, h=value_of(h), mask=value_of(pre_activation) > 0,
            weight_grads=_weight_grads(fn, to_z, value_of(x), [value_of(w) for w in weights], list(param_names)),
            replica=replica, post=value_of(a), u_pre=u_pre, u_post=u_post)
        if ctx.plan.on_point is not None:
            ctx.plan.on_point(point)
        else:
            ctx.points.append(point)
        return a

    # --- to be provided by subclasses --------------------------------------------------
    def embed(self, x):
        raise NotImplementedError

    def block(self, k, params, h, ctx):
        raise NotImplementedError

    def pooled_features(self, h):
        raise NotImplementedError

    def replica_grid(self, h):
        """Block output as [N, P, G, c] for the replicated local losses."""
        raise NotImplementedError


def _layer_norm_pullback(h, sigma):
    """``delta -> (z̄, {})``: the local LN's exact reverse pass from its output h and σ."""
    return lambda delta: (fused.layer_norm_pullback(h, sigma, delta), {})


def _pullback(normalize, z, norm_weights, norm_names):
    """``delta -> (z̄, {norm param name: cotangent})``: the exact reverse pass of ``normalize`` at z."""
    def to_z(delta):
        _, back = autodiff.vjp(normalize, z, *norm_weights)
        z_bar, *norm_grads = back(delta)
        return z_bar, dict(zip(norm_names, norm_grads))
    return to_z


def _weight_grads(fn, to_z, x, weights, names):
    """``weight_grads(delta, through_norm=True)``: parameter cotangents of this layer alone.

    ``delta`` is a cotangent at the normalised pre-activation h [N, ...].  Through the norm, it
    is pulled back by ``to_z`` (the norm's exact Jacobian transpose; the norm's own parameters get
    their share) to z; with ``through_norm=False`` (FG-A's "NG" option) or no norm it is used at z
    directly.  Then the linear map's ``xᵀδ`` — from ``fn.param_pullback`` when the layer has one,
    else by one reverse pass through this layer only.
    """
    def weight_grads(delta, through_norm=True):
        grads = {}
        if to_z is not None and through_norm:
            delta, norm_grads = to_z(delta)
            grads.update(norm_grads)
        pullback = getattr(fn, "param_pullback", None)
        if pullback is not None:  # [W̄, b̄]; a layer without a bias takes W̄ only
            grads.update(zip(names, pullback(x, delta)))
        else:
            _, back = autodiff.vjp(lambda *w: fn(x, *w), *weights)
            grads.update(zip(names, back(delta)))
        return grads
    return weight_grads
