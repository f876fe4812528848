"""dualnet vs JAX and PyTorch forward mode on the same machine, in the same run.

    python benchmarks/peers.py            # 200 timed steps per measurement
    python benchmarks/peers.py --quick    # 30 steps (under 5 minutes)

One FG-A training step on the MLP 784-800-800-800-10 (ReLU, no norm), batch 128, float32:
Gaussian noise u_l at every hidden pre-activation, one forward-mode pass giving the per-example
directional derivatives d_n, then ΔW_l = h_{l-1}ᵀ (d ⊙ u_l ⊙ relu′) / N per layer and the exact
read-out gradient; and one BP step of the same net.  Implementations:
  dualnet        rules.create('fg-a') / rules.create('bp') on models.create('mlp')
  jax            jax.jit of a jax.jvp step (and of jax.grad for BP)
  torch_fwad     torch.autograd.forward_ad dual tensors
  torch_func     torch.func.jvp
plus the GEMM-bound limit: 3 × the forward FLOPs at the GEMM rate measured here (numpy float32).
The LocalMixer M/1/16 LG-FG-A step is timed against its own BP step (dualnet only).
Each framework runs in its own process with 2 threads; the machine is shared and noisy, so only
the ratios measured in one run mean anything.  The workers run with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset (they force older OpenBLAS kernels on some CPUs); where the calling
environment sets them, the FG-A steps of dualnet and JAX are timed again under it
(``default_environment``).  Each worker records its BLAS libraries (threadpoolctl: library,
kernel architecture, threads), and the load average is recorded before and after.  Prints one
JSON object.
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


def worker_dualnet(repeats):
    import numpy as np

    from dualnet import models, optim, rules
    x, y = _data(np)
    x = x.reshape(BATCH, 1, 28, 28)
    out = {}
    for label, model, names in [
            ("mlp", models.create("mlp", hidden=800, layers=4, batch_norm=False), ("fg-a", "bp")),
            ("mixer", models.create("localmixer", config="M/1/16"), ("lg-fg-a", "bp"))]:
        for name in names:
            params, rule, sgd = model.init(0), rules.create(name), optim.SGD(1e-3)
            rng = np.random.default_rng(0)
            out[f"{label}_{name}"] = median_ms(lambda: sgd.step(params, rule(model, params, x, y, rng).grads), repeats)
    # the GEMM rate of this machine, float32, on the MLP's own GEMM shapes
    mats = [np.random.default_rng(1).standard_normal(s).astype(np.float32)
            for s in [(BATCH, 784), (784, 800), (BATCH, 800), (800, 800)]]
    flops = 2 * BATCH * (784 * 800 + 800 * 800)
    gemm_ms = median_ms(lambda: (mats[0] @ mats[1], mats[2] @ mats[3]), repeats)
    forward_flops = 2 * BATCH * sum(a * b for a, b in zip(SIZES, SIZES[1:]))
    out["gemm_gflops"] = flops / gemm_ms / 1e6
    out["gemm_bound_fga"] = 3 * forward_flops / (out["gemm_gflops"] * 1e6)
    return out


def worker_jax(repeats):
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
    return {"mlp_fg-a": median_ms(lambda: jax.block_until_ready(fga_step(params, x, key)), repeats),
            "mlp_bp": median_ms(lambda: jax.block_until_ready(bp_step(params, x)), repeats)}


def worker_torch(repeats):
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

    return {"mlp_fg-a_fwad": median_ms(fwad_step, repeats), "mlp_fg-a_func": median_ms(func_step, repeats),
            "mlp_bp": median_ms(bp_step, repeats)}


WORKERS = {"dualnet": worker_dualnet, "jax": worker_jax, "torch": worker_torch}


def blas_libraries():
    """The BLAS/OpenMP pools loaded in this process: (library, kernel architecture, threads)."""
    from threadpoolctl import threadpool_info
    return [f"{pool.get('internal_api')} {pool.get('architecture')} x{pool.get('num_threads')}"
            for pool in threadpool_info()]


def run_worker(name, repeats, unset_blas_overrides=True):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, OPENBLAS_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS,
               NUMBA_NUM_THREADS=THREADS,
               XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
    if unset_blas_overrides:
        env = {k: v for k, v in env.items() if k not in BLAS_OVERRIDES}
    done = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(repeats)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    repeats = args.repeats or (30 if args.quick else 200)
    if args.worker:
        print(json.dumps({**WORKERS[args.worker](repeats), "blas": blas_libraries()}))
        return
    load_before = os.getloadavg()[0]
    result = {name: run_worker(name, repeats) for name in WORKERS}
    default = {}
    if any(name in os.environ for name in BLAS_OVERRIDES):  # the machine's own setting, for the record
        for name in ("dualnet", "jax"):
            part = run_worker(name, repeats, unset_blas_overrides=False)
            default[name] = {"mlp_fg-a_ms": part.get("mlp_fg-a"), "blas": part.get("blas")}
        default["overrides"] = {name: os.environ.get(name) for name in BLAS_OVERRIDES}
    ms = {f"{k}_{name}": v for name, part in result.items() for k, v in part.items() if isinstance(v, float)}
    ratios = {}
    pairs = {"fga_dualnet_over_jax": ("mlp_fg-a_dualnet", "mlp_fg-a_jax"),
             "fga_dualnet_over_torch_fwad": ("mlp_fg-a_dualnet", "mlp_fg-a_fwad_torch"),
             "fga_dualnet_over_torch_func": ("mlp_fg-a_dualnet", "mlp_fg-a_func_torch"),
             "fga_dualnet_over_gemm_bound": ("mlp_fg-a_dualnet", "gemm_bound_fga_dualnet"),
             "bp_dualnet_over_jax": ("mlp_bp_dualnet", "mlp_bp_jax"),
             "bp_dualnet_over_torch": ("mlp_bp_dualnet", "mlp_bp_torch"),
             "fga_dualnet_over_bp_dualnet": ("mlp_fg-a_dualnet", "mlp_bp_dualnet"),
             "mixer_lgfga_over_bp_dualnet": ("mixer_lg-fg-a_dualnet", "mixer_bp_dualnet")}
    for key, (a, b) in pairs.items():
        if a in ms and b in ms:
            ratios[key] = round(ms[a] / ms[b], 3)
    errors = {name: part["error"] for name, part in result.items() if "error" in part}
    print(json.dumps({"ms": {k: round(v, 3) for k, v in ms.items()}, "ratios": ratios, "errors": errors,
                      "repeats": repeats, "blas": {name: part.get("blas") for name, part in result.items()},
                      "default_environment": default, "load_average": [load_before, os.getloadavg()[0]]},
                     indent=2))


if __name__ == "__main__":
    main()
