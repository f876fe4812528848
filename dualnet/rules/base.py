"""What every learning rule shares: the ``Rule`` interface, the ``Estimate`` it returns, the
objectives of the backprop family, and the diagnostics.

A rule turns ``(model, params, x, labels, rng, state)`` into a gradient estimate for every
parameter; an optimiser applies it.  Rules with their own persistent tensors (feedback
matrices, auxiliary nets) keep them in ``rule.state`` and round-trip them through
``state_dict`` / ``load_state_dict`` for exact resume.
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

import numpy

from .. import autodiff, backend
from .. import primitives as P
from ..dual import value_of
from ..gradients import Gradients
from ..nn.layers import linear
from ..nn.plan import Plan


@dataclass
class Estimate:
    """``grads``: {param name: array}, a ``Gradients`` mapping (a linear layer's weight gradient is
    formed from its factors when first read; an optimiser may apply it without forming it);
    ``loss``: mean final loss (float; None on a pipeline stage before the last, which has no
    read-out); ``state``: model running statistics after the step;
    ``diagnostics``: per-layer cosine/norm when requested; ``batch_wide``: names whose gradient is
    already the whole batch's (``Batch.mean`` was applied: the data-parallel runner must not reduce
    them again)."""
    grads: dict
    loss: float
    state: dict
    diagnostics: dict = field(default_factory=dict)
    batch_wide: frozenset = frozenset()

    def __post_init__(self):
        if not isinstance(self.grads, Gradients):  # a linear weight's entry may be its factors (an Outer)
            self.grads = Gradients(self.grads)


def _same(x):
    return x


@dataclass(frozen=True)
class Batch:
    """Where the examples of an estimate sit in the step's whole batch: rows ``start:stop`` of
    ``total``.  ``mean(x)`` turns a mean over these rows into the mean over the whole batch: the
    identity in one process; under data parallelism, Σ_r (N_r/N) x_r over the ranks.  Rules use
    it for what must be the batch's, not the shard's (FG-W's directional derivatives, DKP's and
    FDFA's feedback updates), and key per-example noise by the global row index."""
    start: int
    stop: int
    total: int
    mean: Callable = _same

    @classmethod
    def whole(cls, n):
        """All ``n`` examples of a batch in one process."""
        return cls(0, n, n)


# Named seed streams of the rules' own tensors: a rule seeded with ``seed`` draws stream s's
# i-th tensor from numpy.random.default_rng(seed + SEED_STREAMS[s] + i), apart from the other streams.
SEED_STREAMS = {
    "feedback-alignment": 7919,  # FA: one fixed B per weight, drawn in declaration order
    "direct-feedback": 104729,   # DFA: B_l of each hidden layer, keyed by (block, layer name)
    "random-local-classifier": 15485863,  # dfa-local (Ren's "DFA"): C_l of each hidden layer, keyed likewise
}


def stream_rng(seed, stream, index=0):
    """The NumPy generator of tensor ``index`` of the named seed ``stream`` (see ``SEED_STREAMS``)."""
    return numpy.random.default_rng(seed + SEED_STREAMS[stream] + index)


# The plan each member of the backprop family trains with, and the rule whose gradient
# another rule estimates ("its own target").
PLANS = {
    "global": dict(),
    "local": dict(local_losses=True, readout_stop_gradient=True),
    "local-greedy": dict(local_losses=True, greedy=True, readout_stop_gradient=True),
}


def contrastive_plan(options, contrastive, temperature):
    """Plan options for Ren's contrastive setting: InfoNCE losses, read-out as a stop-gradient probe."""
    if not contrastive:
        return dict(options)
    return {**options, "contrastive": True, "temperature": temperature, "readout_stop_gradient": True}


class Rule:
    """Base class.  ``name``; ``target``: the objective whose gradient this rule follows (see
    ``PLANS``); ``needs_local_heads``: whether it trains with local losses, so that a model whose
    local heads are optional should be built with them (the runner asks)."""
    name = "rule"
    target = "global"
    contrastive = False  # x holds two augmented views stacked (the runner makes them)
    temperature = 0.5

    @property
    def needs_local_heads(self):
        return self.target != "global"

    pipeline_tangents = False
    """With ``pipeline == 'signal'``: the stages' forward messages carry the output's tangent too."""

    @property
    def pipeline(self):
        """How the block pipeline (``--parallel pipeline``) trains this rule: 'local' (every block from
        its own local loss, nothing from later blocks), 'signal' (``forward_pass``, ``signal`` and
        ``updates``: the blocks need only a small per-example signal from the last stage), or None
        (it needs later blocks)."""
        return "local" if self.target == "local-greedy" else None

    def pipeline_refusal(self):
        """One line saying why these options cannot run in the block pipeline, or None."""
        if self.contrastive:
            return "contrastive=True (two augmented views per batch) is not supported"
        return None

    def __init__(self, diagnostics=False):
        self.diagnostics = diagnostics
        self.state = {}

    def setup(self, model, params, seed=0):
        """Create rule-owned tensors (feedback matrices...).  Called once before training."""

    def state_dict(self):
        return {k: backend.to_numpy(v) for k, v in self.state.items()}

    def load_state_dict(self, state):
        self.state = {k: backend.to_device(v) for k, v in state.items()}

    def __call__(self, model, params, x, labels, rng, state=None, batch=None):
        """The estimate on (x, labels); ``batch`` (a ``Batch``) places these examples in the step's
        whole batch (default: they are all of it)."""
        estimate = self.estimate(model, params, x, labels, rng, state, batch or Batch.whole(len(labels)))
        if self.diagnostics:
            exact = exact_gradients(model, params, x, labels, self.target, state, contrastive=self.contrastive,
                                    temperature=self.temperature)[0]
            estimate.diagnostics = alignment(estimate.grads, exact)
        return estimate

    def estimate(self, model, params, x, labels, rng, state, batch):
        raise NotImplementedError


def objective(trace):
    """Mean final loss plus the mean of every local loss (pooled per example); a pipeline stage's
    trace (``Model.forward``'s ``blocks``) has only its own blocks' losses, and the final loss only
    on the last stage."""
    terms = [loss for loss in [trace.loss] + list(trace.local_losses) if loss is not None]
    total = P.mean(terms[0])
    for loss in terms[1:]:
        total = total + P.mean(loss)
    return total


def exact_gradients(model, params, x, labels, target="global", state=None, feedback=None, contrastive=False,
                    temperature=0.5):
    """Reverse-mode gradient of the ``target`` objective (``PLANS``); returns (grads, trace), grads
    a ``Gradients`` mapping (a weight multiplied once, as in a linear layer, may be held as factors).

    ``feedback`` ({weight name: B}) turns the reverse pass into feedback alignment;
    ``contrastive``: x holds two views stacked and the losses are InfoNCE (see ``Plan``).
    """
    plan = Plan(feedback=feedback or {}, **contrastive_plan(PLANS[target], contrastive, temperature))
    traces = []

    def loss_of(p):
        trace = model.forward(p, x, labels, plan, state)
        traces.append(trace)
        return objective(trace)

    total, pullback = autodiff.vjp(loss_of, params, factored=True)
    grads = pullback(numpy.ones((), dtype=value_of(total).dtype))[0]
    return Gradients(grads), traces[0]


def mean_value(x):
    """The mean of ``x``'s value as a float; None for None (a pipeline stage without the read-out)."""
    return None if x is None else float(value_of(x).mean())


def output_error(logits, labels):
    """∂(mean cross-entropy)/∂logits = (softmax − onehot) / N, from values only."""
    logits = value_of(logits)
    xp = backend.namespace(logits)
    error = P.softmax(logits, axis=-1)
    error[xp.arange(len(labels)), labels] -= 1
    return error / len(labels)


def local_head_grads(model, params, trace, labels, contrastive=False, temperature=0.5):
    """Exact gradients of every local head — the parameters its model declares as block k's local
    head (a linear head or an aux net) — from its pooled local loss (heads always backprop); with ``contrastive``,
    from the pooled InfoNCE of the two views stacked in the block output.

    A linear head (``model.linear_local_heads``) on features f = ``local_head_input(h)`` [N, F]
    takes the read-out's closed form: e = (softmax(f W + b) − onehot) / N, W̄ = fᵀ e, b̄ = Σ_n e_n
    (no reverse pass); the others go through ``autodiff.vjp``."""
    grads = {}
    for k, block_output in enumerate(trace.outputs):
        names = sorted(model.parameters_of(k, local_head=True))
        if not names or block_output is None:  # None: a block of an earlier pipeline stage
            continue
        h = value_of(block_output)
        if model.linear_local_heads and not contrastive:
            weight, bias = f"blocks.{k}.head.weight", f"blocks.{k}.head.bias"
            features = value_of(model.local_head_input(h))
            error = output_error(features @ value_of(params[weight]) + value_of(params[bias]), labels)
            grads.update(zip((weight, bias), linear.param_pullback(features, error)))
            continue

        def loss_of(*weights, k=k, h=h, names=names):
            heads = dict(zip(names, weights))
            if contrastive:
                return P.mean(model.contrastive_loss(k, heads, h, False, temperature))
            return P.mean(model.local_loss(k, heads, h, labels, replicated=False))
        _, pullback = autodiff.vjp(loss_of, *(value_of(params[name]) for name in names))
        grads.update(zip(names, pullback(numpy.ones((), dtype=h.dtype))))
    return grads


def alignment(estimate, exact):
    """Per-tensor cosine similarity between an estimate and the exact gradient, and norms."""
    report = {}
    for name, g in estimate.items():
        if name not in exact:
            continue
        a, b = backend.to_numpy(g).ravel().astype(numpy.float64), backend.to_numpy(exact[name]).ravel()
        denominator = numpy.linalg.norm(a) * numpy.linalg.norm(b)
        report[name] = {"cosine": float(a @ b / denominator) if denominator > 0 else 0.0,
                        "norm": float(numpy.linalg.norm(a)), "exact_norm": float(numpy.linalg.norm(b))}
    return report


def replica_factors(d, shape, replica):
    """The loss derivatives that reach a layer's units: ``(factors [K, N, A], B)``, where unit
    block a of example n (B consecutive units of its flattened units, A·B of them) takes
    factors[k, n, a] in direction k.

    ``d`` is [K, N] (one loss per example) or [K, N, P, G] (replicated losses); ``shape`` is the
    layer's [N, ...] shape.  'example': Σ over P and G (A = 1); 'token' (layer [N, P, C]): Σ over
    G, shared by the patch's C channels (A = P); 'own' (layer [N, P, C] or [N, P, G, c]): the
    units of group g in patch p take d[n, p, g] (A = P·G).
    """
    k, n = d.shape[:2]
    units = prod(shape[1:])
    if d.ndim == 2:
        return d[..., None], units
    patches, groups = d.shape[2:]
    if replica == "example" or (patches == 1 and groups == 1):
        return d.sum(axis=(2, 3))[..., None], units
    if replica == "token":
        return d.sum(axis=3), units // patches
    if replica == "own":
        return d.reshape(k, n, patches * groups), units // (patches * groups)
    raise ValueError(f"replica_factors: unknown replica mapping {replica!r}")


def reference_site_gradient(factors, values, mask):
    """Σ_k factors_k · values_k over the K directions (in the order k = 0, 1, ...), times ``mask``.

    factors [K, N, A]; values [K, N, A, B] (each factor scales its block of B values); mask
    [N, A, B] bool, or None for none.  Returns [N, A, B].  The contract of the ``site_gradient``
    kernels (module ``site_gradient``), which do it in one pass.
    """
    total = factors[0, ..., None] * values[0]
    for direction in range(1, values.shape[0]):
        total += factors[direction, ..., None] * values[direction]
    if mask is not None:
        total *= mask
    return total


def site_gradient(d, values, replica, mask=None):
    """FG-A's gradient at a layer's site from its noise ``values`` u [K, N, ...]: Σ_k e_k ⊙ u_k
    ⊙ mask, where e_k is direction k's loss derivatives d mapped onto the layer's units
    (``replica_factors``: d [K, N] or replicas [K, N, P, G]) and ``mask`` [N, ...] (bool, e.g. the
    ReLU's) zeroes the units it marks False.  Returns [N, ...] in one kernel pass
    (``reference_site_gradient``), without the [K, N, ...] products."""
    factors, block = replica_factors(d, values.shape[1:], replica)
    directions, rows, blocks = factors.shape
    grid = values.reshape(directions, rows, blocks, block)  # the reference and the kernels promote mixed dtypes
    mask = None if mask is None else mask.reshape(rows, blocks, block)
    kernel = backend.kernel("site_gradient", "site_gradient", reference_site_gradient, factors, grid)
    return kernel(factors, grid, mask).reshape(values.shape[1:])
