"""The processes of a run and their collectives.

``SingleProcess`` (rank 0 of 1) makes every collective the identity, so the runner has one code
path.  ``MPIWorld`` wraps mpi4py's ``COMM_WORLD``.  The Allreduce of an array on a GPU (CuPy) goes
through one of three transports (``GPU_TRANSPORTS``; chosen by ``DUALNET_GPU_TRANSPORT``,
default 'auto'):

* 'nccl': NCCL (``cupy.cuda.nccl``), its communicator initialised through MPI (rank 0 draws the
  unique id and broadcasts it); one GPU per rank;
* 'cuda-aware': the device buffer handed to MPI itself (an MPI built with CUDA support);
* 'host': a copy to host memory, MPI's Allreduce there, and a copy back.

'auto' takes NCCL where CuPy has it, then a CUDA-aware MPI where mpi4py reports one, else the host.
Every rank of a CUDA run uses GPU ``local rank mod devices`` (``use_local_gpu``).  The
point-to-point messages of the block pipeline are staged through the host.
``bytes_sent`` counts the payload this process contributed to each Allreduce (n float64 count
8n bytes) and sent point to point (``isend``: the block pipeline's forward messages), and
``allreduces`` the number of Allreduces, which is what the benchmarks report per step.
``together`` and ``from_rank_zero`` make work that one rank may fail (reading files, writing a
checkpoint) fail on every rank, so that no rank waits in a collective for one that stopped.
"""
import os
import pickle
import time

import numpy

from .. import backend

INSTALL = "pip install 'dualnet[mpi]' (mpi4py and MPICH), then launch with mpiexec -n P python -m dualnet ..."
GPU_TRANSPORTS = ("auto", "nccl", "cuda-aware", "host")


class TransportUnavailable(RuntimeError):
    """The GPU transport asked for (DUALNET_GPU_TRANSPORT) cannot be used here."""


class RankFailed(RuntimeError):
    """Another rank's error that could not be sent as itself (it does not pickle): its type and message."""


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

    def __init__(self, comm=None, gpu_transport="auto"):
        super().__init__()
        if gpu_transport not in GPU_TRANSPORTS:
            raise ValueError(f"gpu_transport={gpu_transport!r}; choose one of {', '.join(GPU_TRANSPORTS)}")
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError(f"--parallel needs mpi4py and an MPI: {INSTALL}") from None
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.gpu_transport, self._nccl = gpu_transport, None

    def use_local_gpu(self):
        """Make GPU (local rank mod GPU count) this process's current device; returns its index.
        The local rank is the rank among the processes of this node (MPI shared-memory split)."""
        import cupy
        from mpi4py import MPI
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        device = local.Get_rank() % cupy.cuda.runtime.getDeviceCount()
        local.Free()
        cupy.cuda.Device(device).use()
        return device

    def allreduce(self, array):
        xp = backend.namespace(array)
        self.allreduces += 1
        if xp is numpy or self.transport() == "host":
            host = numpy.ascontiguousarray(backend.to_numpy(array))
            self.bytes_sent += host.nbytes
            total = numpy.empty_like(host)
            self.comm.Allreduce(host, total)
            return total if xp is numpy else xp.asarray(total)
        device = xp.ascontiguousarray(array)
        self.bytes_sent += device.nbytes
        total = xp.empty_like(device)
        if self.transport() == "nccl":
            from cupy.cuda import nccl
            self._nccl_comm().allReduce(device.data.ptr, total.data.ptr, device.size, _nccl_type(device.dtype),
                                        nccl.NCCL_SUM, xp.cuda.get_current_stream().ptr)
        else:  # cuda-aware: MPI reads and writes the device buffers once the stream has finished
            xp.cuda.get_current_stream().synchronize()
            self.comm.Allreduce(device, total)
        return total

    def transport(self):
        """The GPU transport in use: ``gpu_transport``, with 'auto' resolved on first use."""
        if self.gpu_transport == "auto":
            self.gpu_transport = resolve_transport(_nccl_available(), _mpi_cuda_aware())
        if self.gpu_transport == "nccl" and not _nccl_available():
            raise TransportUnavailable("gpu transport 'nccl': CuPy has no NCCL (cupy.cuda.nccl.available is "
                                       "False); install NCCL (pip install nvidia-nccl-cu12) or set "
                                       "DUALNET_GPU_TRANSPORT=host")
        return self.gpu_transport

    def _nccl_comm(self):
        if self._nccl is None:
            from cupy.cuda import nccl
            unique_id = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        return self._nccl

    def allgather(self, value):
        return self.comm.allgather(value)

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def gather(self, value):
        return self.comm.gather(value, root=0)

    def abort(self, code):
        """End every process of the run now, with exit status ``code`` (MPI_Abort)."""
        self.comm.Abort(code)

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


def together(world, work):
    """``work()`` on every rank as one step: its result on this rank; when it raised on any rank,
    every rank raises the error of the lowest failing rank r (its message prefixed ``rank r:`` when
    r > 0), so no rank goes on to wait in a collective for a rank that gave up.  One allgather of
    an error or None; ``work`` itself must not communicate."""
    try:
        result, error = work(), None
    except Exception as raised:
        result, error = None, raised
    if world.size > 1:
        errors = world.allgather(_sendable(error))
        failed = next((rank for rank, sent in enumerate(errors) if sent is not None), None)
        if failed is not None:
            error = error if failed == world.rank else errors[failed]
            if failed and error.args and isinstance(error.args[0], str):
                error.args = (f"rank {failed}: {error.args[0]}",) + error.args[1:]
    if error is not None:
        raise error
    return result


def from_rank_zero(world, work):
    """Rank 0's ``work()`` on every rank (the others do not call it): what rank 0 alone may decide,
    such as whether a run directory is already taken; an error it raises is raised on every rank."""
    return world.bcast(together(world, work if world.rank == 0 else lambda: None))


def _sendable(error):
    """``error`` if it survives pickling (the allgather), else a ``RankFailed`` with its message."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RankFailed(f"{type(error).__name__}: {error}")


def resolve_transport(nccl_available, mpi_cuda_aware):
    """'auto' made concrete: 'nccl' where CuPy has NCCL, else 'cuda-aware' where the MPI is, else 'host'."""
    return "nccl" if nccl_available else "cuda-aware" if mpi_cuda_aware else "host"


def _nccl_available():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", False))


def _mpi_cuda_aware():
    from mpi4py import MPI
    query = getattr(MPI, "Query_cuda_support", None)  # MPIX_Query_cuda_support, where the MPI has it
    return bool(query and query())


def _nccl_type(dtype):
    from cupy.cuda import nccl
    types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32,
             "int64": nccl.NCCL_INT64}
    if numpy.dtype(dtype).name not in types:
        raise TypeError(f"allreduce over NCCL: dtype {numpy.dtype(dtype)} is not supported; use one of {sorted(types)}")
    return types[numpy.dtype(dtype).name]


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
    transport = os.environ.get("DUALNET_GPU_TRANSPORT", "auto")
    if transport not in GPU_TRANSPORTS:
        raise ValueError(f"DUALNET_GPU_TRANSPORT={transport!r}; choose one of {', '.join(GPU_TRANSPORTS)}")
    return MPIWorld(gpu_transport=transport)
