"""dualnet on the GPU (CuPy, CUDA kernels) vs JAX jit(jvp) and PyTorch forward AD on the same GPU.

    python benchmarks/gpu.py            # 50 timed steps per measurement, batches 128 and 512
    python benchmarks/gpu.py --quick    # 10 timed steps, batch 128 only (a few minutes)

Needs CuPy with a usable CUDA device; without one it prints "no usable CUDA device" and exits
with status 2.  The peers need JAX with its CUDA plugin (``pip install jax[cuda12]``) and a CUDA
build of PyTorch: a peer that sees no GPU reports an error in place of its numbers, never a CPU
time.  Every framework runs in its own process, one after the other, on the same GPU; all GEMMs
are full float32 (JAX matmul precision 'highest', PyTorch and CuPy without TF32).  Prints one
JSON object: ``ms`` (per framework), ``kernels``, ``replicated_loss_memory``, ``ratios`` (each
key names both sides), ``targets``, ``errors``.

1. Training steps (median wall time of one step — the estimate and the SGD update, device
   synchronised after every step — after warm-up), float32, on random data:
   * LocalMixer M/8/16 and L/8/64 on CIFAR-sized input [N, 3, 32, 32] (P = 64 patches),
     rules fg-a, lg-fg-a, bp, at N = 128 and 512;
   * MLP 784-800-800-800-10 (ReLU, no norm) on [N, 1, 28, 28], rules fg-a and bp, same N.
   dualnet runs ``rules.create(rule)`` on ``models.create(...)`` with the CuPy backend.  The
   peers compute the same estimates from the same architecture (``Arch``): FG-A / LG-FG-A as
   one ``jax.jvp`` (``torch.autograd.forward_ad``) pass with Gaussian noise at every normalised
   pre-activation — per block with stop-gradients for LG-FG-A — the replicated-loss derivatives
   d[n,p,g] = (1/P)⟨ḣ[n,p,g], W_g δ_n⟩ from the block output's tangent, then each layer's
   update through its own LN Jacobian (``jax.vjp`` of the layer; the closed form in PyTorch)
   and exact heads; BP is ``jax.grad`` / ``torch.autograd.grad`` of the mean loss.  The whole
   JAX step (noise, estimate, update) is one ``jax.jit``.
2. Kernels (GPU time from ``cupyx.profiler.benchmark``, median):
   * grouped linear ``fused.grouped_linear`` [M, G, c] x [G, c, c] (M = N·P rows of LocalMixer's
     grouped layers), value only and value + 1 tangent, vs ``cupy.matmul`` (cuBLAS) of the
     same batched GEMM on contiguous [G, M, c] ([G, 2M, c]) operands: the ratio of achieved
     FLOP rates (target >= 0.7);
   * layer norm ``fused.layer_norm`` over rows of C = 512, 2048 (token LN) and c = 32 (group
     LN), value only and value + 1 tangent: bytes read + written per second vs a device-to-
     device copy (``cudaMemcpyAsync``) of the input (target >= 0.6).
3. Fused vs naive replicated cross-entropy memory at L/32/64 (P = 1024, G = 64, c = 32, 10
   classes, K = 10 directions): the fused jvp and vjp are measured with CuPy's memory pool
   (bytes the pool holds after the pass beyond its inputs — an upper bound of the peak) at
   ``--loss-examples`` examples and scaled linearly to N = 128; the naive pass's memory is
   computed (``replicated_loss.naive_lower_bound_mb``: value + K tangents of the replicated
   features [N, P, G, G·c]).
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy
import replicated_loss

EPS = 1e-5      # dualnet's LN epsilon
LR = 1e-3
MIXERS = ("M/8/16", "L/8/64")
MIXER_INPUT, MLP_INPUT, CLASSES = (3, 32, 32), (1, 28, 28), 10
MLP_OPTIONS = dict(hidden=800, layers=4, batch_norm=False)
RULES = {"localmixer": ("fg-a", "lg-fg-a", "bp"), "mlp": ("fg-a", "bp")}
LOSS_EXAMPLES, FULL_EXAMPLES = 32, 128


# ---------------------------------------------------------------------------------------
# what is measured: cases, the architecture the peers rebuild, timing
# ---------------------------------------------------------------------------------------
def cases(batches):
    """(label, model name, model options, input shape, rule, batch) of every timed step."""
    out = []
    for batch in batches:
        for config in MIXERS:
            for rule in RULES["localmixer"]:
                out.append((f"{rule}@{config},N={batch}", "localmixer", dict(config=config), MIXER_INPUT, rule, batch))
        for rule in RULES["mlp"]:
            out.append((f"{rule}@MLP,N={batch}", "mlp", MLP_OPTIONS, MLP_INPUT, rule, batch))
    return out


def build(name, options, input_shape):
    """The dualnet model and its float32 host parameters (the peers start from the same ones)."""
    from dualnet import backend, models
    model = models.create(name, input_shape=input_shape, num_classes=CLASSES, **options)
    with backend.using("numpy"):
        return model, model.init(0)


def batch_data(input_shape, batch):
    rng = numpy.random.default_rng(0)
    return (rng.standard_normal((batch,) + input_shape, dtype=numpy.float32),
            rng.integers(0, CLASSES, batch))


@dataclasses.dataclass(frozen=True, order=True)  # ordered: JAX sorts the keys of a noise dict
class Layer:
    """One hidden layer: z = kind(x; W, b) → LN (``norm``) → [noise] → (+ block input) → ReLU."""
    block: int
    kind: str          # 'token', 'dense', 'grouped' (LocalMixer) or 'linear' (MLP)
    norm: bool
    residual: bool

    @property
    def weight(self):
        return f"blocks.{self.block}.{self.kind}.weight"

    @property
    def bias(self):
        return f"blocks.{self.block}.{self.kind}.bias"


class Arch:
    """The layers of a dualnet LocalMixer or MLP as the peers rebuild them (``nn/localmixer.py``,
    ``nn/mlp.py``): LocalMixer block 0 = dense, grouped; block k >= 1 = token, dense, grouped
    (+ block input); LN without affine after every linear layer; MLP = linear → ReLU."""

    def __init__(self, model):
        self.mixer = model.name == "localmixer"
        if self.mixer:
            self.patches, self.tokens = model.patches, model.tokens
            self.channels, self.groups = model.channels, model.groups
            self.width = self.channels // self.groups
            self.blocks = [[Layer(k, kind, True, kind == "grouped" and k > 0)
                            for kind in (("token",) if k else ()) + ("dense", "grouped")]
                           for k in range(model.num_blocks)]
        else:
            self.blocks = [[Layer(k, "linear", False, False)] for k in range(model.num_blocks)]
            self.hidden = model.hidden_width
        self.layers = [layer for block in self.blocks for layer in block]

    def site_shape(self, layer, n):
        """Shape of the noise at a layer's normalised pre-activation."""
        if not self.mixer:
            return (n, self.hidden)
        if layer.kind == "grouped":
            return (n, self.tokens, self.groups, self.width)
        return (n, self.tokens, self.channels)

    def embed_shape(self, x_shape):
        """x [N, C_in, H, W] → the patch grid [N, C_in, s, H/s, s, W/s] (LocalMixer)."""
        n, c, height, width = x_shape
        s = self.patches
        return (n, c, s, height // s, s, width // s)


def measure_cases(settings, time_case):
    """{'ms': {label: ms}, 'case_errors': {label: message}} over ``cases``, with
    ``time_case(name, options, input_shape, rule, batch) -> ms``; a failing case (e.g. out of
    memory at L/8/64, N = 512 on a small GPU) is recorded and the others still run."""
    out, errors = {}, {}
    for label, name, options, input_shape, rule, batch in cases(settings["batches"]):
        try:
            out[label] = time_case(name, options, input_shape, rule, batch)
        except Exception as error:  # reported in the JSON, not swallowed
            errors[label] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return {"ms": out, "case_errors": errors}


def timed(step, synchronize, repeats, warmup):
    """Median milliseconds of ``step()`` followed by ``synchronize()``."""
    for _ in range(warmup):
        step()
        synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


# ---------------------------------------------------------------------------------------
# dualnet
# ---------------------------------------------------------------------------------------
def worker_dualnet(settings):
    import cupy

    from dualnet import backend, optim, rules
    backend.use("cupy")

    def time_case(name, options, input_shape, rule_name, batch):
        cupy.get_default_memory_pool().free_all_blocks()  # the previous case's arrays are gone by now
        model, host_params = build(name, options, input_shape)
        params = {k: backend.to_device(v) for k, v in host_params.items()}
        x, y = (backend.to_device(a) for a in batch_data(input_shape, batch))
        rule, sgd, rng, state = rules.create(rule_name), optim.SGD(LR), backend.rng(0), model.init_state()
        rule.setup(model, params, 0)
        return timed(lambda: sgd.step(params, rule(model, params, x, y, rng, state).grads),
                     cupy.cuda.Device().synchronize, settings["repeats"], settings["warmup"])
    return {**measure_cases(settings, time_case), "device": _cupy_device()}


def _cupy_device():
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return {"name": name.decode() if isinstance(name, bytes) else name, "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}


# ---------------------------------------------------------------------------------------
# JAX: the whole step in one jax.jit
# ---------------------------------------------------------------------------------------
def jax_estimators(model):
    """{rule: estimate(params, x, onehot, noise) -> {name: gradient}} in JAX (noise: {layer: array};
    bp takes no noise), for the dualnet ``model``'s architecture and parameter names."""
    import jax
    import jax.numpy as jnp
    arch = Arch(model)

    def layer_norm(z):
        centred = z - z.mean(-1, keepdims=True)
        return centred / jnp.sqrt((centred * centred).mean(-1, keepdims=True) + EPS)

    def linear(layer, weight, bias, x):
        if layer.kind == "token":
            return jnp.einsum("qp,npc->nqc", weight, x) + bias[:, None]
        if layer.kind == "grouped":
            return jnp.einsum("npgc,gcd->npgd", x, weight) + bias
        return x @ weight + bias

    def normalized(layer, weight, bias, x):
        z = linear(layer, weight, bias, x)
        return layer_norm(z) if layer.norm else z

    def grid(h):
        return h.reshape(h.shape[:2] + (arch.groups, arch.width))

    def embed(x):
        if not arch.mixer:
            return x.reshape(x.shape[0], -1)
        patches = x.reshape(arch.embed_shape(x.shape)).transpose(0, 2, 4, 1, 3, 5)
        return patches.reshape(x.shape[0], arch.tokens, -1)

    def pool(h):
        return h.mean(1) if arch.mixer else h

    def block(params, k, h, noise):
        """Block k on h; returns (output, [(layer input, pre-activation)] per layer)."""
        block_input, records = h, []
        for layer in arch.blocks[k]:
            x = grid(h) if layer.kind == "grouped" else h
            y = normalized(layer, params[layer.weight], params[layer.bias], x)
            if noise is not None:
                y = y + noise[layer]
            pre = y + grid(block_input) if layer.residual else y
            h = jax.nn.relu(pre)
            records.append((x, pre))
            if layer.kind == "grouped":
                h = h.reshape(h.shape[:2] + (arch.channels,))
        return h, records

    def readout(params, features, onehot):
        logits = features @ params["head.weight"] + params["head.bias"]
        return -(jax.nn.log_softmax(logits) * onehot).sum(-1), logits

    def exact_head(features, logits, onehot, weight, bias):
        error = (jax.nn.softmax(logits) - onehot) / onehot.shape[0]
        return {weight: features.T @ error, bias: error.sum(0)}

    def layer_grads(params, layer, x, site_grad):
        _, pullback = jax.vjp(lambda w, b: normalized(layer, w, b, x), params[layer.weight], params[layer.bias])
        weight_grad, bias_grad = pullback(site_grad)
        return {layer.weight: weight_grad, layer.bias: bias_grad}

    def fga(params, x, onehot, noise):
        def losses(noise):
            h, records = embed(x), []
            for k in range(len(arch.blocks)):
                h, block_records = block(params, k, h, noise)
                records += block_records
            per_example, logits = readout(params, pool(h), onehot)
            return per_example, (records, pool(h), logits)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, noise)
        _, d, (records, features, logits) = jax.jvp(losses, (zeros,), (noise,), has_aux=True)
        n = onehot.shape[0]
        grads = exact_head(features, logits, onehot, "head.weight", "head.bias")
        for layer, (x_in, pre) in zip(arch.layers, records):
            scale = d.reshape((n,) + (1,) * (pre.ndim - 1))
            grads.update(layer_grads(params, layer, x_in, scale * noise[layer] * (pre > 0) / n))
        return grads

    def lgfga(params, x, onehot, noise):
        h, grads, n = embed(x), {}, onehot.shape[0]
        for k, layers in enumerate(arch.blocks):
            own = {layer: noise[layer] for layer in layers}
            zeros = jax.tree_util.tree_map(jnp.zeros_like, own)
            out, out_tangent, records = jax.jvp(lambda u: block(params, k, h, u), (zeros,), (own,), has_aux=True)
            head_w, head_b = params[f"blocks.{k}.head.weight"], params[f"blocks.{k}.head.bias"]
            pooled = grid(out).mean(1).reshape(n, -1)
            logits = pooled @ head_w + head_b
            delta = jax.nn.softmax(logits) - onehot                             # ∂L_n/∂h_n
            directions = (delta @ head_w.T).reshape(n, arch.groups, arch.width)  # u[n, g] = W_g δ_n
            d = jnp.einsum("npgc,ngc->npg", grid(out_tangent), directions) / arch.tokens
            grads.update(exact_head(pooled, logits, onehot, f"blocks.{k}.head.weight", f"blocks.{k}.head.bias"))
            for layer, (x_in, pre) in zip(layers, records):
                if layer.kind == "token":
                    units = d.sum(-1, keepdims=True)                 # token units: Σ_g d[n, p, g]
                elif layer.kind == "dense":
                    units = jnp.repeat(d, arch.width, axis=-1)       # channel units: their group's d
                else:
                    units = d[..., None]
                grads.update(layer_grads(params, layer, x_in, units * noise[layer] * (pre > 0) / n))
            h = out
        _, logits = readout(params, pool(h), onehot)
        grads.update(exact_head(pool(h), logits, onehot, "head.weight", "head.bias"))
        return grads

    def bp(params, x, onehot):
        def loss(params):
            h = embed(x)
            for k in range(len(arch.blocks)):
                h, _ = block(params, k, h, None)
            return readout(params, pool(h), onehot)[0].mean()
        return jax.grad(loss)(params)

    return {"fg-a": fga, "lg-fg-a": lgfga, "bp": bp}, arch


def worker_jax(settings):
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_default_matmul_precision", "highest")
    device = jax.devices()[0]
    if device.platform != "gpu":
        raise RuntimeError(f"JAX sees no GPU (default device: {device.platform}); install jax[cuda12]")

    def time_case(name, options, input_shape, rule_name, batch):
        model, host_params = build(name, options, input_shape)
        estimators, arch = jax_estimators(model)
        estimate = estimators[rule_name]
        x, y = batch_data(input_shape, batch)
        x, onehot = jnp.asarray(x), jax.nn.one_hot(y, CLASSES, dtype=jnp.float32)

        def step(params, key):
            if rule_name == "bp":
                grads = estimate(params, x, onehot)
            else:
                keys = jax.random.split(key, len(arch.layers))
                noise = {layer: jax.random.normal(k, arch.site_shape(layer, batch), jnp.float32)
                         for layer, k in zip(arch.layers, keys)}
                grads = estimate(params, x, onehot, noise)
            return {k: (v - LR * grads[k] if k in grads else v) for k, v in params.items()}
        step = jax.jit(step, donate_argnums=0)
        state = {"params": {k: jnp.asarray(v) for k, v in host_params.items()}, "key": jax.random.PRNGKey(0)}

        def run():
            state["params"] = step(state["params"], state["key"])
        return timed(run, lambda: jax.block_until_ready(state["params"]), settings["repeats"], settings["warmup"])
    return {**measure_cases(settings, time_case), "device": {"name": device.device_kind, "jax": jax.__version__}}


# ---------------------------------------------------------------------------------------
# PyTorch: forward-mode AD (dual tensors) for FG-A / LG-FG-A, autograd for BP
# ---------------------------------------------------------------------------------------
def torch_estimators(model):
    """{rule: estimate(params, x, onehot, noise) -> {name: gradient}} in PyTorch, as
    ``jax_estimators`` (bp takes no noise); arrays on any one torch device."""
    import torch
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    arch = Arch(model)
    primal = lambda t: fwAD.unpack_dual(t).primal

    def linear(layer, weight, bias, x):
        if layer.kind == "token":
            return torch.matmul(weight, x) + bias[:, None]
        if layer.kind == "grouped":
            return torch.einsum("npgc,gcd->npgd", x, weight) + bias
        return x @ weight + bias

    def grid(h):
        return h.reshape(h.shape[:2] + (arch.groups, arch.width))

    def embed(x):
        if not arch.mixer:
            return x.reshape(x.shape[0], -1)
        patches = x.reshape(arch.embed_shape(x.shape)).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(x.shape[0], arch.tokens, -1)

    def pool(h):
        return h.mean(1) if arch.mixer else h

    def block(params, k, h, noise):
        """Block k on h (noise as tangents, inside a dual level); returns (output,
        [(layer input, z, normalised y, pre-activation)] per layer, primal values)."""
        block_input, records = h, []
        for layer in arch.blocks[k]:
            x = grid(h) if layer.kind == "grouped" else h
            z = linear(layer, params[layer.weight], params[layer.bias], x)
            y = F.layer_norm(z, z.shape[-1:], eps=EPS) if layer.norm else z
            y_value = primal(y)
            if noise is not None:
                y = y + fwAD.make_dual(torch.zeros_like(noise[layer]), noise[layer])
            pre = y + grid(block_input) if layer.residual else y
            h = torch.relu(pre)
            records.append((primal(x), primal(z), y_value, primal(pre)))
            if layer.kind == "grouped":
                h = h.reshape(h.shape[:2] + (arch.channels,))
        return h, records

    def readout(params, features, onehot):
        logits = features @ params["head.weight"] + params["head.bias"]
        return -(torch.log_softmax(logits, -1) * onehot).sum(-1), logits

    def exact_head(features, logits, onehot, weight, bias):
        error = (torch.softmax(logits, -1) - onehot) / onehot.shape[0]
        return {weight: features.T @ error, bias: error.sum(0)}

    def layer_grads(layer, x, z, y, site_grad):
        """The layer's own pull-back: the exact LN Jacobian (symmetric), then xᵀδ."""
        g = site_grad
        if layer.norm:
            sigma = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + EPS)
            g = (g - g.mean(-1, keepdim=True) - y * (y * g).mean(-1, keepdim=True)) / sigma
        if layer.kind == "token":
            weight, bias = torch.einsum("nqc,npc->qp", g, x), g.sum((0, 2))
        elif layer.kind == "grouped":
            weight, bias = torch.einsum("npgc,npgd->gcd", x, g), g.sum((0, 1))
        else:
            rows = g.reshape(-1, g.shape[-1])
            weight, bias = x.reshape(-1, x.shape[-1]).T @ rows, rows.sum(0)
        return {layer.weight: weight, layer.bias: bias}

    def fga(params, x, onehot, noise):
        n = onehot.shape[0]
        with torch.no_grad(), fwAD.dual_level():
            h, records = embed(x), []
            for k in range(len(arch.blocks)):
                h, block_records = block(params, k, h, noise)
                records += block_records
            per_example, logits = readout(params, pool(h), onehot)
            d = fwAD.unpack_dual(per_example).tangent
            features, logits = primal(pool(h)), primal(logits)
        grads = exact_head(features, logits, onehot, "head.weight", "head.bias")
        for layer, (x_in, z, y, pre) in zip(arch.layers, records):
            scale = d.reshape((n,) + (1,) * (pre.ndim - 1))
            grads.update(layer_grads(layer, x_in, z, y, scale * noise[layer] * (pre > 0) / n))
        return grads

    def lgfga(params, x, onehot, noise):
        n, grads = onehot.shape[0], {}
        with torch.no_grad(), fwAD.dual_level():
            h = embed(x)
            for k, layers in enumerate(arch.blocks):
                out, records = block(params, k, h, noise)
                out, out_tangent = fwAD.unpack_dual(out)
                head_w, head_b = params[f"blocks.{k}.head.weight"], params[f"blocks.{k}.head.bias"]
                pooled = grid(out).mean(1).reshape(n, -1)
                logits = pooled @ head_w + head_b
                delta = torch.softmax(logits, -1) - onehot
                directions = (delta @ head_w.T).reshape(n, arch.groups, arch.width)
                d = torch.einsum("npgc,ngc->npg", grid(out_tangent), directions) / arch.tokens
                grads.update(exact_head(pooled, logits, onehot, f"blocks.{k}.head.weight", f"blocks.{k}.head.bias"))
                for layer, (x_in, z, y, pre) in zip(layers, records):
                    if layer.kind == "token":
                        units = d.sum(-1, keepdim=True)
                    elif layer.kind == "dense":
                        units = torch.repeat_interleave(d, arch.width, dim=-1)
                    else:
                        units = d[..., None]
                    grads.update(layer_grads(layer, x_in, z, y, units * noise[layer] * (pre > 0) / n))
                h = out  # stop-gradient: the next block sees values only
        _, logits = readout(params, pool(h), onehot)
        grads.update(exact_head(pool(h), logits, onehot, "head.weight", "head.bias"))
        return grads

    def bp(params, x, onehot):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        h = embed(x)
        for k in range(len(arch.blocks)):
            h, _ = block(leaves, k, h, None)
        loss = readout(leaves, pool(h), onehot)[0].mean()
        names = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        return {k: g for k, g in zip(names, grads) if g is not None}

    return {"fg-a": fga, "lg-fg-a": lgfga, "bp": bp}, arch


