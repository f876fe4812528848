"""The processes of a run and their collectives.

``SingleProcess`` (rank 0 of 1) makes every collective the identity, so the runner has one code
path.  ``MPIWorld`` wraps mpi4py's ``COMM_WORLD``; arrays on a GPU are staged through the host.
``bytes_sent`` counts the payload this process contributed to each Allreduce (n float64 count
8n bytes) and ``allreduces`` their number, which is what the benchmarks report per step.
"""
import numpy

from .. import backend

INSTALL = "pip install 'dualnet[mpi]' (mpi4py and MPICH), then launch with mpiexec -n P python -m dualnet ..."


class SingleProcess:
    """One process: rank 0 of 1; collectives return their input."""
    rank, size = 0, 1

    def __init__(self):
        self.bytes_sent, self.allreduces = 0, 0

    def allreduce(self, array):
        """Σ over ranks of ``array`` (any shape; here: ``array`` itself)."""
        return array

    def allgather(self, value):
        """[value of rank 0, value of rank 1, ...] (picklable values)."""
        return [value]

    def bcast(self, value):
        """Rank 0's ``value`` on every rank."""
        return value


class MPIWorld(SingleProcess):
    """The processes of ``mpiexec``: ``rank`` and ``size`` from MPI's ``COMM_WORLD``."""

    def __init__(self, comm=None):
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError(f"--parallel needs mpi4py and an MPI: {INSTALL}") from None
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce(self, array):
        xp = backend.namespace(array)
        host = numpy.ascontiguousarray(backend.to_numpy(array))
        total = numpy.empty_like(host)
        self.comm.Allreduce(host, total)
        self.bytes_sent += host.nbytes
        self.allreduces += 1
        return total if xp is numpy else xp.asarray(total)

    def allgather(self, value):
        return self.comm.allgather(value)

    def bcast(self, value):
        return self.comm.bcast(value, root=0)


def world(parallel=None):
    """The world of a run: ``SingleProcess()`` for ``parallel=None``, ``MPIWorld()`` for 'data'."""
    if parallel is None:
        return SingleProcess()
    if parallel != "data":
        raise ValueError(f"parallel={parallel!r}; choose 'data' (or None for one process)")
    return MPIWorld()
