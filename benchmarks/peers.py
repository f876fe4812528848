"""dualnet vs JAX and PyTorch forward mode on the same machine, in the same run.

    python benchmarks/peers.py            # 7 rounds of 40 timed steps per measurement (~1 minute)
    python benchmarks/peers.py --quick    # 3 rounds of 20 steps

One FG-A training step on the MLP 784-800-800-800-10 (ReLU, no norm), batch 128, float32:
Gaussian noise u_l at every hidden pre-activation, one forward-mode pass giving the per-example
directional derivatives d_n, then ΔW_l = h_{l-1}ᵀ (d ⊙ u_l ⊙ relu′) / N per layer and the exact
read-out gradient; and one BP step of the same net.  Implementations:
  dualnet        rules.create('fg-a') / rules.create('bp') on models.create('mlp')
  jax            jax.jit of a jax.jvp step (and of jax.grad for BP)
  torch_fwad     torch.autograd.forward_ad dual tensors
  torch_func     torch.func.jvp
plus the floor under dualnet's MLP steps: their matrix products alone, back to back, in the
same layouts (``gemm_sequences``).  A ``*_jax_over_dualnet_gemms`` ratio under 1 means JAX's
whole step takes less time than the GEMMs that dualnet's step hands to NumPy's BLAS.
The LocalMixer M/1/16 LG-FG-A step is timed against its own BP step (dualnet only).
Each framework runs in its own process with 2 threads, started once and kept.  The machine is
shared and drifts by tens of percent within minutes, so the workers take turns: in every round
each (framework, step) is timed once (the median of ``--repeats`` steps), the order reversed from
one round to the next and a short pause between measurements, and each ratio is the median over
the rounds of the ratio within a round (``ratio_ranges``: its smallest and largest).  The workers
run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (they force older OpenBLAS kernels on some
CPUs); where the calling environment sets them, the FG-A steps of dualnet and JAX are timed
again under it (``default_environment``).  Each worker records its BLAS libraries (threadpoolctl:
library, kernel architecture, threads), and the load average is recorded before and after.
Prints one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import time

SIZES = (784, 800, 800, 800, 10)
BATCH = 128
THREADS = "2"
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def median_ms(step, repeats, warmup=5):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


def _data(np):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    return x, y


def steps_dualnet():
    import numpy as np

    from dualnet import models, optim, rules
    x, y = _data(np)
    x = x.reshape(BATCH, 1, 28, 28)
    steps = {}
    for label, model, names in [
            ("mlp", models.create("mlp", hidden=800, layers=4, batch_norm=False), ("fg-a", "bp")),
            ("mixer", models.create("localmixer", config="M/1/16"), ("lg-fg-a", "bp"))]:
        for name in names:
            params, rule, sgd = model.init(0), rules.create(name), optim.SGD(1e-3)
            rng = np.random.default_rng(0)
            steps[f"{label}_{name}"] = (lambda params=params, rule=rule, sgd=sgd, model=model, rng=rng:
                                        sgd.step(params, rule(model, params, x, y, rng).grads))
    steps["mlp_fg-a_gemms"], steps["mlp_bp_gemms"] = gemm_sequences(np)
    return steps


def gemm_sequences(np):
    """(FG-A, BP): the matrix products of dualnet's MLP steps alone, back to back, in its operand
    layouts (weights [in, out], x rows) — the floor under its steps with NumPy's BLAS.

    FG-A: x W1, then per later layer one GEMM of the value rows stacked on the tangent rows
    [2N, in] W, then the weight gradients hᵀδ.  BP: the four forward products, then per layer
    δ Wᵀ (not for the first) and hᵀδ.  A weight gradient is added into its W by the GEMM (β = 1)
    where the step holds it as factors, as the step's SGD update does, and formed otherwise (the
    read-out's; ``dualnet.gradients.outer``)."""
    from dualnet.gradients import Outer, outer, outer_update
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((a, b), dtype=np.float32) for a, b in zip(SIZES, SIZES[1:])]
    inputs = [rng.standard_normal((BATCH, a), dtype=np.float32) for a in SIZES[:-1]]
    stacked = [rng.standard_normal((2 * BATCH, a), dtype=np.float32) for a in SIZES[1:-1]]
    deltas = [rng.standard_normal((BATCH, b), dtype=np.float32) for b in SIZES[1:]]

    def weight_gradient(layer):
        gradient = outer(inputs[layer], deltas[layer])
        if isinstance(gradient, Outer):
            outer_update(gradient, weights[layer], -1e-6)

    def fga():
        inputs[0] @ weights[0]
        for rows, w in zip(stacked, weights[1:]):
            rows @ w
        for layer in range(len(weights)):
            weight_gradient(layer)

    def bp():
        for h, w in zip(inputs, weights):
            h @ w
        for layer in reversed(range(len(weights))):
            weight_gradient(layer)
            if layer:
                deltas[layer] @ weights[layer].T
    return fga, bp


