"""Counter-based standard normals on the CPU (Numba): the fast path of ``dualnet.noise``.

``normal_flat(key, offset, size, dtype)`` has the contract of
``dualnet.noise.reference_normal_flat`` (the keying, bit layout and ziggurat are described
there) and returns the same numbers: bit for bit, except in the tail beyond r = 3.654 where
the two may evaluate ``log`` with different libraries (≤ 2 ulp apart).

Work goes in blocks of ``BLOCK`` numbers that stay in L1: one loop hashes the block's counters
into 64-bit words (SplitMix64's finaliser; LLVM vectorises it with 64-bit multiplies), a second
loop turns each word (float64) or 32-bit half-word (float32) into ±m·W[i] and lists the ≈1.5%
draws outside their layer's rectangle, and those few finish on the scalar wedge/tail path, which
reads only their own position's rejection sub-streams.  A draw of at least
``PARALLEL_MIN_ELEMENTS`` numbers is cut into runs of whole blocks, one per thread (each run is
the same function of its positions, so the numbers do not depend on the thread count); smaller
draws run on the calling thread.

The constants of ``dualnet.noise`` (γ, the mixers, r) are compiled into Numba's cached machine
code, whose cache tracks this file only: they are fixed by design (the stream is pinned by
tests), and changing one there means touching this file too.
"""
import math
import sys

import numba
import numpy as np
from numba import float32, float64, int64, uint64

from dualnet import noise

from . import parallel

if sys.byteorder != "little":  # the float32 path reads a word's 32-bit halves through a view
    raise ImportError("kernels.cpu.gaussian assumes a little-endian CPU")

BLOCK = 2048
"""Numbers per block (float64: 16 KiB of words, float32: 8 KiB)."""

_GAMMA = np.uint64(noise.GAMMA)
_MIX1 = np.uint64(noise.MIX1)
_MIX2 = np.uint64(noise.MIX2)
_SUBKEY = np.uint64(noise.SUBKEY)
_R = noise.R
_W32, _K32 = noise.TABLES[np.dtype(np.float32)]
_W64, _K64 = noise.TABLES[np.dtype(np.float64)]


@numba.njit(inline="always")
def _mix(z):
    z = (z ^ (z >> uint64(30))) * _MIX1
    z = (z ^ (z >> uint64(27))) * _MIX2
    return z ^ (z >> uint64(31))


@numba.njit(cache=True)
def _hash(k, first, words):
    """words[t] = H(k, first + t) = mix64(k + (first + t + 1)·γ)."""
    for t in range(words.shape[0]):
        words[t] = _mix(k + (first + uint64(t + 1)) * _GAMMA)


@numba.njit(inline="always")
def _uniform(w):
    return float64((w >> uint64(11)) + uint64(1)) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always")
def _substream(k, position, t):
    """S(p, t) = H(subkey(k, t), p)."""
    sub = _mix(k ^ (uint64(t + 1) * _SUBKEY))
    return _mix(sub + (position + uint64(1)) * _GAMMA)


@numba.njit(cache=True)
def _finish(k, position, layer, negative, x, density, width52, limit52):
    """The wedge/tail continuation of a rejected draw (float64), as in the reference."""
    t = 0
    while True:
        if layer == 0:
            a = -math.log(_uniform(_substream(k, position, t))) / _R
            b = -math.log(_uniform(_substream(k, position, t + 1)))
            t += 2
            if 2.0 * b > a * a:
                value = _R + a
                break
        else:
            u = _uniform(_substream(k, position, t))
            t += 1
            y = density[layer] + u * (density[layer + 1] - density[layer])
            if y < math.exp(-0.5 * x * x):
                value = x
                break
            w = _substream(k, position, t)
            t += 1
            layer = int64(w & uint64(255))
            negative = int64((w >> uint64(8)) & uint64(1))
            m = int64(w >> uint64(12))
            x = float64(m) * width52[layer]
            if m < limit52[layer]:
                value = x
                break
    return -value if negative else value


@numba.njit(cache=True)
def _rectangles32(halves, out, width, limit, rejected):
    """out[j] = ±m·W[i] from 32-bit half-words; lists the j with m ≥ K[i]; returns their count."""
    count = 0
    for j in range(out.shape[0]):
        h = int64(halves[j])
        layer = h & 255
        m = h >> 9
        x = float32(m) * width[layer]
        out[j] = -x if (h >> 8) & 1 else x
        if m >= limit[layer]:
            rejected[count] = j
            count += 1
    return count


