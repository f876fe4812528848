"""Peak memory and time of one training step as an MLP deepens (Baydin et al. 2022, Figure 6).

    python benchmarks/memory_depth.py                 # width 1024, depths 2..32, batch 64
    python benchmarks/memory_depth.py --depths 2 4 8 16 32 64 --repeats 5   # benchmarks/README.md
    python benchmarks/memory_depth.py --quick

For each depth: one FG-W step with ``memory='recompute'`` (weight tangents drawn per tensor from
a key on access and drawn again for the update, so none is kept; ``fg-w``), one FG-A step keeping
every layer for its update (``fg-a``), one FG-A step with ``memory='recompute'`` (a value-only
second pass regenerates each layer and its
seeded noise; ``fg-a-recompute``), one BP step, and one BP step with activation checkpointing
(``bp-checkpoint``: the L hidden layers cut into round(√L) segments, each a ``dualnet.checkpoint``
that keeps only its input and output on the tape and recomputes its interior in the backward
pass; ``checkpointed_bp``) of an MLP of width 1024 without norm layers, batch 64, float32.
Memory is the peak of NumPy allocations during the step (tracemalloc) minus the parameters, the
gradient dict the step returns and the input batch — what the *method* needs on top of the model.
Time is the fastest of ``--repeats`` steps taken in rounds (one step of every method per round),
without tracemalloc.  Prints a JSON object and writes ``memory_depth.png``.
"""
import argparse
import itertools
import json
import math
import os
import time
import tracemalloc

import numpy as np

from dualnet import Dual, autodiff, losses, models, rules
from dualnet.nn.plan import Context, Plan
from dualnet.rules.base import Estimate, Rule

WIDTH, BATCH = 1024, 64


