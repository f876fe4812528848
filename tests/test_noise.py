"""The counter-based Gaussian generator (dualnet.noise) and its Numba kernel.

Exactness: the kernel equals the xp reference bit for bit wherever |x| < r (the rectangle and
wedge paths use only +, ×, comparisons and the same exp decision); in the tail beyond r the value
is r − ln(U)/r, and NumPy's and libm's log may differ by an ulp, so there ≤ 2 ulp.

Statistics: fixed keys, so every test is deterministic.  Each bound is z·(standard error under
the null) with z = 4.5 (two-sided p ≈ 7e-6 per check): mean ± z/√n, variance 1 ± z√(2/n),
skewness ± z√(6/n), excess kurtosis ± z√(24/n), a tail count c with expectation e = n·P(|Z| > t)
within e ± z√e, correlations ± z/√n.  Kolmogorov–Smirnov p-values must exceed 1e-5.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualnet import backend, noise

scipy_stats = pytest.importorskip("scipy.stats")

DTYPES = [np.float32, np.float64]
Z = 4.5
KS_P = 1e-5


def kernel():
    pytest.importorskip("numba")
    from dualnet.kernels import cpu
    return cpu.load("gaussian")


def assert_matches_reference(actual, expected):
    """Bit-identical inside the ziggurat's layers, ≤ 2 ulp in the tail beyond r."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    body = np.abs(expected) < noise.R
    np.testing.assert_array_equal(actual[body], expected[body])
    np.testing.assert_array_max_ulp(actual[~body], expected[~body], maxulp=2)


# ---------------------------------------------------------------------------------------
# keys and bits
# ---------------------------------------------------------------------------------------
def test_words_are_splitmix64_outputs():
    # SplitMix64 from state 0: its published first outputs.
    assert [noise.splitmix64_word(0, c) for c in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                               0x06C45D188009454F]
    # and the counter form equals the sequential generator for any state
    state = k = noise.key(3, 1)
    for c in range(50):
        state = (state + noise.GAMMA) & noise.MASK64
        assert noise.splitmix64_word(k, c) == noise.mix64(state)
    words = noise._words(np, k, 17, 8)
    assert words.dtype == np.uint64
    assert [int(w) for w in words] == [noise.splitmix64_word(k, c) for c in range(17, 25)]


def test_key_fold():
    assert noise.key(1, 2, 3) == noise.key(1, 2, 3) == noise.as_key((1, 2, 3)) == noise.as_key([1, 2, 3])
    keys = {noise.key(*t) for t in [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2**64 - 1,), (1, 2, 3),
                                    (3, 2, 1), (np.int64(1), np.uint64(2), 3)]}
    assert len(keys) == 9  # the last tuple equals (1, 2, 3): numpy integers are accepted as their values
    assert all(0 <= k < 2**64 for k in keys)
    assert noise.as_key(12345) == 12345  # an int is a key as it is


def test_key_bits_avalanche():
    # adjacent tuples: each output bit flips with probability 1/2 (binomial bound over 64 × 2000 bits)
    flips = np.zeros(64)
    for s in range(2000):
        diff = noise.key(7, s) ^ noise.key(7, s + 1)
        flips += [(diff >> b) & 1 for b in range(64)]
    total = flips.sum() / (64 * 2000)
    assert abs(total - 0.5) < Z * math.sqrt(0.25 / (64 * 2000))
    # each bit alone; 64 simultaneous checks, so z = 5.5 (64 · P(|Z| > 5.5) ≈ 2.4e-6)
    assert np.all(np.abs(flips / 2000 - 0.5) < 5.5 * math.sqrt(0.25 / 2000))


@pytest.mark.parametrize("bad, error, match", [
    ((), ValueError, "at least one"), ((-1,), ValueError, r"\[0, 2\*\*64\)"), ((2**64,), ValueError, "2\\*\\*64"),
    ((1.5,), TypeError, "integer"), (("3",), TypeError, "integer")])