def steps_jax():
    import jax
    import jax.numpy as jnp
    import numpy as np
    x, y = _data(np)
    keys = jax.random.split(jax.random.PRNGKey(0), len(SIZES))
    params = [(jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), jnp.zeros(b, jnp.float32))
              for k, a, b in zip(keys, SIZES, SIZES[1:])]
    onehot = jax.nn.one_hot(y, SIZES[-1])

    def losses(params, x, noise):
        h, acts = x, []
        for (w, b), u in zip(params[:-1], noise):
            acts.append(h)
            h = jax.nn.relu(h @ w + b + u)
        acts.append(h)
        logits = h @ params[-1][0] + params[-1][1]
        return -(jax.nn.log_softmax(logits) * onehot).sum(-1), (acts, logits)

    @jax.jit
    def fga_step(params, x, key):
        shapes = [(BATCH, b) for b in SIZES[1:-1]]
        noise = [jax.random.normal(k, s, jnp.float32) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]
        zeros = [jnp.zeros(s, jnp.float32) for s in shapes]
        (_, (acts, logits)), (d, _) = jax.jvp(lambda n: losses(params, x, n), (zeros,), (noise,))
        new = []
        for l, ((w, b), u) in enumerate(zip(params[:-1], noise)):
            delta = d[:, None] * u * (acts[l + 1] > 0) / BATCH
            new.append((w - 1e-3 * acts[l].T @ delta, b - 1e-3 * delta.sum(0)))
        error = (jax.nn.softmax(logits) - onehot) / BATCH
        w, b = params[-1]
        new.append((w - 1e-3 * acts[-1].T @ error, b - 1e-3 * error.sum(0)))
        return new

    @jax.jit
    def bp_step(params, x):
        grads = jax.grad(lambda p: losses(p, x, [0.0] * (len(SIZES) - 2))[0].mean())(params)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)

    key = jax.random.PRNGKey(1)
    return {"mlp_fg-a": lambda: jax.block_until_ready(fga_step(params, x, key)),
            "mlp_bp": lambda: jax.block_until_ready(bp_step(params, x))}


