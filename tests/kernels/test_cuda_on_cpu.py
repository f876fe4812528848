"""The CUDA kernels' own sources (kernels/cuda/*.cu), run on the CPU, against the NumPy references.

The harness (tests/kernels/cuda_harness, docs/cuda_on_cpu.md) compiles each source unchanged
with the host C++ compiler after a header that emulates threads, warps (32 lanes in lock step)
and shuffles.  The launchers of kernels/cuda run as they are, with the test-only ``cupy``
stand-in: so the geometry is the launchers' own (``cuda.warp_grid`` / ``cuda.thread_grid``),
every argument list is checked against the kernel's parameters parsed from its source, and
deliberately small and odd grids replace it to exercise the grid-stride loops.  The references
are those the Numba kernels are held to (``dualnet.fused``, ``dualnet.losses``).

This proves the kernels' arithmetic, indexing, shuffles and argument passing; only a real GPU can
show timing, memory use, NVRTC compilation and truly concurrent warps.

Run: ``PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_on_cpu.py``
(skips, with the reason, when no C++ compiler is found).
"""
import itertools

import numpy as np
import pytest

from dualnet import backend, fused, losses, optim
from dualnet.kernels import cuda
from dualnet.rules.base import reference_site_gradient

DTYPES = [np.float32, np.float64]
GEOMETRIES = {  # name -> None (the launcher's own) or (grid, block) -> (grid, block)
    "launcher": None,
    "one-warp": lambda grid, block: ((1,), (32,)),
    "3-blocks-of-3-warps": lambda grid, block: ((3,), (96,)),
}
TESTED = {  # kernel (without _f32/_f64) -> the test below that runs it through its launcher
    "layer_norm_forward": "test_layer_norm",
    "layer_norm_jacobian": "test_layer_norm",
    "normalize_epilogue": "test_normalize_epilogue",
    "normalize_relu": "test_normalize_relu",
    "replica_tangent": "test_replica_tangent",
    "replica_cotangent": "test_replica_cotangent",
    "sgd_update": "test_sgd_update",
    "site_gradient": "test_site_gradient",
}
SUFFIX = {np.float32: "f32", np.float64: "f64"}
EPS = 1e-5


def tolerance(dtype, reduced):
    """rtol = atol for outputs made of O(1) terms after sums of ``reduced`` terms, computed in
    ``dtype`` by the kernel and by the reference in different orders: rounding errors of a sum
    grow like √n units of roundoff; 16 covers the few operations around the sums."""
    return 16 * np.finfo(dtype).eps * max(1.0, np.sqrt(reduced))


def assert_close(actual, expected, dtype, reduced):
    """``actual`` (a device array from a launcher) equals ``expected`` (host reference, same dtype)
    to ``tolerance``."""
    if expected is None:
        assert actual is None
        return
    assert backend.namespace(actual) is not np, "a launcher returned a host array"
    actual = actual.get()
    assert actual.shape == expected.shape and actual.dtype == np.dtype(dtype)
    assert not np.isnan(actual).any(), "NaN: an element left unwritten or a read outside an input"
    bound = tolerance(dtype, reduced)
    np.testing.assert_allclose(actual, expected, rtol=bound, atol=bound)


def launched(device, dtype):
    """The kernels (without suffix) ``device`` ran, all for ``dtype``."""
    names = {name for name, _, _ in device.launches}
    assert all(name.endswith(SUFFIX[dtype]) for name in names)
    return {name[:-4] for name in names}


# ---------------------------------------------------------------------------------------
# checks shared by the tests and the mutation tests
# ---------------------------------------------------------------------------------------
def check_layer_norm(cp, rng, dtype, shape, directions):
    """layer_norm_forward (with and without tangents) and layer_norm_jacobian vs fused.reference_*."""
    launcher = cuda.load("layer_norm")
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    tangent = rng.standard_normal((directions,) + shape).astype(dtype)
    width = shape[-1]
    for t in (tangent, None):
        actual = launcher.layer_norm_forward(cp.asarray(x), None if t is None else cp.asarray(t), EPS)
        for a, e in zip(actual, fused.reference_layer_norm_forward(x, t, EPS)):
            assert_close(a, e, dtype, width)
    y, _, sigma = fused.reference_layer_norm_forward(x, None, EPS)
    actual = launcher.layer_norm_jacobian(cp.asarray(y), cp.asarray(sigma), cp.asarray(tangent))
    assert_close(actual, fused.reference_layer_norm_jacobian(y, sigma, tangent), dtype, width)


