"""The same model, rule and runner code on the GPU (CuPy) as on the CPU (NumPy).

On a GPU (``dualnet.backend.cuda_available()``: CuPy installed and ``cupy.is_available()``) these
run on it.  Without CuPy they run against the test-only CuPy stand-in (``fake_cupy``; see
docs/cuda_on_cpu.md): device arrays are NumPy arrays of a ``cupy`` type and the CUDA kernels run on
the CPU under the warp emulation.  That proves the logic: the backend switch, arrays staying on the
device, the launchers' argument passing, ``DUALNET_BACKEND=cupy``, checkpoints moving between
devices; only a real GPU shows cuBLAS/cuRAND numbers, timing, memory and NVRTC.  They skip when
CuPy is installed without a usable device, or without CuPy when no C++ compiler is found.

* Estimates: for bp, fg-a, lg-fg-a, fg-w, dfa and fdfa on a tiny MLP (with BatchNorm and local
  heads) and a tiny LocalMixer, two consecutive steps from the same parameters, data and seeds
  give the same gradients, loss, running statistics and rule state on both devices, in float64,
  within rtol = 1e-7, atol = 1e-9·max(1, largest |entry|).  Only the summation order of
  BLAS vs cuBLAS and of the Numba vs CUDA kernels differs (~1e-15 relative per operation); any
  real discrepancy is O(1).
* Training: a short run on the digits (``train.Config``) on the GPU reaches the CPU run's test
  accuracy within 0.03 (11 of 360 test images) with identical noise, and within 0.08 with CuPy's
  own noise stream (the spread of LG-FG-A's test accuracy over 8 other noise streams of this
  configuration was ±0.035).
* Checkpoints written on the GPU hold host arrays, load on the CPU with the GPU run's accuracy,
  and the run continues there (``--device cpu`` on resume).

Identical noise.  Rules draw from Generators on the arrays' backend: the step's ``rng``,
per-tensor or per-site generators made with ``namespace(x).random.default_rng(seed)`` or
``backend.rng(seed)``.  CuPy's generators (cuRAND XORWOW) give other numbers than NumPy's for the
same seed, so the ``host_draws`` fixture replaces ``cupy.random.default_rng`` with
``HostDraws``: NumPy's draws for the same seed, copied to the GPU.  It offers only Generator
methods CuPy has, so a rule calling a method CuPy lacks fails here as it would on the GPU.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dualnet import backend, models, rules
from dualnet.train import Config, build_model, evaluate, load_checkpoint, prepare_data, train

pytestmark = pytest.mark.usefixtures("cuda_device")

RULES = ["bp", "fg-a", "lg-fg-a", "fg-w", "dfa", "fdfa"]
MODELS = {
    "mlp": dict(input_shape=(1, 8, 8), hidden=24, layers=3, local_heads=True),
    "localmixer": dict(input_shape=(1, 8, 8), config="M/8/16", blocks=2, patches=2, channels=16, groups=4),
}
RTOL, ATOL_FRACTION = 1e-7, 1e-9
SAME_NOISE_TOLERANCE, OWN_NOISE_TOLERANCE = 0.03, 0.08


class HostDraws:
    """Stand-in for ``cupy.random.default_rng(seed)``: NumPy's draws for ``seed``, on the GPU."""

    def __init__(self, seed=None):
        self._numpy = np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=np.float64):
        return self._device(self._numpy.standard_normal(size, dtype=dtype))

    def random(self, size=None, dtype=np.float64):
        return self._device(self._numpy.random(size, dtype=dtype))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return self._device(self._numpy.uniform(low, high, size).astype(dtype))

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return self._device(self._numpy.integers(low, high, size, dtype=dtype, endpoint=endpoint))

    @staticmethod
    def _device(values):
        import cupy
        return cupy.asarray(values)


