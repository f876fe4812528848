"""The thread settings ``import dualnet`` makes: idle OpenMP and OpenBLAS workers sleep."""
import os
import subprocess
import sys
import textwrap

import pytest

from dualnet import idle_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDLE_CPU = textwrap.dedent("""
    import json, os, sys, time
    import dualnet
    import numpy as np
    from threadpoolctl import threadpool_info
    rng = np.random.default_rng(0)
    if sys.argv[1] == "kernel":  # a Numba kernel's parallel loop: 1 M elements
        import numba
        from dualnet.kernels import cpu
        jacobian = cpu.load("layer_norm").layer_norm_jacobian
        y = rng.standard_normal((2048, 512)).astype(np.float32)
        sigma, v = np.ones((2048, 1), np.float32), y[None].copy()
        call, runtime = lambda: jacobian(y, sigma, v), "omp"
    else:  # a BLAS matrix product
        a = rng.standard_normal((1024, 1024)).astype(np.float32)
        call, runtime = lambda: a @ a, "openblas"
    call()
    spent = []
    for _ in range(10):
        call()
        start = time.process_time()
        time.sleep(0.02)
        spent.append(time.process_time() - start)
    if runtime == "omp":
        threads = numba.get_num_threads() if numba.threading_layer() == "omp" else 0
    else:
        threads = max([p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openblas"] + [0])
    settings = {name: os.environ.get(name) for name in dualnet.idle_threads.IDLE_THREAD_SETTINGS}
    print(json.dumps(dict(threads=threads, settings=settings, spent_ms=1000 * sorted(spent)[5])))
""")


def idle_cpu_after(call, **env):
    """In a fresh process that imports dualnet first: the threads of the runtime that ran ``call``
    ('kernel': Numba on OpenMP, 'gemm': OpenBLAS; 0 when another runtime ran it), the settings in
    force, and the median CPU ms the process spent in a 20 ms pause right after the call."""
    import json
    clean = {k: v for k, v in os.environ.items() if k not in idle_threads.IDLE_THREAD_SETTINGS}
    done = subprocess.run([sys.executable, "-c", IDLE_CPU, call], capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": ROOT, "NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2",
                               **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a second worker")


@needs_two_cores
@pytest.mark.parametrize("call", ["kernel", "gemm"])
def test_workers_sleep_after_a_call(call):
    # By default GNU OpenMP's worker spun ~9 ms after each parallel loop (8.6 ms of CPU in a 20 ms
    # pause) and OpenBLAS's for the whole pause (20 ms), each on a core the other runtime needed
    # next: ~1.5x on a LocalMixer M/8/16 step.
    seen = idle_cpu_after(call)
    assert seen["settings"] == idle_threads.IDLE_THREAD_SETTINGS
    if seen["threads"] < 2:
        pytest.skip(f"{call}: not run by a multi-threaded {'OpenMP' if call == 'kernel' else 'OpenBLAS'}")
    assert seen["spent_ms"] < 2.0


def test_settings_from_the_environment_are_kept():
    spinning = {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "28"}
    assert idle_cpu_after("gemm", **spinning)["settings"] == spinning
