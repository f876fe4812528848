"""CuPy launchers of ``replicated_loss.cu``: the fused replicated losses' two loops on the GPU.

Same functions and results as ``dualnet.kernels.cpu.replicated_loss`` (and the references in
``dualnet.losses``), for CuPy arrays of float32 or float64.  The source is compiled by the shared
loader ``dualnet.kernels.cuda.function`` on first use; importing this module needs neither CuPy
nor a GPU.
"""
import numpy

from . import function, require, thread_grid, warp_grid


def replica_tangent(x_tangent, u, scale, head=None, out=None):
    """``d[k,n,p,g] = scale·Σ_c ẋ[k,n,p,g,c]·u[n,g,c] (+ head[k,n])``, added into ``out`` if given.

    ``x_tangent`` [K, N, P, G, c], ``u`` [N, G, c], ``head`` None or [K or 1, N], ``out`` None
    or [K, N, P, G] (C-contiguous); one float dtype.  Returns [K, N, P, G].
    """
    import cupy
    dtype = x_tangent.dtype
    directions, examples, patches, groups, channels = x_tangent.shape
    op = "replicated_loss.replica_tangent"
    require(u.shape == (examples, groups, channels) and u.dtype == dtype, op,
            f"x_tangent {x_tangent.shape} and u {u.shape} ({u.dtype}) disagree")
    require(head is None or (head.ndim == 2 and head.shape[0] in (1, directions) and head.shape[1] == examples),
            op, f"head must be [K or 1, N] = [{directions} or 1, {examples}], got {getattr(head, 'shape', None)}")
    x_tangent, u = cupy.ascontiguousarray(x_tangent), cupy.ascontiguousarray(u)
    head_directions = 0 if head is None else head.shape[0]
    head = cupy.zeros((1, 1), dtype) if head is None else cupy.ascontiguousarray(head, dtype=dtype)
    accumulate = out is not None
    if accumulate:
        require(out.shape == x_tangent.shape[:4] and out.dtype == dtype and out.flags.c_contiguous, op,
                f"out must be a C-contiguous {x_tangent.shape[:4]} array of {dtype}, got {out.shape} of {out.dtype}")
    else:
        out = cupy.empty(x_tangent.shape[:4], dtype)
    grid, block = warp_grid(directions * examples * patches * groups)
    function("replicated_loss", "replica_tangent", dtype)(
        grid, block,
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
    require(u.ndim == 3 and u.shape[:2] == (examples, groups) and cotangent.dtype == dtype,
            "replicated_loss.replica_cotangent", f"cotangent {cotangent.shape} ({cotangent.dtype}) and u {u.shape} "
                                                 f"({dtype}) disagree")
    cotangent, u = cupy.ascontiguousarray(cotangent), cupy.ascontiguousarray(u)
    out = cupy.empty((examples, patches, groups, channels), dtype)
    grid, block = thread_grid(out.size)
    function("replicated_loss", "replica_cotangent", dtype)(
        grid, block,
        (cotangent, u, out, numpy.int64(examples), numpy.int64(patches), numpy.int64(groups),
         numpy.int64(channels), dtype.type(scale)))
    return out
