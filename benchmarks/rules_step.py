"""Time per training step of every rule, as a ratio to BP measured in the same run.

    python benchmarks/rules_step.py            # MLP 784-800-800-800-10 and LocalMixer M/1/16, batch 128
    python benchmarks/rules_step.py --quick    # fewer repeats
    python benchmarks/rules_step.py --configs M/1/16,M/8/16 --rules bp,fg-w,fg-a,lg-fg-a   # M/8/16 on 32×32×3

A step = the rule's gradient estimate + an SGD update, float32, on random MNIST-shaped data.  On
each model the rules take turns, one step each, so that the machine's drift (tens of percent
within a minute on a shared VM) reaches every rule alike.  Prints one JSON object: median
milliseconds per step and ``<rule>_over_bp`` ratios.
"""
import argparse
import json
import statistics
import time

import numpy as np

from dualnet import models, optim, rules
from dualnet.nn.localmixer import CONFIGS

RULES = ["bp", "l-bp", "lg-bp", "fa", "l-fa", "lg-fa", "dfa", "dkp", "fdfa", "fg-w", "lg-fg-w", "fg-a", "lg-fg-a",
         "guess"]  # every rule, on both models (guess: its defaults, a local guess for the global target)


def time_rules(model, names, x, y, repeats, warmup=2):
    """Median ms per step of each rule in ``names``, the rules taking turns step by step (the
    order reversed every round), so that the machine's drift reaches them alike."""
    optimizer = optim.SGD(0.0)
    runs = {}
    for name in names:
        params = model.init(0)
        rule = rules.create(name)
        rule.setup(model, params, 0)
        runs[name] = (rule, params, model.init_state())
    times = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else reversed(names):
            rule, params, state = runs[name]
            rng = np.random.default_rng(i)
            start = time.perf_counter()
            estimate = rule(model, params, x, y, rng, state)
            optimizer.step(params, estimate.grads)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def suites(configs):
    """(label, model, input shape): the MLP on MNIST shapes, then each LocalMixer config (28×28×1
    where its patch grid divides 28, else CIFAR's 32×32×3)."""
    yield "mlp", models.create("mlp", hidden=800, layers=4, batch_norm=False, local_heads=True), (1, 28, 28)
    for config in configs:
        shape = (1, 28, 28) if 28 % CONFIGS[config]["patches"] == 0 else (3, 32, 32)
        label = "mixer" if config == "M/1/16" else config
        yield label, models.create("localmixer", config=config, input_shape=shape), shape


def run(quick=False, configs=("M/1/16",), rule_names=RULES, repeats=None):
    repeats = repeats or (3 if quick else 10)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 128)
    result = {}
    for label, model, shape in suites(configs):
        x = rng.standard_normal((128,) + shape).astype(np.float32)
        for name, ms in time_rules(model, rule_names, x, y, repeats).items():
            result[f"{label}_{name}_ms"] = round(ms, 2)
        for name in rule_names:
            if name != "bp":
                result[f"{label}_{name}_over_bp"] = round(result[f"{label}_{name}_ms"] / result[f"{label}_bp_ms"], 3)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--configs", default="M/1/16", help="LocalMixer configs, comma-separated (e.g. M/1/16,M/8/16)")
    parser.add_argument("--rules", default=",".join(RULES), help="rules to time, comma-separated (bp is always first)")
    parser.add_argument("--repeats", type=int, help="timed steps per rule (default 10, 3 with --quick)")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    chosen = ["bp"] + [r for r in args.rules.split(",") if r and r != "bp"]
    print(json.dumps(run(args.quick, args.configs.split(","), chosen, args.repeats), indent=2))
