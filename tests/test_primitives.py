"""Table-driven tests of every primitive in ``dualnet.primitives.TABLE``.

Each primitive has a *spec*: a function that draws (with hypothesis) a valid random
application ``(fn, inputs)``, where ``fn(*inputs)`` calls the primitive and ``inputs`` are the
float64 arrays it is differentiated with respect to (non-differentiable parameters, constants
and index objects are closed over).  Every spec is checked for:

* JVP against central finite differences in float64 (step 1e-6; rtol 1e-6, atol 1e-6 — the
  finite-difference error is ~1e-10 here, the tolerance leaves room for curvature);
* VJP by the dot-product identity <J u, w> = <u, Jᵀ w> (relative 1e-10);
* K-direction tangents equal K single-direction passes (bitwise, except GEMM-based ops,
  which may block the BLAS work differently: relative 1e-12);
* symbolic zeros in -> symbolic zero out (``tangent is None``: no array is made);
* float32 in -> float32 value, tangent and cotangent.

A primitive added to the table without a spec fails ``test_every_primitive_has_a_spec``; the
fused primitives registered by other modules are tested in their own files (``ELSEWHERE``).
"""
import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

import dualnet as dn
from dualnet import Dual
from dualnet.autodiff import backward
from dualnet.dual import Node
from dualnet.primitives import TABLE

# Fused primitives registered by other modules, each tested in its own file.
ELSEWHERE = {
    "grouped_linear": "tests/test_fused.py",
    "layer_norm": "tests/test_fused.py",
    "grouped_linear_layer_norm": "tests/test_fused.py",
    "layer_norm_relu": "tests/test_fused.py",
    "grouped_linear_layer_norm_relu": "tests/test_fused.py",
    "replicated_cross_entropy": "tests/test_losses.py",
    "replicated_info_nce": "tests/test_losses.py",
    "conv2d": "tests/test_conv.py",
    "im2col": "tests/test_conv.py",
    "col2im": "tests/test_conv.py",
}
# Modules that register primitives when imported: load them so TABLE is complete.
REGISTERING_MODULES = ("dualnet.fused", "dualnet.losses", "dualnet.nn")

STEP, FD_RTOL, FD_ATOL = 1e-6, 1e-6, 1e-6
DOT_RTOL = 1e-10
GEMM_RTOL = 1e-12
GEMM_BASED = {"matmul", "einsum"}

SMALL = dict(min_dims=0, max_dims=3, min_side=1, max_side=4)


# ---------------------------------------------------------------------------------------
# input generators
# ---------------------------------------------------------------------------------------
def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def normal(rng, shape):
    return rng.standard_normal(shape)


def positive(rng, shape):
    return rng.uniform(0.5, 2.0, shape)


def away_from_zero(rng, shape, gap=0.1):
    """Normal samples pushed at least ``gap`` away from 0 (kinks of relu/abs)."""
    x = rng.standard_normal(shape)
    return np.sign(x + (x == 0)) * (np.abs(x) + gap)


def distinct(rng, shape, gap=0.05):
    """Values whose pairwise gaps exceed ``gap`` (no ties: max is differentiable)."""
    size = int(np.prod(shape))
    return (rng.permutation(size) * gap + rng.uniform(0, gap / 4, size)).reshape(shape) - size * gap / 2


def _differentiable(draw, names):
    """A non-empty subset of operand names that get tangents; the others stay constants."""
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    return [n for n in names if n in chosen]


def _assemble(call, operands, chosen):
    """fn over the chosen operands only, the rest closed over as constants."""
    def fn(*arrays):
        given_ = dict(zip(chosen, arrays))
        dtype = arrays[0].dtype  # constants follow the inputs' precision (float32 runs stay float32)
        return call(*[given_[name] if name in given_ else
                      value.astype(dtype) if isinstance(value, np.ndarray) and value.dtype.kind == "f" else value
                      for name, value in operands])
    return fn, [value for name, value in operands if name in chosen]


