"""The primitive table: every differentiable op with its value, jvp and vjp side by side.

Argument order (one convention for every rule):

* ``value(*args, **params) -> out``
* per-argument jvp rule ``jvp_i(tangent, out, *args, **params)``: the output tangent caused by
  argument i's tangent.  Tangents *always* carry a leading direction axis K (K = 1 for a single
  direction), so a rule is written once and is K-aware.  Contributions of all arguments are
  summed; symbolic-zero tangents are skipped without work.
* per-argument vjp rule ``vjp_i(cotangent, out, *args, **params)``: argument i's cotangent
  (reverse mode carries no direction axis).
* A primitive may instead give one *joint* rule ``jvp(tangents, out, *args, **params)`` or
  ``vjp(cotangent, out, *args, **params) -> tuple`` when the arguments are best handled together.

``None`` in a per-argument tuple marks a non-differentiable argument (index, mask, shape...).
A primitive declared with ``residuals=True`` hands what its forward pass computed to its rules
(see ``Primitive``).
A missing rule raises ``NotImplementedError`` naming the op and the mode.  Every primitive is
also exported as a function (``dualnet.exp``, ``dualnet.matmul`` ...) accepting Duals or arrays.

Nesting.  The rules of this table are written with operators, array methods and ``ns(...)``
functions that also accept Duals, so a rule applied inside another derivative is itself
differentiated (derivatives of any order, in any mix of modes).  A primitive whose rules are not
written that way (a fused kernel) keeps ``nested=False`` and refuses to be nested, naming itself.

Composite functions (``sort``, ``topk``, ``take_along_axis``, ``repeat``, ``split``,
``diagonal``, ``trace``, ``tensordot``, ``dot``, ``swapaxes``, ``moveaxis``) select, re-index or
contract through the primitives above (``getitem``, ``einsum``, ``transpose``), whose rules give
their derivatives: a selection's tangent is the selected entries of the input's tangent, its
cotangent is scattered back (``scatter_add``, which adds repeated entries).  NumPy functions
called on a Dual run these functions (``numpy_dispatch``).
"""
import builtins
import math
import string

import numpy

from . import backend, dual
from .dual import Dual, bind, value_of
from .gradients import outer


def ns(*arrays):
    """The array namespace of ``arrays``: NumPy or CuPy, or, when any is a Dual (a rule running
    inside another derivative), ``NESTED``: NumPy's names bound to dualnet's functions."""
    for a in arrays:
        if isinstance(a, Dual):
            return NESTED
    return backend.namespace(*arrays)


class Primitive:
    """A named op: ``Primitive(name, value, jvp=None, vjp=None)``; calling it applies it.

    ``broadcasting=True`` (elementwise ops) broadcasts Dual operands before the rules see them.
    ``value_and_jvp`` (optional) computes value and output tangent together when that is
    cheaper, e.g. one GEMM for the value rows and the tangent rows:
    ``value_and_jvp(tangents, *args, **params) -> (out, out_tangent)``, or ``None`` to fall
    back to ``value`` + ``jvp`` for these arguments.
    ``nested=True`` declares that the rules accept Duals (see the module docstring); otherwise
    applying the primitive inside another derivative raises ``NotImplementedError``.
    ``residuals=True`` declares that the forward pass returns residuals — arrays it computed on
    the way that the rules reuse instead of recomputing: ``value(*args, **params) -> (out,
    residuals)`` and ``value_and_jvp(...) -> (out, out_tangent, residuals)``; the engine keeps
    them with the tape node and passes them to the jvp and vjp rules as the keyword argument
    ``residuals`` (``None`` in a nested application, where the rules must recompute them), and
    ``apply`` returns them to the caller.
    A first argument that is a list or tuple of Duals or arrays (``mean([x, x + 2])``) is stacked
    into one operand first, as NumPy converts it to an array.
    """

    def __init__(self, name, value, jvp=None, vjp=None, broadcasting=False, value_and_jvp=None, nested=False,
                 residuals=False):
        self.name, self.value, self.jvp_rule, self.vjp_rule = name, value, jvp, vjp
        self.broadcasting, self.value_and_jvp, self.nested = broadcasting, value_and_jvp, nested
        self.residuals = residuals

    def __call__(self, *args, **params):
        return bind(self, self._operands(args), params)

    def apply(self, *args, **params):
        """``(out, residuals)``: the call's output and the residuals of its forward pass (plain
        arrays, ``None`` unless the primitive declares ``residuals=True``)."""
        return dual.apply(self, self._operands(args), params)

    def _operands(self, args):
        if args and isinstance(args[0], (list, tuple)) and builtins.any(
                isinstance(e, Dual) or backend.is_array(e) for e in args[0]):
            args = (stack(args[0]),) + args[1:]
        if self.broadcasting:
            args = _broadcast_duals(self.name, args)
        return args

    def __repr__(self):
        return f"Primitive({self.name})"

    def jvp(self, tangents, out, args, params, residuals=None):
        rule = self.jvp_rule
        if self.residuals:
            params = {**params, "residuals": residuals}
        if rule is None:
            raise NotImplementedError(f"{self.name}: no jvp rule (forward mode) is defined")
        if callable(rule):
            return rule(tangents, out, *args, **params)
        total = None
        for i, t in enumerate(tangents):
            if t is None:
                continue
            if i >= len(rule) or rule[i] is None:
                raise NotImplementedError(f"{self.name}: argument {i} is not differentiable in forward mode")
            contribution = rule[i](t, out, *args, **params)
            total = contribution if total is None else total + contribution
        return total

    def vjp(self, cotangent, out, args, params, needed, residuals=None):
        """Cotangents of the arguments flagged in ``needed`` (others are ``None``); ``residuals``:
        the tape node's (given to the rules of a primitive that declares them)."""
        rule = self.vjp_rule
        if self.residuals:
            params = {**params, "residuals": residuals}
        if rule is None:
            raise NotImplementedError(f"{self.name}: no vjp rule (reverse mode) is defined")
        if callable(rule):
            return rule(cotangent, out, *args, **params)
        grads = []
        for i, need in enumerate(needed):
            if not need:
                grads.append(None)
            elif i >= len(rule) or rule[i] is None:
                raise NotImplementedError(f"{self.name}: argument {i} is not differentiable in reverse mode")
            else:
                grads.append(rule[i](cotangent, out, *args, **params))
        return grads


def _broadcast_duals(name, args):
    """Elementwise ops: broadcast Dual operands explicitly so rules see equal shapes.

    When a Dual takes part, NumPy scalars among the other operands become Python scalars, so
    they follow the Dual's dtype (``float32_dual * numpy.float64(0.5)`` stays float32) as
    Python numbers do.
    """
    if not builtins.any(isinstance(a, Dual) for a in args):
        return args
    args = tuple(a.item() if isinstance(a, numpy.generic) else a for a in args)
    shapes = [a.shape if isinstance(a, Dual) else numpy.shape(a) for a in args]
    try:
        shape = numpy.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"{name}: operand shapes {tuple(shapes)} do not broadcast together") from None
    return tuple(broadcast_to(a, shape) if isinstance(a, Dual) and a.shape != shape else a for a in args)


