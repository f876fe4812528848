"""The process-level setting ``import dualnet`` makes: freed heap is kept for the next step."""
import os
import subprocess
import sys
import textwrap

import pytest

from dualnet import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from dualnet import models, optim, rules
    name, shape = sys.argv[1], tuple(int(n) for n in sys.argv[2].split(","))
    options = {"mlp": dict(hidden=800, layers=4, batch_norm=False),
               "localmixer": dict(config="M/8/16", blocks=1, channels=128, groups=4)}[name]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((128,) + shape).astype(np.float32), rng.integers(0, 10, 128)
    model = models.create(name, input_shape=shape, **options)
    params, rule, sgd = model.init(0), rules.create("fg-a"), optim.SGD(1e-3)
    step = lambda: sgd.step(params, rule(model, params, x, y, rng).grads)
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def faults_per_step(model, shape, **env):
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS, model, shape], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1",
                                            "NUMBA_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(not backend.keep_freed_memory(), reason="needs glibc's mallopt")
@pytest.mark.parametrize("model, shape", [("mlp", "1,28,28"), ("localmixer", "3,32,32")])
def test_a_training_step_takes_no_fresh_pages(model, shape):
    # With glibc's defaults the MLP's heap shrank at the end of every step and grew again in the
    # next (~3,400 page faults, 13 MB zeroed, about a fifth of the step), and the LocalMixer's
    # 4 MB arrays were mapped and unmapped on every allocation.
    assert faults_per_step(model, shape) < 50


IDLE_CPU = textwrap.dedent("""
    import os, time
    import numpy as np
    import dualnet
    import numba
    from dualnet.kernels import cpu
    jacobian = cpu.load("layer_norm").layer_norm_jacobian
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2048, 512)).astype(np.float32)
    sigma, v = np.ones((2048, 1), np.float32), y[None].copy()
    jacobian(y, sigma, v)  # a parallel region: 1 M elements
    spent = []
    for _ in range(10):
        jacobian(y, sigma, v)
        start = time.process_time()
        time.sleep(0.02)
        spent.append(time.process_time() - start)
    print(numba.threading_layer(), os.environ.get("OMP_WAIT_POLICY"), 1000 * sorted(spent)[5])
""")


def idle_cpu_after_a_parallel_kernel(**env):
    """(threading layer, OMP_WAIT_POLICY seen after import, median CPU ms spent during a 20 ms
    pause right after a parallel kernel) in a fresh process with 2 Numba threads."""
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", IDLE_CPU], capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": ROOT, "NUMBA_NUM_THREADS": "2", **env})
    assert done.returncode == 0, done.stderr
    layer, policy, spent = done.stdout.split()
    return layer, policy, float(spent)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a parallel region")
def test_kernel_threads_sleep_between_parallel_regions():
    # GNU OpenMP's default policy spun each worker ~9 ms after every region (8.6 ms of CPU in a
    # 20 ms pause, measured), taking a core from the GEMMs that follow: ~1.5x on a LocalMixer step.
    layer, policy, spent = idle_cpu_after_a_parallel_kernel()
    if layer != "omp":
        pytest.skip(f"Numba runs its parallel kernels on {layer!r}, not OpenMP")
    assert policy == "PASSIVE"
    assert spent < 2.0


def test_an_openmp_wait_policy_from_the_environment_is_kept():
    _, policy, _ = idle_cpu_after_a_parallel_kernel(OMP_WAIT_POLICY="ACTIVE")
    assert policy == "ACTIVE"