# ---------------------------------------------------------------------------------------
# specs: draw -> (fn, inputs)
# ---------------------------------------------------------------------------------------
def _binary(primitive, make_x=normal, make_y=normal, relate=None):
    def spec(draw):
        rng = _rng(draw)
        shape_x, shape_y = draw(mutually_broadcastable_shapes(num_shapes=2, **SMALL)).input_shapes
        x, y = make_x(rng, shape_x), make_y(rng, shape_y)
        if relate is not None:
            y = relate(rng, x, y)
        chosen = _differentiable(draw, ["x", "y"])
        if len(chosen) == 1 and draw(st.booleans()):  # a Python scalar constant
            constant = float(make_y(rng, ()) if chosen == ["x"] else make_x(rng, ()))
            if relate is not None and chosen == ["x"]:
                x = x + np.where(np.abs(x - constant) < 0.1, 0.2, 0)
            operands = [("x", x), ("y", constant)] if chosen == ["x"] else [("x", constant), ("y", y)]
            if relate is not None and chosen == ["y"]:
                operands[1] = ("y", y + np.where(np.abs(y - constant) < 0.1, 0.2, 0))
            return _assemble(primitive, operands, chosen)
        return _assemble(primitive, [("x", x), ("y", y)], chosen)
    return spec


def _apart(rng, x, y):
    """Move y at least 0.1 away from x, so maximum/minimum have no ties."""
    gap = y - x
    return x + np.sign(gap + (gap == 0)) * (np.abs(gap) + 0.1)


def _unary(primitive, make=normal):
    def spec(draw):
        rng = _rng(draw)
        return primitive, [make(rng, draw(array_shapes(**SMALL)))]
    return spec


def _power(draw):
    if draw(st.booleans()):  # base and exponent both differentiable, broadcasting against each other
        return _binary(dn.power, make_x=positive)(draw)
    rng = _rng(draw)
    exponent = draw(st.sampled_from([2, 3, 0.5, -1.5, np.float64(1.7)]))
    return (lambda x: dn.power(x, exponent)), [positive(rng, draw(array_shapes(**SMALL)))]


def _where(draw):
    rng = _rng(draw)
    shapes = draw(mutually_broadcastable_shapes(num_shapes=3, **SMALL)).input_shapes
    condition = rng.random(shapes[0]) < 0.5
    x, y = normal(rng, shapes[1]), normal(rng, shapes[2])
    chosen = _differentiable(draw, ["x", "y"])
    return _assemble(lambda x, y: dn.where(condition, x, y), [("x", x), ("y", y)], chosen)


def _clip(draw):
    rng = _rng(draw)
    x = normal(rng, draw(array_shapes(**SMALL)))
    lo, hi = draw(st.sampled_from([(-0.5, 0.5), (None, 0.3), (-0.3, None)]))
    for bound in (lo, hi):
        if bound is not None:
            x = x + np.where(np.abs(x - bound) < 0.05, 0.1, 0)  # keep away from the kinks
    return (lambda x: dn.clip(x, lo, hi)), [x]


def _axis(draw, ndim):
    """None, an int (possibly negative) or a tuple of distinct axes."""
    if ndim == 0:
        return None
    return draw(st.one_of(
        st.none(), st.integers(-ndim, ndim - 1),
        st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)))


def _reduction(primitive, make=normal):
    def spec(draw):
        rng = _rng(draw)
        shape = draw(array_shapes(**SMALL))
        axis, keepdims = _axis(draw, len(shape)), draw(st.booleans())
        return (lambda x: primitive(x, axis=axis, keepdims=keepdims)), [make(rng, shape)]
    return spec


def _along_axis(primitive, keepdims_param=False):
    def spec(draw):
        rng = _rng(draw)
        shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        params = dict(axis=axis, keepdims=draw(st.booleans())) if keepdims_param else dict(axis=axis)
        return (lambda x: primitive(x, **params)), [normal(rng, shape) * 3]
    return spec


MATMUL_SHAPES = [((3,), (3,)), ((3,), (3, 2)), ((4, 3), (3,)), ((4, 3), (3, 2)), ((2, 4, 3), (3, 2)),
                 ((4, 3), (2, 3, 5)), ((2, 1, 4, 3), (5, 3, 2)), ((1, 4, 3), (2, 3, 2))]


def _matmul(draw):
    rng = _rng(draw)
    shape_x, shape_y = draw(st.sampled_from(MATMUL_SHAPES))
    chosen = _differentiable(draw, ["x", "y"])
    return _assemble(dn.matmul, [("x", normal(rng, shape_x)), ("y", normal(rng, shape_y))], chosen)


