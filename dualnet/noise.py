"""Counter-based Gaussian noise: every number is a pure function of (key, position).

Keys.  ``key(*values)`` folds a tuple of non-negative integers (e.g. ``(seed, stream, step,
site)``) into one 64-bit key with the bijective finaliser ``mix64`` (SplitMix64's output
function): ``k₀ = mix64(DOMAIN + n·γ)``, ``k_{i+1} = mix64(k_i ⊕ mix64(v_i + γ))`` (mod 2⁶⁴,
n the tuple's length, γ = 0x9E3779B97F4A7C15).  Tuples of different length or content give
unrelated keys; the fold is order-sensitive.

Bits.  Word ``c`` of the stream of key ``k`` is ``H(k, c) = mix64(k + (c + 1)·γ mod 2⁶⁴)``, the
c-th output of SplitMix64 started from state ``k``, computed without any sequential state.
float64 number ``p`` reads word ``p``; float32 number ``p`` reads the low (p even) or high (p odd)
32-bit half of word ``p // 2`` of the stream of ``k₃₂ = mix64(k ⊕ FLOAT32_SALT)`` (everything
below, rejections included, runs on k₃₂ for float32), so the two dtypes draw independent streams.

Normals.  A 256-layer ziggurat (Marsaglia & Tsang 2000) for the unnormalised density
f(x) = exp(−x²/2), base-strip edge r = 3.6541528853610088.  From the bits: layer ``i`` = low 8
bits, sign = bit 8, ``m`` = the top 52 bits of the word (float64) or the 23 bits above the sign
of the half-word (float32), ``x = m·X[i]·2^-bits``.
If ``m < K[i]`` (x is inside the layer's rectangle under f, ≈ 98.5% of draws) the number is
``±x``.  Otherwise (the wedge or, for layer 0, the tail beyond r) the standard ziggurat
continuation runs in float64 on a second family of words ``S(p, t) = H(subkey(k, t), p)``,
``subkey(k, t) = mix64(k ⊕ (t + 1)·SUBKEY)``, t = 0, 1, 2, ... consumed in order; uniforms are
``U = (S >> 11 + 1)·2⁻⁵³ ∈ (0, 1]``:

* tail (layer 0): a = −ln U_t / r, b = −ln U_{t+1}, t += 2; accept r + a if 2b > a², else repeat;
* wedge (layer i ≥ 1): y = F[i] + U_t·(F[i+1] − F[i]), t += 1; accept x if y < f(x); else draw a
  fresh (i, sign, m) from S(p, t), t += 1, accept it if m < K₅₂[i], else continue with it.

So the number at position ``p`` depends on nothing but (k, p): any slice can be drawn alone, and
a draw at offset ``o`` equals the matching slice of a larger draw.  float32 and float64 draws of
the same key are independent streams, not roundings of one another.

``reference_normal_flat`` is the xp reference (NumPy or CuPy integer ops); on NumPy arrays the
Numba kernel ``dualnet.kernels.cpu.gaussian.normal_flat`` computes the same numbers (bit for bit
except in the tail beyond r, where ``log`` of NumPy and of libm may differ by an ulp).
"""
import math
import operator
from fractions import Fraction

import numpy

from . import backend
from .kernels import cpu as cpu_kernels

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
"""2⁶⁴/φ rounded to odd: the counter increment (SplitMix64's γ)."""
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
SUBKEY = 0xD6E8FEB86659FD93
"""Odd multiplier that derives the rejection sub-stream keys."""
FLOAT32_SALT = 0x3F800000A5A5F32F
"""float32 draws run on the key mix64(k ⊕ FLOAT32_SALT)."""
DOMAIN = 0x64756E6F697365
"""Start of the key fold (so that ``key()`` of a tuple never equals a raw ``mix64`` of it)."""
MAX_POSITION = 1 << 62
"""Positions must lie in [0, 2⁶²)."""

LAYERS = 256
R = 3.6541528853610088
"""Right edge of the ziggurat's base strip for 256 layers (Marsaglia & Tsang 2000)."""
DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
MANTISSA_BITS = {numpy.dtype(numpy.float32): 23, numpy.dtype(numpy.float64): 52}


def mix64(z):
    """SplitMix64's finaliser on a Python int: a bijection of [0, 2⁶⁴) with full avalanche.

    z ← (z ⊕ z≫30)·MIX1, z ← (z ⊕ z≫27)·MIX2, z ← z ⊕ z≫31, all mod 2⁶⁴.
    """
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def _as_uint64(value, what):
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"noise: {what} must be an integer, got {type(value).__name__}") from None
    if not 0 <= v <= MASK64:
        raise ValueError(f"noise: {what} must lie in [0, 2**64), got {v}")
    return v