def segment_bounds(blocks, segments=None):
    """Cut ``blocks`` consecutive blocks into ``segments`` (default round(√blocks), at least 1)
    contiguous runs of near-equal length: a list of (start, stop)."""
    count = max(1, min(blocks, segments or round(math.sqrt(blocks))))
    edges = np.linspace(0, blocks, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def checkpointed_bp(model, params, x, labels, segments=None):
    """The exact gradient of the mean cross-entropy by reverse mode with activation checkpointing.

    The model's blocks are cut into ``segment_bounds`` runs; each run is one ``dualnet.checkpoint``
    of h ↦ block_{b-1}(… block_a(h)) taking (h, θ_a, …, θ_{b-1}).  The tape then holds the S segment
    inputs (each [N, width]) instead of every layer's intermediates, and the backward pass re-runs
    one segment at a time: with S = √L, activation memory O(√L) instead of O(L) for one extra
    forward pass.  The embedding and the read-out stay on the ordinary tape.  Models whose blocks
    keep running statistics (BatchNorm) are refused: recomputation would update them twice.

    Returns ({name: gradient}, mean loss).
    """
    if model.init_state():
        raise ValueError(f"checkpointed_bp: {model.name} keeps running statistics; build it without norm layers")
    names = {k: sorted(n for n in params if model.block_of(n) == k) for k in range(model.num_blocks)}
    plan = Plan(record_points=False, record_outputs=False)

    def run_blocks(start, stop, h, p):
        chosen = [n for k in range(start, stop) for n in names[k]]

        def segment(h, *weights):
            local = dict(zip(chosen, weights))
            ctx = Context(plan)
            for k in range(start, stop):
                h = model.block(k, local, h, ctx)
            return h
        label = f"blocks {start}-{stop - 1}"
        weights = [p[n] for n in chosen]
        if isinstance(h, Dual):
            return autodiff.checkpoint(segment, label)(h, *weights)
        # the batch itself needs no cotangent: keep it out of the arguments (checkpoint differentiates all)
        return autodiff.checkpoint(lambda *w: segment(h, *w), label)(*weights)

    def loss_of(p):
        h = model.embed(x)
        for start, stop in segment_bounds(model.num_blocks, segments):
            h = run_blocks(start, stop, h, p)
        logits = model.readout(p, model.pooled_features(h), Context(plan))
        return losses.cross_entropy(logits, labels)

    loss, pullback = autodiff.vjp(loss_of, params)
    return pullback(np.ones((), dtype=loss.dtype))[0], float(loss)


class CheckpointedBackprop(Rule):
    """BP with activation checkpointing, as a rule (``checkpointed_bp``) for ``measure``."""
    name = "bp-checkpoint"

    def __init__(self, segments=None):
        super().__init__()
        self.segments = segments

    def estimate(self, model, params, x, labels, rng, state, batch):
        grads, loss = checkpointed_bp(model, params, x, labels, self.segments)
        return Estimate(grads, loss, {})


RULES = {"bp": ("bp", {}), "bp-checkpoint": (CheckpointedBackprop, {}), "fg-w": ("fg-w", {"memory": "recompute"}),
         "fg-a": ("fg-a", {}), "fg-a-recompute": ("fg-a", {"memory": "recompute"})}


def measure(depth, repeats):
    """Every method of ``RULES`` at one depth: {label: {"ms", "peak_mb", "params_mb"}}.

    Memory: one step under tracemalloc per method (the peak is deterministic).  Time: ``repeats``
    rounds without tracemalloc, each round one step of every method in turn, so that a change in
    the machine's load hits all of them; the fastest step of each method is kept.
    """
    model = models.create("mlp", input_shape=(1, 32, 32), num_classes=10, hidden=WIDTH, layers=depth,
                          batch_norm=False)
    params = model.init(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    steps = {label: (name(**options) if isinstance(name, type) else rules.create(name, **options))
             for label, (name, options) in RULES.items()}
    param_bytes = sum(p.nbytes for p in params.values())
    result = {}
    for label, rule in steps.items():
        rule(model, params, x, y, rng)  # warm-up
        tracemalloc.start()
        grads = dict(rule(model, params, x, y, rng).grads)  # formed (a linear weight's arrive as factors)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        grad_bytes = sum(g.nbytes for g in grads.values())
        del grads
        result[label] = {"peak_mb": (peak - grad_bytes) / 2 ** 20, "params_mb": param_bytes / 2 ** 20,
                         "ms": float("inf")}
    for _ in range(repeats):
        for label, rule in steps.items():
            start = time.perf_counter()
            dict(rule(model, params, x, y, rng).grads)
            result[label]["ms"] = min(result[label]["ms"], 1000 * (time.perf_counter() - start))
    return result


def plot(result, depths, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in RULES:
        memory.plot(depths, [result[f"{name}_{d}"]["peak_mb"] for d in depths], marker="o", label=name)
        speed.plot(depths, [result[f"{name}_{d}"]["ms"] for d in depths], marker="o", label=name)
    memory.set(ylabel="peak memory beyond params+grads (MB)")
    speed.set(ylabel="ms per step", yscale="log")
    for axes in (memory, speed):
        axes.set_xscale("log", base=2)
        axes.set_xticks(depths, [str(d) for d in depths])
        axes.minorticks_off()
        axes.set_xlabel("layers")
    memory.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="layers, counting the output")
    parser.add_argument("--repeats", type=int, default=3, help="steps timed per method and depth (the minimum is kept)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_depth.png"),
                        help="the plot (default: beside this script, shown in benchmarks/README.md)")
    args = parser.parse_args()
    depths, first, last = args.depths, min(args.depths), max(args.depths)
    repeats = 1 if args.quick else args.repeats
    result = {f"{name}_{d}": values for d in depths for name, values in measure(d, repeats).items()}
    summary = {f"{name}_peak_growth_{first}_to_{last}":
               round(result[f"{name}_{last}"]["peak_mb"] / result[f"{name}_{first}"]["peak_mb"], 2) for name in RULES}
    plot(result, depths, args.out)
    print(json.dumps({"summary": summary, "per_depth": {k: {m: round(v, 2) for m, v in r.items()}
                                                         for k, r in result.items()}}, indent=2))


if __name__ == "__main__":
    main()