EINSUMS = [("ij,jk->ik", (3, 4), (4, 2)), ("...ij,...jk->...ik", (2, 3, 4), (4, 2)),
           ("...ij,...jk->...ik", (2, 1, 3, 4), (5, 4, 2)), ("bij,bjk->bik", (2, 3, 4), (2, 4, 3)),
           ("i,i->", (5,), (5,)), ("ij,ij->i", (3, 4), (3, 4)), ("ij,k->ijk", (2, 3), (4,)),
           ("ij,jk->ki", (3, 4), (4, 2)), ("ij,k->i", (3, 4), (5,)), ("i...,i->...", (3, 2, 2), (3,)),
           ("ij,jk", (3, 4), (4, 2))]


def _einsum(draw):
    rng = _rng(draw)
    spec_string, shape_x, shape_y = draw(st.sampled_from(EINSUMS))
    chosen = _differentiable(draw, ["x", "y"])
    return _assemble(lambda x, y: dn.einsum(spec_string, x, y),
                     [("x", normal(rng, shape_x)), ("y", normal(rng, shape_y))], chosen)


def _reshape(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(**SMALL))
    size = int(np.prod(shape))
    new = draw(st.sampled_from([(size,), (1, size), (size, 1), (-1,), (1, -1, 1)]))
    return (lambda x: dn.reshape(x, new)), [normal(rng, shape)]


def _transpose(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(**SMALL))
    axes = draw(st.one_of(st.none(), st.permutations(range(len(shape))).map(tuple),
                          st.permutations(range(-len(shape), 0)).map(tuple)))
    return (lambda x: dn.transpose(x, axes)), [normal(rng, shape)]


def _broadcast_to(draw):
    rng = _rng(draw)
    target = draw(array_shapes(**SMALL))
    kept = target[len(target) - draw(st.integers(0, len(target))):]  # a suffix of the target...
    shape = tuple(1 if draw(st.booleans()) else n for n in kept)  # ...with some sides set to 1
    return (lambda x: dn.broadcast_to(x, target)), [normal(rng, shape)]


def _expand_dims(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(**SMALL))
    axis = draw(st.one_of(st.integers(-len(shape) - 1, len(shape)), st.just((0, -1))))
    return (lambda x: dn.expand_dims(x, axis)), [normal(rng, shape)]


def _squeeze(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3)) + (1,)
    ones = tuple(i for i, n in enumerate(shape) if n == 1)
    axis = draw(st.one_of(st.none(), st.sampled_from(ones), st.just(ones)))
    return (lambda x: dn.squeeze(x, axis=axis)), [normal(rng, shape)]


def _index(draw, rng, shape):
    """A random index of one of NumPy's kinds for an array of ``shape`` (ndim >= 1)."""
    kind = draw(st.sampled_from(["slices", "int_array", "bool_mask", "row_mask", "ellipsis_none", "separated",
                                 "int_and_list"]))
    if kind == "slices":
        return tuple(slice(draw(st.integers(0, n - 1)), None, draw(st.sampled_from([1, 2, -1]))) for n in shape)
    if kind == "int_array":  # repeats included: reverse mode must accumulate them
        return rng.integers(0, shape[0], size=draw(st.integers(1, 5)))
    if kind == "bool_mask":
        return rng.random(shape) < 0.5
    if kind == "row_mask":
        return rng.random(shape[:1]) < 0.5
    if kind == "ellipsis_none":
        return (Ellipsis, None, draw(st.integers(-shape[-1], shape[-1] - 1)))
    if kind == "separated" and len(shape) >= 3:  # advanced indices split by a slice move to the front
        return (rng.integers(0, shape[0], 2), slice(None), rng.integers(0, shape[2], 2))
    return (draw(st.integers(0, shape[0] - 1)), [0] * (len(shape) > 1)) if len(shape) > 1 else [0, 0]