def key(*values):
    """One 64-bit key (a Python int) from a tuple of integers in [0, 2⁶⁴), e.g. (seed, step, site).

    k₀ = mix64(DOMAIN + n·γ); k_{i+1} = mix64(k_i ⊕ mix64(v_i + γ)); returns k_n.
    """
    if not values:
        raise ValueError("noise.key: give at least one integer")
    k = mix64(DOMAIN + len(values) * GAMMA)
    for i, v in enumerate(values):
        k = mix64(k ^ mix64(_as_uint64(v, f"key value #{i}") + GAMMA))
    return k


def as_key(k):
    """A key from an int (used as is, must be in [0, 2⁶⁴)) or a tuple/list of ints (``key(*k)``)."""
    if isinstance(k, (tuple, list)):
        return key(*k)
    return _as_uint64(k, "key")


def subkey(k, t):
    """Key of the t-th rejection sub-stream of key k: mix64(k ⊕ (t + 1)·SUBKEY mod 2⁶⁴)."""
    return mix64(k ^ (((t + 1) * SUBKEY) & MASK64))


def stream_key(k, dtype):
    """The key the draws of ``dtype`` run on: k for float64, mix64(k ⊕ FLOAT32_SALT) for float32."""
    return k if numpy.dtype(dtype) == numpy.float64 else mix64(k ^ FLOAT32_SALT)


def splitmix64_word(k, c):
    """Word c of key k as plain Python ints: H(k, c) = mix64(k + (c + 1)·γ)."""
    return mix64(k + (c + 1) * GAMMA)


# ---------------------------------------------------------------------------------------
# ziggurat tables
# ---------------------------------------------------------------------------------------
def _f(x):
    return math.exp(-0.5 * x * x)


def _edges():
    """X[0..256]: X[0] = v/f(r) (base strip incl. tail), X[1] = r, X[i+1] = f⁻¹(f(X[i]) + v/X[i]),
    X[256] = 0, with v = r f(r) + ∫_r^∞ f the common layer area."""
    area = R * _f(R) + math.sqrt(math.pi / 2) * math.erfc(R / math.sqrt(2))
    x = [area / _f(R), R]
    for i in range(1, LAYERS - 1):
        x.append(math.sqrt(-2.0 * math.log(area / x[i] + _f(x[i]))))
    x.append(0.0)
    return numpy.array(x), area


EDGES, LAYER_AREA = _edges()
DENSITY = numpy.exp(-0.5 * EDGES * EDGES)
"""F[i] = f(X[i]) (F[256] = 1); the wedge of layer i ≥ 1 spans y ∈ [F[i], F[i+1]]."""


def _thresholds(bits):
    """K[i] = ⌊2^bits · X[i+1]/X[i]⌋ exactly (m < K[i] ⟹ m·X[i]/2^bits < X[i+1])."""
    return numpy.array([(Fraction(float(EDGES[i + 1])) / Fraction(float(EDGES[i])) * (1 << bits)).__floor__()
                        for i in range(LAYERS)], dtype=numpy.int64)


TABLES = {}
"""dtype → (W, K): W[i] = X[i]·2^-bits rounded to dtype, K as in ``_thresholds``."""
for _dtype, _bits in MANTISSA_BITS.items():
    TABLES[_dtype] = (numpy.ldexp(EDGES[:LAYERS], -_bits).astype(_dtype), _thresholds(_bits))