# ---------------------------------------------------------------------------------------
# helpers shared by the rules
# ---------------------------------------------------------------------------------------
def normalize_axes(axis, ndim):
    """``None | int | tuple`` -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, numpy.integer)) else tuple(axis)
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dimensions")
    return tuple(sorted(int(a) % builtins.max(ndim, 1) for a in axes))


def _k(axes):
    """Shift value axes past the leading direction axis of a tangent."""
    return tuple(a + 1 for a in axes)


def lift(t, ndim):
    """Insert singleton axes after K so a tangent broadcasts like a value of ``ndim`` dims."""
    missing = ndim - (t.ndim - 1)
    return t.reshape((t.shape[0],) + (1,) * missing + t.shape[1:]) if missing > 0 else t


def unbroadcast(g, shape):
    """Sum ``g`` down to ``shape`` (the reverse of NumPy broadcasting)."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and g.shape[extra + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _expand_reduced(g, shape, axes, keepdims):
    """Re-insert reduced axes into ``g`` so it broadcasts against an input of ``shape``."""
    return g if keepdims else ns(g).expand_dims(g, axes)


def result_dtype(*xs):
    """The result dtype of operands that may be Duals, arrays or Python scalars."""
    values = [value_of(x) for x in xs]
    return ns(*values).result_type(*values)


def _extreme_mask(x, out, axes, keepdims):
    """Indicator of the entries of x equal to the reduced ``out`` (a max or a min), ties split
    evenly (each tied entry gets 1/count).  Computed on values: a constant for the rules."""
    x, out = value_of(x), value_of(out)
    full = out if keepdims else ns(out).expand_dims(out, axes)
    mask = (x == full).astype(x.dtype)
    return mask / mask.sum(axis=axes, keepdims=True)


def _flip(a, axis):
    """``a`` reversed along ``axis`` (a non-negative axis)."""
    return a[(slice(None),) * axis + (slice(None, None, -1),)]


def Op(name, value, **rules):
    """A primitive of this table: ``Primitive(name, value, **rules)`` whose rules take Duals (it nests)."""
    return Primitive(name, value, nested=True, **rules)


# ---------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------
add = Op("add", lambda x, y: x + y,
         jvp=(lambda t, out, x, y: t, lambda t, out, x, y: t),
         vjp=(lambda g, out, x, y: g, lambda g, out, x, y: g),
         broadcasting=True)
sub = Op("sub", lambda x, y: x - y,
         jvp=(lambda t, out, x, y: t, lambda t, out, x, y: -t),
         vjp=(lambda g, out, x, y: g, lambda g, out, x, y: -g),
         broadcasting=True)
mul = Op("mul", lambda x, y: x * y,
         jvp=(lambda t, out, x, y: t * y, lambda t, out, x, y: x * t),
         vjp=(lambda g, out, x, y: g * y, lambda g, out, x, y: g * x),
         broadcasting=True)
div = Op("div", lambda x, y: x / y,
         jvp=(lambda t, out, x, y: t / y, lambda t, out, x, y: -t * (out / y)),
         vjp=(lambda g, out, x, y: g / y, lambda g, out, x, y: -g * out / y),
         broadcasting=True)
neg = Op("neg", lambda x: -x,
         jvp=(lambda t, out, x: -t,), vjp=(lambda g, out, x: -g,))


def _weak(p):
    """A NumPy scalar as a Python number, so a float32 operand stays float32."""
    return p.item() if isinstance(p, numpy.generic) else p


def _power_slope(x, p):
    """∂(x**p)/∂x = p x**(p−1), and exactly 0 where p = 0 (also at x = 0, where x**−1 is inf)."""
    p = _weak(p)
    if isinstance(p, (int, float)):
        return p * x ** (p - 1) if p != 0 else 0 * x
    return p * x ** where(value_of(p) == 0, 1, p - 1)


def _log_base(x):
    """log x with log 0 replaced by 0: ∂(x**p)/∂p = x**p log x is 0 at x = 0 (x**p = 0 there)."""
    x = _weak(x)
    if isinstance(x, (int, float)):
        return math.log(x) if x > 0 else (0.0 if x == 0 else math.nan)
    return log(where(value_of(x) == 0, 1, x))


power = Op("power", lambda x, p: x ** _weak(p),  # base and exponent both differentiable
           jvp=(lambda t, out, x, p: t * _power_slope(x, p), lambda t, out, x, p: t * (out * _log_base(x))),
           vjp=(lambda g, out, x, p: g * _power_slope(x, p), lambda g, out, x, p: g * (out * _log_base(x))),
           broadcasting=True)
exp = Op("exp", lambda x: ns(x).exp(x),
         jvp=(lambda t, out, x: t * out,), vjp=(lambda g, out, x: g * out,))
log = Op("log", lambda x: ns(x).log(x),
         jvp=(lambda t, out, x: t / x,), vjp=(lambda g, out, x: g / x,))
sqrt = Op("sqrt", lambda x: ns(x).sqrt(x),
          jvp=(lambda t, out, x: t / (2 * out),), vjp=(lambda g, out, x: g / (2 * out),))
tanh = Op("tanh", lambda x: ns(x).tanh(x),
          jvp=(lambda t, out, x: t * (1 - out * out),), vjp=(lambda g, out, x: g * (1 - out * out),))
sigmoid = Op("sigmoid", lambda x: 0.5 * (ns(x).tanh(0.5 * x) + 1),
             jvp=(lambda t, out, x: t * (out * (1 - out)),),
             vjp=(lambda g, out, x: g * (out * (1 - out)),))


def _elementwise(name, slope):
    """The unary NumPy function ``name`` with derivative ``slope(out, x)``: ẏ = ẋ·slope, x̄ = ȳ·slope."""
    return Op(name, lambda x: getattr(ns(x), name)(x),
              jvp=(lambda t, out, x: t * slope(out, x),), vjp=(lambda g, out, x: g * slope(out, x),))


sin = _elementwise("sin", lambda out, x: cos(x))
cos = _elementwise("cos", lambda out, x: -sin(x))
tan = _elementwise("tan", lambda out, x: 1 + out * out)
sinh = _elementwise("sinh", lambda out, x: cosh(x))
cosh = _elementwise("cosh", lambda out, x: sinh(x))
arctan = _elementwise("arctan", lambda out, x: 1 / (1 + x * x))
log1p = _elementwise("log1p", lambda out, x: 1 / (1 + x))
expm1 = _elementwise("expm1", lambda out, x: out + 1)
log2 = _elementwise("log2", lambda out, x: 1 / (x * math.log(2)))
log10 = _elementwise("log10", lambda out, x: 1 / (x * math.log(10)))


