"""Time per training step of every rule, as a ratio to BP measured in the same run.

    python benchmarks/rules_step.py            # MLP 784-800-800-800-10 and LocalMixer M/1/16, batch 128
    python benchmarks/rules_step.py --quick    # fewer repeats

A step = the rule's gradient estimate + an SGD update, float32, on random MNIST-shaped data.
Prints one JSON object: median milliseconds per step and ``<rule>_over_bp`` ratios.
"""
import argparse
import json
import statistics
import time

import numpy as np

from dualnet import models, optim, rules

RULES = ["bp", "l-bp", "lg-bp", "fa", "l-fa", "lg-fa", "dfa", "dkp", "fdfa", "fg-w", "lg-fg-w", "fg-a", "lg-fg-a",
         "guess"]  # every rule, on both models (guess: its defaults, a local guess for the global target)


def time_rule(model, name, x, y, repeats, warmup=2):
    params = model.init(0)
    rule = rules.create(name)
    rule.setup(model, params, 0)
    optimizer = optim.SGD(0.0)
    state = model.init_state()
    times = []
    for i in range(warmup + repeats):
        rng = np.random.default_rng(i)
        start = time.perf_counter()
        estimate = rule(model, params, x, y, rng, state)
        optimizer.step(params, estimate.grads)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(quick=False):
    repeats = 3 if quick else 10
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    result = {}
    suites = [("mlp", models.create("mlp", hidden=800, layers=4, batch_norm=False, local_heads=True)),
              ("mixer", models.create("localmixer", config="M/1/16"))]
    for label, model in suites:
        for name in RULES:
            result[f"{label}_{name}_ms"] = round(time_rule(model, name, x, y, repeats), 2)
        for name in RULES[1:]:
            result[f"{label}_{name}_over_bp"] = round(result[f"{label}_{name}_ms"] / result[f"{label}_bp_ms"], 3)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
