"""What one forward pass should do, and what it saw: ``Plan``, ``Site``, ``Point``, ``Context``.

A model's forward function takes a ``Plan`` — which tangents to inject where, where to stop
gradients, which losses to return, which linear maps use feedback weights — and fills a
``Context`` with the perturbation points it passed.  Rules never re-implement a forward pass:
they choose a plan and read the points.

Sites (where a tangent may be injected):
  ``'pre'``    the normalised pre-activation of a hidden layer (after the post-linear norm,
               before the activation; in a residual block's last layer, before the residual add)
               — FG-A's site;
  ``'post'``   the post-activation of a hidden layer — FDFA's site;
  ``'output'`` a block's output — the site of Fournier's activity-space guesses;
  ``'logits'`` the read-out's output (block ``None``, name ``'readout'``) — where FG-A with
               ``readout='perturbed'`` perturbs the output layer as Bacho & Chu's FG-A does.

A plan's ``layer_hook`` may also replace a hidden layer's linear map and norm for one pass (a
``Layer`` describes them): the per-example weight tangents of Fournier's guesses enter there.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import primitives as P
from ..dual import Dual, add_tangent

SITE_KINDS = ("pre", "post", "output", "logits")


@dataclass(frozen=True)
class Site:
    """One place a tangent can be injected: ``block`` index, layer ``name``, ``kind`` and value shape."""
    block: int
    name: str
    kind: str
    shape: tuple
    dtype: object


@dataclass(frozen=True)
class Layer:
    """One hidden layer as ``Model.hidden`` runs it: z = fn(x, *θ) with θ = params[``param_names``],
    then h = normalize(z, *θ_norm) with θ_norm = params[``norm_param_names``] (``normalize`` None: h = z)."""
    block: int
    name: str
    fn: Callable
    normalize: Callable | None
    param_names: tuple
    norm_param_names: tuple


@dataclass
class Point:
    """A hidden layer as FG-A, DFA and FDFA see it.

    ``h``: the value at the 'pre' site (normalised pre-activation) [N, ...]; ``mask``: the
    activation's derivative there (after the residual add, if any), same shape; ``post``: the
    post-activation; ``u_pre``/``u_post``: tangents injected at the 'pre'/'post' sites (or None);
    ``weight_grads(delta, through_norm=True)``: {param name: cotangent} of this layer's
    parameters for a cotangent ``delta`` at h — a reverse pass through this one layer only
    (the norm's exact Jacobian transpose, then xᵀδ); ``replica``: how per-replica loss
    derivatives d[N, P, G] map onto this layer's units — 'example' (Σ over P, G), 'token'
    (Σ over G, per patch) or 'own' (units of group g in patch p use d[n, p, g]).
    """
    block: int
    name: str
    h: object
    mask: object
    weight_grads: Callable
    replica: str
    post: object = None
    u_pre: object = None
    u_post: object = None


@dataclass
class Plan:
    """The instructions for one forward pass.

    ``perturb(site) -> tangent | None``: tangent to add at a site (None: nothing injected).
    ``greedy``: stop-gradient at every block input (local greedy training).
    ``local_losses``: compute each block's local loss (needs local heads).
    ``replicated``: local losses as replicas [N, P, G] (Ren's replicated aggregator) instead of
    the pooled per-example loss [N].
    ``readout_stop_gradient``: the final classifier sees stop-gradient features.
    ``feedback``: {weight name: B} — those linear maps send cotangents back through B (FA).
    ``train``: batch statistics in BatchNorm (and running-average updates).
    ``contrastive``: the batch is two views stacked [view 1; view 2] (2N rows); local losses are
    Ren's symmetric InfoNCE on the heads' projections (temperature ``temperature``) — every
    block's with ``local_losses``, else the last block's only — and the read-out (trained on
    stop-gradient features of view 1) is the online linear probe.
    ``record_points``: keep every hidden layer's ``Point``; ``record_outputs``: keep every block
    output (the local heads' inputs).  Rules that perturb weights only need neither (local heads
    aside), and skipping them keeps forward mode's memory flat in depth.
    ``on_point(point)``: called with each hidden layer's ``Point`` as the pass reaches it, in
    place of keeping it (a rule can use a layer and let it go: memory flat in depth).
    ``layer_hook(layer) -> (fn, normalize)``: what each hidden layer (a ``Layer``) runs in place of
    its linear map and norm in this pass (None: the layer's own).
    """
    perturb: Callable | None = None
    greedy: bool = False
    local_losses: bool = False
    replicated: bool = False
    readout_stop_gradient: bool = False
    feedback: dict = field(default_factory=dict)
    train: bool = True
    contrastive: bool = False
    temperature: float = 0.5
    record_points: bool = True
    record_outputs: bool = True
    on_point: Callable | None = None
    layer_hook: Callable | None = None


class Context:
    """Collects the points of one forward pass and applies the plan's injections.  ``state``: the
    BatchNorm running statistics the pass reads (updates go to ``new_state``); ``over_ranks``: a
    ``layers.RankStatistics`` when the pass is a data-parallel shard's (its BatchNorms then use the
    whole batch's statistics), else None."""

    def __init__(self, plan, state=None, over_ranks=None):
        self.plan, self.points, self.state = plan, [], {} if state is None else state
        self.new_state, self.over_ranks = {}, over_ranks

    def tangent_at(self, block, name, kind, shape, dtype):
        """The plan's tangent for the site (block, name, kind) of a value of ``shape`` and ``dtype``, or None."""
        if self.plan.perturb is None:
            return None
        return self.plan.perturb(Site(block, name, kind, tuple(shape), dtype))

    def inject(self, block, name, kind, value, fresh=False):
        """Add the plan's tangent for this site to ``value``'s tangent; returns (value, tangent).
        ``fresh``: value's tangent may take it in place (see ``add_tangent``)."""
        val = value.value if isinstance(value, Dual) else value
        u = self.tangent_at(block, name, kind, val.shape, val.dtype)
        if u is None:
            return value, None
        return add_tangent(value, u, fresh), u

    def stop(self, x):
        return P.stop_gradient(x) if isinstance(x, Dual) else x