@numba.njit(cache=True)
def _rectangles64(words, out, width, limit, rejected):
    """out[j] = ±m·W[i] from 64-bit words; lists the j with m ≥ K[i]; returns their count."""
    count = 0
    for j in range(out.shape[0]):
        w = words[j]
        layer = int64(w & uint64(255))
        m = int64(w >> uint64(12))
        x = float64(m) * width[layer]
        out[j] = -x if (w >> uint64(8)) & uint64(1) else x
        if m >= limit[layer]:
            rejected[count] = j
            count += 1
    return count


@numba.njit(cache=True)
def _fill32(k, offset, out, width, limit, width23, density, width52, limit52):
    n = out.shape[0]
    words = np.empty(BLOCK // 2 + 1, np.uint64)
    halves = words.view(np.uint32)
    rejected = np.empty(BLOCK, np.int64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        p0 = offset + start
        first = p0 >> 1
        _hash(k, uint64(first), words[:((p0 + stop - start + 1) >> 1) - first])
        low = p0 & 1
        count = _rectangles32(halves[low:low + stop - start], out[start:stop], width, limit, rejected)
        for r in range(count):
            j = rejected[r]
            h = int64(halves[low + j])
            layer = h & 255
            x = float64(h >> 9) * width23[layer]
            out[start + j] = float32(_finish(k, uint64(p0 + j), layer, (h >> 8) & 1, x, density, width52, limit52))


@numba.njit(cache=True)
def _fill64(k, offset, out, width, limit, density):
    n = out.shape[0]
    words = np.empty(BLOCK, np.uint64)
    rejected = np.empty(BLOCK, np.int64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        block = words[:stop - start]
        _hash(k, uint64(offset + start), block)
        count = _rectangles64(block, out[start:stop], width, limit, rejected)
        for r in range(count):
            j = rejected[r]
            w = block[j]
            layer = int64(w & uint64(255))
            x = float64(int64(w >> uint64(12))) * width[layer]
            out[start + j] = _finish(k, uint64(offset + start + j), layer, int64((w >> uint64(8)) & uint64(1)), x,
                                     density, width, limit)


@numba.njit(inline="always")
def _run(n, run, runs):
    """[start, stop) of run ``run`` of ``runs``: whole blocks, the last run takes the rest."""
    per_run = ((n + BLOCK - 1) // BLOCK + runs - 1) // runs * BLOCK
    return min(n, run * per_run), min(n, (run + 1) * per_run)


@numba.njit(parallel=True, cache=True)
def _fill32_runs(runs, k, offset, out, width, limit, width23, density, width52, limit52):
    """``_fill32`` over ``runs`` runs of whole blocks in parallel."""
    for run in numba.prange(runs):
        start, stop = _run(out.shape[0], run, runs)
        _fill32(k, offset + start, out[start:stop], width, limit, width23, density, width52, limit52)


@numba.njit(parallel=True, cache=True)
def _fill64_runs(runs, k, offset, out, width, limit, density):
    """``_fill64`` over ``runs`` runs of whole blocks in parallel."""
    for run in numba.prange(runs):
        start, stop = _run(out.shape[0], run, runs)
        _fill64(k, offset + start, out[start:stop], width, limit, density)


def normal_flat(k, offset, size, dtype, out=None):
    """Numbers ``offset, ..., offset + size − 1`` of key k's N(0, 1) stream: a 1-D array [size] of
    dtype (``out``, a contiguous 1-D array of that size and dtype, when given).

    Same contract and results as ``dualnet.noise.reference_normal_flat`` on NumPy.
    """
    dtype = noise.check_dtype(dtype, "normal_flat")
    offset = noise.check_span(offset, size, "normal_flat")
    if out is None:
        out = np.empty(size, dtype)
    elif out.shape != (size,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"normal_flat: out must be a contiguous [{size}] {dtype} array")
    k = np.uint64(noise.stream_key(noise.as_key(k), dtype))
    fill, runs, tables = _kernels(dtype)
    if parallel(size):  # one run per thread
        runs(numba.get_num_threads(), k, np.int64(offset), out, *tables)
    else:
        fill(k, np.int64(offset), out, *tables)
    return out


def warm_up(dtype):
    """Compile (or load from Numba's cache) the kernels for ``dtype``, the slow path included."""
    normal_flat(noise.key(0), 1, 3 * BLOCK + 1, dtype)
    _, runs, tables = _kernels(np.dtype(dtype))
    runs(2, np.uint64(1), np.int64(0), np.empty(BLOCK + 1, dtype), *tables)  # the parallel runs, on a small array


def _kernels(dtype):
    """(one-thread fill, parallel runs, their tables) for float32 or float64."""
    if dtype == np.float32:
        return _fill32, _fill32_runs, (_W32, _K32, noise.WIDTH23, noise.DENSITY, _W64, _K64)
    return _fill64, _fill64_runs, (_W64, _K64, noise.DENSITY)