def check_normalize_epilogue(cp, rng, dtype, groups, rows, width, directions, combinations):
    """normalize_epilogue vs fused.reference_normalize_epilogue for each presence pattern of the
    three optional operands in ``combinations`` (tuples of 3 booleans)."""
    launcher = cuda.load("normalize_epilogue")

    def make(*shape):
        return (rng.standard_normal(shape) * 2).astype(dtype)
    value = make(groups, rows, width)
    candidates = (make(groups, directions, rows, width), make(groups, width), make(directions, groups, width))
    for present in combinations:
        optional = [c if p else None for c, p in zip(candidates, present)]
        k = directions if any(optional[i] is not None for i in (0, 2)) else 0
        expected = fused.reference_normalize_epilogue(value, *optional, EPS, k)
        actual = launcher.normalize_epilogue(cp.asarray(value), *[None if a is None else cp.asarray(a)
                                                                  for a in optional], EPS, k)
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype, width)


def check_normalize_relu(cp, arguments, dtype, groups, rows, width, directions, combinations):
    """normalize_relu vs fused.reference_normalize_relu for each presence pattern of the six
    optional operands in ``combinations`` (tuples of 6 booleans); ``arguments``: the
    ``normalize_relu_arguments`` fixture."""
    launcher = cuda.load("normalize_epilogue")
    for present in combinations:
        call = arguments(dtype, groups, rows, width, directions, present)
        actual = launcher.normalize_relu(*[cp.asarray(a) if isinstance(a, np.ndarray) else a for a in call])
        for a, e in zip(actual, fused.reference_normalize_relu(*call)):
            assert_close(a, e, dtype, width)


def check_replica_tangent(cp, rng, dtype, shape, head_directions):
    """replica_tangent (fresh and accumulating into ``out``) vs losses.replica_tangent_reference."""
    launcher = cuda.load("replicated_loss")
    directions, examples, _, groups, channels = shape
    x_tangent = rng.standard_normal(shape).astype(dtype)
    u = rng.standard_normal((examples, groups, channels)).astype(dtype)
    head = None if head_directions is None else rng.standard_normal((head_directions, examples)).astype(dtype)
    device_head = None if head is None else cp.asarray(head)
    actual = launcher.replica_tangent(cp.asarray(x_tangent), cp.asarray(u), 0.37, device_head)
    assert_close(actual, losses.replica_tangent_reference(x_tangent, u, 0.37, head), dtype, channels)
    start = rng.standard_normal(shape[:4]).astype(dtype)
    actual = launcher.replica_tangent(cp.asarray(x_tangent), cp.asarray(u), 0.37, device_head, out=cp.asarray(start))
    expected = losses.replica_tangent_reference(x_tangent, u, 0.37, head, out=start.copy())
    assert_close(actual, expected, dtype, channels)


def check_replica_cotangent(cp, rng, dtype, shape):
    """replica_cotangent vs losses.replica_cotangent_reference."""
    _, examples, patches, groups, channels = shape
    cotangent = rng.standard_normal((examples, patches, groups)).astype(dtype)
    u = rng.standard_normal((examples, groups, channels)).astype(dtype)
    actual = cuda.load("replicated_loss").replica_cotangent(cp.asarray(cotangent), cp.asarray(u), 0.37)
    assert_close(actual, losses.replica_cotangent_reference(cotangent, u, 0.37), dtype, 1)


def check_sgd_update(cp, rng, dtype, shape, momentum, nesterov, weight_decay):
    """sgd_update (in place on the parameter and the buffer) vs optim.reference_sgd_update."""
    param, grad, buffer = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    with_buffer = momentum > 0
    expected = [param.copy(), buffer.copy() if with_buffer else None]
    optim.reference_sgd_update(expected[0], grad, expected[1], 0.037, momentum, weight_decay, nesterov)
    device = [cp.asarray(param), cp.asarray(buffer) if with_buffer else None]
    cuda.load("sgd").sgd_update(device[0], cp.asarray(grad), device[1], 0.037, momentum, weight_decay, nesterov)
    assert_close(device[0], expected[0], dtype, 1)
    if with_buffer:
        assert_close(device[1], expected[1], dtype, 1)


