"""The thread settings of dualnet: idle OpenMP workers sleep, and so do idle OpenBLAS workers once
kernels run in parallel."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dualnet import idle_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDLE_CPU = textwrap.dedent("""
    import json, os, time
    import dualnet
    import numba
    import numpy as np
    from dualnet.kernels import cpu
    jacobian = cpu.load("layer_norm").layer_norm_jacobian
    y = np.random.default_rng(0).standard_normal((2048, 512)).astype(np.float32)
    sigma, v = np.ones((2048, 1), np.float32), y[None].copy()
    jacobian(y, sigma, v)  # a parallel loop: 1 M elements
    spent = []
    for _ in range(10):
        jacobian(y, sigma, v)
        start = time.process_time()
        time.sleep(0.02)
        spent.append(time.process_time() - start)
    threads = numba.get_num_threads() if numba.threading_layer() == "omp" else 0
    settings = {name: os.environ.get(name) for name in dualnet.idle_threads.IDLE_THREAD_SETTINGS}
    print(json.dumps(dict(threads=threads, settings=settings, spent_ms=1000 * sorted(spent)[5])))
""")


def idle_cpu_after_a_parallel_kernel(**env):
    """In a fresh process with 2 Numba threads: the OpenMP threads that ran a parallel kernel (0
    when Numba runs them on another threading layer), the settings in force after ``import
    dualnet``, and the median CPU ms spent in a 20 ms pause right after the kernel."""
    clean = {k: v for k, v in os.environ.items() if k not in idle_threads.IDLE_THREAD_SETTINGS}
    done = subprocess.run([sys.executable, "-c", IDLE_CPU], capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": ROOT, "NUMBA_NUM_THREADS": "2", **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a second worker")
def test_kernel_workers_sleep_after_a_parallel_loop():
    # By default GNU OpenMP's worker spun ~9 ms after each parallel loop (8.6 ms of CPU in a 20 ms
    # pause, measured), on a core the next GEMM needed: ~1.5x on a LocalMixer M/8/16 BP step.
    seen = idle_cpu_after_a_parallel_kernel()
    assert seen["settings"] == idle_threads.IDLE_THREAD_SETTINGS
    if seen["threads"] < 2:
        pytest.skip("Numba's parallel kernels do not run on 2 OpenMP threads here")
    assert seen["spent_ms"] < 2.0


def test_a_setting_from_the_environment_is_kept():
    seen = idle_cpu_after_a_parallel_kernel(OMP_WAIT_POLICY="ACTIVE")
    assert seen["settings"] == {"OMP_WAIT_POLICY": "ACTIVE"}
    if seen["threads"] >= 2:
        assert seen["spent_ms"] > 2.0  # the measurement sees the spinning it guards against


OPENBLAS_IDLE_CPU = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import dualnet
    from dualnet import noise
    from threadpoolctl import threadpool_info
    a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)

    def idle_ms():  # median CPU ms the process spends in a 30 ms pause right after a matrix product
        spent = []
        for _ in range(5):
            a @ a
            start = time.process_time()
            time.sleep(0.03)
            spent.append(time.process_time() - start)
        return 1000 * sorted(spent)[2]
    before = idle_ms()
    draw = int(sys.argv[1])
    noise.normal_rows(noise.key(1), (draw,), 0, draw)  # parallel from 2^20 numbers on
    after = idle_ms()
    blas = [(i["threading_layer"], i["num_threads"]) for i in threadpool_info() if i["internal_api"] == "openblas"]
    print(json.dumps(dict(before=before, after=after, blas=blas, left=os.environ.get("OPENBLAS_THREAD_TIMEOUT"))))
""")


def openblas_idle_cpu(draw, **env):
    """In a fresh process with 2 OpenBLAS and 2 Numba threads: the median CPU ms spent in a 30 ms
    pause after a matrix product, before and after a Gaussian draw of ``draw`` numbers."""
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    done = subprocess.run([sys.executable, "-c", OPENBLAS_IDLE_CPU, str(draw)], capture_output=True, text=True,
                          timeout=300, env={**clean, "PYTHONPATH": ROOT, "NUMBA_NUM_THREADS": "2",
                                            "OPENBLAS_NUM_THREADS": "2", **env})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    if not seen["blas"] or any(blas != ["pthreads", 2] for blas in seen["blas"]):
        pytest.skip(f"the BLAS here is not OpenBLAS with its own 2 threads: {seen['blas']}")
    return seen


needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a second worker")


@needs_two_cores
def test_openblas_workers_sleep_once_a_kernel_runs_in_parallel():
    # OpenBLAS's idle worker spins ~0.1 s after each product; a parallel kernel then shares its
    # core (a 4 M-number draw: 5.2 against 2.7 ms).  After the first parallel kernel it sleeps.
    seen = openblas_idle_cpu(1 << 21)
    assert seen["before"] > 10.0  # the measurement sees the spinning it guards against
    assert seen["after"] < 5.0
    assert seen["left"] is None  # child processes get OpenBLAS's default


@needs_two_cores
def test_openblas_workers_keep_spinning_when_no_kernel_runs_in_parallel():
    seen = openblas_idle_cpu(1 << 16)
    assert seen["before"] > 10.0 and seen["after"] > 10.0


@needs_two_cores
def test_an_openblas_timeout_from_the_environment_is_kept():
    seen = openblas_idle_cpu(1 << 21, OPENBLAS_THREAD_TIMEOUT="28")
    assert seen["before"] > 10.0 and seen["after"] > 10.0
    assert seen["left"] == "28"
