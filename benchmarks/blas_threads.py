"""BLAS oversubscription: a GEMM and an FG-A step with 1 or 2 BLAS threads, on an idle core pair
and next to busy processes.

    python benchmarks/blas_threads.py [--repeats 40] [--busy 0,1,2]

On a 2-core machine, OpenBLAS's default of one thread per core is right while the machine is
idle; when other processes hold a core, its threads wait on each other at every GEMM and the
rate falls far below one thread's.  This runs, for each number of busy competitors (pure-Python
spin loops, one process each) and each BLAS thread count (threadpoolctl):

* ``gemm``: [128, 800] @ [800, 800] float32 (the MLP's hidden GEMM), GFLOP/s;
* ``fga``: one FG-A step of the MLP 784-800-800-800-10, batch 128 (ms).

The process re-executes itself with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset and records
the BLAS kernel (threadpoolctl) and the load average.  Only meaningful on an otherwise idle
machine.  Prints a markdown table to stderr and a JSON object to stdout.
"""
import argparse
import json
import multiprocessing
import os
import sys

import numpy as np
from gaussian import environment, reexec_without_blas_overrides
from peers import median_ms


def _spin(stop):
    """Keep one core busy with arithmetic (the event is polled every 10⁶ iterations)."""
    while not stop.is_set():
        total = 0
        for i in range(1_000_000):
            total += i


def measure(repeats):
    from dualnet import models, optim, rules
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((128, 800), np.float32), rng.standard_normal((800, 800), np.float32)
    gemm_ms = median_ms(lambda: a @ b, 5 * repeats)
    x = rng.standard_normal((128, 1, 28, 28), np.float32)
    y = rng.integers(0, 10, 128)
    model = models.create("mlp", hidden=800, layers=4, batch_norm=False)
    params, rule, sgd = model.init(0), rules.create("fg-a"), optim.SGD(1e-3)
    step_rng = np.random.default_rng(0)
    fga_ms = median_ms(lambda: sgd.step(params, rule(model, params, x, y, step_rng).grads), repeats)
    return {"gemm_gflops": 2 * 128 * 800 * 800 / gemm_ms / 1e6, "fga_ms": fga_ms}


def main():
    reexec_without_blas_overrides()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--busy", default="0,1,2", help="numbers of competing busy processes")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits
    report = {"environment": environment(), "load_before": os.getloadavg()[0], "results": {}}
    for busy in [int(n) for n in args.busy.split(",")]:
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(busy)]
        for spinner in spinners:
            spinner.start()
        try:
            for threads in (1, 2):
                with threadpool_limits(threads, user_api="blas"):
                    report["results"][f"busy{busy}.threads{threads}"] = measure(args.repeats)
        finally:
            stop.set()
            for spinner in spinners:
                spinner.join()
    report["load_after"] = os.getloadavg()[0]
    print("| busy processes | BLAS threads | GEMM GFLOP/s | FG-A step (ms) |\n|---|---|---|---|", file=sys.stderr)
    for key, result in report["results"].items():
        busy, threads = key.split(".")
        print(f"| {busy[4:]} | {threads[7:]} | {result['gemm_gflops']:.1f} | {result['fga_ms']:.1f} |", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
