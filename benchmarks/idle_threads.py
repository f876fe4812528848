"""What idle worker threads cost a parallel kernel, under this process's thread settings.

    python benchmarks/idle_threads.py                               # dualnet's settings
    OPENBLAS_THREAD_TIMEOUT=28 python benchmarks/idle_threads.py    # OpenBLAS's own default spinning
    OMP_WAIT_POLICY=ACTIVE python benchmarks/idle_threads.py        # OpenMP's workers keep spinning

A training step alternates BLAS matrix products with Numba's parallel kernels, and each runtime
may keep its workers spinning after a call.  Measured here, each as a median over 40 rounds:

* ``idle_cpu_ms``: CPU time the process spends in a 20 ms pause right after a parallel kernel
  (the layer-norm Jacobian on 1 M elements) or after a [128, 800] × [800, 800] float32 product:
  what the spinning workers burn while the main thread sleeps;
* ``draw_ms``: one parallel Gaussian draw of 128 × 64 × 512 float32 numbers (one perturbed layer of
  LocalMixer M/8/16) right after another draw, right after a product, and right after a product
  and 1 ms of busy work on the main thread.

The first parallel kernel (before the measurements) has dualnet make OpenBLAS's idle workers
sleep after 2^20 cycles unless the environment sets ``OPENBLAS_THREAD_TIMEOUT``
(``dualnet.idle_threads.let_openblas_workers_sleep``).  Prints one JSON object with the settings
in force (after ``import dualnet``), the OpenBLAS libraries dualnet changed, the thread pools
(threadpoolctl) and the load average.  Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset,
as the other speed benchmarks; an environment variable that OpenBLAS reads must be set before
the process starts, since NumPy loads OpenBLAS on import.
"""
import json
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info

import dualnet
from dualnet import noise
from dualnet.kernels import cpu

ROUNDS = 40


def median_ms(before, measured, rounds=ROUNDS):
    """Median over rounds of the wall time of ``measured()`` right after ``before()``."""
    times = []
    for _ in range(rounds):
        before()
        start = time.perf_counter()
        measured()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 3)


def idle_cpu_ms(before, rounds=ROUNDS):
    """Median CPU ms the process spends during a 20 ms sleep right after ``before()``."""
    spent = []
    for _ in range(rounds):
        before()
        start = time.process_time()
        time.sleep(0.02)
        spent.append(time.process_time() - start)
    return round(1e3 * statistics.median(spent), 3)


def main():
    rng = np.random.default_rng(0)
    h, weight = rng.standard_normal((128, 800), dtype=np.float32), rng.standard_normal((800, 800), dtype=np.float32)
    y = rng.standard_normal((2048, 512)).astype(np.float32)
    sigma, v = np.ones((2048, 1), np.float32), y[None].copy()
    jacobian = cpu.load("layer_norm").layer_norm_jacobian
    layer = np.empty((128, 64, 512), np.float32)

    def gemm():
        return h @ weight

    def kernel():
        return jacobian(y, sigma, v)

    def draw():
        return noise.normal(1, layer.shape, out=layer)

    def gemm_then_busy():
        gemm()
        end = time.perf_counter() + 1e-3
        while time.perf_counter() < end:
            pass

    load_before = os.getloadavg()
    gemm(), kernel(), draw()  # compile and start both thread pools
    report = {
        "settings": {name: os.environ.get(name) for name in
                     ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE")},
        "openblas_made_to_sleep_sooner": dualnet.idle_threads.openblas_changed,
        "idle_cpu_ms": {"after_parallel_kernel": idle_cpu_ms(kernel), "after_gemm": idle_cpu_ms(gemm)},
        "draw_ms": {"after_draw": median_ms(draw, draw), "after_gemm": median_ms(gemm, draw),
                    "after_gemm_and_1ms_busy": median_ms(gemm_then_busy, draw)},
        "threadpools": [f"{p['internal_api']} {p.get('architecture')} x{p['num_threads']}" for p in threadpool_info()],
        "dualnet": dualnet.__version__,
        "load_average": [load_before[0], os.getloadavg()[0]],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