def _getitem(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    index = _index(draw, rng, shape)
    return (lambda x: dn.getitem(x, index)), [normal(rng, shape)]


def _pieces(join):
    def spec(draw):
        rng = _rng(draw)
        shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
        count = draw(st.integers(1, 3))
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        shapes = [shape] * count
        if join is dn.concatenate:  # pieces may differ along the joined axis
            shapes = [shape[:axis % len(shape)] + (draw(st.integers(1, 3)),) + shape[axis % len(shape) + 1:]
                      for _ in range(count)]
        names = [f"x{i}" for i in range(count)]
        chosen = _differentiable(draw, names)
        return _assemble(lambda *xs: join(list(xs), axis=axis),
                         [(n, normal(rng, s)) for n, s in zip(names, shapes)], chosen)
    return spec


def _pad(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
    widths = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                            st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                                     min_size=len(shape), max_size=len(shape)).map(tuple)))
    constant = draw(st.sampled_from([0.0, 1.5]))
    return (lambda x: dn.pad(x, widths, constant)), [normal(rng, shape)]


def bounded(rng, shape, bound=1.2):
    return rng.uniform(-bound, bound, shape)


def between_integers(rng, shape):
    """Values at least 0.1 away from every integer (the jumps of floor and ceil)."""
    return rng.integers(-3, 3, shape) + rng.uniform(0.1, 0.9, shape)


def _moments(primitive):
    """var/std over axes with ddof 0 or 1, at least two entries reduced (std is smooth there)."""
    def spec(draw):
        rng = _rng(draw)
        shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=4))
        axis, keepdims, ddof = _axis(draw, len(shape)), draw(st.booleans()), draw(st.sampled_from([0, 1]))
        return (lambda x: primitive(x, axis=axis, ddof=ddof, keepdims=keepdims)), [normal(rng, shape)]
    return spec


def _cumsum(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(**SMALL))
    axis = draw(st.none() if not shape else st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    return (lambda x: dn.cumsum(x, axis=axis)), [normal(rng, shape)]


def _astype(draw):
    """Through float64 and back to the input's dtype (a float32 run stays float32)."""
    rng = _rng(draw)
    return (lambda x: dn.astype(dn.astype(x, np.float64), x.dtype)), [normal(rng, draw(array_shapes(**SMALL)))]


def _scatter_add(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    index = _index(draw, rng, shape)
    return (lambda g: dn.primitives.scatter_add(g, index, shape)), [normal(rng, np.zeros(shape)[index].shape)]


def _tile(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(**SMALL))
    reps = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=4)))
    return (lambda x: dn.tile(x, reps)), [normal(rng, shape)]


def _roll(draw):
    rng = _rng(draw)
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    ndim = len(shape)
    shift, axis = draw(st.one_of(
        st.tuples(st.integers(-5, 5), st.none()), st.tuples(st.integers(-5, 5), st.integers(-ndim, ndim - 1)),
        st.tuples(st.just((1, -2)), st.just((0, -1)))))
    return (lambda x: dn.roll(x, shift, axis)), [normal(rng, shape)]


SPECS = {
    "add": _binary(dn.add), "sub": _binary(dn.sub), "mul": _binary(dn.mul),
    "div": _binary(dn.div, make_y=positive), "neg": _unary(dn.neg), "power": _power,
    "exp": _unary(dn.exp), "log": _unary(dn.log, positive), "sqrt": _unary(dn.sqrt, positive),
    "tanh": _unary(dn.tanh), "sigmoid": _unary(dn.sigmoid), "relu": _unary(dn.relu, away_from_zero),
    "abs": _unary(dn.abs, away_from_zero),
    "maximum": _binary(dn.maximum, relate=_apart), "minimum": _binary(dn.minimum, relate=_apart),
    "where": _where, "clip": _clip,
    "sum": _reduction(dn.sum), "mean": _reduction(dn.mean), "max": _reduction(dn.max, distinct),
    "matmul": _matmul, "einsum": _einsum, "reshape": _reshape, "transpose": _transpose,
    "broadcast_to": _broadcast_to, "expand_dims": _expand_dims, "squeeze": _squeeze, "getitem": _getitem,
    "concatenate": _pieces(dn.concatenate), "stack": _pieces(dn.stack), "pad": _pad,
    "stop_gradient": _unary(dn.stop_gradient),
    "logsumexp": _along_axis(dn.logsumexp, keepdims_param=True), "softmax": _along_axis(dn.softmax),
    "log_softmax": _along_axis(dn.log_softmax),
    "sin": _unary(dn.sin), "cos": _unary(dn.cos), "tan": _unary(dn.tan, bounded), "sinh": _unary(dn.sinh),
    "cosh": _unary(dn.cosh), "arctan": _unary(dn.arctan), "log1p": _unary(dn.log1p, positive),
    "expm1": _unary(dn.expm1), "log2": _unary(dn.log2, positive), "log10": _unary(dn.log10, positive),
    "sign": _unary(dn.sign, away_from_zero), "floor": _unary(dn.floor, between_integers),
    "ceil": _unary(dn.ceil, between_integers), "logaddexp": _binary(dn.logaddexp),
    "min": _reduction(dn.min, distinct), "var": _moments(dn.var), "std": _moments(dn.std),
    "prod": _reduction(dn.prod), "cumsum": _cumsum, "astype": _astype, "scatter_add": _scatter_add,
    "tile": _tile, "roll": _roll,
}
ZERO_DERIVATIVE = {"stop_gradient", "sign", "floor", "ceil"}  # their tangent is a symbolic zero
NAMES = sorted(SPECS)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def central_difference(fn, inputs, tangents, step=STEP):
    plus = fn(*[x + step * t for x, t in zip(inputs, tangents)])
    minus = fn(*[x - step * t for x, t in zip(inputs, tangents)])
    return (np.asarray(plus) - np.asarray(minus)) / (2 * step)