def _piecewise_constant(name):
    """The unary NumPy function ``name``, constant between its jumps: derivative zero (symbolic)."""
    return Op(name, lambda x: getattr(ns(x), name)(x),
              jvp=lambda tangents, out, x: None, vjp=lambda g, out, x: (None,))


sign = _piecewise_constant("sign")
floor = _piecewise_constant("floor")
ceil = _piecewise_constant("ceil")


def _positive(x):
    """1.0 where x > 0 else 0.0, in x's dtype (a float mask multiplies faster than a bool one)."""
    return (x > 0).astype(x.dtype)


def _relu_jvp(t, out, x):
    """ẏ = ẋ·[x > 0].  One direction on arrays: times the bool mask itself, the same numbers without
    the pass that makes a float mask (measured 2.6 against 3.7 ms for [128, 64, 512] float32); K > 1
    directions broadcast the mask K times, where the float mask multiplies faster."""
    if t.shape[0] == 1 and backend.is_array(t):
        return t * (value_of(x) > 0)
    return t * _positive(x)


def _sign_of(x):
    """sign(x) of the values, a constant (its own derivative is zero)."""
    x = value_of(x)
    return ns(x).sign(x)


relu = Op("relu", lambda x: ns(x).maximum(x, 0),
          jvp=(_relu_jvp,), vjp=(lambda g, out, x: g * _positive(x),))
abs = Op("abs", lambda x: ns(x).abs(x),
         jvp=(lambda t, out, x: t * _sign_of(x),), vjp=(lambda g, out, x: g * _sign_of(x),))


def _pick(x, y, first):
    """Weight of ``x`` in max/min: 1 where it wins, 1/2 on ties, 0 where it loses."""
    wins = (x > y) if first else (x < y)
    return (wins + 0.5 * (x == y)).astype(result_dtype(x, y))


maximum = Op("maximum", lambda x, y: ns(x, y).maximum(x, y),
             jvp=(lambda t, out, x, y: t * _pick(x, y, True), lambda t, out, x, y: t * _pick(y, x, True)),
             vjp=(lambda g, out, x, y: g * _pick(x, y, True), lambda g, out, x, y: g * _pick(y, x, True)),
             broadcasting=True)
minimum = Op("minimum", lambda x, y: ns(x, y).minimum(x, y),
             jvp=(lambda t, out, x, y: t * _pick(x, y, False), lambda t, out, x, y: t * _pick(y, x, False)),
             vjp=(lambda g, out, x, y: g * _pick(x, y, False), lambda g, out, x, y: g * _pick(y, x, False)),
             broadcasting=True)
logaddexp = Op("logaddexp", lambda x, y: ns(x, y).logaddexp(x, y),  # log(eˣ + eʸ): weights softmax(x, y)
               jvp=(lambda t, out, x, y: t * exp(x - out), lambda t, out, x, y: t * exp(y - out)),
               vjp=(lambda g, out, x, y: g * exp(x - out), lambda g, out, x, y: g * exp(y - out)),
               broadcasting=True)
where = Op("where", lambda c, x, y: ns(x, y).where(c, x, y),
           jvp=(None, lambda t, out, c, x, y: ns(t).where(c, t, 0), lambda t, out, c, x, y: ns(t).where(c, 0, t)),
           vjp=(None, lambda g, out, c, x, y: ns(g).where(c, g, 0), lambda g, out, c, x, y: ns(g).where(c, 0, g)),
           broadcasting=True)


