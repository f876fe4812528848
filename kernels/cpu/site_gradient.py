"""FG-A's gradient at a layer's site on the CPU (Numba): Σ_k factors_k · u_k, masked, in one pass.

``site_gradient`` has the contract of ``dualnet.rules.base.reference_site_gradient``: factors
[K, N, A] (the loss derivatives reaching each block of B units), values [K, N, A, B] (the noise),
mask [N, A, B] bool or None.  NumPy makes the K products, their sum and the masked copy as
separate passes over arrays as large as the layer (on LocalMixer M/8/16, 4.2 M numbers each);
here each example's output is made in one pass, with the products added in the reference's order and
no fused multiply-add, so the numbers are the reference's.  A call over fewer than
``PARALLEL_MIN_ELEMENTS`` numbers runs on the calling thread; a larger one is cut into runs of
examples, one per thread.
"""
import numba
import numpy as np

from . import parallel


@numba.njit(inline="always")
def _scaled(o, f, u, m, width, add, masked):
    """One example's row o [A·B] from one direction: o = (add ? o : 0) + f[a]·u, block by block,
    then times m where ``masked``."""
    for a in range(f.shape[0]):
        scale = f[a]
        base = a * width
        if add and masked:
            for j in range(width):
                o[base + j] = (o[base + j] + scale * u[base + j]) * m[base + j]
        elif add:
            for j in range(width):
                o[base + j] = o[base + j] + scale * u[base + j]
        elif masked:
            for j in range(width):
                o[base + j] = scale * u[base + j] * m[base + j]
        else:
            for j in range(width):
                o[base + j] = scale * u[base + j]


@numba.njit(cache=True)
def _rows(factors, values, mask, has_mask, out, first, last):
    """Examples first ≤ n < last of out [N, A·B] from factors [K, N, A], values [K, N, A·B] and
    mask [N, A·B]: the first direction's products, each further direction's added, the mask
    applied with the last (one row view per example and operand, the blocks by offset)."""
    directions = values.shape[0]
    width = out.shape[1] // factors.shape[2]
    for n in range(first, last):
        o = out[n]
        m = mask[n] if has_mask else mask[0]
        for k in range(directions):
            _scaled(o, factors[k, n], values[k, n], m, width, k > 0, has_mask and k == directions - 1)


@numba.njit(parallel=True, cache=True)
def _rows_parallel(runs, factors, values, mask, has_mask, out):
    """``_rows`` over all N examples, cut into ``runs`` runs run in parallel."""
    rows = values.shape[1]
    per_run = (rows + runs - 1) // runs
    for run in numba.prange(runs):
        _rows(factors, values, mask, has_mask, out, min(rows, run * per_run), min(rows, (run + 1) * per_run))


def site_gradient(factors, values, mask):
    """Numba ``dualnet.rules.base.reference_site_gradient``: factors [K, N, A], values [K, N, A, B],
    mask [N, A, B] bool or None -> [N, A, B]."""
    dtype = np.result_type(factors, values)
    directions, rows, blocks, width = values.shape
    factors = np.ascontiguousarray(factors, dtype=dtype)
    values = np.ascontiguousarray(values, dtype=dtype).reshape(directions, rows, blocks * width)
    has_mask = mask is not None
    mask = (np.ascontiguousarray(mask, dtype=np.bool_).reshape(rows, blocks * width) if has_mask
            else np.ones((1, blocks * width), np.bool_))
    out = np.empty((rows, blocks * width), dtype)
    if parallel(values.size):
        _rows_parallel(numba.get_num_threads(), factors, values, mask, has_mask, out)
    else:
        _rows(factors, values, mask, has_mask, out, 0, rows)
    return out.reshape(rows, blocks, width)


def warm_up(dtype):
    """Compile (or load from cache) the kernels for ``dtype`` (the parallel one on a small array)."""
    factors, values = np.ones((2, 2, 3), dtype), np.ones((2, 2, 3, 4), dtype)
    site_gradient(factors, values, np.ones((2, 3, 4), np.bool_))
    site_gradient(factors, values, None)
    _rows_parallel(2, factors, values.reshape(2, 2, 12), np.ones((2, 12), np.bool_), True, np.empty((2, 12), dtype))
