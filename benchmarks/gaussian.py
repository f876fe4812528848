"""The counter-based Gaussian draw (dualnet.noise) against NumPy's, at FG-A sizes.

    python benchmarks/gaussian.py [--rounds 200] [--json out.json]

Sizes: 2 × 128 × 512 = 131 072 numbers (LocalMixer M/1/16: two perturbed sites, batch 128) and
3 × 128 × 800 = 307 200 (MLP 784-800-800-800-10: three hidden layers, batch 128), 2²⁰, and
128 × 64 × 512 = 4 194 304 (one perturbed layer of LocalMixer M/8/16, batch 128).
Methods, each returning a fresh array like the others:

* ``numpy``: ``numpy.random.default_rng(0).standard_normal(n, dtype)`` (PCG64 + ziggurat);
* ``dualnet``: ``dualnet.noise.normal(key, n, dtype)`` (the Numba kernel: one thread below
  ``kernels.cpu.PARALLEL_MIN_ELEMENTS`` = 2²⁰ numbers, one run of whole blocks per Numba thread
  from there on; the same numbers either way);
* ``numpy_out`` and ``dualnet_out``: the same two filling a preallocated array (``out=``);
* ``reference``: the xp reference on NumPy (what CuPy runs; ``DUALNET_KERNELS=reference``).

A last measurement puts the draws inside an FG-A-shaped chain of GEMMs (``gemm_chain``), with
OpenBLAS on its configured threads and on one; it is only meaningful on an idle machine (with
two BLAS threads on a busy 2-core machine the GEMMs themselves slow down several-fold).

The four alternate within each round; a round's ratio is numpy's time over dualnet's (fresh
arrays, or both with out=), and the table gives the medians over rounds of times and ratios.
The reference is timed afterwards (its large temporaries, if interleaved, slowed NumPy's own
draws by 1.3-2.7×).  The process re-executes itself with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset (as the other speed benchmarks run), and
records the load average before and after, the thread pools (threadpoolctl) and the versions.
Prints a markdown table to stderr and a JSON object to stdout.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

SIZES = {"M/1/16 FG-A (2x128x512)": 2 * 128 * 512, "MLP FG-A (3x128x800)": 3 * 128 * 800, "2^20": 1 << 20,
         "M/8/16 FG-A layer (128x64x512)": 128 * 64 * 512}
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def reexec_without_blas_overrides():
    if any(name in os.environ for name in UNSET):
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def environment():
    import numba
    from threadpoolctl import threadpool_info
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "llvm_cpu": __import__("llvmlite.binding", fromlist=["binding"]).get_host_cpu_name(),
            "threadpools": [{k: pool.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                            for pool in threadpool_info()],
            "blas_overrides_unset": all(name not in os.environ for name in UNSET)}


def gemm_chain(noise, rounds):
    """The draws inside an FG-A-shaped step of the MLP 784-800-800-800 (batch 128, float32): per
    layer the GEMMs z = hW, a tangent product hW + u with u the layer's [128, 800] noise, and an
    update product hᵀ(·).  The same chain runs with NumPy's
    draw, dualnet's, and np.zeros in place of the draw (the baseline), interleaved; a draw's cost
    is the chain's median time minus the baseline's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 784)).astype(np.float32)
    weights = [(rng.standard_normal(shape) * 0.03).astype(np.float32) for shape in
               [(784, 800), (800, 800), (800, 800)]]
    generator = np.random.default_rng(1)
    draws = {"numpy": lambda site, shape: generator.standard_normal(shape, dtype=np.float32),
             "dualnet": lambda site, shape: noise.normal((1, 7, site), shape, np.float32),
             "zeros": lambda site, shape: np.zeros(shape, np.float32)}

    def step(draw):
        h = x
        for site, w in enumerate(weights):
            z = h @ w
            tangent = h @ w + draw(site, z.shape)
            h = np.maximum(z, 0)
            h.T @ tangent
    times = {name: [] for name in draws}
    for _ in range(rounds):
        for name, draw in draws.items():
            start = time.perf_counter()
            step(draw)
            times[name].append(time.perf_counter() - start)
    median = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return {"median_ms": median, "draw_ms": {name: median[name] - median["zeros"] for name in ("numpy", "dualnet")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--reference-rounds", type=int, default=10)
    parser.add_argument("--json", help="also write the JSON result here")
    args = parser.parse_args()
    reexec_without_blas_overrides()

    import dualnet  # noqa: F401  (binds dualnet.kernels)
    from dualnet import noise

    load_before = os.getloadavg()
    noise.warm_up()
    generator = np.random.default_rng(0)
    key = noise.key(2026, 12, 2)

    def reference(n, dtype):
        return noise.reference_normal_flat(key, 0, n, dtype)

    methods = {"numpy": lambda n, dtype, out: generator.standard_normal(n, dtype=dtype),
               "dualnet": lambda n, dtype, out: noise.normal(key, n, dtype, xp=np),
               "numpy_out": lambda n, dtype, out: generator.standard_normal(n, dtype=dtype, out=out),
               "dualnet_out": lambda n, dtype, out: noise.normal(key, n, out=out)}
    results = []
    for label, n in SIZES.items():
        for dtype in (np.float32, np.float64):
            out = np.empty(n, dtype)
            times = {name: [] for name in methods}
            for _ in range(args.rounds):
                for name, draw in methods.items():
                    start = time.perf_counter()
                    draw(n, dtype, out)
                    times[name].append(time.perf_counter() - start)
            times = {name: np.array(t) for name, t in times.items()}
            results.append({"size": label, "n": n, "dtype": np.dtype(dtype).name,
                            "median_ms": {name: 1e3 * float(np.median(t)) for name, t in times.items()},
                            "median_speedup_over_numpy": float(np.median(times["numpy"] / times["dualnet"])),
                            "median_speedup_over_numpy_out":
                                float(np.median(times["numpy_out"] / times["dualnet_out"]))})
    # the reference last: its large temporaries change how the allocator serves the others' arrays
    for entry in results:
        dtype = np.dtype(entry["dtype"])
        times = []
        for _ in range(args.reference_rounds):
            start = time.perf_counter()
            noise.reference_normal_flat(key, 0, entry["n"], dtype)
            times.append(time.perf_counter() - start)
        entry["median_ms"]["reference"] = 1e3 * float(np.median(times))
    from threadpoolctl import threadpool_limits
    in_step = {"blas_threads_default": gemm_chain(noise, args.rounds)}
    with threadpool_limits(limits=1, user_api="blas"):
        in_step["blas_threads_1"] = gemm_chain(noise, args.rounds)
    load_after = os.getloadavg()
    report = {"environment": environment(), "load_average_before": load_before, "load_average_after": load_after,
              "rounds": args.rounds, "results": results, "in_gemm_chain": in_step}

    print("| size | dtype | numpy ms | dualnet ms | speed-up | speed-up, both with out= | reference ms |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for e in results:
        ms = e["median_ms"]
        print(f"| {e['size']} | {e['dtype']} | {ms['numpy']:.3f} | {ms['dualnet']:.3f} | "
              f"{e['median_speedup_over_numpy']:.2f}× | {e['median_speedup_over_numpy_out']:.2f}× | "
              f"{ms['reference']:.2f} |", file=sys.stderr)
    for threads, chain in in_step.items():
        ms = chain["median_ms"]
        print(f"GEMM chain, {threads}: no draw {ms['zeros']:.2f} ms, NumPy draws {ms['numpy']:.2f} ms, dualnet "
              f"draws {ms['dualnet']:.2f} ms; the draws cost {chain['draw_ms']['numpy']:.2f} vs "
              f"{chain['draw_ms']['dualnet']:.2f} ms", file=sys.stderr)
    print(f"load average before {load_before}, after {load_after}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
