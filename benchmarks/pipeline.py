"""The block pipeline on this machine, and a cost model for more stages.

    python benchmarks/pipeline.py            # 30 steps per run
    python benchmarks/pipeline.py --quick    # 8 steps per run (under 3 minutes)

For LG-FG-A on LocalMixer M/8/16 (CIFAR-10-shaped input) and on the 4-layer MLP
(784-800-800-800-10, MNIST-shaped) with local heads, random images (no dataset files needed),
batch 128, float32, one BLAS thread per process: ``mpiexec -n S python -m dualnet train
--parallel pipeline --max-steps T`` (the runner, with the images swapped in) for S = 1 and 2
(S = 1 is the same runner with one stage), and LG-BP at S = 1 for the BP comparison.  The
runner's summary gives, per stage, the seconds spent computing and waiting for input, the peak
resident memory, and the forward bytes per batch.

Measured: examples/s = T·N / (wall time from the first stage's first step to the last stage's
last step); idle per stage against the fill-and-drain bubble expected for stage s, the time the
stages before it take for the first batch (Σ_{j<s} busy_j / T), plus the tail it waits for the
last stage at the end.

Cost model (stated networks, as in the data-parallel benchmark): 25 Gb/s Ethernet with 20 µs
latency and 200 Gb/s InfiniBand with 2 µs.  A model of L = 64 blocks like the measured one's
(per-block compute c = busy at S = 1 / its blocks; message m bytes per example, measured) on S
stages of L/S blocks:
    local greedy:   t_step = (L/S)·c + α + N·m/β,   throughput = N / t_step · E/(E + S − 1)
with E = 469 steps per epoch (60,000 examples, N = 128; fill and drain once per epoch), against
    BP (GPipe):     t_step = (M + S − 1) · ((L/S)·c_bp/M + 2(α + N·m/(M β))),   M = 4S micro-batches,
where c_bp is LG-BP's per-block step time (forward + backward through the block), the backward
messages are activation-sized gradients (as large as the forward ones), and the pipeline is
flushed every step (synchronous SGD).  Prints one JSON object.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # the LocalMixer on CIFAR-10-shaped images (its 8x8 patches need 32x32), the MLP on MNIST-shaped
    "localmixer-M/8/16": ["--model", "localmixer", "--config", "M/8/16", "--dataset", "cifar10"],
    "mlp-4": ["--model", "mlp", "--layers", "4", "--hidden", "800", "--dataset", "mnist"],
}
SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28)}
NETWORKS = {"ethernet-25G": (20e-6, 25e9 / 8), "infiniband-200G": (2e-6, 200e9 / 8)}  # (latency s, bytes/s)
BATCH, EPOCH_STEPS, DEPTH, SYNTHETIC = 128, 469, 64, 6000


def synthetic(name, **ignored):
    """Random images of dataset ``name``'s shape (no dataset files on the benchmark machines): the
    step time does not depend on the pixels."""
    from dualnet.data.datasets import Dataset
    rng = numpy.random.default_rng(0)
    images = lambda n: rng.random((n,) + SHAPES[name], dtype=numpy.float32)  # noqa: E731
    return Dataset(name, images(SYNTHETIC), rng.integers(0, 10, SYNTHETIC), images(256), rng.integers(0, 10, 256),
                   10, "synthetic (benchmarks/pipeline.py)")


def stage_main(argv):
    """Under mpiexec: the CLI's ``train`` with the synthetic MNIST."""
    from dualnet import cli, data
    data.load = synthetic
    raise SystemExit(cli.main(argv))


def run(model, rule, stages, steps, directory):
    """One run under mpiexec; returns the runner's summary (rank 0's)."""
    out = os.path.join(directory, f"{model.replace('/', '-')}-{rule}-{stages}")
    command = [shutil.which("mpiexec"), "-n", str(stages), sys.executable, os.path.abspath(__file__), "--stage",
               "train", *MODELS[model], "--rule", rule, "--parallel", "pipeline",
               "--batch-size", str(BATCH), "--train-limit", str(BATCH * steps), "--max-steps", str(steps),
               "--lr", "0.01", "--eval-limit", "256", "--out", out]
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "NUMBA_NUM_THREADS")}
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **threads, "PYTHONPATH": ROOT})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def measured(summary):
    steps, busy, idle = summary["steps"], summary["stage_busy_s"], summary["stage_idle_s"]
    fill = [sum(busy[:s]) / steps for s in range(len(busy))]
    return {"examples_per_s": steps * BATCH / summary["steps_wall_s"], "stages": summary["stages"],
            "busy_ms_per_step": [1000 * b / steps for b in busy], "idle_s": idle, "expected_fill_s": fill,
            "peak_rss_mb": summary["stage_peak_rss_mb"], "bytes_per_step": summary.get("bytes_per_batch") or 0.0}


def predictions(one_stage, bp_one_stage, blocks, message_bytes):
    """Predicted speedup over S = 1 for S = 4…64 on each network, local greedy and BP (GPipe)."""
    c = one_stage["busy_ms_per_step"][0] / 1000 / blocks
    c_bp = bp_one_stage["busy_ms_per_step"][0] / 1000 / blocks
    out = {}
    for network, (alpha, beta) in NETWORKS.items():
        local, bp = {}, {}
        base_local, base_bp = DEPTH * c, DEPTH * c_bp
        for stages in (4, 8, 16, 32, 64):
            t_local = DEPTH / stages * c + alpha + message_bytes / beta
            fill = EPOCH_STEPS / (EPOCH_STEPS + stages - 1)
            local[stages] = round(base_local / t_local * fill, 2)
            micro = 4 * stages
            t_bp = (micro + stages - 1) * (DEPTH / stages * c_bp / micro + 2 * (alpha + message_bytes / micro / beta))
            bp[stages] = round(base_bp / t_bp, 2)
        out[network] = {"lg-fg-a": local, "bp-gpipe": bp}
    return out


def main():
    if sys.argv[1:2] == ["--stage"]:
        return stage_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 steps per run (under 3 minutes)")
    args = parser.parse_args()
    steps = 8 if args.quick else 30
    report = {"steps": steps, "batch": BATCH, "by_model": {}, "runs": {}, "predicted_speedup": {}}
    with tempfile.TemporaryDirectory() as directory:
        for model in MODELS:
            runs = {stages: measured(run(model, "lg-fg-a", stages, steps, directory)) for stages in (1, 2)}
            bp = measured(run(model, "lg-bp", 1, steps, directory))
            report["runs"][model] = {"lg-fg-a": runs, "lg-bp": {1: bp}}
            report["by_model"][model] = {"examples_per_s": {str(s): round(r["examples_per_s"], 1)
                                                            for s, r in runs.items()},
                                         "bytes_per_step": runs[2]["bytes_per_step"]}
            blocks = sum(runs[1]["stages"])
            report["predicted_speedup"][model] = predictions(runs[1], bp, blocks, runs[2]["bytes_per_step"])
    headline = report["by_model"][next(iter(MODELS))]  # LG-FG-A on the first model: the flat keys
    report.update(examples_per_s=headline["examples_per_s"], bytes_per_step=headline["bytes_per_step"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