def worker_torch(settings):
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no GPU (torch.cuda.is_available() is False); install a CUDA build")
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")

    def time_case(name, options, input_shape, rule_name, batch):
        torch.cuda.empty_cache()  # the previous case's tensors are gone by now
        model, host_params = build(name, options, input_shape)
        estimators, arch = torch_estimators(model)
        estimate = estimators[rule_name]
        params = {k: torch.as_tensor(v, device=device) for k, v in host_params.items()}
        x, y = batch_data(input_shape, batch)
        x = torch.as_tensor(x, device=device)
        onehot = torch.nn.functional.one_hot(torch.as_tensor(y, device=device), CLASSES).float()

        def step():
            if rule_name == "bp":
                grads = estimate(params, x, onehot)
            else:
                noise = {layer: torch.randn(arch.site_shape(layer, batch), device=device) for layer in arch.layers}
                grads = estimate(params, x, onehot, noise)
            with torch.no_grad():
                for k, g in grads.items():
                    params[k].sub_(LR * g)
        return timed(step, torch.cuda.synchronize, settings["repeats"], settings["warmup"])
    return {**measure_cases(settings, time_case),
            "device": {"name": torch.cuda.get_device_name(0), "torch": torch.__version__}}


# ---------------------------------------------------------------------------------------
# kernels: grouped linear vs cuBLAS, layer norm vs device-to-device copy
# ---------------------------------------------------------------------------------------
def worker_kernels(settings):
    import cupy
    from cupyx.profiler import benchmark

    import dualnet as dn
    from dualnet import backend, fused
    from dualnet.nn.localmixer import CONFIGS
    backend.use("cupy")

    def gpu_ms(fn):
        result = benchmark(fn, n_repeat=settings["kernel_repeats"], n_warmup=settings["warmup"])
        return 1000 * float(numpy.median(result.gpu_times[0]))

    rng = cupy.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, dtype=cupy.float32)
    grouped, norms = {}, {}
    for batch in settings["batches"]:
        for config in MIXERS:
            sizes = CONFIGS[config]
            channels, groups = sizes["channels"], sizes["groups"]
            rows, width = batch * sizes["patches"] ** 2, channels // groups
            x, x_tangent = normal(rows, groups, width), normal(1, rows, groups, width)
            weight, bias = normal(groups, width, width), normal(groups, width)
            major = cupy.ascontiguousarray(x.transpose(1, 0, 2))                        # [G, M, c]
            stacked = cupy.ascontiguousarray(cupy.concatenate([x, x_tangent[0]]).transpose(1, 0, 2))  # [G, 2M, c]
            flops = 2 * rows * groups * width * width
            for label, dualnet_call, cublas_call, count in [
                    ("value", lambda: fused.grouped_linear(x, weight, bias), lambda: cupy.matmul(major, weight), 1),
                    ("value+1 tangent", lambda: fused.grouped_linear(dn.Dual(x, x_tangent), weight, bias),
                     lambda: cupy.matmul(stacked, weight), 2)]:
                ours, theirs = gpu_ms(dualnet_call), gpu_ms(cublas_call)
                grouped[f"{config},N={batch},{label}"] = {
                    "dualnet_ms": ours, "cublas_ms": theirs, "dualnet_tflops": count * flops / ours / 1e9,
                    "cublas_tflops": count * flops / theirs / 1e9, "dualnet_rate_over_cublas_rate": theirs / ours}
            for label, shape in [(f"token LN C={channels}", (rows, channels)),
                                 (f"group LN c={width}", (rows * groups, width))]:
                key = f"{config},N={batch},{label}"
                x, x_tangent = normal(*shape), normal(1, *shape)
                copy = cupy.empty_like(x)
                copy_ms = gpu_ms(lambda: copy.data.copy_from_device_async(x.data, x.nbytes))
                copy_gbs = 2 * x.nbytes / copy_ms / 1e6
                sigma_bytes = 4 * shape[0]
                for variant, call, moved in [  # bytes read + written: x (ẋ), y (ẏ), σ
                        ("value", lambda: fused.layer_norm(x), 2 * x.nbytes + sigma_bytes),
                        ("value+1 tangent", lambda: fused.layer_norm(dn.Dual(x, x_tangent)),
                         4 * x.nbytes + sigma_bytes)]:
                    ms = gpu_ms(call)
                    norms[f"{key},{variant}"] = {
                        "dualnet_ms": ms, "dualnet_gbs": moved / ms / 1e6, "d2d_copy_gbs": copy_gbs,
                        "dualnet_bandwidth_over_d2d_copy_bandwidth": moved / ms / 1e6 / copy_gbs}
            cupy.get_default_memory_pool().free_all_blocks()
    return {"grouped_linear": grouped, "layer_norm": norms, "device": _cupy_device()}


