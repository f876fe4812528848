"""Engine overhead: the cost of forward mode relative to the plain forward pass.

Model: MLP 784-800-800-800-10 (ReLU, softmax cross-entropy), batch 128, float32.
All passes run through the same dualnet functions:

* ``forward``      plain NumPy arrays in, plain arrays out (the primitives only evaluate values);
* ``jvp``          ``dualnet.jvp`` of the batch-mean loss, one tangent on every weight and bias;
* ``jvp_8_single`` eight such JVPs, one direction each;
* ``jvp_k8``       one JVP pushing K = 8 directions at once (tangents of shape (8,) + param.shape).

Each time is the minimum over ``--rounds`` interleaved rounds (robust to other load on the machine).
Prints one JSON object with the times (seconds) and the ratios
``jvp_over_forward`` (target <= 2.6) and ``k8_batched_over_8_single`` (target <= 0.6).

Run: ``python benchmarks/engine_overhead.py [--rounds 20]``.
"""
import argparse
import json
import os
import platform
import time

import numpy

import dualnet as dn

SIZES = (784, 800, 800, 800, 10)
BATCH = 128
DIRECTIONS = 8


def init_params(rng, sizes=SIZES, dtype=numpy.float32):
    """He-initialised ``[(W (p, q), b (q,)), ...]``."""
    return [((rng.standard_normal((p, q)) * numpy.sqrt(2.0 / p)).astype(dtype), numpy.zeros(q, dtype))
            for p, q in zip(sizes[:-1], sizes[1:])]


def loss(params, images, labels):
    """Mean softmax cross-entropy of the MLP on a batch: images (N, 784), labels (N,) ints."""
    hidden = images
    for layer, (weight, bias) in enumerate(params):
        hidden = dn.add(dn.matmul(hidden, weight), bias)
        if layer < len(params) - 1:
            hidden = dn.relu(hidden)
    log_probs = dn.log_softmax(hidden, axis=-1)
    picked = dn.getitem(log_probs, (numpy.arange(len(labels)), labels))
    return dn.neg(dn.mean(picked))


def best_times(cases, rounds):
    """Minimum wall time of each case over ``rounds`` interleaved rounds (one warm-up first).

    Interleaving puts every case under the same background load; the minimum is the
    least-disturbed run.
    """
    for fn in cases.values():
        fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    args = parser.parse_args()

    rng = numpy.random.default_rng(0)
    params = init_params(rng)
    images = rng.standard_normal((BATCH, SIZES[0])).astype(numpy.float32)
    labels = rng.integers(0, SIZES[-1], BATCH)
    one = dn.tree_map(lambda p: rng.standard_normal(p.shape).astype(numpy.float32), params)
    many = dn.tree_map(lambda p: rng.standard_normal((DIRECTIONS,) + p.shape).astype(numpy.float32), params)
    singles = [dn.tree_map(lambda m, k=k: m[k], many) for k in range(DIRECTIONS)]

    def objective(p):
        return loss(p, images, labels)

    times = best_times({
        "forward": lambda: objective(params),
        "jvp": lambda: dn.jvp(objective, (params,), (one,)),
        "jvp_8_single": lambda: [dn.jvp(objective, (params,), (single,)) for single in singles],
        "jvp_k8": lambda: dn.jvp(objective, (params,), (many,)),
    }, args.rounds)
    report = {
        "benchmark": "engine_overhead",
        "model": "MLP 784-800-800-800-10, ReLU, softmax CE",
        "batch": BATCH, "dtype": "float32", "directions": DIRECTIONS,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, numpy {numpy.__version__}",
        "seconds": {name: round(t, 6) for name, t in times.items()},
        "jvp_over_forward": round(times["jvp"] / times["forward"], 3),
        "k8_batched_over_8_single": round(times["jvp_k8"] / times["jvp_8_single"], 3),
        "targets": {"jvp_over_forward": 2.6, "k8_batched_over_8_single": 0.6},
    }
    print(json.dumps(report, indent=2))



if __name__ == "__main__":
    main()
