"""Worker threads that sleep when idle: the thread setting ``import dualnet`` makes.

A training step alternates BLAS matrix products, which want every core, with the CPU kernels'
parallel loops (Numba on OpenMP), which want every core too.  By default GNU OpenMP keeps its
workers spinning for ~9 ms after each parallel loop, in case another follows at once, and the
next matrix product then shares a core with a spinning thread.  Measured on a 2-core machine, in
CPU time spent during a 20 ms pause right after a parallel kernel: 8.6 ms by default, under
0.1 ms with ``OMP_WAIT_POLICY=PASSIVE``; a LocalMixer M/8/16 step (batch 128, 2 threads) went
from ~460 to ~300 ms for BP and from ~500 to ~410 ms for FG-A (benchmarks/README.md).

``IDLE_THREAD_SETTINGS`` are environment defaults: a variable the environment already sets is
kept (``OMP_WAIT_POLICY=ACTIVE`` restores the spinning).  OpenMP reads it when it starts, with
the first parallel kernel, after ``import dualnet``.

OpenBLAS's workers spin too, for 2^28 cycles (~0.1 s) after each product, and a parallel kernel
right after a product runs at half speed (a 4 M-number draw: 5.2 against 2.7 ms).
``OPENBLAS_THREAD_TIMEOUT=20`` (set before NumPy is imported) makes them sleep after ~0.4 ms:
LocalMixer M/8/16's FG-A and LG-FG-A steps were 15-18% shorter, but on the small M/1/16 the
wake-ups made LG-FG-A's step 3-9% longer (14, ~5 µs: up to 20%).  Being a trade-off that
depends on the model, and only settable before NumPy loads, it is left to the user
(benchmarks/README.md, "Idle worker threads").
"""
import os

IDLE_THREAD_SETTINGS = {
    "OMP_WAIT_POLICY": "PASSIVE",  # OpenMP workers sleep as soon as a parallel loop ends
}


def let_idle_threads_sleep():
    """Set ``IDLE_THREAD_SETTINGS`` where the environment sets nothing; returns the values in force."""
    return {name: os.environ.setdefault(name, value) for name, value in IDLE_THREAD_SETTINGS.items()}