def reverse_cotangents(fn, inputs):
    """Run fn on taped Duals; return (output Dual, raw cotangent function) without dtype casts."""
    leaves = []
    for x in inputs:
        leaf = Dual(x)
        leaf.node = Node(None, (), (), {}, leaf.value)
        leaves.append(leaf)
    out = fn(*leaves)

    def pull(cotangent):
        grads = backward([out], [cotangent])
        return [grads.get(id(leaf.node)) for leaf in leaves]
    return out, pull


def assert_same_value(name, actual, expected):
    """Values agree bitwise, except GEMM-based ops (value and tangent rows may share one GEMM)."""
    if name in GEMM_BASED:
        np.testing.assert_allclose(actual, expected, rtol=GEMM_RTOL, atol=GEMM_RTOL * np.abs(expected).max())
    else:
        np.testing.assert_array_equal(actual, expected)


def _inner(a, b):
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------------------
# the table is covered
# ---------------------------------------------------------------------------------------
def test_every_primitive_has_a_spec():
    for module in REGISTERING_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
    untested = sorted(set(TABLE) - set(SPECS) - set(ELSEWHERE))
    assert not untested, f"primitives without a test spec (add one to SPECS or to ELSEWHERE): {untested}"
    assert not set(SPECS) & set(ELSEWHERE)


def test_every_spec_names_a_primitive_of_the_table():
    assert set(SPECS) <= set(TABLE), sorted(set(SPECS) - set(TABLE))


# ---------------------------------------------------------------------------------------
# derivatives
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=20)
@given(data=st.data())
def test_jvp_matches_central_differences(name, data):
    """Forward mode equals (f(x + h t) - f(x - h t)) / 2h in float64, h = 1e-6."""
    fn, inputs = SPECS[name](data.draw)
    rng = np.random.default_rng(1)
    tangents = [rng.standard_normal(x.shape) for x in inputs]
    out, tangent = dn.jvp(fn, inputs, tangents)
    assert_same_value(name, out, fn(*inputs))
    expected = np.zeros_like(np.asarray(out)) if name in ZERO_DERIVATIVE else central_difference(fn, inputs, tangents)
    assert tangent.shape == np.shape(out) and tangent.dtype == np.float64
    np.testing.assert_allclose(tangent, expected, rtol=FD_RTOL, atol=FD_ATOL)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=20)
@given(data=st.data())
def test_vjp_satisfies_the_dot_product_identity(name, data):
    """<J u, w> (forward mode) = <u, Jᵀ w> (reverse mode), relative 1e-10."""
    fn, inputs = SPECS[name](data.draw)
    rng = np.random.default_rng(2)
    directions = [rng.standard_normal(x.shape) for x in inputs]
    out, forward = dn.jvp(fn, inputs, directions)
    weights = rng.standard_normal(np.shape(out))
    out_reverse, pullback = dn.vjp(fn, *inputs)
    cotangents = pullback(weights)
    assert_same_value(name, out_reverse, out)
    assert all(c.shape == x.shape for c, x in zip(cotangents, inputs))
    left = _inner(forward, weights)
    right = sum(_inner(u, c) for u, c in zip(directions, cotangents))
    scale = np.linalg.norm(forward) * np.linalg.norm(weights) + 1e-300
    assert abs(left - right) <= DOT_RTOL * scale, (left, right)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(data=st.data(), directions=st.integers(1, 4))
