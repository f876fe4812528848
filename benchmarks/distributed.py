"""Data-parallel training over MPI: bytes per step, step time at P = 1 and 2, and a cost model.

    python benchmarks/distributed.py            # 60 timed steps per measurement
    python benchmarks/distributed.py --quick    # 15 steps (under 3 minutes); prints the same JSON

Workload: the MLP 784-800-800-800-10 (ReLU, no BatchNorm; local heads for the local rules),
global batch 128, float32, synthetic MNIST-shaped data; every rule's data-parallel step exactly
as the runner takes it (``distributed.estimate_on_shard``, then the optimiser).  Measured, each in
its own ``mpiexec`` launch with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset:

* P = 1 with 2 BLAS threads (the whole machine in one process) and with 1 thread, at batch 128
  and 64: the compute-time model t(n) = a + b·n of one rank;
* P = 2 with 1 BLAS thread per rank: the measured data-parallel step;
* the bytes each rank sends per step (the payload of its Allreduces), and the Allreduce time of
  8 B and 8 MB between the two ranks of this machine (latency α and bandwidth β of loopback).

Cost model (strong scaling, global batch N fixed): a step on P ranks takes
t(P) = a + b·N/P + m·(2·⌈log₂P⌉·α + 2·(P−1)/P · bytes/β), m the number of Allreduces per step,
a tree for latency and a ring for bandwidth; speed-up(P) = t(1)/t(P).  It is validated against
the P = 2 measurement with loopback's α and β, then evaluated for two stated networks:
25 Gb/s Ethernet (α = 25 µs, β = 3.1 GB/s) and 200 Gb/s InfiniBand (α = 1.5 µs, β = 25 GB/s).
Writes benchmarks/distributed.png (predicted speed-up against P) and prints one JSON object
with the keys bytes_per_step.<rule> and predicted_speedup.<network>.<P> (for FG-W, whose ranks
exchange only scalars; predicted_speedup_by_rule holds every rule).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

RULES = ("bp", "fa", "dfa", "dkp", "fdfa", "fg-w", "lg-fg-w", "fg-a", "lg-fg-a", "guess")
SIZES = (784, 800, 800, 800, 10)
BATCH = 128
NETWORKS = {"ethernet-25g": (25e-6, 25e9 / 8), "infiniband-200g": (1.5e-6, 200e9 / 8)}
RANKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# ---------------------------------------------------------------------------------------- worker
def worker(steps, batch):
    from dualnet import distributed, models, optim, rules
    world = distributed.world(None if os.environ.get("DUALNET_SINGLE") else "data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    results = {}
    for name in RULES:
        rule = rules.create(name)
        model = models.create("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=SIZES[1],
                              layers=len(SIZES) - 1, batch_norm=False, local_heads=rule.needs_local_heads)
        params, state = model.init(0), model.init_state()
        rule.setup(model, params, 0)
        optimizer = optim.create("sgd", lr=1e-3)
        times, sent, calls = [], [], []
        for step in range(steps + 3):
            before, before_calls = world.bytes_sent, world.allreduces
            start = time.perf_counter()
            _, grads, _, new_state, _ = distributed.estimate_on_shard(
                world, rule, model, params, x, labels, np.random.default_rng([0, step]), state)
            optimizer.step(params, grads)
            times.append(time.perf_counter() - start)
            sent.append(world.bytes_sent - before)
            calls.append(world.allreduces - before_calls)
        results[name] = {"step_ms": 1e3 * float(np.median(times[3:])), "bytes": int(np.median(sent[3:])),
                         "allreduces": int(np.median(calls[3:]))}
    if world.size > 1:
        results["_link"] = link(world)
    if world.rank == 0:
        print(json.dumps(results))


def link(world):
    """Median Allreduce time of 8 B and of 8 MB between the ranks: (α, β)."""
    timings = {}
    for size in (1, 1 << 20):
        buffer = np.ones(size)
        samples = []
        for _ in range(30):
            start = time.perf_counter()
            world.allreduce(buffer)
            samples.append(time.perf_counter() - start)
        timings[size] = float(np.median(samples))
    alpha = timings[1] / 2  # a two-rank Allreduce: one exchange each way
    beta = 8 * (1 << 20) / max(timings[1 << 20] - timings[1], 1e-9)
    return {"alpha_s": alpha, "beta_bytes_per_s": beta}


# ---------------------------------------------------------------------------------------- driver
def launch(ranks, threads, steps, batch):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps), "--batch", str(batch)]
    if ranks > 1:
        command = [shutil.which("mpiexec"), "-n", str(ranks)] + command
    else:
        env["DUALNET_SINGLE"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
        raise SystemExit(f"benchmark worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_step(compute, bytes_, allreduces, ranks, alpha, beta):
    """t(P) in seconds from the compute model (a, b) and one network (α, β)."""
    a, b = compute
    if ranks == 1:
        return a + b * BATCH
    communication = allreduces * (2 * math.ceil(math.log2(ranks)) * alpha) + 2 * (ranks - 1) / ranks * bytes_ / beta
    return a + b * BATCH / ranks + communication


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="15 timed steps per measurement")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (15 if args.quick else 60)
    if args.worker:
        worker(steps, args.batch)
        return
    if shutil.which("mpiexec") is None:
        raise SystemExit("needs mpiexec: pip install -e '.[mpi]'")
    load_before = os.getloadavg()[0]
    whole = launch(1, 2, steps, BATCH)
    one_thread = launch(1, 1, steps, BATCH)
    half = launch(1, 1, steps, BATCH // 2)
    pair = launch(2, 1, steps, BATCH)
    loopback = pair.pop("_link")
    report = {"load_before": load_before, "load_after": os.getloadavg()[0], "loopback": loopback,
              "bytes_per_step": {}, "bp_bytes_per_step": pair["bp"]["bytes"], "step_ms": {},
              "predicted_speedup": {}, "predicted_speedup_by_rule": {}, "validation_p2": {}}
    for rule in RULES:
        b = (one_thread[rule]["step_ms"] - half[rule]["step_ms"]) / 1e3 / (BATCH - BATCH // 2)
        a = one_thread[rule]["step_ms"] / 1e3 - b * BATCH
        compute, measured = (a, b), pair[rule]
        report["bytes_per_step"][rule] = measured["bytes"]
        report["step_ms"][rule] = {"p1_two_threads": whole[rule]["step_ms"],
                                   "p1_one_thread": one_thread[rule]["step_ms"],
                                   "p2_one_thread_each": measured["step_ms"]}
        predicted = predicted_step(compute, measured["bytes"], measured["allreduces"], 2, loopback["alpha_s"],
                                   loopback["beta_bytes_per_s"])
        report["validation_p2"][rule] = {"predicted_ms": 1e3 * predicted, "measured_ms": measured["step_ms"]}
        for network, (alpha, beta) in NETWORKS.items():
            single = predicted_step(compute, 0, 0, 1, alpha, beta)
            speedups = {p: single / predicted_step(compute, measured["bytes"], measured["allreduces"], p, alpha, beta)
                        for p in RANKS}
            report["predicted_speedup_by_rule"].setdefault(rule, {})[network] = speedups
    report["predicted_speedup"] = report["predicted_speedup_by_rule"]["fg-w"]
    plot(report)
    print(json.dumps(report, indent=1))


def plot(report):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    figure, axes = plt.subplots(1, len(NETWORKS), figsize=(11, 4), sharey=True)
    for axis, network in zip(axes, NETWORKS):
        for rule in ("bp", "fg-a", "fg-w", "lg-fg-w", "dfa"):
            speedups = report["predicted_speedup_by_rule"][rule][network]
            axis.plot(list(speedups), list(speedups.values()), marker="o", label=rule)
        axis.plot(RANKS, RANKS, color="grey", linestyle=":", label="linear")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        axis.set_xlabel("ranks P")
        axis.set_title(network)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("predicted speed-up (global batch 128)")
    axes[0].legend()
    figure.suptitle("Data-parallel MLP 784-800-800-800-10: cost model from measured compute and bytes")
    figure.tight_layout()
    figure.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed.png"), dpi=110)


if __name__ == "__main__":
    main()