def check_site_gradient(cp, rng, dtype, shape, masked):
    """site_gradient vs rules.base.reference_site_gradient; shape (K, N, A, B); the mask, when
    present, holds NaN and ±inf products to show it multiplies (as NumPy's float·bool does)."""
    directions, rows, blocks, width = shape
    factors = rng.standard_normal((directions, rows, blocks)).astype(dtype)
    values = rng.standard_normal(shape).astype(dtype)
    values[0, 0, 0, :3] = [np.nan, np.inf, -np.inf][:width]
    mask = rng.random((rows, blocks, width)) < 0.6 if masked else None
    with np.errstate(invalid="ignore"):  # inf · False is NaN, as the kernel must give too
        expected = reference_site_gradient(factors, values, mask)
    actual = cuda.load("site_gradient").site_gradient(cp.asarray(factors), cp.asarray(values),
                                                      None if mask is None else cp.asarray(mask))
    assert backend.namespace(actual) is not np and actual.shape == expected.shape and actual.dtype == dtype
    np.testing.assert_array_equal(actual.get(), expected)  # the same products and sums in the same order


# ---------------------------------------------------------------------------------------
# every kernel entry point, both dtypes, ragged shapes, launcher and odd grids
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=list(GEOMETRIES), ids=list(GEOMETRIES))
def device(fake_cupy, request):
    """The cupy stand-in with one of GEOMETRIES in force."""
    fake_cupy.geometry = GEOMETRIES[request.param]
    return fake_cupy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, directions", [((5, 7), 1), ((2, 3, 1), 4), ((3, 33), 4), ((1, 100), 1),
                                                ((4, 64), 4), ((70, 67), 1)])
def test_layer_norm(device, rng, dtype, shape, directions):
    import cupy
    check_layer_norm(cupy, rng, dtype, shape, directions)
    assert launched(device, dtype) == {"layer_norm_forward", "layer_norm_jacobian"}


EVERY_COMBINATION = tuple(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, rows, width, directions", [(3, 5, 7, 1), (2, 9, 45, 4), (1, 2, 33, 4)])
def test_normalize_epilogue(device, rng, dtype, groups, rows, width, directions):
    import cupy
    combinations = EVERY_COMBINATION if device.geometry is None else (EVERY_COMBINATION[0], EVERY_COMBINATION[-1])
    check_normalize_epilogue(cupy, rng, dtype, groups, rows, width, directions, combinations)
    assert launched(device, dtype) == {"normalize_epilogue"}


EVERY_RELU_COMBINATION = tuple(itertools.product([False, True], repeat=6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, rows, width, directions", [(3, 5, 7, 1), (2, 9, 45, 3), (1, 2, 33, 1)])
def test_normalize_relu(device, normalize_relu_arguments, dtype, groups, rows, width, directions):
    import cupy
    combinations = (EVERY_RELU_COMBINATION if device.geometry is None
                    else (EVERY_RELU_COMBINATION[0], EVERY_RELU_COMBINATION[21], EVERY_RELU_COMBINATION[-1]))
    check_normalize_relu(cupy, normalize_relu_arguments, dtype, groups, rows, width, directions, combinations)
    assert launched(device, dtype) == {"normalize_relu"}


REPLICA_SHAPES = [(1, 1, 1, 1, 1), (4, 2, 5, 3, 37), (1, 3, 2, 16, 32), (4, 1, 3, 2, 70)]  # K, N, P, G, c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", REPLICA_SHAPES)
@pytest.mark.parametrize("head", ["none", "one", "every"])
def test_replica_tangent(device, rng, dtype, shape, head):
    import cupy
    check_replica_tangent(cupy, rng, dtype, shape, {"none": None, "one": 1, "every": shape[0]}[head])
    assert launched(device, dtype) == {"replica_tangent"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", REPLICA_SHAPES)
def test_replica_cotangent(device, rng, dtype, shape):
    import cupy
    check_replica_cotangent(cupy, rng, dtype, shape)
    assert launched(device, dtype) == {"replica_cotangent"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5, 7), (300,), (3, 4, 33)])
@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4),
                                                              (0.9, True, 0.0)])
def test_sgd_update(device, rng, dtype, shape, momentum, nesterov, weight_decay):
    import cupy
    check_sgd_update(cupy, rng, dtype, shape, momentum, nesterov, weight_decay)
    assert launched(device, dtype) == {"sgd_update"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 5, 3, 7), (3, 4, 2, 33), (2, 3, 1, 70)])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_site_gradient(device, rng, dtype, shape, masked):
    import cupy
    check_site_gradient(cupy, rng, dtype, shape, masked)
    assert launched(device, dtype) == {"site_gradient"}


