"""Peak memory and time of one training step as an MLP deepens (Baydin et al. 2022, Figure 6).

    python benchmarks/memory_depth.py                 # width 1024, depths 2..32, batch 64
    python benchmarks/memory_depth.py --quick

For each depth: one FG-W step (weight tangents drawn per tensor from a seed on access and
regenerated for the update), one FG-A step keeping every layer for its update (``fg-a``), one
FG-A step with ``memory='recompute'`` (a value-only second pass regenerates each layer and its
seeded noise; ``fg-a-recompute``), and one BP step of an MLP of width 1024 without
norm layers, batch 64, float32.  Memory is the peak of NumPy allocations during the step
(tracemalloc) minus the parameters, the gradient dict the step returns and the input batch —
what the *method* needs on top of the model.  Prints a JSON object and writes
``memory_depth.png``.
"""
import argparse
import json
import os
import time
import tracemalloc

import math

import numpy as np

from dualnet import autodiff, losses, models, rules
from dualnet.nn.plan import Context, Plan
from dualnet.rules.base import Estimate, Rule

WIDTH, BATCH = 1024, 64


def segment_bounds(blocks, segments=None):
    """Cut ``blocks`` consecutive blocks into ``segments`` (default round(√blocks), at least 1)
    contiguous runs of near-equal length: a list of (start, stop)."""
    count = max(1, min(blocks, segments or round(math.sqrt(blocks))))
    edges = np.linspace(0, blocks, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


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

    def run_blocks(start, stop):
        chosen = [n for k in range(start, stop) for n in names[k]]

        def segment(h, *weights):
            local = dict(zip(chosen, weights))
            ctx = Context(plan)
            for k in range(start, stop):
                h = model.block(k, local, h, ctx)
            return h
        return autodiff.checkpoint(segment, f"blocks {start}-{stop - 1}"), chosen

    def loss_of(p):
        h = model.embed(x)
        for start, stop in segment_bounds(model.num_blocks, segments):
            run, chosen = run_blocks(start, stop)
            h = run(h, *(p[n] for n in chosen))
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

    def estimate(self, model, params, x, labels, rng, state):
        grads, loss = checkpointed_bp(model, params, x, labels, self.segments)
        return Estimate(grads, loss, {})


RULES = {"bp": ("bp", {}), "bp-checkpoint": (CheckpointedBackprop, {}), "fg-w": ("fg-w", {}),
         "fg-a": ("fg-a", {}), "fg-a-recompute": ("fg-a", {"memory": "recompute"})}


def measure(depth, label, repeats):
    model = models.create("mlp", input_shape=(1, 32, 32), num_classes=10, hidden=WIDTH, layers=depth,
                          batch_norm=False)
    params = model.init(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    name, options = RULES[label]
    rule = name(**options) if isinstance(name, type) else rules.create(name, **options)
    rule(model, params, x, y, rng)  # warm-up
    times, peaks = [], []
    param_bytes = sum(p.nbytes for p in params.values())
    for _ in range(repeats):
        tracemalloc.start()
        start = time.perf_counter()
        estimate = rule(model, params, x, y, rng)
        times.append(time.perf_counter() - start)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        grad_bytes = sum(g.nbytes for g in estimate.grads.values())
        peaks.append(peak - grad_bytes)
        del estimate
    return {"ms": 1000 * min(times), "peak_mb": min(peaks) / 2 ** 20, "params_mb": param_bytes / 2 ** 20}


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
    speed.set(ylabel="ms per step")
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
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_depth.png"),
                        help="the plot (default: beside this script, shown in benchmarks/README.md)")
    args = parser.parse_args()
    depths = [2, 4, 8, 16, 32]
    repeats = 1 if args.quick else 3
    result = {f"{name}_{d}": measure(d, name, repeats) for d in depths for name in RULES}
    summary = {f"{name}_peak_growth_2_to_32": round(result[f"{name}_32"]["peak_mb"] / result[f"{name}_2"]["peak_mb"], 2)
               for name in RULES}
    plot(result, depths, args.out)
    print(json.dumps({"summary": summary, "per_depth": {k: {m: round(v, 2) for m, v in r.items()}
                                                         for k, r in result.items()}}, indent=2))


if __name__ == "__main__":
    main()