def test_key_rejects_bad_values(bad, error, match):
    with pytest.raises(error, match=match):
        noise.key(*bad)


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got int32"):
        noise.normal(1, 4, np.int32)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        noise.normal(1, 4, "not a dtype")
    with pytest.raises(ValueError, match="offset must be ≥ 0"):
        noise.normal(1, 4, offset=-1)
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        noise.normal(1, 4, offset=2**62 - 3)
    with pytest.raises(ValueError, match="negative dimension"):
        noise.normal(1, (3, -1))
    with pytest.raises(ValueError, match="key must lie"):
        noise.normal(-5, 4)
    with pytest.raises(ValueError, match="start <= stop"):
        noise.normal_rows(1, (4, 3), 3, 2)
    with pytest.raises(ValueError, match="start <= stop <= 4"):
        noise.normal_rows(1, (4, 3), 0, 5)
    with pytest.raises(ValueError, match="at least one axis"):
        noise.normal_rows(1, (), 0, 0)
    with pytest.raises(ValueError, match="dtype must be"):
        noise.reference_normal_flat(1, 0, 4, np.float16)


def test_ziggurat_tables():
    x, f = noise.EDGES, noise.DENSITY
    assert x[1] == noise.R and x[-1] == 0.0 and np.all(np.diff(x) < 0)
    # every layer (base strip with its tail, then the boxes) has the same area v; the top box closes at f(0) = 1
    areas = x[1:noise.LAYERS] * (f[2:] - f[1:noise.LAYERS])
    np.testing.assert_allclose(areas, noise.LAYER_AREA, rtol=1e-12)
    tail = math.sqrt(math.pi / 2) * math.erfc(noise.R / math.sqrt(2))
    assert math.isclose(x[0] * f[1], noise.R * f[1] + tail, rel_tol=1e-15)
    for dtype, bits in noise.MANTISSA_BITS.items():
        width, limit = noise.TABLES[dtype]
        assert width.dtype == dtype
        # m < K[i] keeps x = m·X[i]/2^bits inside the rectangle [0, X[i+1]); K is the largest such bound
        assert np.all(limit * x[:noise.LAYERS] <= x[1:] * 2.0**bits)
        assert np.all((limit + 1) * x[:noise.LAYERS] >= x[1:] * 2.0**bits)
        assert limit[-1] == 0  # the top layer has no rectangle under f
    # 98.5 % of draws take the fast path: Σ_i K[i]/(256·2^bits)
    for dtype, bits in noise.MANTISSA_BITS.items():
        assert 0.984 < noise.TABLES[dtype][1].sum() / (256 * 2.0**bits) < 0.986


# ---------------------------------------------------------------------------------------
# reference and kernel agree; slices; determinism
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset, size", [(0, 0), (0, 1), (1, 1), (5, 7), (1, 2047), (0, 2048), (3, 4097),
                                          (2**40 + 1, 3000), (11, 200_000)])
def test_kernel_matches_reference(dtype, offset, size):
    k = noise.key(2026, offset)
    expected = noise.reference_normal_flat(k, offset, size, dtype)
    assert_matches_reference(kernel().normal_flat(k, offset, size, dtype), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_on_many_slow_draws(dtype):
    # 2^20 numbers: ≈ 15 000 rejections, ≈ 270 of them in the tail
    k = noise.key(9, 9)
    expected = noise.reference_normal_flat(k, 0, 1 << 20, dtype)
    assert np.sum(np.abs(expected) > noise.R) > 150
    assert_matches_reference(kernel().normal_flat(k, 0, 1 << 20, dtype), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_parallel_draw_does_not_depend_on_the_thread_count(dtype):
    # from PARALLEL_MIN_ELEMENTS numbers the kernel cuts the draw into one run per thread; an odd
    # offset and a size that is no multiple of the block move every run's boundary inside a word
    import numba

    from dualnet.kernels.cpu import PARALLEL_MIN_ELEMENTS
    k, offset, size = noise.key(4, 2), 3, PARALLEL_MIN_ELEMENTS + 2 * 2048 + 5
    expected = noise.reference_normal_flat(k, offset, size, dtype)
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, previous}):
            numba.set_num_threads(threads)
            assert_matches_reference(kernel().normal_flat(k, offset, size, dtype), expected)
    finally:
        numba.set_num_threads(previous)


