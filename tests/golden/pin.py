"""The golden cases: every rule's estimate on a fixed seed for an MLP, a LocalMixer and a ResNet-18.

``python tests/golden/pin.py`` (from the repository root) rewrites ``estimates.json``; the test
(``test_golden.py``) recomputes every case and compares.  Each case runs two consecutive steps of
the rule (so the rules that learn their feedback matrices, which start at zero, are pinned after
one update too) in float64, and records one SHA-256 over every estimate's bytes (the pin) and
each tensor's norm (to say which tensor moved, and by how much, when a case fails).

The pins are kept per BLAS kernel set (``blas_kernels()``, e.g. "openblas SkylakeX"): kernel sets
sum a GEMM's products in different orders (OpenBLAS's Haswell kernels even give a row different
last bits depending on how many rows the GEMM has), so one case has one pin per kernel set that
pinned it; under a kernel set without pins the test compares each tensor's norm instead.
The cases run on the NumPy reference paths (``DUALNET_KERNELS=reference``): a Numba kernel
compiled afresh and the same kernel loaded from Numba's on-disk cache can differ in the last
bit, so the kernels are held to the references by their own tests (tests/kernels), and the pins
hold the rules, models and engine above them.
"""
import hashlib
import json
import os
import sys

import numpy as np

from dualnet import backend, models, rules

HERE = os.path.dirname(os.path.abspath(__file__))
PINS = os.path.join(HERE, "estimates.json")

MODELS = {
    "mlp": dict(name="mlp", input_shape=(1, 4, 4), num_classes=3, hidden=6, layers=3, batch_norm=True,
                local_heads=True),
    "localmixer": dict(name="localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2,
                       patches=2, channels=8, groups=2),
    "resnet18": dict(name="resnet18", input_shape=(3, 8, 8), num_classes=3, width=2, aux="cnn", aux_width=2,
                     aux_depth=1),
}

# Every registered rule with its defaults, plus the options that take other code paths.
RULES = [(name, {}) for name in rules.names()] + [
    ("fg-w", {"directions": 2}),
    ("lg-fg-w", {"directions": 2}),
    ("fg-a", {"directions": 2, "norm_grad": False}),
    ("lg-fg-a", {"memory": "recompute"}),
    ("lg-fg-a", {"site": "post", "batch_coupling": "own"}),
    ("lg-fg-a", {"contrastive": True}),
    ("lg-bp", {"contrastive": True}),
    ("dkp", {"adam": True}),
    ("fdfa", {"adam": True, "directions": 2}),
    ("guess", {"guess": "gaussian", "target": "local"}),
    ("guess", {"guess": "ntk", "space": "weight"}),
    ("guess", {"guess": "fixed-ntk", "target": "intermediate"}),
    ("guess", {"guess": "rademacher", "projection": "span"}),
    ("guess", {"aux": "linear"}),
    ("fg-w", {"readout": "perturbed"}),
    ("lg-fg-w", {"dense_groups": "own"}),
    ("fg-a", {"readout": "perturbed", "loss_reduction": "sum"}),
    ("fdfa", {"adam": True, "update": "after"}),
    ("guess", {"last_block": "exact"}),
    ("guess", {"space": "weight", "weight_unit": "module", "guess": "gaussian", "normalise_random": True}),
]

BATCH = 4
STEPS = 2


def case_name(model, rule, options):
    suffix = ",".join(f"{key}={value}" for key, value in sorted(options.items()))
    return f"{model}/{rule}" + (f"[{suffix}]" if suffix else "")


def cases():
    for model in MODELS:
        for rule, options in RULES:
            yield case_name(model, rule, options), model, rule, options


def estimates(model_key, rule_name, options):
    """{f'{step}:{tensor}': array} of the rule's estimates and losses over ``STEPS`` steps."""
    model_options = dict(MODELS[model_key])
    model = models.create(model_options.pop("name"), **model_options)
    params = model.init(0, dtype=np.float64)
    jitter = np.random.default_rng(1)  # off the zero biases / zero read-out, as in the rule tests
    params = {name: value + 0.1 * jitter.standard_normal(value.shape) for name, value in sorted(params.items())}
    data = np.random.default_rng(2)
    x = data.standard_normal((BATCH,) + model.input_shape)
    labels = data.integers(0, model.num_classes, BATCH)
    rule = rules.create(rule_name, **options)
    rule.setup(model, params, seed=3)
    if rule.contrastive:
        x = np.concatenate([x, x[::-1]], axis=0)
    state, out = model.init_state(np.float64), {}
    for step in range(STEPS):
        estimate = rule(model, params, x, labels, backend.rng([4, step]), state)
        state = estimate.state or state
        for name, g in estimate.grads.items():
            out[f"{step}:{name}"] = np.ascontiguousarray(backend.to_numpy(g), dtype=np.float64)
        out[f"{step}:loss"] = np.float64(estimate.loss)
    return out


def blas_kernels():
    """The BLAS kernel set of this process, e.g. 'openblas SkylakeX' (threadpoolctl)."""
    from threadpoolctl import threadpool_info
    pools = {f"{pool['internal_api']} {pool.get('architecture')}" for pool in threadpool_info()
             if pool["user_api"] == "blas"}
    return ", ".join(sorted(pools)) or "unknown"


def pin(model_key, rule_name, options):
    """The case's pin: one SHA-256 over every (name, bytes) in name order, and each tensor's norm
    in that order — or {'refused': message} where the rule refuses the model."""
    try:
        arrays = estimates(model_key, rule_name, options)
    except ValueError as error:
        return {"refused": str(error)}
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name].tobytes())
    norms = [float(f"{np.linalg.norm(arrays[name]):.9g}") for name in sorted(arrays)]
    return {"sha256": digest.hexdigest(), "norms": norms}


def main():
    """Pin every case under this process's BLAS kernel set, keeping the other sets' pins of cases
    whose norms are unchanged (a case that changed is pinned afresh, for this kernel set only)."""
    os.environ["DUALNET_KERNELS"] = "reference"
    kernels = blas_kernels()
    old = {}
    if os.path.exists(PINS):
        with open(PINS) as f:
            old = json.load(f)
    pins = {}
    for name, model, rule, options in cases():
        now = pin(model, rule, options)
        if "refused" not in now:
            before = old.get(name, {})
            kept = before.get("sha256", {}) if np.allclose(before.get("norms", []), now["norms"], rtol=1e-8, atol=0) \
                and len(before.get("norms", [])) == len(now["norms"]) else {}
            now["sha256"] = dict(kept, **{kernels: now["sha256"]})
        pins[name] = now
    with open(PINS, "w") as f:
        json.dump(pins, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")
    refused = [name for name, pin in pins.items() if "refused" in pin]
    print(f"pinned {len(pins)} cases ({len(refused)} refused) for {kernels} in {PINS}", file=sys.stderr)


if __name__ == "__main__":
    main()
