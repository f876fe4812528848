"""A table of derivative cases at the edges NumPy users reach: negative, tuple and empty axes,
keepdims, every indexing form, broadcasting against scalars and larger arrays, 0-d inputs, and the
composite functions.

Each case is a function of float64 arrays of given shapes, checked three ways:

* forward mode against central finite differences, h = 1e-6 (truncation ~h² f''' ≈ 1e-12, rounding
  ~eps/h ≈ 1e-10 relative; tolerance 1e-6 relative and absolute leaves room for curvature);
* reverse mode by the dot-product identity <J u, w> = <u, Jᵀ w>, to 1e-10 relative (both sides are
  exact up to rounding of the same sums in different orders);
* one pass with K = 3 stacked directions against three single-direction passes (1e-12 relative).
"""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest

import dualnet as dn

STEP, FD_TOL, DOT_RTOL, K_RTOL = 1e-6, 1e-6, 1e-10, 1e-12


class Case(NamedTuple):
    label: str
    fn: Callable
    shapes: tuple
    inputs: str = "normal"  # "normal", or "positive" for log / power / sqrt


def _reductions():
    """Every reduction over negative, tuple and empty axes, with and without keepdims."""
    cases = []
    for name in ("sum", "mean", "max", "min", "prod", "var", "std", "logsumexp"):
        for axis in (-1, (0, 2), (), (-3, -1), None):
            if name in ("std", "logsumexp") and axis in ((), None):
                continue  # std of one entry is 0 (not differentiable); logsumexp reduces named axes
            for keepdims in (False, True):
                reduce = getattr(dn, name)
                cases.append(Case(f"{name} axis={axis} keepdims={keepdims}",
                                  lambda x, r=reduce, a=axis, k=keepdims: r(x, axis=a, keepdims=k), ((2, 3, 4),)))
    return cases


BOOL_MASK = np.array([[True, False, True], [False, False, True]])
INDICES = np.array([2, 0, 2, 1])  # a repeat: reverse mode accumulates

INDEXING = [
    Case("x[..., 1]", lambda x: x[..., 1], ((2, 3, 4),)),
    Case("x[None, ..., None]", lambda x: x[None, ..., None], ((2, 3),)),
    Case("x[1, None, ::-2]", lambda x: x[1, None, ::-2], ((2, 5),)),
    Case("x[::-1, 1:]", lambda x: x[::-1, 1:], ((3, 4),)),
    Case("x[mask]", lambda x: x[BOOL_MASK], ((2, 3),)),
    Case("x[mask, :]", lambda x: x[BOOL_MASK[0]], ((3, 4),)),
    Case("x[int array]", lambda x: x[INDICES], ((3, 2),)),
    Case("x[:, int array]", lambda x: x[:, INDICES], ((2, 3),)),
    Case("x[int, int array]", lambda x: x[1, INDICES], ((2, 3),)),
    Case("x[int array, :, int array]", lambda x: x[INDICES[:2], :, INDICES[2:]], ((3, 2, 3),)),
    Case("x[-1]", lambda x: x[-1], ((3,),)),
    Case("x[...] of 0-d", lambda x: x[...], ((),)),
    Case("x[None] of 0-d", lambda x: x[None], ((),)),
]

BROADCASTING = [
    Case(f"{name} {a} with {b}", lambda x, y, f=f: f(x, y), (a, b), "positive")
    for name, f in [("add", dn.add), ("mul", dn.mul), ("div", dn.div), ("power", dn.power),
                    ("logaddexp", dn.logaddexp), ("maximum", dn.maximum),
                    ("where", lambda x, y: dn.where(np.arange(6).reshape(2, 3) % 2 == 0, x, y))]
    for a, b in [((), (2, 3)), ((3,), (2, 3)), ((2, 1), (1, 3)), ((2, 3), ()), ((1, 3), (4, 2, 3))]
] + [
    Case("x + Python scalar", lambda x: x + 1.5, ((2, 3),)),
    Case("Python scalar ** x", lambda x: 2.0 ** x, ((2, 3),)),
    Case("x ** larger exponent array", lambda x: x ** np.linspace(-1, 2, 6).reshape(2, 3), ((3,),), "positive"),
    Case("larger array - x", lambda x: np.ones((2, 3)) - x, ((3,),)),
]

ZERO_D = [
    Case(f"{name} of 0-d", lambda x, f=f: f(x), ((),), "positive")
    for name, f in [("exp", dn.exp), ("log", dn.log), ("tanh", dn.tanh), ("sin", dn.sin), ("sqrt", dn.sqrt),
                    ("sum", dn.sum), ("max", dn.max), ("prod", dn.prod), ("cumsum", dn.cumsum),
                    ("reshape", lambda x: dn.reshape(x, (1, 1))), ("stack", lambda x: dn.stack([x, 2 * x, 1.0])),
                    ("x ** 0", lambda x: x ** 0), ("expand_dims", lambda x: dn.expand_dims(x, 0))]
] + [Case("0-d times array", lambda x, y: x * y, ((), (3,))),
     Case("matmul to 0-d", lambda x, y: dn.matmul(x, y), ((3,), (3,)))]

