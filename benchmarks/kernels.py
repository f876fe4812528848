"""Fused-op kernels vs their NumPy references, at LocalMixer sizes (CPU).

    python benchmarks/kernels.py [--repeats 7] [--dtype float32] [--json out.json]

Sizes (batch N = 128): S/1/1 (1 token, C = 256, G = 1), M/1/16 (1 token, C = 512, G = 16,
c = 32), M/8/16 (P = 64 tokens, C = 512, G = 16, c = 32); K in {1, 4} tangent directions.
Each row times one contract of ``dualnet.fused`` — the Numba kernel against the reference — and
the whole fused layer ``grouped_linear_layer_norm`` in forward mode against the same layer built
from two primitives (grouped_linear → layer_norm), both with the kernels (the choice that
``dualnet.nn.layers.normalized`` makes for LocalMixer's grouped layers).  A last group measures
the design choice of the grouped GEMMs: value and tangent rows in two batched GEMMs vs stacked
into one.  Times are the best of
``--repeats`` means of a few calls (the machine is shared; compare ratios within one run).
Prints a markdown table to stderr and a JSON object to stdout.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

import dualnet as dn
from dualnet import fused
from dualnet.kernels import cpu

CONFIGS = {  # name -> (rows M = N * P, channels C, groups G)
    "S/1/1": (128, 256, 1),
    "M/1/16": (128, 512, 16),
    "M/8/16": (128 * 64, 512, 16),
}
EPS = 1e-5


def best_time(fn, repeats, budget=0.05):
    """Best over ``repeats`` of the mean time of ``n`` calls, n chosen so one repeat takes ~budget s."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    calls = max(1, min(50, int(budget / max(once, 1e-6))))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def with_mode(mode, fn):
    def run():
        previous = os.environ.get("DUALNET_KERNELS")
        os.environ["DUALNET_KERNELS"] = mode
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["DUALNET_KERNELS"]
            else:
                os.environ["DUALNET_KERNELS"] = previous
    return run


def cases(config, directions, dtype, rng):
    """(label, kernel call, reference call) for one size and K."""
    rows, channels, groups = CONFIGS[config]
    width = channels // groups

    def draw(*shape):
        return rng.standard_normal(shape).astype(dtype)
    layer_norm, epilogue = cpu.load("layer_norm"), cpu.load("normalize_epilogue")
    dense, dense_tangent = draw(rows, channels), draw(directions, rows, channels)
    y, _, sigma = fused.reference_layer_norm_forward(dense, None, EPS)
    cotangents = draw(directions, rows, channels)
    gemm_value, gemm_tangent = draw(groups, rows, width), draw(groups, directions, rows, width)
    epilogue_args = (gemm_value, gemm_tangent, draw(groups, width), None, EPS, directions)
    yield ("layer_norm_forward [M, C]",
           lambda: layer_norm.layer_norm_forward(dense, dense_tangent, EPS),
           lambda: fused.reference_layer_norm_forward(dense, dense_tangent, EPS))
    yield ("layer_norm_jacobian [M, C] (pull-back)",
           lambda: layer_norm.layer_norm_jacobian(y, sigma, cotangents),
           lambda: fused.reference_layer_norm_jacobian(y, sigma, cotangents))
    yield ("normalize_epilogue [G, M, c] -> [M, G, c]",
           lambda: epilogue.normalize_epilogue(*epilogue_args),
           lambda: fused.reference_normalize_epilogue(*epilogue_args))

    x = dn.Dual(draw(rows, groups, width), draw(directions, rows, groups, width))
    weight, layer_bias = draw(groups, width, width) * 0.2, draw(groups, width)

    def fused_layer():
        return fused.grouped_linear_layer_norm(x, weight, layer_bias)

    def unfused_layer():
        return fused.layer_norm(fused.grouped_linear(x, weight, layer_bias))
    yield ("layer: grouped linear → LN, fused vs two ops (forward mode)", with_mode("auto", fused_layer),
           with_mode("auto", unfused_layer))

    x_rows, x_tangent_rows = x.value.reshape(rows, groups, width), x.tangent.reshape(directions * rows, groups, width)

    def two_gemms():
        return (x_rows.transpose(1, 0, 2) @ weight, x_tangent_rows.transpose(1, 0, 2) @ weight)

    def stacked_gemm():
        stacked = np.concatenate([x_rows, x_tangent_rows])
        return stacked.transpose(1, 0, 2) @ weight
    yield ("grouped GEMMs: two calls (kernel column) vs value+tangent stacked", two_gemms, stacked_gemm)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", help="also write the JSON result to this file")
    args = parser.parse_args()
    import numba
    dn.backend.warm_up_kernels((args.dtype,))
    rng = np.random.default_rng(0)
    results = []
    for config in CONFIGS:
        for directions in (1, 4):
            for label, kernel, reference in cases(config, directions, np.dtype(args.dtype), rng):
                kernel_s, reference_s = best_time(kernel, args.repeats), best_time(reference, args.repeats)
                results.append({"config": config, "K": directions, "op": label, "kernel_ms": kernel_s * 1e3,
                                "reference_ms": reference_s * 1e3, "speedup": reference_s / kernel_s})
                print(f"{config:7s} K={directions} {label:62s} {kernel_s * 1e3:9.3f} ms vs "
                      f"{reference_s * 1e3:9.3f} ms  x{reference_s / kernel_s:5.2f}", file=sys.stderr)
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(), "numpy": np.__version__,
              "numba": numba.__version__, "dtype": args.dtype, "repeats": args.repeats, "results": results}
    print("\n| config | K | op | kernel ms | reference ms | speed-up |\n|---|---|---|---|---|---|", file=sys.stderr)
    for r in results:
        print(f"| {r['config']} | {r['K']} | {r['op']} | {r['kernel_ms']:.3f} | {r['reference_ms']:.3f} | "
              f"{r['speedup']:.2f}× |", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
