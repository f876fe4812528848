"""CuPy loader of ``replicated_loss.cu``: the fused replicated losses' two loops on the GPU.

Same functions and results as ``dualnet.kernels.cpu.replicated_loss`` (and the references in
``dualnet.losses``), for CuPy arrays of float32 or float64.  The source is compiled by CuPy
(NVRTC) on first use and cached by CuPy; importing this module needs neither CuPy nor a GPU.
"""
import functools
import pathlib

import numpy

SOURCE = pathlib.Path(__file__).with_name("replicated_loss.cu")
_SUFFIX = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64"}
_THREADS = 256  # 8 warps per block


@functools.cache
def _module():
    import cupy
    return cupy.RawModule(code=SOURCE.read_text(), options=("--std=c++11",))


def _kernel(name, dtype):
    if dtype not in _SUFFIX:
        raise ValueError(f"kernels.cuda.replicated_loss.{name}: need float32 or float64, got {dtype}")
    return _module().get_function(f"{name}_{_SUFFIX[dtype]}")


def _blocks(threads):
    return ((threads + _THREADS - 1) // _THREADS,)


def replica_tangent(x_tangent, u, scale, head=None, out=None):
    """``d[k,n,p,g] = scale·Σ_c ẋ[k,n,p,g,c]·u[n,g,c] (+ head[k,n])``, added into ``out`` if given.

    ``x_tangent`` [K, N, P, G, c], ``u`` [N, G, c], ``head`` None or [K or 1, N], ``out`` None
    or [K, N, P, G] (C-contiguous); one float dtype.  Returns [K, N, P, G].
    """
    import cupy
    dtype = x_tangent.dtype
    directions, examples, patches, groups, channels = x_tangent.shape
    if u.shape != (examples, groups, channels) or u.dtype != dtype:
        raise ValueError(f"kernels.cuda.replicated_loss.replica_tangent: x_tangent {x_tangent.shape} and u "
                         f"{u.shape} ({u.dtype}) disagree")
    x_tangent, u = cupy.ascontiguousarray(x_tangent), cupy.ascontiguousarray(u)
    head_directions = 0 if head is None else head.shape[0]
    head = cupy.zeros((1, 1), dtype) if head is None else cupy.ascontiguousarray(head, dtype=dtype)
    accumulate = out is not None
    if accumulate:
        if out.shape != x_tangent.shape[:4] or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"kernels.cuda.replicated_loss.replica_tangent: out must be a C-contiguous "
                             f"{x_tangent.shape[:4]} array of {dtype}, got {out.shape} of {out.dtype}")
    else:
        out = cupy.empty(x_tangent.shape[:4], dtype)
    rows = directions * examples * patches * groups
    _kernel("replica_tangent", dtype)(
        _blocks(32 * rows), (_THREADS,),
        (x_tangent, u, head, out, numpy.int64(directions), numpy.int64(examples), numpy.int64(patches),
         numpy.int64(groups), numpy.int64(channels), numpy.int64(head_directions), dtype.type(scale),
         numpy.int32(accumulate)))
    return out


def replica_cotangent(cotangent, u, scale):
    """``x̄[n,p,g,:] = scale·cotangent[n,p,g]·u[n,g,:]``: [N, P, G] × [N, G, c] → [N, P, G, c]."""
    import cupy
    dtype = u.dtype
    examples, patches, groups = cotangent.shape
    channels = u.shape[2]
    if u.shape[:2] != (examples, groups) or cotangent.dtype != dtype:
        raise ValueError(f"kernels.cuda.replicated_loss.replica_cotangent: cotangent {cotangent.shape} "
                         f"({cotangent.dtype}) and u {u.shape} ({dtype}) disagree")
    cotangent, u = cupy.ascontiguousarray(cotangent), cupy.ascontiguousarray(u)
    out = cupy.empty((examples, patches, groups, channels), dtype)
    _kernel("replica_cotangent", dtype)(
        _blocks(out.size), (_THREADS,),
        (cotangent, u, out, numpy.int64(examples), numpy.int64(patches), numpy.int64(groups),
         numpy.int64(channels), dtype.type(scale)))
    return out