def test_k_directions_equal_k_single_passes(name, data, directions):
    """One pass with tangents (K,) + shape equals K passes (symbolic zeros mixed in)."""
    fn, inputs = SPECS[name](data.draw)
    rng = np.random.default_rng(3)
    zero = [data.draw(st.booleans()) for _ in inputs] if len(inputs) > 1 else [False]
    zero[data.draw(st.integers(0, len(inputs) - 1))] = False
    stacked = [None if z else rng.standard_normal((directions,) + x.shape) for x, z in zip(inputs, zero)]
    _, batched = dn.jvp(fn, inputs, stacked)
    singles = np.stack([dn.jvp(fn, inputs, [None if t is None else t[k] for t in stacked])[1]
                        for k in range(directions)])
    assert batched.shape == singles.shape and batched.dtype == singles.dtype
    if name in GEMM_BASED:
        np.testing.assert_allclose(batched, singles, rtol=GEMM_RTOL, atol=GEMM_RTOL * np.abs(singles).max())
    else:
        np.testing.assert_array_equal(batched, singles)


# ---------------------------------------------------------------------------------------
# symbolic zeros and dtypes
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5)
@given(data=st.data())
def test_symbolic_zeros_stay_symbolic(name, data):
    """Duals without tangents give a Dual without a tangent: no zero array is created."""
    fn, inputs = SPECS[name](data.draw)
    out = fn(*[Dual(x) for x in inputs])
    assert isinstance(out, Dual) and out.tangent is None
    assert out.dtype == np.float64


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5)
@given(data=st.data())
def test_float32_stays_float32(name, data):
    """float32 inputs and tangents give float32 values, tangents (K = 1 and K = 2) and cotangents."""
    fn, inputs = SPECS[name](data.draw)
    inputs = [x.astype(np.float32) for x in inputs]
    rng = np.random.default_rng(4)
    for shape in ((), (2,)):
        tangents = [rng.standard_normal(shape + x.shape).astype(np.float32) for x in inputs]
        out = fn(*[Dual(x, t) for x, t in zip(inputs, tangents)])
        assert out.dtype == np.float32
        assert out.tangent is None if name in ZERO_DERIVATIVE else out.tangent.dtype == np.float32
    out, pull = reverse_cotangents(fn, inputs)
    for cotangent in pull(np.ones(out.shape, np.float32)):
        assert cotangent is None or cotangent.dtype == np.float32


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5)
@given(data=st.data())
def test_plain_arrays_give_plain_arrays(name, data):
    """Every primitive is also a function on plain arrays (no Dual in -> no Dual out)."""
    fn, inputs = SPECS[name](data.draw)
    out = fn(*inputs)
    assert not isinstance(out, Dual)
    assert isinstance(out, np.ndarray)


