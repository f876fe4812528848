"""Scale-out over MPI: one small communication layer (``World``) and the data-parallel split.

A plain run never imports MPI: ``world(None)`` is the single process, ``world("data")`` the
processes ``mpiexec`` started (mpi4py's ``COMM_WORLD``).  Collectives are plain Allreduce /
Allgather / Bcast on NumPy buffers (CuPy buffers go over NCCL, a CUDA-aware MPI or the host:
``world.GPU_TRANSPORTS``), counted in ``bytes_sent`` so that benchmarks can report the
exact traffic of a step.
"""
from .data_parallel import batch_mean, combine, estimate_on_shard, shard
from .world import (
    GPU_TRANSPORTS,
    MPIWorld,
    RankFailed,
    SingleProcess,
    TransportUnavailable,
    from_rank_zero,
    together,
    world,
)

__all__ = ["GPU_TRANSPORTS", "MPIWorld", "RankFailed", "SingleProcess", "TransportUnavailable", "batch_mean",
           "combine", "estimate_on_shard", "from_rank_zero", "shard", "together", "world"]
