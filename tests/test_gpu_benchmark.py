"""benchmarks/gpu.py: its JAX and PyTorch peers compute dualnet's estimates, and without a GPU it
stops with one clear message (exit status 2).

The peers are checked on the CPU in float64 with the noise dualnet drew: every gradient of
FG-A, LG-FG-A and BP on a small LocalMixer (3 blocks: token mixing, residuals, replicated
local losses) and FG-A and BP on an MLP agrees to 1e-8 of the tensor's largest entry (floored
at 1e-6 of the largest gradient overall: LN makes some biases' gradients exactly zero).
Needs JAX and PyTorch (the ``bench`` extra); skipped without them.
"""
import importlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dualnet import backend, models, rules

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
MODELS = {"localmixer": dict(input_shape=(3, 8, 8), config="M/8/16", blocks=3, patches=2, channels=16, groups=4),
          "mlp": dict(input_shape=(1, 4, 4), hidden=12, layers=4, batch_norm=False)}


@pytest.fixture(scope="module")
def gpu_benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def jax64():
    """JAX with float64 enabled for the test (restored after)."""
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


def record_noise(monkeypatch):
    """The per-example noise FG-A's keyed draws give each site, in the order the rule asks for it."""
    from dualnet.rules import forward
    draws, keyed = [], forward.example_noise

    def recording(*args, **kwargs):
        draw = keyed(*args, **kwargs)

        def sample(site):
            u = draw(site)
            if u is not None:
                draws.append(u)
            return u
        return sample
    monkeypatch.setattr(forward, "example_noise", recording)
    return draws


@pytest.mark.parametrize("model_name, rule_name", [("localmixer", "fg-a"), ("localmixer", "lg-fg-a"),
                                                   ("localmixer", "bp"), ("mlp", "fg-a"), ("mlp", "bp")])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_peers_compute_dualnets_estimates(request, monkeypatch, gpu_benchmark, framework, model_name, rule_name):
    if framework == "jax":
        request.getfixturevalue("jax64")
        import jax.numpy as jnp
        convert, estimators = jnp.asarray, gpu_benchmark.jax_estimators
    else:
        torch = pytest.importorskip("torch")
        convert, estimators = torch.as_tensor, gpu_benchmark.torch_estimators
    model = models.create(model_name, num_classes=10, **MODELS[model_name])
    rng = np.random.default_rng(5)
    with backend.using("numpy"):
        params = model.init(0, dtype=np.float64)
        params["head.weight"] = 0.3 * rng.standard_normal(params["head.weight"].shape)  # LocalMixer's starts at 0
        x = rng.standard_normal((6,) + MODELS[model_name]["input_shape"])
        y = rng.integers(0, 10, 6)
        draws = record_noise(monkeypatch)
        expected = rules.create(rule_name)(model, dict(params), x, y, np.random.default_rng(1), {}).grads
    estimate, arch = estimators(model)
    assert len(draws) == (0 if rule_name == "bp" else len(arch.layers))
    noise = {layer: convert(draw[0]) for layer, draw in zip(arch.layers, draws)}  # K = 1 axis dropped
    arguments = ({k: convert(v) for k, v in params.items()}, convert(x), convert(np.eye(10)[y]))
    got = estimate[rule_name](*arguments, *(() if rule_name == "bp" else (noise,)))
    largest = max(np.abs(v).max() for v in expected.values())
    assert largest > 0
    for name, value in expected.items():
        ours = np.asarray(got[name]) if name in got else np.zeros_like(value)  # torch omits unused heads in bp
        scale = max(np.abs(value).max(), 1e-6 * largest)
        np.testing.assert_allclose(ours, value, rtol=0, atol=1e-8 * scale, err_msg=name)


@pytest.mark.skipif(backend.cuda_available(), reason="checks the message where no GPU can be used")
def test_without_a_gpu_the_benchmark_exits_2_with_one_clear_message():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--quick"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "no usable CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