WIDTH52 = numpy.ldexp(EDGES[:LAYERS], -52)
"""X[i]·2⁻⁵² in float64 (the retry draws of the slow path)."""
WIDTH23 = numpy.ldexp(EDGES[:LAYERS], -23)
"""X[i]·2⁻²³ in float64 (a rejected float32 draw, continued in float64)."""


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------
def check_dtype(dtype, caller):
    try:
        dt = numpy.dtype(dtype)
    except TypeError:
        raise TypeError(f"noise.{caller}: dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in DTYPES:
        raise ValueError(f"noise.{caller}: dtype must be float32 or float64, got {dt}")
    return dt


def check_span(offset, size, caller):
    offset = operator.index(offset)
    if offset < 0:
        raise ValueError(f"noise.{caller}: offset must be ≥ 0, got {offset}")
    if size < 0:
        raise ValueError(f"noise.{caller}: size must be ≥ 0, got {size}")
    if offset + size > MAX_POSITION:
        raise ValueError(f"noise.{caller}: positions must stay below 2**62, got offset {offset} + size {size}")
    return offset


def _shape(shape, caller):
    shape = (shape,) if isinstance(shape, (int, numpy.integer)) else tuple(operator.index(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"noise.{caller}: negative dimension in shape {shape}")
    return shape


# ---------------------------------------------------------------------------------------
# the xp reference (plain integer and float array ops: NumPy or CuPy)
# ---------------------------------------------------------------------------------------
def _mix(xp, z):
    """mix64 on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(MIX1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(MIX2)
    return z ^ (z >> xp.uint64(31))


def _words(xp, k, first, count):
    """H(k, c) for c = first, ..., first + count − 1 (uint64 [count])."""
    counters = xp.arange(first + 1, first + 1 + count, dtype=xp.uint64)
    return _mix(xp, counters * xp.uint64(GAMMA) + xp.uint64(k))


def _substream(xp, k, positions, t):
    """S(p, t) = H(subkey(k, t), p) for uint64 arrays positions and t."""
    keys = _mix(xp, xp.uint64(k) ^ ((t + xp.uint64(1)) * xp.uint64(SUBKEY)))
    return _mix(xp, keys + (positions + xp.uint64(1)) * xp.uint64(GAMMA))


def _uniform(xp, words):
    """(w ≫ 11 + 1)·2⁻⁵³ ∈ (0, 1] in float64."""
    return ((words >> xp.uint64(11)) + xp.uint64(1)).astype(xp.float64) * (1.0 / (1 << 53))


def _reference_slow(xp, k, positions, layer, negative, x):
    """Finish rejected draws (see the module docstring); all arrays [n], x float64. Returns float64 [n]."""
    density = xp.asarray(DENSITY)
    width, limit = xp.asarray(WIDTH52), xp.asarray(TABLES[numpy.dtype(numpy.float64)][1])
    result = xp.empty(positions.shape[0], dtype=xp.float64)
    t = xp.zeros(positions.shape[0], dtype=xp.uint64)
    todo = xp.arange(positions.shape[0])
    layer, negative, x = layer.copy(), negative.copy(), x.copy()
    while todo.shape[0]:
        p, i, tt = positions[todo], layer[todo], t[todo]
        u0 = _uniform(xp, _substream(xp, k, p, tt))
        u1 = _uniform(xp, _substream(xp, k, p, tt + xp.uint64(1)))
        tail = i == 0
        a = -xp.log(u0) / R
        y = density[i] + u0 * (density[i + 1] - density[i])
        ok = xp.where(tail, 2.0 * -xp.log(u1) > a * a, y < xp.exp(-0.5 * x[todo] * x[todo]))
        value = xp.where(tail, R + a, x[todo])
        tt = tt + xp.where(tail, xp.uint64(2), xp.uint64(1))
        # a rejected wedge draws afresh from S(p, t)
        fresh = ~ok & ~tail
        w = _substream(xp, k, p, tt)
        new_layer = (w & xp.uint64(LAYERS - 1)).astype(xp.intp)
        new_m = w >> xp.uint64(12)
        new_x = new_m.astype(xp.float64) * width[new_layer]
        new_ok = fresh & (new_m.astype(xp.int64) < limit[new_layer])
        tt = tt + fresh.astype(xp.uint64)
        value = xp.where(new_ok, new_x, value)
        sign = xp.where(fresh, ((w >> xp.uint64(8)) & xp.uint64(1)).astype(bool), negative[todo])
        done = ok | new_ok
        result[todo[done]] = xp.where(sign[done], -value[done], value[done])
        layer[todo] = xp.where(fresh, new_layer, i)
        negative[todo] = sign
        x[todo] = xp.where(fresh, new_x, x[todo])
        t[todo] = tt
        todo = todo[~done]
    return result


_DEVICE_TABLES = {}


def _tables(xp, dtype):
    """(W, K) of ``dtype`` as arrays of ``xp`` (on CuPy: on the current device), cached."""
    name = (xp.__name__, dtype, None if xp is numpy else xp.cuda.runtime.getDevice())
    if name not in _DEVICE_TABLES:
        width, limit = TABLES[dtype]
        _DEVICE_TABLES[name] = (xp.asarray(width), xp.asarray(limit))
    return _DEVICE_TABLES[name]


def reference_normal_flat(k, offset, size, dtype, xp=numpy, out=None):
    """Numbers ``offset, ..., offset + size − 1`` of the standard-normal stream of key ``k``.

    k: int in [0, 2⁶⁴); offset ≥ 0; size ≥ 0; dtype float32/float64.  Returns a 1-D array
    [size] of ``dtype`` on ``xp`` (``out`` when given, filled); element j is N(0, 1) number
    ``offset + j`` of key k.
    """
    dtype = check_dtype(dtype, "reference_normal_flat")
    offset = check_span(offset, size, "reference_normal_flat")
    k = stream_key(_as_uint64(k, "key"), dtype)
    bits = MANTISSA_BITS[dtype]
    if bits == 52:
        raw = _words(xp, k, offset, size)
    else:
        first = offset >> 1
        words = _words(xp, k, first, ((offset + size + 1) >> 1) - first)
        halves = xp.stack([words & xp.uint64(0xFFFFFFFF), words >> xp.uint64(32)], axis=1).reshape(-1)
        raw = halves[offset & 1:(offset & 1) + size]
    layer = (raw & xp.uint64(LAYERS - 1)).astype(xp.intp)
    negative = ((raw >> xp.uint64(8)) & xp.uint64(1)).astype(bool)
    m = (raw >> xp.uint64((64 if bits == 52 else 32) - bits)).astype(xp.int64)  # the bits above the sign
    width, limit = _tables(xp, dtype)
    x = m.astype(dtype) * width[layer]
    values = xp.where(negative, -x, x)
    rejected = xp.nonzero(m >= limit[layer])[0]
    if rejected.shape[0]:
        scale = xp.asarray(WIDTH52 if bits == 52 else WIDTH23)
        first_x = m[rejected].astype(xp.float64) * scale[layer[rejected]]
        positions = rejected.astype(xp.uint64) + xp.uint64(offset)
        values[rejected] = _reference_slow(xp, k, positions, layer[rejected], negative[rejected],
                                           first_x).astype(dtype)
    if out is None:
        return values
    out[...] = values
    return out


# ---------------------------------------------------------------------------------------
# public draws
# ---------------------------------------------------------------------------------------
def _flat(k, offset, shape, dtype, xp, out, caller):
    """The draw for ``normal``/``normal_rows``: checks, then the kernel (NumPy) or the reference."""
    shape = _shape(shape, caller)
    if out is not None:
        if tuple(out.shape) != shape:
            raise ValueError(f"noise.{caller}: out has shape {tuple(out.shape)}, expected {shape}")
        if dtype is not None and numpy.dtype(dtype) != out.dtype:
            raise ValueError(f"noise.{caller}: out has dtype {out.dtype}, but dtype={numpy.dtype(dtype)} was asked")
        if not out.flags.c_contiguous:
            raise ValueError(f"noise.{caller}: out must be C-contiguous")
        dtype, xp = out.dtype, backend.namespace(out)
    dtype = check_dtype(numpy.float32 if dtype is None else dtype, caller)
    size = math.prod(shape)
    offset = check_span(offset, size, caller)
    k = as_key(k)
    xp = backend.xp if xp is None else xp
    flat = None if out is None else out.reshape(-1)
    if xp is numpy and backend.kernels_mode() == "auto" and cpu_kernels.available():
        flat = cpu_kernels.load("gaussian").normal_flat(k, offset, size, dtype, flat)
    else:
        flat = reference_normal_flat(k, offset, size, dtype, xp, flat)
    return flat.reshape(shape) if out is None else out


def normal(k, shape, dtype=None, *, offset=0, xp=None, out=None):
    """A standard-normal array of ``shape``, a pure function of (key, position).

    Element with C-order flat index j is number ``offset + j`` of key ``k``'s stream, so
    ``normal(k, S, offset=o)`` equals ``normal(k, (o + prod(S),))[o:].reshape(S)``.
    k: an int in [0, 2⁶⁴) or a tuple of such ints (folded by ``key``); shape: int or tuple;
    dtype float32 or float64 (default: float32, or out's dtype); offset ≥ 0 (positions stay
    below 2⁶²); xp: NumPy or CuPy (default: the active backend, or out's); out: a C-contiguous
    array of ``shape`` to fill and return.  NumPy arrays come from the Numba kernel when available.
    """
    return _flat(k, offset, shape, dtype, xp, out, "normal")


def normal_rows(k, shape, start, stop, dtype=None, *, xp=None, out=None):
    """Rows ``start:stop`` of the conceptual array ``normal(k, shape)``, drawn alone.

    shape = (N, ...): the full array's shape; 0 ≤ start ≤ stop ≤ N.  Returns (or fills ``out``
    with) [stop − start, *shape[1:]], equal to ``normal(k, shape)[start:stop]`` — e.g. one
    data-parallel rank's shard of the examples of a per-example noise draw.  dtype, xp, out as
    in ``normal``.
    """
    shape = _shape(shape, "normal_rows")
    if not shape:
        raise ValueError("noise.normal_rows: shape needs at least one axis (the rows)")
    start, stop = operator.index(start), operator.index(stop)
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"noise.normal_rows: need 0 <= start <= stop <= {shape[0]}, got {start}:{stop}")
    row = math.prod(shape[1:])
    return _flat(k, start * row, (stop - start,) + shape[1:], dtype, xp, out, "normal_rows")


def warm_up(dtypes=("float32", "float64")):
    """Compile (or load from Numba's cache) the CPU kernel now; nothing when it would not be used."""
    if backend.kernels_mode() == "auto" and cpu_kernels.available():
        cpu_kernels.warm_up(("gaussian",), dtypes)
