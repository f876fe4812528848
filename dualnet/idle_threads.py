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

OpenBLAS's workers spin too: each idle worker polls for 2^28 cycles (~0.1 s) after a matrix
product before it sleeps.  A parallel kernel right after a product then shares a core with it
and runs at about one thread's speed (a 4 M-number draw: 5.2 against 2.7 ms).  OpenBLAS reads
``OPENBLAS_THREAD_TIMEOUT`` (log2 of those cycles) when it loads, with NumPy, which is usually
before ``import dualnet``.  So ``let_openblas_workers_sleep`` sets it afterwards: the first time
a kernel goes parallel (``dualnet.kernels.cpu.parallel``, only on arrays of at least 2^20
elements), dualnet has OpenBLAS read its environment again with ``OPENBLAS_THREAD_TIMEOUT=20``
(~0.4 ms) and stops its workers (``blas_thread_shutdown_``, the call OpenBLAS itself makes
before a fork); the next product starts them again with the short timeout.  Only where no
parallel kernel ever runs (small layers: the MLP, LocalMixer M/1/16) do products keep their
workers spinning, because there waking a sleeping worker for each short product costs more
(LocalMixer M/1/16: 5-14% longer steps with 20).  Measured on LocalMixer M/8/16, in one process
switching between the two settings: FG-A 10% and LG-FG-A 14% shorter steps, BP unchanged
(benchmarks/README.md, "Idle worker threads").  A value of ``OPENBLAS_THREAD_TIMEOUT`` in the
environment is kept (28 keeps OpenBLAS's default); the switch needs OpenBLAS's own thread
server (``threading_layer == 'pthreads'`` in threadpoolctl) and is skipped for any other BLAS.
"""
import os

IDLE_THREAD_SETTINGS = {
    "OMP_WAIT_POLICY": "PASSIVE",  # OpenMP workers sleep as soon as a parallel loop ends
}


def let_idle_threads_sleep():
    """Set ``IDLE_THREAD_SETTINGS`` where the environment sets nothing; returns the values in force."""
    return {name: os.environ.setdefault(name, value) for name, value in IDLE_THREAD_SETTINGS.items()}


OPENBLAS_SLEEP_AFTER = 20
"""``OPENBLAS_THREAD_TIMEOUT`` that ``let_openblas_workers_sleep`` gives OpenBLAS: an idle worker
polls 2^20 cycles (~0.4 ms) before it sleeps, instead of 2^28."""

openblas_changed = []
"""Paths of the OpenBLAS libraries whose workers ``let_openblas_workers_sleep`` made sleep sooner."""
_openblas_asked = False


def let_openblas_workers_sleep():
    """Once per process: make idle OpenBLAS workers sleep after 2^``OPENBLAS_SLEEP_AFTER``
    cycles (see the module docstring), unless the environment sets ``OPENBLAS_THREAD_TIMEOUT``.
    Call it from the main thread, between matrix products (the workers are stopped and restart
    with the next product).  Returns ``openblas_changed``."""
    global _openblas_asked
    if _openblas_asked or "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return openblas_changed
    _openblas_asked = True
    from threadpoolctl import ThreadpoolController
    for controller in ThreadpoolController().lib_controllers:
        library = getattr(controller, "dynlib", None)  # threadpoolctl's handle on the loaded library
        read_env = getattr(library, "openblas_read_env", None)
        stop_workers = getattr(library, "blas_thread_shutdown_", None)
        if (controller.internal_api != "openblas" or controller.threading_layer != "pthreads"
                or read_env is None or stop_workers is None):
            continue
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(OPENBLAS_SLEEP_AFTER)
        try:
            read_env()
        finally:  # child processes start with OpenBLAS's own default again
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
        stop_workers()
        openblas_changed.append(controller.filepath)
    return openblas_changed
