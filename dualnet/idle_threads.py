"""Worker threads that sleep when idle: the thread settings ``import dualnet`` makes.

A training step alternates BLAS matrix products, which want every core, with the CPU kernels'
parallel loops (Numba on OpenMP), which want every core too.  By default both runtimes keep their
workers spinning after a call, in case another follows at once: GNU OpenMP for ~9 ms after each
parallel loop, OpenBLAS for 2^28 cycles (~0.1 s) after each product.  The spinning worker of one
runtime then shares a core with the working threads of the other, and whichever finishes last
sets the pace.  Measured on a 2-core machine, in CPU time spent during a 20 ms pause: 8.6 ms after
an OpenMP loop, 20 ms after a GEMM; with the settings below, under 0.1 ms after either.

``IDLE_THREAD_SETTINGS`` are environment defaults: a variable the environment already sets is
kept (``OMP_WAIT_POLICY=ACTIVE``, ``OPENBLAS_THREAD_TIMEOUT=28`` restore the runtimes'
spinning).  Each runtime reads its variable when it starts, so the settings apply to the runtimes
started after ``import dualnet``: OpenMP starts with the first parallel kernel; OpenBLAS starts
when NumPy is imported, so its setting applies when ``dualnet`` is imported before NumPy (as in
``python -m dualnet``), and has no effect otherwise.  Effect (LocalMixer M/8/16 step, batch 128,
2 threads, benchmarks/README.md): BP ~460 → ~300 ms and FG-A ~500 → ~410 ms from the OpenMP
setting, then ~10% off every rule from the OpenBLAS one.
"""
import os

IDLE_THREAD_SETTINGS = {
    "OMP_WAIT_POLICY": "PASSIVE",      # OpenMP workers sleep as soon as a parallel loop ends
    "OPENBLAS_THREAD_TIMEOUT": "14",   # OpenBLAS workers spin 2^14 cycles (~5 µs), not 2^28, then sleep
}


def let_idle_threads_sleep():
    """Set ``IDLE_THREAD_SETTINGS`` where the environment sets nothing; returns the values in force."""
    return {name: os.environ.setdefault(name, value) for name, value in IDLE_THREAD_SETTINGS.items()}