def steps_torch():
    import numpy as np
    import torch
    import torch.autograd.forward_ad as fwAD
    torch.set_num_threads(int(THREADS))
    x, y = _data(np)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(a, b, generator=gen) / a ** 0.5, torch.zeros(b)) for a, b in zip(SIZES, SIZES[1:])]
    onehot = torch.nn.functional.one_hot(y, SIZES[-1]).float()

    def update(acts, logits, d, noise):
        with torch.no_grad():
            for l, ((w, b), u) in enumerate(zip(params[:-1], noise)):
                delta = d[:, None] * u * (acts[l + 1] > 0) / BATCH
                w -= 1e-3 * acts[l].T @ delta
                b -= 1e-3 * delta.sum(0)
            error = (torch.softmax(logits, -1) - onehot) / BATCH
            params[-1][0].sub_(1e-3 * acts[-1].T @ error)
            params[-1][1].sub_(1e-3 * error.sum(0))

    def forward(noise_duals):
        h, acts = x, []
        for (w, b), u in zip(params[:-1], noise_duals):
            acts.append(h)
            h = torch.relu(h @ w + b + u)
        acts.append(h)
        logits = h @ params[-1][0] + params[-1][1]
        return -(torch.log_softmax(logits, -1) * onehot).sum(-1), acts, logits

    def fwad_step():
        noise = [torch.randn(BATCH, b, generator=gen) for b in SIZES[1:-1]]
        with torch.no_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(torch.zeros_like(u), u) for u in noise]
            losses, acts, logits = forward(duals)
            d = fwAD.unpack_dual(losses).tangent
            acts = [fwAD.unpack_dual(a).primal for a in acts]
            logits = fwAD.unpack_dual(logits).primal
        update(acts, logits, d, noise)

    def func_step():
        noise = [torch.randn(BATCH, b, generator=gen) for b in SIZES[1:-1]]
        zeros = tuple(torch.zeros_like(u) for u in noise)
        with torch.no_grad():
            (losses, acts, logits), (d, _, _) = torch.func.jvp(lambda *n: forward(n), zeros, tuple(noise))
        update(acts, logits, d, noise)

    def bp_step():
        for w, b in params:
            w.requires_grad_(True)
            b.requires_grad_(True)
        losses, _, _ = forward([0.0] * (len(SIZES) - 2))
        grads = torch.autograd.grad(losses.mean(), [t for pair in params for t in pair])
        with torch.no_grad():
            for t, g in zip([t for pair in params for t in pair], grads):
                t -= 1e-3 * g
        for w, b in params:
            w.requires_grad_(False)
            b.requires_grad_(False)

    return {"mlp_fg-a_fwad": fwad_step, "mlp_fg-a_func": func_step, "mlp_bp": bp_step}


WORKERS = {"dualnet": steps_dualnet, "jax": steps_jax, "torch": steps_torch}


def blas_libraries():
    """The BLAS/OpenMP pools loaded in this process: (library, kernel architecture, threads)."""
    from threadpoolctl import threadpool_info
    return [f"{pool.get('internal_api')} {pool.get('architecture')} x{pool.get('num_threads')}"
            for pool in threadpool_info()]


def serve(name):
    """A worker: build ``name``'s steps, report ready with the BLAS libraries, then answer each
    request line ``<label> <repeats>`` with the median of that many steps (after 3 untimed)."""
    steps = WORKERS[name]()
    for step in steps.values():  # compiles, and loads every thread pool the steps use
        step()
    print(json.dumps({"ready": sorted(steps), "blas": blas_libraries()}), flush=True)
    for line in sys.stdin:
        label, repeats = line.split()
        print(json.dumps({"ms": median_ms(steps[label], int(repeats), warmup=3)}), flush=True)