def test_every_kernel_entry_point_is_tested(cuda_harness):
    """TESTED names every kernel the sources of cuda.MODULES define, in float and double."""
    defined = {kernel for name in cuda.MODULES for kernel in cuda_harness.kernel_signatures(cuda.source(name))}
    assert defined == {f"{kernel}_{suffix}" for kernel in TESTED for suffix in ("f32", "f64")}
    assert set(TESTED.values()) <= set(globals())


def test_every_module_is_compiled_by_the_shared_loader(fake_cupy, cuda_harness):
    """Every kernel of every module in cuda.MODULES comes from cuda.function, built with cuda.OPTIONS."""
    for name in cuda.MODULES:
        for kernel in cuda_harness.kernel_signatures(cuda.source(name)):
            cuda.function(name, kernel[:-len("_f32")], {"f32": np.float32, "f64": np.float64}[kernel[-3:]])
    assert fake_cupy.options == [cuda.OPTIONS] * len(cuda.MODULES)
    assert "replicated_loss" in cuda.MODULES and cuda.load("replicated_loss").replica_tangent


def test_launchers_reject_shapes_that_would_index_out_of_bounds(fake_cupy):
    import cupy
    layer_norm, epilogue, replicated_loss = map(cuda.load, ("layer_norm", "normalize_epilogue", "replicated_loss"))
    x = cupy.zeros((3, 5))
    with pytest.raises(ValueError, match="tangent must be"):
        layer_norm.layer_norm_forward(x, cupy.zeros((2, 3, 4)), EPS)
    with pytest.raises(ValueError, match="disagree"):
        layer_norm.layer_norm_jacobian(x, cupy.zeros((3,)), cupy.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"bias must be \(2, 5\)"):
        epilogue.normalize_epilogue(cupy.zeros((2, 3, 5)), None, cupy.zeros((2, 4)), None, EPS, 0)
    with pytest.raises(ValueError, match=r"bias_tangent must be \(1, 2, 5\)"):
        epilogue.normalize_epilogue(cupy.zeros((2, 3, 5)), None, None, cupy.zeros((2, 2, 5)), EPS, 1)
    with pytest.raises(ValueError, match=r"normalize_relu.*residual must be \(3, 2, 5\)"):
        epilogue.normalize_relu(cupy.zeros((2, 3, 5)), None, None, None, None, cupy.zeros((2, 3, 5)), None, EPS, 0)
    with pytest.raises(ValueError, match=r"normalize_relu.*injected must be \(1, 3, 2, 5\)"):
        epilogue.normalize_relu(cupy.zeros((2, 3, 5)), None, None, None, cupy.zeros((1, 2, 3, 5)), None, None, EPS, 1)
    with pytest.raises(ValueError, match="head must be"):
        replicated_loss.replica_tangent(cupy.zeros((3, 2, 1, 1, 4)), cupy.zeros((2, 1, 4)), 1.0, cupy.zeros((2, 2)))
    site_gradient = cuda.load("site_gradient").site_gradient
    with pytest.raises(ValueError, match=r"factors must be \(2, 3, 4\)"):
        site_gradient(cupy.zeros((2, 3, 5)), cupy.zeros((2, 3, 4, 5)), None)
    with pytest.raises(ValueError, match="mask must be a bool array"):
        site_gradient(cupy.zeros((2, 3, 4)), cupy.zeros((2, 3, 4, 5)), cupy.zeros((3, 4, 5)))
    assert fake_cupy.launches == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_directions_give_empty_tangents_and_empty_inputs_launch_one_block(fake_cupy, dtype):
    import cupy
    x = cupy.asarray(np.arange(10, dtype=dtype).reshape(2, 5))
    y, y_tangent, _ = cuda.load("layer_norm").layer_norm_forward(x, cupy.zeros((0, 2, 5), dtype), EPS)
    assert y_tangent.shape == (0, 2, 5) and y_tangent.dtype == dtype
    assert_close(y, fused.reference_layer_norm_forward(x.get(), None, EPS)[0], dtype, 5)
    empty = cuda.load("replicated_loss").replica_cotangent(cupy.zeros((0, 2, 3), dtype), cupy.zeros((0, 3, 4), dtype),
                                                           1.0)
    assert empty.shape == (0, 2, 3, 4)
    assert fake_cupy.launches[-1] == (f"replica_cotangent_{SUFFIX[dtype]}", (1,), (256,))


