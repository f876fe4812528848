"""The processes of a run and their collectives.

``SingleProcess`` (rank 0 of 1) makes every collective the identity, so the runner has one code
path.  ``MPIWorld`` wraps mpi4py's ``COMM_WORLD``; arrays on a GPU are staged through the host.
``bytes_sent`` counts the payload this process contributed to each Allreduce (n float64 count
8n bytes) and sent point to point (``isend``: the block pipeline's forward messages), and
``allreduces`` the number of Allreduces, which is what the benchmarks report per step.
"""
import time

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

    def gather(self, value):
        """On rank 0: [value of rank 0, value of rank 1, ...] (picklable values); None elsewhere."""
        return [value]

    def broadcast(self, array, root):
        """Rank ``root``'s ``array`` (any shape and dtype) on every rank; the others pass None."""
        return array

    def broadcast_arrays(self, arrays, root):
        """Rank ``root``'s tuple of arrays on every rank; the others pass None."""
        return tuple(arrays)


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

    def gather(self, value):
        return self.comm.gather(value, root=0)

    # --- point to point (the block pipeline): one array = a fixed-size header, then its bytes ----
    def isend(self, array, dest, tag=0):
        """Start sending ``array`` (any shape, a float or int dtype, NumPy or CuPy) to rank ``dest``;
        returns a handle for ``wait``.  The payload (header + array bytes) counts in ``bytes_sent``.
        The array is staged as a contiguous host copy, so the caller may reuse ``array`` at once."""
        host = numpy.ascontiguousarray(backend.to_numpy(array))
        if host.ndim > HEADER_SIZE - 2:
            raise ValueError(f"isend: arrays of at most {HEADER_SIZE - 2} axes; got shape {host.shape}")
        header = numpy.zeros(HEADER_SIZE, numpy.int64)
        header[0], header[1] = host.ndim, DTYPES.index(host.dtype.str)
        header[2:2 + host.ndim] = host.shape
        requests = [self.comm.Isend(header, dest, tag=2 * tag), self.comm.Isend(host, dest, tag=2 * tag + 1)]
        self.bytes_sent += header.nbytes + host.nbytes
        return _Sending(requests, (header, host))

    def recv(self, source, tag=0):
        """The next array that rank ``source`` sent with ``isend(..., tag)`` (a NumPy array; moved to
        the active device by the caller)."""
        header = numpy.empty(HEADER_SIZE, numpy.int64)
        _idle_until(lambda: self.comm.Iprobe(source, tag=2 * tag))
        self.comm.Recv(header, source, tag=2 * tag)
        ndim = int(header[0])
        array = numpy.empty(tuple(int(n) for n in header[2:2 + ndim]), numpy.dtype(DTYPES[int(header[1])]))
        self.comm.Recv(array, source, tag=2 * tag + 1)
        return array

    def broadcast(self, array, root):
        header = numpy.zeros(HEADER_SIZE, numpy.int64)
        if self.rank == root:
            host = numpy.ascontiguousarray(backend.to_numpy(array))
            header[0], header[1] = host.ndim, DTYPES.index(host.dtype.str)
            header[2:2 + host.ndim] = host.shape
        request = self.comm.Ibcast(header, root=root)
        _idle_until(request.Test)
        if self.rank != root:
            ndim = int(header[0])
            host = numpy.empty(tuple(int(n) for n in header[2:2 + ndim]), numpy.dtype(DTYPES[int(header[1])]))
        request = self.comm.Ibcast(host, root=root)
        _idle_until(request.Test)
        if self.rank == root:
            self.bytes_sent += header.nbytes + host.nbytes
        return backend.to_device(host)

    def broadcast_arrays(self, arrays, root):
        count = numpy.array([len(arrays) if self.rank == root else 0], numpy.int64)
        request = self.comm.Ibcast(count, root=root)
        _idle_until(request.Test)
        return tuple(self.broadcast(arrays[i] if self.rank == root else None, root) for i in range(int(count[0])))

    def iallreduce(self, array):
        """Start Σ over ranks of the float64 ``array``; returns a handle whose ``wait()`` gives the sum.
        Every rank must start the same sequence of these (they are collectives)."""
        host = numpy.ascontiguousarray(array, numpy.float64)
        total = numpy.empty_like(host)
        request = self.comm.Iallreduce(host, total)
        self.bytes_sent += host.nbytes
        return _Reducing(request, host, total)


def _idle_until(done, longest=1e-3):
    """Wait for ``done()`` sleeping between polls (50 µs, doubling up to ``longest``): MPICH's
    blocking calls spin on a core, which a stage waiting for its input would take from the stages
    computing when there are fewer cores than processes."""
    pause = 5e-5
    while not done():
        time.sleep(pause)
        pause = min(2 * pause, longest)


HEADER_SIZE = 8  # int64: ndim, dtype index, up to 6 axis lengths
DTYPES = ("<f4", "<f8", "<i4", "<i8", "<f2", "|b1", "|u1")


class _Sending:
    """A started ``isend``: ``wait()`` returns once its buffers may be released."""

    def __init__(self, requests, buffers):
        self.requests, self.buffers = requests, buffers

    def wait(self):
        _idle_until(lambda: all(request.Test() for request in self.requests))
        self.buffers = None


class _Reducing:
    """A started ``iallreduce``: ``wait()`` returns the sum."""

    def __init__(self, request, sent, total):
        self.request, self.sent, self.total = request, sent, total

    def wait(self):
        _idle_until(self.request.Test)
        return self.total


PARALLEL = ("data", "pipeline")


def world(parallel=None):
    """The world of a run: ``SingleProcess()`` for ``parallel=None``, ``MPIWorld()`` for 'data'
    (ranks share every batch) and 'pipeline' (rank s is stage s of the block pipeline)."""
    if parallel is None:
        return SingleProcess()
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}; choose one of {', '.join(PARALLEL)} (or None for one process)")
    return MPIWorld()
