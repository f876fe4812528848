"""out ← α·leftᵀright + β·out on CuPy arrays: one cuBLAS GEMM with β (``cupy.cublas.gemm``).

Same contract as ``dualnet.gradients.reference_outer_update`` (and the CPU kernel): left [M, p],
right [M, q], out [p, q], one dtype, ``out`` updated in place.  No CUDA source of its own: cuBLAS
already adds the product into ``out`` as it forms it.  Equal to the reference to rounding.
"""
from . import require


def outer_update(left, right, out, alpha, beta):
    """left [M, p], right [M, q]; out [p, q], contiguous, updated in place."""
    import cupy
    from cupy import cublas
    require(out.ndim == 2 and out.shape == (left.shape[1], right.shape[1]) and left.shape[0] == right.shape[0],
            "outer_update.outer_update", f"out must be [p, q] for left [M, p] and right [M, q], got {out.shape}, "
            f"{left.shape} and {right.shape}")
    require(out.flags.c_contiguous or out.flags.f_contiguous, "outer_update.outer_update",
            "out must be contiguous (it is updated in place)")
    dtype = out.dtype
    cublas.gemm("T", "N", cupy.ascontiguousarray(left, dtype), cupy.ascontiguousarray(right, dtype), out=out,
                alpha=float(alpha), beta=float(beta))