# ---------------------------------------------------------------------------------------
# rough spots, checked against explicit references
# ---------------------------------------------------------------------------------------
def test_max_splits_ties_evenly(rng):
    """d max / dx is 1/count on each tied maximum, in both modes and with K directions."""
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    tangents = rng.standard_normal((4,) + x.shape)
    _, full = dn.jvp(lambda a: dn.max(a), [x], [tangents])
    np.testing.assert_allclose(full, (tangents[:, 0, 1] + tangents[:, 0, 2]) / 2, rtol=1e-15)
    _, rows = dn.jvp(lambda a: dn.max(a, axis=1), [x], [tangents])
    np.testing.assert_allclose(rows, np.stack([tangents[:, 0, 1:].mean(-1), tangents[:, 1].mean(-1)], -1),
                               rtol=1e-15)
    np.testing.assert_array_equal(dn.grad(lambda a: dn.max(a, axis=1).sum())(x),
                                  [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


@pytest.mark.parametrize("index", [
    (slice(None, None, -1), 1), (Ellipsis, None, 1), (None, Ellipsis), (1, Ellipsis, slice(0, 2)),
    np.array([0, 2, 2, 1]), [1, 1], (slice(None), np.array([3, 0])), (np.array([0, 1]), slice(None), np.array([1, 0])),
    np.array([[0, 1], [2, 2]]), "value_mask", "row_mask", (Ellipsis, np.array([True, False, True, True, False])),
], ids=str)
def test_getitem_with_k_directions_indexes_each_direction(index, rng):
    """Indexing is linear: tangent[k] = t[k][index] for every NumPy index kind, K = 3."""
    x = rng.standard_normal((3, 4, 5))
    if isinstance(index, str):
        index = x > 0 if index == "value_mask" else np.array([True, False, True])
    tangents = rng.standard_normal((3,) + x.shape)
    out = dn.getitem(Dual(x, tangents), index)
    np.testing.assert_array_equal(out.value, x[index])
    np.testing.assert_array_equal(out.tangent, np.stack([t[index] for t in tangents]))
    cotangent = rng.standard_normal(out.shape)
    expected = np.zeros_like(x)
    np.add.at(expected, index, cotangent)
    np.testing.assert_array_equal(dn.vjp(lambda a: dn.getitem(a, index), x)[1](cotangent)[0], expected)


@pytest.mark.parametrize("spec, shape_x, shape_y", [
    ("...ij,...jk->...ik", (2, 1, 3, 4), (5, 4, 2)), ("...i,...i->...", (3, 4), (2, 1, 4)),
    ("i...,i->...", (3, 2, 2), (3,)), ("ij,jk", (3, 4), (4, 2))])
def test_einsum_ellipsis_and_implicit_output_follow_numpy(spec, shape_x, shape_y, rng):
    """Bilinear: (x, y)' = einsum(ẋ, y) + einsum(x, ẏ), with NumPy's ellipsis broadcasting."""
    x, y = rng.standard_normal(shape_x), rng.standard_normal(shape_y)
    tx, ty = rng.standard_normal((2,) + shape_x), rng.standard_normal((2,) + shape_y)
    out = dn.einsum(spec, Dual(x, tx), Dual(y, ty))
    np.testing.assert_allclose(out.value, np.einsum(spec, x, y), rtol=1e-13)
    expected = np.stack([np.einsum(spec, a, y) + np.einsum(spec, x, b) for a, b in zip(tx, ty)])
    np.testing.assert_allclose(out.tangent, expected, rtol=1e-12, atol=1e-12)


def test_einsum_reverse_mode_of_a_trace_names_op_and_mode(rng):
    x, y = rng.standard_normal((3, 3)), rng.standard_normal(3)
    _, pullback = dn.vjp(lambda a: dn.einsum("ii,i->i", a, y), x)
    with pytest.raises(NotImplementedError, match="einsum.*reverse mode"):
        pullback(np.ones(3))


@pytest.mark.parametrize("shape_x, shape_y", MATMUL_SHAPES)
def test_matmul_promotes_and_broadcasts_like_numpy(shape_x, shape_y, rng):
    x, y = rng.standard_normal(shape_x), rng.standard_normal(shape_y)
    tx, ty = rng.standard_normal((3,) + shape_x), rng.standard_normal((3,) + shape_y)
    out = dn.matmul(Dual(x, tx), Dual(y, ty))
    assert out.shape == np.matmul(x, y).shape and out.tangent.shape == (3,) + out.shape
    np.testing.assert_allclose(out.value, x @ y, rtol=1e-13)
    np.testing.assert_allclose(out.tangent, np.stack([a @ y + x @ b for a, b in zip(tx, ty)]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"matmul.*\(4, 3\).*\(2, 3\)"):
        dn.matmul(Dual(np.ones((4, 3))), np.ones((2, 3)))


@pytest.mark.parametrize("reduce", [dn.sum, dn.mean, dn.max, dn.logsumexp])
def test_full_reductions_give_zero_dimensional_arrays(reduce, rng):
    """NumPy returns scalars from full reductions; dualnet keeps 0-d arrays (values and tangents)."""
    x = rng.standard_normal((3, 2)).astype(np.float32)
    assert type(reduce(x, axis=None)) is np.ndarray
    out = reduce(Dual(x, np.ones_like(x)), axis=None)
    assert type(out.value) is np.ndarray and out.shape == () and out.dtype == np.float32
    assert out.tangent.shape == () and out.tangent.dtype == np.float32


def test_constants_broadcast_against_duals(rng):
    """A scalar Dual times a matrix, a row Dual plus a matrix: tangents take the output shape."""
    matrix = rng.standard_normal((2, 3))
    scaled = Dual(np.float64(2.0), np.array([1.0, -1.0])) * matrix  # K = 2 directions on a scalar
    assert scaled.shape == (2, 3) and scaled.tangent.shape == (2, 2, 3)
    np.testing.assert_array_equal(scaled.tangent, np.stack([matrix, -matrix]))
    row = Dual(np.ones(3), np.arange(3.0))
    shifted = matrix + row
    np.testing.assert_array_equal(shifted.tangent, np.broadcast_to(np.arange(3.0), (2, 3)))
    np.testing.assert_array_equal(dn.grad(lambda r: (matrix + r).sum())(np.ones(3)), [2, 2, 2])


def test_numpy_scalars_follow_the_dual_dtype():
    """float32 Dual (op) numpy.float64 scalar stays float32, like a Python float; arrays promote."""
    x = Dual(np.ones(3, np.float32), np.ones(3, np.float32))
    for out in (x * np.float64(0.5), np.float64(2.0) - x, x / np.float64(3.0), x ** np.float64(2.0),
                dn.maximum(x, np.float64(0.0))):
        assert out.dtype == np.float32 and out.tangent.dtype == np.float32
    promoted = x + np.ones(3)  # NumPy rules for arrays: float64; the tangent follows the value
    assert promoted.dtype == np.float64 and promoted.tangent.dtype == np.float64


def test_stop_gradient_cuts_both_modes(rng):
    x = rng.standard_normal(4)
    out = dn.stop_gradient(Dual(x, rng.standard_normal((3, 4))))
    assert out.tangent is None
    np.testing.assert_array_equal(out.value, x)
    np.testing.assert_array_equal(dn.grad(lambda a: (dn.stop_gradient(a) * a).sum())(x), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((6, 1, 4, 5), 1), ((4, 7, 9), 1), ((3, 5, 7), (0, 2)), ((11,), None),
                                         ((5, 6), -1), ((2, 3), ())])
def test_mean_gives_numpys_numbers_bit_for_bit(dtype, shape, axis, rng):
    """``array_mean`` divides in the array's dtype; NumPy divides in float64 and rounds back."""
    for scale in (1.0, 1e-30, 1e30, 1e-40):
        x = (rng.standard_normal(shape) * scale).astype(dtype)
        for keepdims in (False, True):
            ours, numpys = dn.primitives.array_mean(x, axis, keepdims), x.mean(axis=axis, keepdims=keepdims)
            assert type(ours) is type(numpys) and ours.dtype == numpys.dtype
            assert np.asarray(ours).tobytes() == np.asarray(numpys).tobytes()


@pytest.mark.parametrize("directions", [1, 3])
def test_relu_tangent_is_the_float_masks_product_bit_for_bit(directions, rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    x[0, :3] = 0.0
    t = rng.standard_normal((directions, 5, 7)).astype(np.float32)
    tangent = dn.relu(Dual(x, t)).tangent
    assert tangent.dtype == np.float32
    assert tangent.tobytes() == (t * (x > 0).astype(np.float32)).tobytes()


@pytest.mark.parametrize("x_shape", [(5, 4), (3, 2, 4), (2, 1, 3, 4)])
@pytest.mark.parametrize("directions", [1, 3])
def test_matmul_tangent_of_the_weight_is_one_gemm_per_direction_over_all_rows(x_shape, directions):
    """x @ ẇ for a matrix w: the rows of x against each ẇ_k equal matmul broadcasting, value for value."""
    from dualnet.primitives import _matmul_jvp_right, lift
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal((4, 6))
    tangent = rng.standard_normal((directions, 4, 6))
    out = x @ w
    np.testing.assert_allclose(_matmul_jvp_right(tangent, out, x, w), x @ lift(tangent, out.ndim), rtol=1e-13,
                               atol=1e-13)
    assert _matmul_jvp_right(tangent, out, x, w).shape == (directions,) + out.shape