def _inside(x, lo, hi):
    """1.0 where ``lo <= x <= hi`` (a bound of ``None`` is absent), else 0.0, in x's dtype."""
    x = value_of(x)
    inside = ns(x).ones(x.shape, bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    return inside.astype(x.dtype)


clip = Op("clip", lambda x, lo, hi: ns(x).clip(x, lo, hi),  # bounds are constants (or None)
          jvp=(lambda t, out, x, lo, hi: t * _inside(x, lo, hi), None, None),
          vjp=(lambda g, out, x, lo, hi: g * _inside(x, lo, hi), None, None),
          broadcasting=True)


def _cast(x, dtype):
    return x.astype(dtype)


_astype = Op("astype", _cast,  # between float dtypes: the tangent follows, the cotangent goes back
             jvp=(lambda t, out, x, dtype: t.astype(dtype), None),
             vjp=(lambda g, out, x, dtype: g.astype(x.dtype), None))

# ---------------------------------------------------------------------------------------
# reductions (params: axis, keepdims)
# ---------------------------------------------------------------------------------------
def _count(x, axis):
    return math.prod(x.shape[a] for a in normalize_axes(axis, x.ndim))


_FLOAT32_COUNT = 1 << 24  # every count below it is exact in float32


def array_mean(a, axis=None, keepdims=False):
    """``a.mean(axis=axis, keepdims=keepdims)`` of an array (NumPy or CuPy).

    A float32 or float64 NumPy array: its sum divided by the count in its own dtype.  These are
    NumPy's numbers (NumPy divides by an integer count in float64 and rounds back to float32;
    rounding a quotient to 53 bits and then to 24 rounds it as once), without NumPy's float64
    pass over the result: measured 14 against 81 us for the patch mean of [128, 1, 16, 32].
    """
    if type(a) is numpy.ndarray and a.dtype in _MEAN_DTYPES:
        count = _count(a, axis)
        if 0 < count < _FLOAT32_COUNT:
            total = a.sum(axis=axis, keepdims=keepdims)
            if isinstance(total, numpy.ndarray):
                total /= a.dtype.type(count)
                return total
            return total / a.dtype.type(count)
    return a.mean(axis=axis, keepdims=keepdims)


_MEAN_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


sum = Op(
    "sum", lambda x, axis=None, keepdims=False: x.sum(axis=axis, keepdims=keepdims),
    jvp=(lambda t, out, x, axis=None, keepdims=False: t.sum(axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=None, keepdims=False: ns(g).broadcast_to(
        _expand_reduced(g, x.shape, normalize_axes(axis, x.ndim), keepdims), x.shape),))
mean = Op(
    "mean", array_mean,
    jvp=(lambda t, out, x, axis=None, keepdims=False:
         array_mean(t, axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=None, keepdims=False: ns(g).broadcast_to(
        _expand_reduced(g, x.shape, normalize_axes(axis, x.ndim), keepdims) / _count(x, axis), x.shape),))


def _selection(name):
    """``max`` or ``min`` over axes: the derivative of the selected entry, ties share it evenly."""
    def jvp(t, out, x, axis=None, keepdims=False):
        axes = normalize_axes(axis, x.ndim)
        return (t * _extreme_mask(x, out, axes, keepdims)).sum(axis=_k(axes), keepdims=keepdims)

    def vjp(g, out, x, axis=None, keepdims=False):
        axes = normalize_axes(axis, x.ndim)
        return _expand_reduced(g, x.shape, axes, keepdims) * _extreme_mask(x, out, axes, keepdims)
    return Op(name, lambda x, axis=None, keepdims=False: getattr(x, name)(axis=axis, keepdims=keepdims),
              jvp=(jvp,), vjp=(vjp,))


max = _selection("max")
min = _selection("min")


def _centred(x, axes):
    return x - x.mean(axis=axes, keepdims=True)


def _var_jvp(t, x, axis, ddof, keepdims):
    """var' = 2/(n − ddof) Σ (x − mean x) ẋ over the reduced axes."""
    axes = normalize_axes(axis, x.ndim)
    return (t * _centred(x, axes)).sum(axis=_k(axes), keepdims=keepdims) * (2 / (_count(x, axis) - ddof))


def _var_vjp(g, x, axis, ddof, keepdims):
    """x̄ = 2/(n − ddof) (x − mean x) ḡ."""
    axes = normalize_axes(axis, x.ndim)
    return _expand_reduced(g, x.shape, axes, keepdims) * _centred(x, axes) * (2 / (_count(x, axis) - ddof))


var = Op("var", lambda x, axis=None, ddof=0, keepdims=False: x.var(axis=axis, ddof=ddof, keepdims=keepdims),
         jvp=(lambda t, out, x, axis=None, ddof=0, keepdims=False: _var_jvp(t, x, axis, ddof, keepdims),),
         vjp=(lambda g, out, x, axis=None, ddof=0, keepdims=False: _var_vjp(g, x, axis, ddof, keepdims),))
std = Op("std", lambda x, axis=None, ddof=0, keepdims=False: x.std(axis=axis, ddof=ddof, keepdims=keepdims),
         jvp=(lambda t, out, x, axis=None, ddof=0, keepdims=False: _var_jvp(t, x, axis, ddof, keepdims) / (2 * out),),
         vjp=(lambda g, out, x, axis=None, ddof=0, keepdims=False: _var_vjp(g / (2 * out), x, axis, ddof, keepdims),))


def _products_of_others(x, axes):
    """For each entry of x, the product of the other entries of its reduced group (exact at zeros).

    The reduced axes are moved last and flattened to n; row i of an n × n copy has entry i set to
    1, so its product is the product of the others.  O(n²) per group.
    """
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    moved = transpose(x, rest + axes)
    n = _count(x, axes)
    rows = reshape(moved, moved.shape[:len(rest)] + (1, n))
    others = prod(where(numpy.eye(n, dtype=bool), 1, rows), axis=-1)
    return transpose(reshape(others, moved.shape), tuple(numpy.argsort(rest + axes).tolist()))


prod = Op(
    "prod", lambda x, axis=None, keepdims=False: x.prod(axis=axis, keepdims=keepdims),
    jvp=(lambda t, out, x, axis=None, keepdims=False: (t * _products_of_others(x, normalize_axes(axis, x.ndim))).sum(
        axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=None, keepdims=False: _expand_reduced(
        g, x.shape, normalize_axes(axis, x.ndim), keepdims) * _products_of_others(x, normalize_axes(axis, x.ndim)),))


def _cumsum_jvp(t, out, x, axis=None):
    if axis is None:
        return t.reshape(t.shape[0], -1).cumsum(axis=1)
    return t.cumsum(axis=normalize_axes(axis, x.ndim)[0] + 1)


def _cumsum_vjp(g, out, x, axis=None):
    """The reverse running sum: x̄_i = Σ_{j ≥ i} ḡ_j."""
    along = 0 if axis is None else normalize_axes(axis, x.ndim)[0]
    return _flip(_flip(g, along).cumsum(axis=along), along).reshape(x.shape)


cumsum = Op("cumsum", lambda x, axis=None: x.cumsum(axis=axis),  # axis=None: over the flattened array
            jvp=(_cumsum_jvp,), vjp=(_cumsum_vjp,))


def _logsumexp(x, axis=-1, keepdims=False):
    module = ns(x)
    top = module.max(x, axis=axis, keepdims=True)
    top = module.where(module.isfinite(top), top, 0)
    out = module.log(module.exp(x - top).sum(axis=axis, keepdims=True)) + top
    return out if keepdims else module.squeeze(out, axis=axis)


def _softmax_jvp(t, out, x, axis=-1):
    return out * (t - (t * out).sum(axis=_k(normalize_axes(axis, x.ndim)), keepdims=True))


logsumexp = Op(
    "logsumexp", _logsumexp,
    jvp=(lambda t, out, x, axis=-1, keepdims=False: (t * softmax(x, axis=axis)).sum(
        axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=-1, keepdims=False: _expand_reduced(
        g, x.shape, normalize_axes(axis, x.ndim), keepdims) * softmax(x, axis=axis),))
softmax = Op(
    "softmax", lambda x, axis=-1: ns(x).exp(x - _logsumexp(x, axis=axis, keepdims=True)),
    jvp=(_softmax_jvp,),
    vjp=(lambda g, out, x, axis=-1: out * (g - (g * out).sum(axis=axis, keepdims=True)),))
log_softmax = Op(
    "log_softmax", lambda x, axis=-1: x - _logsumexp(x, axis=axis, keepdims=True),
    jvp=(lambda t, out, x, axis=-1: t - (t * exp(out)).sum(axis=_k(normalize_axes(axis, x.ndim)), keepdims=True),),
    vjp=(lambda g, out, x, axis=-1: g - exp(out) * g.sum(axis=axis, keepdims=True),))
# ---------------------------------------------------------------------------------------
def _mT(a):
    return a.swapaxes(-1, -2)


def _matmul_jvp_left(t, out, x, w):
    """ẋ @ w for ẋ of shape (K,) + x.shape."""
    if w.ndim == 2:  # one GEMM over all directions and rows
        return (t.reshape(-1, t.shape[-1]) @ w).reshape(t.shape[:-1] + (w.shape[-1],))
    return lift(t, out.ndim) @ w


def _matmul_jvp_right(t, out, x, w):
    """x @ ẇ for ẇ of shape (K,) + w.shape.  For a matrix w, the rows of x against each ẇ_k: K
    GEMMs of all rows (broadcasting x [N, P, p] against ẇ [K, 1, p, q] instead would make N·P
    matrix-vector products: measured 2.7 against 0.5 ms on LocalMixer M/1/16's first layer)."""
    if w.ndim == 2 and x.ndim >= 2:
        rows = _rows(x)
        products = rows @ t[0] if t.shape[0] == 1 else rows[None] @ t
        return products.reshape((t.shape[0],) + x.shape[:-1] + (w.shape[-1],))
    return x @ lift(t, out.ndim)


STACKED_GEMM_MAX = 1 << 20
"""From this many elements of x, a matmul's value and tangent rows take a GEMM each (see below)."""


def _matmul_value_and_jvp(tangents, x, w):
    """Value rows and tangent rows of x in one GEMM: [x; ẋ_1; ...; ẋ_K] @ w, then + x @ ẇ.

    Applies when x carries a tangent, w is a matrix and x has fewer than ``STACKED_GEMM_MAX``
    elements; returns None otherwise (the plain value + jvp path: one GEMM for the value rows,
    one for the tangent rows).  For a large x the copy into the stacked operand costs more than
    the second call saves (measured 65.8 against 57.6 ms for [128, 64, 512] @ [512, 512], one
    direction, one thread; 40.0 against 30.9 ms on two).
    """
    tangent_x, tangent_w = tangents
    if tangent_x is None or w.ndim != 2 or x.ndim < 2 or x.size >= STACKED_GEMM_MAX:
        return None
    module = ns(x, w)
    rows = module.concatenate([x[None], tangent_x]).reshape(-1, x.shape[-1]) @ w
    rows = rows.reshape((len(tangent_x) + 1,) + x.shape[:-1] + (w.shape[-1],))
    out, tangent = rows[0], rows[1:]
    if tangent_w is not None:
        right = _matmul_jvp_right(tangent_w, out, x, w)
        if right.shape == tangent.shape:
            tangent += right  # the rows buffer is ours: accumulate in place
        else:  # a single direction on one operand, K on the other
            tangent = tangent + right
    return out, tangent


def _rows(a):
    """a [..., n] as one matrix of rows [-1, n] (the stacked operand of a single GEMM)."""
    return a.reshape(-1, a.shape[-1])


def _matmul_value(x, w):
    """x @ w; a stack of x against one matrix w is a single GEMM over all rows."""
    if w.ndim == 2 and x.ndim > 2:
        return (_rows(x) @ w).reshape(x.shape[:-1] + (w.shape[-1],))
    return x @ w


def _matmul_vjp_right(g, out, x, w):
    """w̄ = Σ_batch xᵀ g; for a matrix w, one GEMM over the stacked rows (no [batch, p, q] temporary),
    or, on arrays, its factors where they are no larger (``gradients.outer``; formed when read)."""
    if w.ndim == 2:
        if isinstance(x, Dual) or isinstance(g, Dual):
            return _mT(_rows(x)) @ _rows(g)
        return outer(_rows(x), _rows(g))
    return unbroadcast(_mT(x) @ g, w.shape)


_matmul = Op(  # operands of >= 2 dims; dualnet.matmul promotes 1-D operands
    "matmul", _matmul_value,
    jvp=(_matmul_jvp_left, _matmul_jvp_right),
    vjp=(lambda g, out, x, w: unbroadcast(_matmul_value(g, _mT(w)), x.shape), _matmul_vjp_right),
    value_and_jvp=_matmul_value_and_jvp)


def _einsum_parse(spec, *shapes):
    """Expand ``...``: (one index string per operand, the output index string, a free letter)."""
    spec = spec.replace(" ", "")
    if "->" not in spec:  # NumPy's implicit output: '...' then the labels seen once, sorted
        labels = spec.replace(",", "").replace("...", "")
        once = "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
        spec = f"{spec}->{'...' * ('...' in spec)}{once}"
    lhs, rhs = spec.split("->")
    inputs = lhs.split(",")
    if len(inputs) != len(shapes):
        raise ValueError(f"einsum: spec {spec!r} names {len(inputs)} operands, got {len(shapes)}")
    free = [c for c in string.ascii_letters if c not in spec]
    width = builtins.max([len(s) - len(i.replace("...", "")) for i, s in zip(inputs, shapes)] + [0])
    fill = "".join(free[:width])
    inputs = [i.replace("...", fill[width - (len(s) - len(i.replace("...", ""))):]) for i, s in zip(inputs, shapes)]
    return inputs, rhs.replace("...", fill), free[width]


def _einsum_jvp(tangents, out, spec, *xs):
    """Σ_i einsum with operand i replaced by its tangent (a leading direction index k)."""
    inputs, output, k = _einsum_parse(spec, *(x.shape for x in xs))
    total = None
    for i, t in enumerate(tangents[1:]):
        if t is None:
            continue
        subs = ",".join(k + s if j == i else s for j, s in enumerate(inputs))
        term = ns(t, *xs).einsum(f"{subs}->{k}{output}", *xs[:i], t, *xs[i + 1:])
        total = term if total is None else total + term
    return total


def _einsum_vjp(g, out, spec, *xs):
    """Operand i's cotangent: einsum of ḡ with the other operands, back onto operand i's indices."""
    inputs, output, _ = _einsum_parse(spec, *(x.shape for x in xs))
    grads = [None]
    for i, (target, x) in enumerate(zip(inputs, xs)):
        if len(set(target)) != len(target):
            raise NotImplementedError(f"einsum: reverse mode of repeated indices in {spec!r}")
        others = [s for j, s in enumerate(inputs) if j != i]
        kept = "".join(c for c in target if c in output or builtins.any(c in s for s in others))
        operands = [g] + [y for j, y in enumerate(xs) if j != i]
        grad = ns(*operands).einsum(f"{','.join([output] + others)}->{kept}", *operands)
        if kept != target:  # an index summed inside this operand alone: broadcast back over it
            grad = grad.reshape([x.shape[target.index(c)] if c in kept else 1 for c in target])
        summed = tuple(a for a, (m, n) in enumerate(zip(grad.shape, x.shape)) if n == 1 and m != 1)
        grads.append(ns(grad).broadcast_to(grad.sum(axis=summed, keepdims=True) if summed else grad, x.shape))
    return grads


_einsum = Op("einsum", lambda spec, *xs: ns(*xs).einsum(spec, *xs), jvp=_einsum_jvp, vjp=_einsum_vjp)


def einsum(spec, *operands):
    """Einstein summation over any number of operands, as ``numpy.einsum`` (with ``...``).

    E.g. ``einsum('ij,jk->ik', a, b)`` is a @ b.  Forward mode: the sum over operands of the
    contraction with that operand's tangent; reverse mode: each operand's cotangent is the
    contraction of the output cotangent with the others (repeated indices inside one operand,
    a trace, have no reverse rule).
    """
    if not isinstance(spec, str):
        raise TypeError(f"einsum: the first argument must be the subscripts string, got {type(spec).__name__}")
    if not operands:
        raise ValueError("einsum: no operands")
    return _einsum(spec, *operands)

# ---------------------------------------------------------------------------------------
# shape manipulation (params are static)
# ---------------------------------------------------------------------------------------
def _to_out_shape(t, out, x, *args, **params):
    return t.reshape((t.shape[0],) + out.shape)


def _to_in_shape(g, out, x, *args, **params):
    return g.reshape(x.shape)


reshape = Op("reshape", lambda x, shape: x.reshape(shape),
             jvp=(_to_out_shape, None), vjp=(_to_in_shape, None))
expand_dims = Op("expand_dims", lambda x, axis: ns(x).expand_dims(x, axis),
                 jvp=(_to_out_shape, None), vjp=(_to_in_shape, None))
squeeze = Op("squeeze", lambda x, axis=None: ns(x).squeeze(x, axis=axis),
             jvp=(_to_out_shape,), vjp=(_to_in_shape,))


def _axes_or_reversed(axes, ndim):
    return tuple(range(ndim))[::-1] if axes is None else tuple(a % ndim for a in axes)


transpose = Op(
    "transpose", lambda x, axes=None: x.transpose(axes),
    jvp=(lambda t, out, x, axes=None: t.transpose((0,) + _k(_axes_or_reversed(axes, x.ndim))),),
    vjp=(lambda g, out, x, axes=None:  # the inverse permutation, as Python ints (CuPy takes a tuple)
         g.transpose(tuple(numpy.argsort(_axes_or_reversed(axes, x.ndim)).tolist())),))
broadcast_to = Op(
    "broadcast_to", lambda x, shape: ns(x).broadcast_to(x, shape),
    jvp=(lambda t, out, x, shape: ns(t).broadcast_to(lift(t, len(shape)), (t.shape[0],) + tuple(shape)), None),
    vjp=(lambda g, out, x, shape: unbroadcast(g, x.shape), None))


def _index_with_k(index, ndim):
    """Rewrite a value index so it applies to a tangent whose direction axis was moved last."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = builtins.sum(getattr(i, "ndim", 0) if getattr(i, "dtype", None) == bool else
                            (0 if i is None or i is Ellipsis else 1) for i in index)
    out = []
    for i in index:
        out.extend([slice(None)] * (ndim - consumed) if i is Ellipsis else [i])
    return tuple(out)


def _getitem_jvp(t, out, x, index):
    return moveaxis(moveaxis(t, 0, -1)[_index_with_k(index, x.ndim)], -1, 0)


def _scatter_value(g, index, shape):
    grad = ns(g).zeros(shape, dtype=g.dtype)
    parts = index if isinstance(index, tuple) else (index,)
    if builtins.any(getattr(i, "dtype", bool) != bool or isinstance(i, list) for i in parts
                    if not isinstance(i, (int, slice)) and i is not None and i is not Ellipsis):
        return backend.scatter_add(grad, index, g)  # integer arrays may repeat an index
    grad[index] = g
    return grad


def _scatter_jvp(t, out, g, index, shape):
    moved = scatter_add(moveaxis(t, 0, -1), _index_with_k(index, len(shape)), tuple(shape) + (t.shape[0],))
    return moveaxis(moved, -1, 0)


getitem = Op("getitem", lambda x, index: x[index],
             jvp=(_getitem_jvp, None), vjp=(lambda g, out, x, index: scatter_add(g, index, x.shape), None))
scatter_add = Op("scatter_add", _scatter_value,  # zeros(shape) with g added at index: getitem's transpose
                 jvp=(_scatter_jvp, None, None), vjp=(lambda c, out, g, index, shape: getitem(c, index), None, None))


def _pieces_jvp(join):
    """Joint jvp of concatenate/stack: zero-fill symbolic zeros, broadcast K, join along axis+1."""
    def rule(tangents, out, *xs, axis=0):
        module = ns(*tangents)
        k = builtins.max(t.shape[0] for t in tangents if t is not None)
        parts = [backend.namespace(value_of(out)).zeros((k,) + numpy.shape(value_of(x)), out.dtype) if t is None
                 else module.broadcast_to(t, (k,) + x.shape) for t, x in zip(tangents, xs)]
        return join(ns(*parts), parts, (axis % out.ndim) + 1)
    return rule


def _concatenate_vjp(g, out, *xs, axis=0):
    bounds = numpy.cumsum([x.shape[axis] for x in xs])[:-1]
    return split(g, bounds, axis=axis)


def _stack_vjp(g, out, *xs, axis=0):
    before = (slice(None),) * (axis % g.ndim)
    return [g[before + (i,)] for i in range(len(xs))]


_concatenate = Op("concatenate", lambda *xs, axis=0: ns(*xs).concatenate(xs, axis=axis),
                  jvp=_pieces_jvp(lambda m, parts, axis: m.concatenate(parts, axis=axis)),
                  vjp=_concatenate_vjp)
_stack = Op("stack", lambda *xs, axis=0: ns(*xs).stack(xs, axis=axis),
            jvp=_pieces_jvp(lambda m, parts, axis: m.stack(parts, axis=axis)),
            vjp=_stack_vjp)


def _pad_pairs(pad_width, ndim):
    """NumPy's pad_width forms (n, (lo, hi), ((lo, hi),) or one pair per axis) -> pairs per axis."""
    widths = numpy.asarray(pad_width, dtype=int)
    widths = numpy.full((1, 2), widths.item()) if widths.size == 1 else widths.reshape(-1, 2)
    if len(widths) not in (1, ndim):
        raise ValueError(f"pad: pad_width {pad_width!r} does not fit an array of {ndim} dimensions")
    return tuple((int(lo), int(hi)) for lo, hi in numpy.broadcast_to(widths, (ndim, 2)))


def _pad_value(x, pad_width, constant=0.0):
    return ns(x).pad(x, _pad_pairs(pad_width, x.ndim), constant_values=constant)


def _pad_jvp(t, out, x, pad_width, constant=0.0):
    return pad(t, ((0, 0),) + _pad_pairs(pad_width, x.ndim))


def _unpad(g, out, x, pad_width, constant=0.0):
    return g[tuple(slice(lo, lo + n) for (lo, _), n in zip(_pad_pairs(pad_width, x.ndim), x.shape))]


pad = Op("pad", _pad_value,  # constant padding: pad(x, pad_width, constant=0.0)
         jvp=(_pad_jvp, None), vjp=(_unpad, None))


def _tile_vjp(g, out, x, reps):
    """Sum the copies: g [r₀n₀, r₁n₁, ...] -> [r₀, n₀, r₁, n₁, ...] summed over the r axes."""
    split_shape = builtins.sum(((r, n) for r, n in zip(reps, x.shape)), ())
    return g.reshape(split_shape).sum(axis=tuple(range(0, 2 * len(reps), 2)))


_tile = Op("tile", lambda x, reps: ns(x).tile(x, reps),  # len(reps) == x.ndim (see ``tile``)
           jvp=(lambda t, out, x, reps: ns(t).tile(t, (1,) + reps), None), vjp=(_tile_vjp, None))
_roll = Op("roll", lambda x, shifts, axes: ns(x).roll(x, shifts, axes),  # a permutation: its transpose rolls back
           jvp=(lambda t, out, x, shifts, axes: ns(t).roll(t, shifts, _k(axes)),),
           vjp=(lambda g, out, x, shifts, axes: ns(g).roll(g, tuple(-s for s in shifts), axes),))
stop_gradient = Op("stop_gradient", lambda x: x,
                   jvp=lambda tangents, out, x: None,
                   vjp=lambda g, out, x: (None,))


# ---------------------------------------------------------------------------------------
# public functions whose call signature differs from the primitive's, and composites
# ---------------------------------------------------------------------------------------
def _shape(x):
    return numpy.shape(value_of(x))


def _on_device_of(x, index):
    """A host integer index array moved to the device of x's values (CuPy indexes with CuPy arrays)."""
    return backend.namespace(value_of(x)).asarray(index)


def matmul(x, y):
    """``x @ y`` with NumPy semantics: 1-D operands are promoted to matrices and squeezed back.

    Shapes: (..., n, p) @ (..., p, q) -> (..., n, q), batch dimensions broadcast.
    """
    shape_x, shape_y = _shape(x), _shape(y)
    if len(shape_x) == 0 or len(shape_y) == 0:
        raise ValueError(f"matmul: operands must have at least one dimension, got shapes {shape_x} and {shape_y}")
    vector_x, vector_y = len(shape_x) == 1, len(shape_y) == 1
    if shape_x[-1] != shape_y[-2 if len(shape_y) > 1 else 0]:
        raise ValueError(f"matmul: inner dimensions differ, shapes {shape_x} and {shape_y}")
    out = _matmul(expand_dims(x, 0) if vector_x else x, expand_dims(y, -1) if vector_y else y)
    squeezed = (-2,) * vector_x + (-1,) * vector_y
    return squeeze(out, axis=squeezed) if squeezed else out


def _as_pieces(name, xs):
    """Constants among Duals (Python numbers, lists) become arrays of the Duals' dtype."""
    xs = list(xs)
    if not xs:
        raise ValueError(f"{name}: need at least one array to join")
    duals = [x for x in xs if isinstance(x, Dual)]
    if not duals:
        return xs
    module = backend.namespace(value_of(duals[0]))
    return [x if isinstance(x, Dual) or backend.is_array(x) else module.asarray(x, dtype=duals[0].dtype) for x in xs]


def concatenate(xs, axis=0):
    """Join a sequence of arrays/Duals (constants allowed) along an existing axis."""
    return _concatenate(*_as_pieces("concatenate", xs), axis=axis)


def stack(xs, axis=0):
    """Join a sequence of equally shaped arrays/Duals (constants allowed) along a new axis."""
    return _stack(*_as_pieces("stack", xs), axis=axis)


def astype(x, dtype):
    """``x`` in another float dtype; its tangent follows, its cotangent is cast back."""
    if isinstance(x, Dual) and not numpy.issubdtype(numpy.dtype(dtype), numpy.floating):
        raise TypeError(f"astype: a Dual stays real floating point, got dtype {numpy.dtype(dtype)}; "
                        f"use dualnet.value_of(x).astype(...) for a plain array without derivative")
    return _astype(x, numpy.dtype(dtype))


def swapaxes(x, axis1, axis2):
    """``x`` with two axes exchanged."""
    axes = list(range(len(_shape(x))))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(x, tuple(axes))


def moveaxis(x, source, destination):
    """``x`` with axes ``source`` moved to ``destination`` (ints or sequences), as NumPy."""
    ndim = len(_shape(x))
    source = [a % ndim for a in numpy.atleast_1d(source).tolist()]
    destination = [a % ndim for a in numpy.atleast_1d(destination).tolist()]
    order = [a for a in range(ndim) if a not in source]
    for dest, src in sorted(zip(destination, source)):
        order.insert(dest, src)
    return transpose(x, tuple(order))


def tensordot(a, b, axes=2):
    """Σ over paired axes of a and b: ``axes`` = n (a's last n with b's first n) or (a_axes, b_axes).

    Output shape: a's free axes then b's free axes (NumPy's convention), through ``einsum``.
    """
    nda, ndb = len(_shape(a)), len(_shape(b))
    if isinstance(axes, (int, numpy.integer)):
        pairs_a, pairs_b = list(range(nda - axes, nda)), list(range(axes))
    else:
        pairs_a, pairs_b = (numpy.atleast_1d(axes[0]).tolist(), numpy.atleast_1d(axes[1]).tolist())
    pairs_a, pairs_b = [i % nda for i in pairs_a], [i % ndb for i in pairs_b]
    letters = iter(string.ascii_letters)
    sa = [next(letters) for _ in range(nda)]
    sb = [sa[pairs_a[pairs_b.index(j)]] if j in pairs_b else next(letters) for j in range(ndb)]
    out = [c for i, c in enumerate(sa) if i not in pairs_a] + [c for j, c in enumerate(sb) if j not in pairs_b]
    return einsum(f"{''.join(sa)},{''.join(sb)}->{''.join(out)}", a, b)


def dot(a, b):
    """NumPy's ``dot``: a product for 0-d operands, ``matmul`` up to a 2-d b, else a's last axis
    contracted with b's second-to-last."""
    nda, ndb = len(_shape(a)), len(_shape(b))
    if nda == 0 or ndb == 0:
        return mul(a, b)
    if ndb <= 2:
        return matmul(a, b)
    return tensordot(a, b, axes=([nda - 1], [ndb - 2]))


def diagonal(x, offset=0, axis1=0, axis2=1):
    """The diagonal of the (axis1, axis2) planes, as a last axis (NumPy's layout), via ``getitem``."""
    moved = moveaxis(x, (axis1, axis2), (-2, -1))
    rows, cols = _shape(moved)[-2:]
    first_row, first_col = builtins.max(0, -offset), builtins.max(0, offset)
    count = builtins.max(0, builtins.min(rows - first_row, cols - first_col))
    return getitem(moved, (Ellipsis, _on_device_of(x, numpy.arange(first_row, first_row + count)),
                           _on_device_of(x, numpy.arange(first_col, first_col + count))))


def trace(x, offset=0, axis1=0, axis2=1):
    """The sum of ``diagonal(x, offset, axis1, axis2)``."""
    return sum(diagonal(x, offset, axis1, axis2), axis=-1)


def take_along_axis(x, indices, axis):
    """``x`` gathered at integer ``indices`` along ``axis`` (NumPy's ``take_along_axis``), via ``getitem``."""
    shape = _shape(x)
    axis = axis % len(shape)
    grids = numpy.ogrid[tuple(slice(n) for n in shape)]
    return getitem(x, tuple(_on_device_of(x, indices if a == axis else grids[a]) for a in range(len(shape))))


def sort(x, axis=-1):
    """``x`` sorted ascending along ``axis``; each output entry carries its input entry's derivative."""
    return take_along_axis(x, numpy.argsort(backend.to_numpy(value_of(x)), axis=axis, kind="stable"), axis)


def topk(x, k, axis=-1):
    """The k largest entries along ``axis``, largest first: ``(values, indices)``.

    ``values`` carries the derivatives of the selected entries; ``indices`` is an integer array.
    """
    order = numpy.argsort(-backend.to_numpy(value_of(x)), axis=axis, kind="stable")
    indices = numpy.take(order, numpy.arange(k), axis=axis)
    return take_along_axis(x, indices, axis), indices


def repeat(x, repeats, axis=None):
    """Each entry repeated ``repeats`` times along ``axis`` (the flattened array when None)."""
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    shape = _shape(x)
    axis = axis % len(shape)
    index = numpy.repeat(numpy.arange(shape[axis]), repeats)
    return getitem(x, (slice(None),) * axis + (_on_device_of(x, index),))


def tile(x, reps):
    """``x`` repeated ``reps`` times per axis, as NumPy's ``tile`` (a shorter ``reps`` applies to
    the last axes; a longer one prepends axes of length 1 to ``x``)."""
    reps = tuple(int(r) for r in numpy.atleast_1d(reps).tolist())
    shape = tuple(_shape(x))
    if len(reps) > len(shape):
        x = reshape(x, (1,) * (len(reps) - len(shape)) + shape)
        shape = tuple(_shape(x))
    return _tile(x, (1,) * (len(shape) - len(reps)) + reps)


def roll(x, shift, axis=None):
    """Entries shifted by ``shift`` along ``axis`` (ints or tuples), wrapping around, as NumPy."""
    if axis is None:
        return reshape(_roll(reshape(x, (-1,)), shifts=(int(shift),), axes=(0,)), _shape(x))
    ndim = len(_shape(x))
    pairs = numpy.broadcast(numpy.atleast_1d(shift), numpy.atleast_1d(axis))
    shifts, axes = zip(*[(int(s), int(a) % ndim) for s, a in pairs])
    return _roll(x, shifts=shifts, axes=axes)


def split(x, indices_or_sections, axis=0):
    """A list of sub-arrays of ``x`` along ``axis``, as NumPy's ``split``, via ``getitem``."""
    n = _shape(x)[axis]
    before = (slice(None),) * (axis % len(_shape(x)))
    pieces = numpy.split(numpy.arange(n), indices_or_sections)
    starts = numpy.cumsum([0] + [len(p) for p in pieces])
    return [getitem(x, before + (slice(int(lo), int(hi)),)) for lo, hi in zip(starts[:-1], starts[1:])]


TABLE = {p.name: p for p in (
    add, sub, mul, div, neg, power, exp, log, sqrt, tanh, sigmoid, sin, cos, tan, sinh, cosh, arctan, log1p,
    expm1, log2, log10, sign, floor, ceil, relu, abs, maximum, minimum, logaddexp, where, clip, _astype,
    sum, mean, max, min, var, std, prod, cumsum, _matmul, _einsum, reshape, transpose, broadcast_to,
    expand_dims, squeeze, getitem, scatter_add, _concatenate, _stack, _tile, _roll, pad, stop_gradient,
    logsumexp, softmax, log_softmax)}
"""Every primitive of the engine by name (fused ops register themselves here too)."""


# ---------------------------------------------------------------------------------------
# NumPy's names for these functions: numpy.<fn>(dual), and the rules' namespace under nesting
# ---------------------------------------------------------------------------------------
NUMPY_NAMES = {
    "add": add, "subtract": sub, "multiply": mul, "divide": div, "true_divide": div, "negative": neg,
    "positive": lambda x: x, "power": power, "absolute": abs, "abs": abs, "matmul": matmul, "dot": dot,
    **{p.name: p for p in (exp, log, sqrt, tanh, sin, cos, tan, sinh, cosh, arctan, log1p, expm1, log2, log10,
                           sign, floor, ceil, maximum, minimum, logaddexp, where, clip, sum, mean, max, min, var,
                           std, prod, cumsum, reshape, transpose, broadcast_to, expand_dims, squeeze, pad)},
    "amax": max, "amin": min, "einsum": einsum, "concatenate": concatenate, "stack": stack, "split": split,
    "swapaxes": swapaxes, "moveaxis": moveaxis, "tensordot": tensordot, "diagonal": diagonal, "trace": trace,
    "take_along_axis": take_along_axis, "sort": sort, "repeat": repeat, "tile": tile, "roll": roll,
    "ravel": lambda x: reshape(x, (-1,)),
}
"""NumPy's name -> the dualnet function with NumPy's meaning and derivatives (for ``numpy_dispatch``,
and as the namespace of rules applied to Duals)."""

_ON_VALUES = {  # no derivative: answered from the values
    "shape", "ndim", "size", "result_type", "argmax", "argmin", "argsort", "zeros_like", "ones_like", "empty_like"}


def numpy_dispatch(func, args, kwargs):
    """Run NumPy function ``func`` (``__array_function__``) on arguments that include Duals.

    A function of ``NUMPY_NAMES`` runs its dualnet counterpart (derivatives included); a query
    runs on the values; anything else raises ``TypeError`` naming what to use.
    """
    name = getattr(func, "__name__", repr(func))
    if kwargs.get("out") is not None:
        raise TypeError(f"numpy.{name}: out= is not supported on a Dual; call dualnet.{name} without out=")
    if name in _ON_VALUES:
        return func(*[value_of(a) for a in args], **kwargs)
    target = NUMPY_NAMES.get(name)
    if target is None:
        raise TypeError(f"numpy.{name} has no derivative rule in dualnet; use the dualnet functions "
                        f"(dualnet.primitives.TABLE, e.g. dualnet.tanh), or apply numpy.{name} to "
                        f"dualnet.value_of(x) to get a plain array without derivative")
    return target(*args, **kwargs)


class _NestedNamespace:
    """What ``ns`` returns for Duals: NumPy's names as dualnet functions, constructors as arrays."""

    def __getattr__(self, name):
        if name in NUMPY_NAMES:
            return NUMPY_NAMES[name]
        if name in ("zeros", "ones"):
            return getattr(backend.xp, name)
        if name == "result_type":
            return lambda *xs: result_dtype(*xs)
        raise NotImplementedError(f"{name}: a rule used it on a Dual (a nested derivative) and dualnet has no "
                                  f"differentiable {name}")


NESTED = _NestedNamespace()