# ---------------------------------------------------------------------------------------
# fused replicated loss memory at L/32/64 (CuPy's memory pool) vs naive (computed)
# ---------------------------------------------------------------------------------------
def worker_loss_memory(settings):
    import cupy

    from dualnet import backend
    backend.use("cupy")
    pool = cupy.get_default_memory_pool()
    examples = settings["loss_examples"]
    size = dict(replicated_loss.L_32_64, examples=examples)
    problem = tuple(cupy.asarray(a) for a in replicated_loss.make_problem(numpy.random.default_rng(0), **size))
    measured = {}
    for name, run in replicated_loss.passes(replicated_loss.IMPLEMENTATIONS["fused"], problem).items():
        run()  # warm-up: compiled kernels, cuBLAS handles
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        result = run()
        cupy.cuda.Device().synchronize()
        measured[name] = (pool.total_bytes() - before) / 2 ** 20
        del result
    scale = FULL_EXAMPLES / examples
    naive_mb = replicated_loss.naive_lower_bound_mb(**replicated_loss.L_32_64)
    return {"sizes": dict(replicated_loss.L_32_64, classes=replicated_loss.CLASSES,
                          directions=replicated_loss.DIRECTIONS),
            f"fused_mb@N={examples} (measured)": measured,
            f"fused_mb@N={FULL_EXAMPLES} (scaled x{scale:g})": {k: v * scale for k, v in measured.items()},
            f"naive_mb@N={FULL_EXAMPLES} (computed lower bound)": naive_mb,
            "naive_memory_over_fused_memory": {k: naive_mb / (v * scale) for k, v in measured.items()}}


