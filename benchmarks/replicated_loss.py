"""Fused vs naive replicated cross-entropy (Ren et al. 2023, Figure 5): time and memory.

Replicated loss: features x [N, P, G, c] → pooled linear head → one CE per (n, p, g), where
replica (p, g) sees only its own slice live (see ``dualnet.losses``).  Two implementations,
both through dualnet's forward and reverse mode, float32:

* ``fused``: ``dualnet.losses.replicated_cross_entropy`` (Numba kernels when available;
  ``fused_reference`` is the same primitive with ``DUALNET_KERNELS=reference``, NumPy einsum);
* ``naive``: literal replication with dualnet primitives — the replicated pooled features
  [N, P, G, G·c] = stop_gradient(x̄) + (1/P)·(the replica's own live slice put in its group),
  then the linear head and CE for every replica.

Two passes are measured: ``jvp`` (value + tangent of every replica for K directions on x, the
LG-FG-A use) and ``vjp`` (forward on the tape + pull-back of a uniform cotangent: x, W, b).
Time: the minimum over ``--repeats`` (one warm-up first; the least-disturbed run on a shared
machine).  Memory: tracemalloc's peak of what the
pass allocates beyond its inputs (NumPy reports its buffers to tracemalloc), measured in a
separate call of the same pass in the same process.

Sizes: M/8/16 (N=128, P=64, G=16, c=32, 10 classes, K=10).  The naive pass would need more
than 8 GB at N=128 (its tangent alone is K·N·P·G·G·c floats), so it is measured at
``--naive-examples`` and twice that many examples (the growth is reported) and scaled linearly
in N from the larger to 128 (every array it allocates is per-example); the fused pass is
measured at those sizes and at 128.  L/32/64 (P=1024, G=64, c=32): the
naive pass's memory is computed (a lower bound: the value and tangent of the replicated
features alone), the fused pass is measured at ``--large-examples`` examples and scaled to 128.

Run: ``python benchmarks/replicated_loss.py [--repeats 5]``; prints one JSON object.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import time
import tracemalloc

import numpy

import dualnet as dn
from dualnet import losses

FLOAT_BYTES = 4
M_8_16 = dict(examples=128, patches=64, groups=16, channels=32)
L_32_64 = dict(examples=128, patches=1024, groups=64, channels=32)
CLASSES, DIRECTIONS = 10, 10


def naive_replicated_cross_entropy(x, W, b, labels):
    """Literal replication: replicated pooled features [N, P, G, G·c], one CE per replica."""
    n, patches, groups, c = (x.value if isinstance(x, dn.Dual) else x).shape
    frozen = dn.stop_gradient(x)
    own_slice = dn.einsum("npgc,gh->npghc", x - frozen, numpy.eye(groups, dtype=numpy.float32))
    own_slice = own_slice.reshape((n, patches, groups, groups * c))
    features = frozen.mean(axis=1).reshape((n, 1, 1, groups * c)) + own_slice * (1.0 / patches)
    labels = numpy.broadcast_to(labels[:, None, None], (n, patches, groups))
    return losses.cross_entropy(features @ W + b, labels, reduction="none")


IMPLEMENTATIONS = {"fused": losses.replicated_cross_entropy, "naive": naive_replicated_cross_entropy}


def make_problem(rng, examples, patches, groups, channels):
    x = rng.standard_normal((examples, patches, groups, channels), dtype=numpy.float32)
    W = rng.standard_normal((groups * channels, CLASSES), dtype=numpy.float32) * 0.05
    b = numpy.zeros(CLASSES, numpy.float32)
    labels = rng.integers(0, CLASSES, size=examples)
    x_tangent = rng.standard_normal((DIRECTIONS,) + x.shape, dtype=numpy.float32)
    return x, W, b, labels, x_tangent


def passes(loss, problem):
    """The two measured passes of one implementation on one problem, as zero-argument calls."""
    x, W, b, labels, x_tangent = problem
    f = lambda x, W, b: loss(x, W, b, labels)

    def jvp():
        return dn.jvp(f, (x, W, b), (x_tangent, None, None))

    def vjp():
        out, pullback = dn.vjp(f, x, W, b)
        return pullback(numpy.full(out.shape, 1.0 / out[0].size, numpy.float32))
    return {"jvp": jvp, "vjp": vjp}


def best_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(fn):
    """Peak bytes allocated while ``fn`` runs (its result included), per tracemalloc."""
    gc.collect()
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak


def measure(name, problem, repeats, kernels="auto"):
    """{pass: {seconds, peak_mb}} for implementation ``name`` (kernels: DUALNET_KERNELS)."""
    os.environ["DUALNET_KERNELS"] = kernels
    try:
        return {pass_name: {"seconds": best_time(fn, repeats), "peak_mb": peak_bytes(fn) / 2 ** 20}
                for pass_name, fn in passes(IMPLEMENTATIONS[name], problem).items()}
    finally:
        os.environ.pop("DUALNET_KERNELS")


def scaled(result, factor):
    return {p: {k: v * factor for k, v in r.items()} for p, r in result.items()}


def naive_lower_bound_mb(examples, patches, groups, channels):
    """Value + K-direction tangent of the replicated features [N, P, G, G·c] (float32), in MB."""
    return (DIRECTIONS + 1) * examples * patches * groups * groups * channels * FLOAT_BYTES / 2 ** 20


def compare_m_8_16(rng, repeats, naive_examples):
    size = dict(M_8_16)
    full, reduced = size["examples"], 2 * naive_examples
    results = {}
    for examples in (naive_examples, reduced):  # two sizes: the scaling in N is checked, not assumed
        small = make_problem(rng, **dict(size, examples=examples))
        results[f"naive@N={examples}"] = measure("naive", small, repeats)
        results[f"fused@N={examples}"] = measure("fused", small, repeats)
        del small
    large = make_problem(rng, **size)
    results[f"fused@N={full}"] = measure("fused", large, repeats)
    results[f"fused_reference@N={full}"] = measure("fused", large, repeats, kernels="reference")
    naive_full = scaled(results[f"naive@N={reduced}"], full / reduced)
    results[f"naive@N={full} (scaled x{full / reduced:g} from N={reduced})"] = naive_full
    fused_full = results[f"fused@N={full}"]
    ratios = {p: {"speedup": naive_full[p]["seconds"] / fused_full[p]["seconds"],
                  "memory_ratio": naive_full[p]["peak_mb"] / fused_full[p]["peak_mb"]} for p in ("jvp", "vjp")}
    doubling = {p: {k: results[f"naive@N={reduced}"][p][k] / results[f"naive@N={naive_examples}"][p][k]
                    for k in ("seconds", "peak_mb")} for p in ("jvp", "vjp")}
    return {"sizes": dict(size, classes=CLASSES, directions=DIRECTIONS), "results": results,
            "naive_growth_when_N_doubles": doubling,
            f"naive_over_fused_at_N={full}": ratios,
            f"naive_replicated_features_lower_bound_mb_at_N={full}": naive_lower_bound_mb(**size)}


def compare_l_32_64(rng, repeats, large_examples):
    size = dict(L_32_64)
    full = size["examples"]
    problem = make_problem(rng, **dict(size, examples=large_examples))
    measured = measure("fused", problem, repeats)
    del problem
    fused_full = scaled(measured, full / large_examples)
    naive_mb = naive_lower_bound_mb(**size)
    return {"sizes": dict(size, classes=CLASSES, directions=DIRECTIONS),
            f"fused@N={large_examples} (measured)": measured,
            f"fused@N={full} (scaled x{full / large_examples:g})": fused_full,
            f"naive_required_mb_at_N={full} (computed lower bound)": naive_mb,
            f"naive_over_fused_memory_at_N={full}": {p: naive_mb / fused_full[p]["peak_mb"] for p in fused_full}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-examples", type=int, default=8,
                        help="the naive pass is measured at this N and twice it")
    parser.add_argument("--large-examples", type=int, default=8, help="N at which L/32/64 fused is measured")
    args = parser.parse_args()
    rng = numpy.random.default_rng(0)
    report = {
        "benchmark": "replicated_loss",
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": numpy.__version__, "load_average_at_start": os.getloadavg()},
        "dtype": "float32",
        "M/8/16": compare_m_8_16(rng, args.repeats, args.naive_examples),
        "L/32/64": compare_l_32_64(rng, args.repeats, args.large_examples),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