@given(st.lists(st.integers(0, 6), min_size=0, max_size=3), st.integers(0, 5000), st.sampled_from(DTYPES),
       st.booleans())
def test_a_draw_at_an_offset_is_a_slice_of_a_larger_draw(shape, offset, dtype, reference):
    shape = tuple(shape)
    size = math.prod(shape)
    if reference:
        def draw(s, offset=0):
            return noise.reference_normal_flat(77, offset, math.prod(s), dtype).reshape(s)
    else:
        def draw(s, offset=0):
            return noise.normal(77, s, dtype, offset=offset)
    big = draw((offset + size + 9,))
    part = draw(shape, offset=offset)
    assert part.shape == shape and part.dtype == dtype
    np.testing.assert_array_equal(part.reshape(-1), big[offset:offset + size])


@given(st.integers(1, 40), st.lists(st.integers(1, 5), min_size=0, max_size=2), st.data(), st.sampled_from(DTYPES))
def test_rows_of_a_conceptual_array_are_drawn_alone(rows, tail_shape, data, dtype):
    shape = (rows,) + tuple(tail_shape)
    start = data.draw(st.integers(0, rows))
    stop = data.draw(st.integers(start, rows))
    full = noise.normal((5, 1), shape, dtype)
    shard = noise.normal_rows((5, 1), shape, start, stop, dtype)
    assert shard.shape == (stop - start,) + tuple(tail_shape)
    np.testing.assert_array_equal(shard, full[start:stop])