COMPOSITES = [
    Case("sort axis=0", lambda x: dn.sort(x, axis=0), ((3, 4),)),
    Case("topk", lambda x: dn.topk(x, 2, axis=-1)[0], ((3, 4),)),
    Case("repeat", lambda x: dn.repeat(x, [2, 0, 1], axis=-1), ((2, 3),)),
    Case("repeat flat", lambda x: dn.repeat(x, 2), ((2, 3),)),
    Case("tile", lambda x: dn.tile(x, (2, 1, 2)), ((2, 3),)),
    Case("roll", lambda x: dn.roll(x, (1, -1), axis=(0, 1)), ((2, 3),)),
    Case("roll flat", lambda x: dn.roll(x, 4), ((2, 3),)),
    Case("split", lambda x: dn.split(x, [1, 3], axis=1)[1], ((2, 4),)),
    Case("diagonal offset", lambda x: dn.diagonal(x, -1, 2, 0), ((3, 2, 4),)),
    Case("trace", lambda x: dn.trace(x), ((3, 3),)),
    Case("tensordot", lambda x, y: dn.tensordot(x, y, axes=([0, 2], [2, 1])), ((2, 3, 4), (5, 4, 2))),
    Case("dot n-d", lambda x, y: dn.dot(x, y), ((2, 3), (4, 3, 5))),
    Case("einsum one operand", lambda x: dn.einsum("ijk->kj", x), ((3, 2, 4),)),
    Case("einsum three operands", lambda x, y, z: dn.einsum("ij,jk,k->i", x, y, z), ((2, 3), (3, 4), (4,))),
    Case("concatenate with a constant", lambda x: dn.concatenate([x, [[1.0], [2.0]]], axis=-1), ((2, 3),)),
    Case("mean of a list", lambda x: dn.mean([x, x + 2, x * x], axis=0), ((3,),)),
    Case("cumsum axis=-2", lambda x: dn.cumsum(x, axis=-2), ((2, 3, 2),)),
    Case("var ddof=1", lambda x: dn.var(x, axis=(0, 1), ddof=1), ((2, 3, 2),)),
    Case("prod with a zero", lambda x: dn.prod(x * np.array([1.0, 0.0, 1.0]), axis=-1), ((2, 3),)),
    Case("softmax axis=0", lambda x: dn.softmax(x, axis=0), ((3, 2),)),
    Case("swapaxes", lambda x: dn.swapaxes(x, 0, -1), ((2, 3, 4),)),
]

CASES = _reductions() + INDEXING + BROADCASTING + ZERO_D + COMPOSITES


def _draw_inputs(case, rng):
    if case.inputs == "positive":
        return [rng.uniform(0.5, 2.0, s) for s in case.shapes]
    return [rng.standard_normal(s) for s in case.shapes]


def _inner(a, b):
    return float(np.sum(np.asarray(a) * np.asarray(b)))


def test_the_table_covers_the_edges():
    print(f"{len(CASES)} derivative cases, each checked three ways")
    assert len({c.label for c in CASES}) == len(CASES) >= 150


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_case_forward_reverse_and_k_directions(case, rng):
    inputs = _draw_inputs(case, rng)
    directions = [rng.standard_normal(x.shape) for x in inputs]

    out, tangent = dn.jvp(case.fn, inputs, directions)
    plus = case.fn(*[x + STEP * u for x, u in zip(inputs, directions)])
    minus = case.fn(*[x - STEP * u for x, u in zip(inputs, directions)])
    np.testing.assert_allclose(tangent, (plus - minus) / (2 * STEP), rtol=FD_TOL, atol=FD_TOL, err_msg="jvp vs FD")

    weights = rng.standard_normal(np.shape(out))
    cotangents = dn.vjp(case.fn, *inputs)[1](weights)
    left, right = _inner(tangent, weights), sum(_inner(u, c) for u, c in zip(directions, cotangents))
    scale = np.linalg.norm(tangent) * np.linalg.norm(weights) + 1e-300
    assert abs(left - right) <= DOT_RTOL * scale, ("dot-product identity", left, right)

    stacked = [rng.standard_normal((3,) + x.shape) for x in inputs]
    batched = dn.jvp(case.fn, inputs, stacked)[1]
    singles = np.stack([dn.jvp(case.fn, inputs, [t[k] for t in stacked])[1] for k in range(3)])
    np.testing.assert_allclose(batched, singles, rtol=K_RTOL, atol=K_RTOL * (np.abs(singles).max() + 1e-300))