class Worker:
    """One framework's ``serve`` process, with 2 threads and, unless ``unset_blas_overrides`` is
    false, OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset."""

    def __init__(self, name, unset_blas_overrides=True):
        env = dict(os.environ, OMP_NUM_THREADS=THREADS, OPENBLAS_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS,
                   NUMBA_NUM_THREADS=THREADS,
                   XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
        if unset_blas_overrides:
            env = {k: v for k, v in env.items() if k not in BLAS_OVERRIDES}
        self.name = name
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", name], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ready = self._answer()

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read().strip().splitlines()
            raise RuntimeError(error[-1] if error else f"{self.name}: the worker stopped")
        return json.loads(line)

    def time(self, label, repeats):
        self.process.stdin.write(f"{label} {repeats}\n")
        self.process.stdin.flush()
        return self._answer()["ms"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()


RATIOS = {  # name -> (numerator, denominator) as (worker, label)
    "fga_dualnet_over_jax": (("dualnet", "mlp_fg-a"), ("jax", "mlp_fg-a")),
    "bp_dualnet_over_jax": (("dualnet", "mlp_bp"), ("jax", "mlp_bp")),
    "fga_dualnet_over_torch_fwad": (("dualnet", "mlp_fg-a"), ("torch", "mlp_fg-a_fwad")),
    "fga_dualnet_over_torch_func": (("dualnet", "mlp_fg-a"), ("torch", "mlp_fg-a_func")),
    "bp_dualnet_over_torch": (("dualnet", "mlp_bp"), ("torch", "mlp_bp")),
    "fga_dualnet_over_its_gemms": (("dualnet", "mlp_fg-a"), ("dualnet", "mlp_fg-a_gemms")),
    "fga_jax_over_dualnet_gemms": (("jax", "mlp_fg-a"), ("dualnet", "mlp_fg-a_gemms")),
    "bp_dualnet_over_its_gemms": (("dualnet", "mlp_bp"), ("dualnet", "mlp_bp_gemms")),
    "bp_jax_over_dualnet_gemms": (("jax", "mlp_bp"), ("dualnet", "mlp_bp_gemms")),
    "fga_dualnet_over_bp_dualnet": (("dualnet", "mlp_fg-a"), ("dualnet", "mlp_bp")),
    "mixer_lgfga_over_bp_dualnet": (("dualnet", "mixer_lg-fg-a"), ("dualnet", "mixer_bp")),
}


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure(workers, rounds, repeats, pause, labels=None):
    """Every (worker, label) timed once per round, the order reversed from one round to the next,
    with ``pause`` seconds between measurements (an idle worker's BLAS threads stop spinning);
    ``labels``: the steps to time (default: every step of every worker).  Returns {(worker,
    label): [ms per round]}."""
    order = [(name, label) for name, worker in workers.items() for label in worker.ready["ready"]
             if labels is None or label in labels]
    times = {key: [] for key in order}
    for round_index in range(rounds):
        for name, label in order if round_index % 2 == 0 else reversed(order):
            time.sleep(pause)
            times[name, label].append(workers[name].time(label, repeats))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", choices=WORKERS)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--pause", type=float, default=0.2)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    rounds = args.rounds or (3 if args.quick else 7)
    repeats = args.repeats or (20 if args.quick else 40)
    load_before = os.getloadavg()[0]
    workers, errors = {}, {}
    for name in WORKERS:
        try:
            workers[name] = Worker(name)
        except RuntimeError as error:
            errors[name] = str(error)
    try:
        times = measure(workers, rounds, repeats, args.pause)
    finally:
        for worker in workers.values():
            worker.close()
    ratios, ranges = {}, {}
    for key, (numerator, denominator) in RATIOS.items():
        if numerator in times and denominator in times:
            per_round = [a / b for a, b in zip(times[numerator], times[denominator])]
            ratios[key] = round(_median(per_round), 3)
            ranges[key] = [round(min(per_round), 3), round(max(per_round), 3)]
    default = {}
    if any(name in os.environ for name in BLAS_OVERRIDES):  # the machine's own setting, for the record
        machine = {name: Worker(name, unset_blas_overrides=False) for name in ("dualnet", "jax")}
        try:
            fga = measure(machine, rounds, repeats, args.pause, labels=("mlp_fg-a",))
        finally:
            for worker in machine.values():
                worker.close()
        default = {name: {"mlp_fg-a_ms": round(_median(fga[name, "mlp_fg-a"]), 3), "blas": worker.ready["blas"]}
                   for name, worker in machine.items()}
        default["fga_dualnet_over_jax"] = round(_median(
            [a / b for a, b in zip(fga["dualnet", "mlp_fg-a"], fga["jax", "mlp_fg-a"])]), 3)
        default["overrides"] = {name: os.environ.get(name) for name in BLAS_OVERRIDES}
    print(json.dumps({"ms": {f"{label}_{name}": round(_median(values), 3) for (name, label), values in times.items()},
                      "ratios": ratios, "ratio_ranges": ranges, "errors": errors, "rounds": rounds,
                      "repeats": repeats, "blas": {name: worker.ready["blas"] for name, worker in workers.items()},
                      "default_environment": default, "load_average": [load_before, os.getloadavg()[0]]},
                     indent=2))


if __name__ == "__main__":
    main()