@pytest.fixture
def cupy():
    """CuPy, with the default backend switched to it for the test (restored after)."""
    import cupy
    with backend.using("cupy"):
        yield cupy


@pytest.fixture
def host_draws(monkeypatch):
    import cupy
    monkeypatch.setattr(cupy.random, "default_rng", HostDraws)


def _problem(model_name, seed=0, batch=8):
    """A model, float64 host parameters and running statistics, and one host batch.

    LocalMixer's read-out starts at zero, which would make every global rule's hidden update
    zero whatever the noise; a random read-out makes those comparisons count."""
    model = models.create(model_name, **MODELS[model_name])
    with backend.using("numpy"):
        params, state = model.init(seed, dtype=np.float64), model.init_state(dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    params["head.weight"] = 0.1 * rng.standard_normal(params["head.weight"].shape)
    x = rng.standard_normal((batch, 1, 8, 8))
    y = rng.integers(0, 10, batch)
    return model, params, state, x, y


def _two_steps(model, params, state, x, y, rule_name):
    """Two estimates of a fresh rule on the active backend (from the same parameters, state
    carried), returned as host arrays: [(grads, loss, model state)], rule state."""
    to = backend.to_device
    params = {name: to(value) for name, value in params.items()}
    state = {name: tuple(to(a) for a in stats) for name, stats in state.items()}
    x, y = to(x), to(y)
    rule = rules.create(rule_name)
    rule.setup(model, params, 0)
    steps = []
    for step in range(2):
        estimate = rule(model, params, x, y, backend.rng([0, step]), state)
        state = estimate.state or state
        for grad in estimate.grads.values():  # the estimate stays on the device
            assert backend.namespace(grad) is backend.xp
        steps.append(({name: backend.to_numpy(g) for name, g in estimate.grads.items()}, estimate.loss,
                      {name: [backend.to_numpy(a) for a in stats] for name, stats in state.items()}))
    return steps, rule.state_dict()


def _assert_close(actual, expected, what):
    atol = ATOL_FRACTION * max(float(np.abs(expected).max()), 1.0) if np.size(expected) else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=what)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rule_name", RULES)
def test_same_estimate_on_cpu_and_gpu(cupy, host_draws, model_name, rule_name):
    model, params, state, x, y = _problem(model_name)
    with backend.using("numpy"):
        cpu_steps, cpu_rule_state = _two_steps(model, params, state, x, y, rule_name)
    gpu_steps, gpu_rule_state = _two_steps(model, params, state, x, y, rule_name)
    for step, ((cpu_grads, cpu_loss, cpu_state), (gpu_grads, gpu_loss, gpu_state)) in enumerate(
            zip(cpu_steps, gpu_steps)):
        assert sorted(gpu_grads) == sorted(cpu_grads)
        for name in cpu_grads:
            _assert_close(gpu_grads[name], cpu_grads[name], f"step {step}: gradient of {name}")
        assert gpu_loss == pytest.approx(cpu_loss, rel=RTOL)
        for name in cpu_state:
            for gpu_stat, cpu_stat in zip(gpu_state[name], cpu_state[name]):
                _assert_close(gpu_stat, cpu_stat, f"step {step}: running statistics {name}")
    assert sorted(gpu_rule_state) == sorted(cpu_rule_state)
    for name in cpu_rule_state:  # FDFA's learned B, DFA's fixed B
        _assert_close(gpu_rule_state[name], cpu_rule_state[name], f"rule state {name}")


def test_the_runner_draws_noise_on_the_device(cupy):
    from dualnet.run import step_rng
    generator = step_rng(0, 1, 2)
    assert isinstance(generator, cupy.random.Generator)
    assert isinstance(generator.standard_normal((3,), dtype=np.float32), cupy.ndarray)