def test_data_parallel_shards_tile_the_batch():
    shape, key = (128, 512), noise.key(1, 0, 3)
    full = noise.normal(key, shape)
    for ranks in (2, 3, 5):
        bounds = np.linspace(0, shape[0], ranks + 1).astype(int)
        shards = [noise.normal_rows(key, shape, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        np.testing.assert_array_equal(np.concatenate(shards), full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_across_calls_and_paths(dtype, monkeypatch):
    a = noise.normal((4, 2, 0), (64, 33), dtype)
    b = noise.normal((4, 2, 0), (64, 33), dtype)
    np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("DUALNET_KERNELS", "reference")
    assert_matches_reference(a, noise.normal((4, 2, 0), (64, 33), dtype))
    assert not np.array_equal(a, noise.normal((4, 2, 1), (64, 33), dtype))


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_filled_in_place(dtype, mode, monkeypatch):
    monkeypatch.setenv("DUALNET_KERNELS", mode)
    directions, shape = 3, (40, 17)
    buffer = np.full((directions, 10, 17), np.nan, dtype)
    for d in range(directions):  # each direction's shard written straight into its slot
        slot = buffer[d]
        assert noise.normal_rows((6, d), shape, 5, 15, out=slot) is slot
        np.testing.assert_array_equal(buffer[d], noise.normal((6, d), shape, dtype)[5:15])
    whole = np.empty(shape, dtype)
    assert noise.normal(6, shape, out=whole, offset=2) is whole
    np.testing.assert_array_equal(whole, noise.normal(6, shape, dtype, offset=2))
    with pytest.raises(ValueError, match="out has shape"):
        noise.normal(6, (40, 16), out=whole)
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(ValueError, match="out has dtype"):
        noise.normal(6, shape, other, out=whole)
    with pytest.raises(ValueError, match="C-contiguous"):
        noise.normal(6, (40, 9), out=whole[:, ::2])


def test_pinned_values():
    """The stream is part of the on-disk reproducibility contract: these numbers must never change."""
    np.testing.assert_array_equal(noise.normal((0,), 4, np.float64), PINNED64)
    np.testing.assert_array_equal(noise.normal((0,), 4, np.float32), PINNED32)


PINNED64 = np.array([0.3664648402857478, -1.386320098799102, -0.2494674553661518, -0.17480010826092515])
PINNED32 = np.array([0.9712356925010681, -0.26533612608909607, -1.2389320135116577, 0.7338446974754333],
                    dtype=np.float32)


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------
N_STATS = 1 << 22


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def sample(request):
    """4 Mi numbers of one fixed key, as float64 for the statistics."""
    return noise.normal(noise.key(20261202, 1), N_STATS, request.param, xp=np).astype(np.float64)


def test_moments(sample):
    n = sample.size
    assert abs(sample.mean()) < Z / math.sqrt(n)
    assert abs(sample.var() - 1.0) < Z * math.sqrt(2.0 / n)
    assert abs(scipy_stats.skew(sample)) < Z * math.sqrt(6.0 / n)
    assert abs(scipy_stats.kurtosis(sample)) < Z * math.sqrt(24.0 / n)


def test_kolmogorov_smirnov(sample):
    assert scipy_stats.kstest(sample, "norm").pvalue > KS_P
    # the first 2^16 alone (a small draw must be normal too, not only a long run)
    assert scipy_stats.kstest(sample[:1 << 16], "norm").pvalue > KS_P


def test_tail_frequencies(sample):
    for t in (2.0, 3.0, noise.R, 4.0, 4.5):
        expected = sample.size * 2 * scipy_stats.norm.sf(t)
        count = np.sum(np.abs(sample) > t)
        assert abs(count - expected) < Z * math.sqrt(expected), (t, count, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tail_beyond_r_is_the_normal_tail(dtype):
    """The values of the tail algorithm follow N(0,1) conditioned on |x| > r (64 Mi draws, ≈ 17 000 tail values)."""
    key = noise.key(20261202, 2)
    chunk = 1 << 22
    draws = [noise.normal(key, chunk, dtype, offset=i * chunk) for i in range(16)]
    signed = np.concatenate([d[np.abs(d) > noise.R] for d in draws]).astype(np.float64)
    tail = np.abs(signed)
    expected = 16 * chunk * 2 * scipy_stats.norm.sf(noise.R)
    assert abs(tail.size - expected) < Z * math.sqrt(expected)
    sf_r = scipy_stats.norm.sf(noise.R)
    assert scipy_stats.kstest(tail, lambda v: 1.0 - scipy_stats.norm.sf(v) / sf_r).pvalue > KS_P
    # the mean excess over r: E[|x| − r | |x| > r] = φ(r)/Q(r) − r, within z standard errors
    excess = scipy_stats.norm.pdf(noise.R) / sf_r - noise.R
    second = 1.0 - noise.R * excess - excess * excess  # Var(|x| − r | |x| > r) for the truncated normal
    assert abs((tail - noise.R).mean() - excess) < Z * math.sqrt(second / tail.size)
    assert abs(np.sign(signed).mean()) < Z / math.sqrt(signed.size)


def test_sign_and_layer_are_balanced(sample):
    n = sample.size
    assert abs(np.mean(sample > 0) - 0.5) < Z * 0.5 / math.sqrt(n)
    # the 256 layers are chosen uniformly: the frequencies of |x| in 64 equal-probability bins
    edges = scipy_stats.norm.ppf(0.5 + 0.5 * np.arange(1, 64) / 64)
    counts = np.bincount(np.searchsorted(edges, np.abs(sample)), minlength=64)
    assert scipy_stats.chisquare(counts).pvalue > KS_P


def test_adjacent_pairs_are_jointly_uniform(sample):
    """(Φ(x_p), Φ(x_p+1)) over 16 × 16 equal cells: a χ² test of independence beyond correlation."""
    cells = np.minimum((scipy_stats.norm.cdf(sample) * 16).astype(int), 15)
    for first, second in ((cells[0::2], cells[1::2]), (cells[1:-1:2], cells[2::2])):  # within and across words
        counts = np.bincount(first * 16 + second, minlength=256)
        assert scipy_stats.chisquare(counts).pvalue > KS_P


def correlation_bound(n):
    return Z / math.sqrt(n)


def test_adjacent_positions_are_uncorrelated(sample):
    n = sample.size - 1
    for lag in (1, 2, 3, 64):
        a, b = sample[:-lag], sample[lag:]
        assert abs(np.corrcoef(a, b)[0, 1]) < correlation_bound(n)
        assert abs(np.corrcoef(a * a, b * b)[0, 1]) < correlation_bound(n)  # magnitudes too
    # float32 takes two numbers from one 64-bit word: the word's halves are independent
    even, odd = sample[0::2], sample[1::2]
    assert abs(np.corrcoef(even, odd)[0, 1]) < correlation_bound(even.size)
    assert abs(np.corrcoef(np.abs(even), np.abs(odd))[0, 1]) < correlation_bound(even.size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", ["tuple", "raw"])
def test_adjacent_keys_are_uncorrelated(dtype, pair):
    n = 1 << 18
    for s in range(4):
        if pair == "tuple":  # (seed, step) and (seed, step + 1)
            a, b = noise.normal((1, s), n, dtype), noise.normal((1, s + 1), n, dtype)
        else:                # raw integer keys k and k + 1
            a, b = noise.normal(1000 + s, n, dtype), noise.normal(1001 + s, n, dtype)
        a, b = a.astype(np.float64), b.astype(np.float64)
        assert abs(np.corrcoef(a, b)[0, 1]) < correlation_bound(n)
        assert abs(np.corrcoef(a * a, b * b)[0, 1]) < correlation_bound(n)


def test_float32_and_float64_streams_of_one_key_are_independent():
    n = 1 << 18
    wide = noise.normal((2, 0), n, np.float64)
    narrow = noise.normal((2, 0), 2 * n, np.float32).astype(np.float64)
    for other in (narrow[:n], narrow[0::2], narrow[1::2]):  # same position; same 64-bit word index
        assert abs(np.corrcoef(wide, other)[0, 1]) < correlation_bound(n)
        assert abs(np.corrcoef(np.abs(wide), np.abs(other))[0, 1]) < correlation_bound(n)


def test_noise_of_many_sites_is_jointly_uncorrelated():
    """A step's noise over 8 sites: the 8×8 correlation matrix of their draws is I within ± z/√n."""
    n = 1 << 16
    draws = np.stack([noise.normal((3, 41, site), n, np.float32) for site in range(8)]).astype(np.float64)
    off_diagonal = np.corrcoef(draws)[~np.eye(8, dtype=bool)]
    assert np.all(np.abs(off_diagonal) < correlation_bound(n))


# ---------------------------------------------------------------------------------------
# kernel registry, warm-up, GPU
# ---------------------------------------------------------------------------------------
def test_kernel_is_registered_and_warms_up():
    from dualnet.kernels import cpu
    assert "gaussian" in cpu.MODULES
    for dtype in ("float32", "float64"):
        kernel().warm_up(dtype)
    noise.warm_up()


def test_training_warm_up_leaves_every_registered_kernel_cached():
    """The runner says "compiling the Numba kernels once" unless ``cpu.cached()``; after the warm-up it
    runs (``backend.warm_up_kernels``) that must hold, so the message is printed on the first run only."""
    from dualnet.kernels import cpu
    kernel()
    backend.warm_up_kernels(("float32",))
    assert cpu.cached()


@pytest.mark.skipif(not backend.cuda_available(), reason="no usable CUDA device (CuPy)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_on_cupy_matches_numpy(dtype):
    import cupy
    k = noise.key(8, 8)
    on_gpu = noise.normal(k, (300, 1000), dtype, offset=3, xp=cupy)
    assert isinstance(on_gpu, cupy.ndarray)
    expected = noise.reference_normal_flat(k, 3, 300_000, dtype).reshape(300, 1000)
    assert_matches_reference(backend.to_numpy(on_gpu), expected)
    shard = noise.normal_rows(k, (300, 1000), 10, 20, dtype, xp=cupy)
    full = noise.normal(k, (300, 1000), dtype, xp=cupy)
    np.testing.assert_array_equal(backend.to_numpy(shard), backend.to_numpy(full)[10:20])