WORKERS = {"dualnet": worker_dualnet, "jax": worker_jax, "torch": worker_torch, "kernels": worker_kernels,
           "loss_memory": worker_loss_memory}


def run_worker(name, settings):
    env = dict(os.environ, CUPY_TF32="0", NVIDIA_TF32_OVERRIDE="0")
    done = subprocess.run([sys.executable, __file__, "--worker", name, "--settings", json.dumps(settings)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout)


def compare(results):
    """Ratios (keys name both sides) and the issue's targets."""
    ms = {name: part.get("ms", {}) for name, part in results.items()}
    ratios, targets = {}, []
    for label, ours in ms.get("dualnet", {}).items():
        rule = label.split("@")[0]
        for peer, side in (("jax", "jax_jit_grad" if rule == "bp" else "jax_jit_jvp"),
                           ("torch", "torch_autograd" if rule == "bp" else "torch_forward_ad")):
            if label in ms.get(peer, {}):
                ratios[f"{label}: dualnet_over_{side}"] = ours / ms[peer][label]
        if rule == "lg-fg-a":
            bp = label.replace("lg-fg-a@", "bp@")
            if bp in ms["dualnet"]:
                ratios[f"{label}: dualnet_lg-fg-a_over_dualnet_bp"] = ours / ms["dualnet"][bp]
            if label in ms.get("jax", {}):
                value = ours / ms["jax"][label]
                targets.append({"target": f"{label}: dualnet step <= 1.0x JAX jit(jvp)", "value": value,
                                "met": value <= 1.0})
    for section, key, goal in (("grouped_linear", "dualnet_rate_over_cublas_rate", 0.7),
                               ("layer_norm", "dualnet_bandwidth_over_d2d_copy_bandwidth", 0.6)):
        for label, row in results.get("kernels", {}).get(section, {}).items():
            ratios[f"{section}@{label}: {key}"] = row[key]
            targets.append({"target": f"{section}@{label}: {key} >= {goal}", "value": row[key],
                            "met": row[key] >= goal})
    for name, value in results.get("loss_memory", {}).get("naive_memory_over_fused_memory", {}).items():
        ratios[f"replicated_loss@L/32/64,N={FULL_EXAMPLES},{name}: naive_memory_over_fused_memory"] = value
    return ratios, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 timed steps, batch 128, fewer loss examples")
    parser.add_argument("--loss-examples", type=int, help=f"N for the L/32/64 loss memory (default {LOSS_EXAMPLES})")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.settings))))
        return 0
    from dualnet import backend
    if not backend.cuda_available():
        print("benchmarks/gpu.py: no usable CUDA device (CuPy is missing or cupy.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and `pip install -e .[cuda,bench]`.", file=sys.stderr)
        return 2
    settings = {"batches": [128] if args.quick else [128, 512], "repeats": 10 if args.quick else 50,
                "warmup": 3 if args.quick else 5, "kernel_repeats": 20 if args.quick else 100,
                "loss_examples": args.loss_examples or (8 if args.quick else LOSS_EXAMPLES)}
    results = {name: run_worker(name, settings) for name in WORKERS}
    ratios, targets = compare(results)
    print(json.dumps({
        "benchmark": "gpu", "date": time.strftime("%Y-%m-%d"), "settings": settings,
        "devices": {name: part.get("device") for name, part in results.items() if "device" in part},
        "ms": {name: part["ms"] for name, part in results.items() if "ms" in part},
        "kernels": {k: v for k, v in results.get("kernels", {}).items() if k != "device"},
        "replicated_loss_memory": results.get("loss_memory"),
        "ratios": ratios, "targets": targets,
        "errors": {name: part["error"] for name, part in results.items() if "error" in part}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