def _config(tmp_path, label, model, rule, device, epochs):
    options = {"mlp": dict(hidden=64, layers=3),
               "localmixer": dict(config="M/8/16", blocks=2, patches=2, channels=32, groups=4)}[model]
    return Config(model=model, model_options=options, rule=rule, dataset="digits", epochs=epochs, batch_size=64,
                  lr=0.05, optimizer_options={"momentum": 0.9}, seed=0, device=device, out=str(tmp_path / label))


@pytest.mark.parametrize("model, rule", [("mlp", "bp"), ("localmixer", "lg-fg-a")])
def test_training_on_gpu_matches_cpu(tmp_path, host_draws, model, rule):
    pytest.importorskip("sklearn")
    before = backend.current()
    cpu = train(_config(tmp_path, "cpu", model, rule, "cpu", epochs=3))
    gpu = train(_config(tmp_path, "gpu", model, rule, "cuda", epochs=3))
    assert backend.current() == before  # each run restored the backend
    assert abs(gpu["test_acc"] - cpu["test_acc"]) <= SAME_NOISE_TOLERANCE, (cpu, gpu)
    assert json.load(open(tmp_path / "gpu" / "config.json"))["device"] == "cuda"


def test_training_with_cupy_noise_matches_cpu(tmp_path):
    pytest.importorskip("sklearn")
    cpu = train(_config(tmp_path, "cpu", "mlp", "lg-fg-a", "cpu", epochs=8))
    gpu = train(_config(tmp_path, "gpu", "mlp", "lg-fg-a", "cuda", epochs=8))
    assert abs(gpu["test_acc"] - cpu["test_acc"]) <= OWN_NOISE_TOLERANCE, (cpu, gpu)


def test_gpu_checkpoint_loads_and_resumes_on_cpu(tmp_path):
    """A GPU run's checkpoint holds host arrays: NumPy loads it, the CPU evaluates the GPU run's
    parameters to its accuracy, and the run continues on the CPU."""
    pytest.importorskip("sklearn")
    config = _config(tmp_path, "run", "localmixer", "lg-fg-a", "cuda", epochs=1)
    summary = train(config)
    parts, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    with backend.using("numpy"):
        dataset, *_, test_x, test_y = prepare_data(config)
        _, error = evaluate(build_model(config, dataset), parts["params"], parts["state"], test_x, test_y)
    assert abs((1 - error) - summary["test_acc"]) <= 2 / len(test_y)  # float32 near-ties may flip
    resumed = train(dataclasses.replace(config, epochs=2, device="cpu"), resume=True)
    assert resumed["epochs"] == 2
    assert json.load(open(tmp_path / "run" / "config.json"))["device"] == "cpu"


@pytest.mark.parametrize("how", ["--device cuda", "DUALNET_BACKEND=cupy"])
def test_cli_runs_on_the_gpu(tmp_path, how):
    pytest.importorskip("sklearn")
    command = [sys.executable, "-m", "dualnet", "train", "--dataset", "digits", "--train-limit", "128",
               "--rule", "fg-a", "--out", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != "DUALNET_BACKEND"}
    if how == "--device cuda":
        command += ["--device", "cuda"]
    else:
        env["DUALNET_BACKEND"] = "cupy"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.load(open(tmp_path / "run" / "config.json"))["device"] == "cuda"


def test_estimates_on_the_device_run_the_cuda_kernels(cupy, monkeypatch):
    """LocalMixer's fused ops reach kernels/cuda on the device (not the references), so the
    comparisons above hold the CUDA kernels to the Numba ones."""
    from dualnet.kernels import cuda
    launched = set()
    for name in cuda.MODULES:
        launcher = cuda.load(name)

        def recording(module, kernel, dtype, function=launcher.function):
            launched.add(kernel)
            return function(module, kernel, dtype)
        monkeypatch.setattr(launcher, "function", recording)
    model, params, state, x, y = _problem("localmixer")
    _two_steps(model, params, state, x, y, "lg-fg-a")
    assert launched >= {"layer_norm_forward", "layer_norm_jacobian", "replica_tangent"}