@pytest.mark.parametrize("items", [0, 1, 7, 8, 9, 255, 8 << 20, (8 << 20) + 1, 1 << 40])
def test_launch_geometry_covers_every_item_with_a_capped_grid(items):
    (blocks,), (threads,) = cuda.thread_grid(items)
    assert threads % 32 == 0 and 32 <= threads <= 1024
    assert 1 <= blocks <= cuda.MAX_BLOCKS
    assert blocks * threads >= items or blocks == cuda.MAX_BLOCKS  # beyond the cap, the grid stride covers
    assert blocks == 1 or (blocks - 1) * threads < items  # no block is entirely idle
    assert cuda.warp_grid(items) == cuda.thread_grid(32 * items)


# ---------------------------------------------------------------------------------------
# the harness catches real bugs
# ---------------------------------------------------------------------------------------
MUTATIONS = {  # id -> (module, original text, mutated text, a check that must then fail)
    "layer_norm-shuffle-offset": (
        "layer_norm", "offset = 16; offset > 0; offset >>= 1", "offset = 8; offset > 0; offset >>= 1",
        lambda cp, rng: check_layer_norm(cp, rng, np.float64, (3, 33), 4)),
    "layer_norm-jacobian-row-index": (
        "layer_norm", "const long long row = item % rows;", "const long long row = item / directions;",
        lambda cp, rng: check_layer_norm(cp, rng, np.float64, (5, 7), 4)),
    "normalize_epilogue-layout-index": (
        "normalize_epilogue", "value + (g * rows + m) * width", "value + (m * groups + g) * width",
        lambda cp, rng: check_normalize_epilogue(cp, rng, np.float64, 3, 5, 7, 1, EVERY_COMBINATION[:1])),
    "replicated_loss-shuffle-offset": (
        "replicated_loss", "__shfl_down_sync(0xffffffffu, total, offset)",
        "__shfl_down_sync(0xffffffffu, total, offset + 1)",
        lambda cp, rng: check_replica_tangent(cp, rng, np.float32, (1, 3, 2, 16, 32), None)),
    "sgd-buffer-unwritten": (
        "sgd", "buffer[i] = b;", ";",
        lambda cp, rng: check_sgd_update(cp, rng, np.float64, (5, 7), 0.9, False, 0.0)),
    "site_gradient-direction-stride": (
        "site_gradient", "factors[k * rows * blocks + block]", "factors[k * blocks + block]",
        lambda cp, rng: check_site_gradient(cp, rng, np.float64, (3, 4, 2, 33), True)),
    "site_gradient-mask-ignored": (
        "site_gradient", "has_mask ? total * T(mask[i] ? 1 : 0) : total", "total",
        lambda cp, rng: check_site_gradient(cp, rng, np.float64, (1, 5, 3, 7), True)),
    "replicated_loss-u-index": (
        "replicated_loss", "u + (n * groups + g) * channels", "u + (g * examples + n) * channels",
        lambda cp, rng: check_replica_tangent(cp, rng, np.float64, (4, 2, 5, 3, 37), 1)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_mutated_kernel_fails_its_check(fake_cupy, rng, monkeypatch, mutation):
    import cupy
    module, original, mutated, check = MUTATIONS[mutation]
    text = cuda.source(module)
    assert text.count(original) == 1
    check(cupy, rng)  # the source as it is passes
    pristine = cuda.source
    monkeypatch.setattr(cuda, "source", lambda name: text.replace(original, mutated) if name == module
                        else pristine(name))
    cuda.raw_module.cache_clear()
    with pytest.raises(AssertionError):
        check(cupy, rng)


# ---------------------------------------------------------------------------------------
# the emulation itself: lock-step shuffles, divergence, argument checks
# ---------------------------------------------------------------------------------------
PROBE = r'''
extern "C" __global__ void probe(const double* in, double* xor_out, double* down_out, long long n) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const double mine = in[i];
    xor_out[i] = __shfl_xor_sync(0xffffffffu, mine, 5);
    const double twice = __shfl_down_sync(0xffffffffu, mine, 3);
    down_out[i] = __shfl_down_sync(0xffffffffu, twice, 3);
}
extern "C" __global__ void diverge(double* out, int lanes) {
    if ((int)(threadIdx.x % 32) >= lanes) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0, 1);
}
'''


@pytest.fixture(scope="module", params=[(), ("-DCUDA_EMULATION_UCONTEXT",)], ids=["native-fibers", "ucontext"])
def probe(cuda_harness, request):
    """PROBE built for the CPU, with each of the emulation's two fiber implementations."""
    return cuda_harness.build(PROBE, "probe", request.param)


def test_shuffles_exchange_in_lock_step(probe):
    values = np.arange(2 * 64, dtype=np.float64) * 10
    xor_out, down_out = np.full_like(values, np.nan), np.full_like(values, np.nan)
    probe.launch("probe", 2, 64, [values, xor_out, down_out, np.int64(values.size)])
    lane = np.arange(values.size) % 32
    warp_base = np.arange(values.size) // 32 * 32
    np.testing.assert_array_equal(xor_out, values[warp_base + (lane ^ 5)])
    once = np.where(lane + 3 < 32, values[np.minimum(np.arange(values.size) + 3, values.size - 1)], values)
    twice = np.where(lane + 3 < 32, once[np.minimum(np.arange(values.size) + 3, values.size - 1)], once)
    np.testing.assert_array_equal(down_out, twice)


def test_a_shuffle_some_lanes_skip_is_a_launch_error(probe, cuda_harness):
    out = np.zeros(32)
    probe.launch("diverge", 1, 32, [out, np.int32(32)])
    assert (out == 1).all()
    with pytest.raises(cuda_harness.LaunchError, match="divergent warp: 31 of 32"):
        probe.launch("diverge", 1, 32, [out, np.int32(31)])
    with pytest.raises(cuda_harness.LaunchError, match="invalid launch geometry"):
        probe.launch("diverge", 1, 48, [out, np.int32(32)])


@pytest.mark.parametrize("position, bad, message", [
    (3, np.int32(64), "expected a numpy.int64 scalar"),
    (3, 64, "expected a numpy.int64 scalar"),
    (0, np.zeros(64, np.float32), "array of float32"),
    (1, np.zeros((64, 2))[:, 0], "not C-contiguous"),
    (0, np.float64(0), "expected an array"),
])
def test_arguments_are_checked_against_the_parsed_signature(probe, position, bad, message):
    args = [np.zeros(64), np.zeros(64), np.zeros(64), np.int64(64)]
    args[position] = bad
    with pytest.raises(TypeError, match=message):
        probe.check_arguments("probe", args)
    with pytest.raises(TypeError, match="3 arguments for 4 parameters"):
        probe.check_arguments("probe", args[:3])


def test_signatures_are_parsed_after_macro_expansion(cuda_harness):
    signatures = cuda_harness.kernel_signatures(cuda.source("normalize_epilogue"))
    assert set(signatures) == {f"{kernel}_{suffix}" for kernel in ("normalize_epilogue", "normalize_relu")
                               for suffix in ("f32", "f64")}
    params = signatures["normalize_epilogue_f32"]
    assert [p.name for p in params][:5] == ["value", "tangent", "bias", "bias_tangent", "groups"]
    assert [(p.pointer, p.const, str(p.dtype)) for p in params[3:5]] == [(True, True, "float32"),
                                                                         (False, False, "int64")]
    assert [str(p.dtype) for p in params[8:12]] == ["int32"] * 3 + ["float32"]


WRITE_AT = r'''
extern "C" __global__ void write_at(double* out, long long index) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[index] = 1.0;
}
'''


def test_the_stand_in_catches_writes_out_of_bounds_and_host_arrays(fake_cupy):
    import cupy
    kernel = cupy.RawModule(code=WRITE_AT).get_function("write_at")
    out = cupy.zeros(5)
    kernel((1,), (32,), (out, np.int64(4)))
    assert out.get().tolist() == [0, 0, 0, 0, 1]
    for index in (5, -1):
        with pytest.raises(AssertionError, match="wrote outside"):
            kernel((1,), (32,), (cupy.zeros(5)[None], np.int64(index)))
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        kernel((1,), (32,), (np.zeros(5), np.int64(0)))
    with pytest.raises(TypeError, match="mixed with device arrays"):
        out + np.ones(5)
    total = out.sum()
    assert isinstance(total, cupy.ndarray) and total.shape == () and float(total) == 1
