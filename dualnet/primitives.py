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
A missing rule raises ``NotImplementedError`` naming the op and the mode.  Every primitive is
also exported as a function (``dualnet.exp``, ``dualnet.matmul`` ...) accepting Duals or arrays.
"""
import builtins
import string

import numpy

from . import backend
from .dual import Dual, bind

ns = backend.namespace


class Primitive:
    """A named op: ``Primitive(name, value, jvp=None, vjp=None)``; calling it applies it.

    ``broadcasting=True`` (elementwise ops) broadcasts Dual operands before the rules see them.
    ``value_and_jvp`` (optional) computes value and output tangent together when that is
    cheaper, e.g. one GEMM for the value rows and the tangent rows:
    ``value_and_jvp(tangents, *args, **params) -> (out, out_tangent)``, or ``None`` to fall
    back to ``value`` + ``jvp`` for these arguments.
    """

    def __init__(self, name, value, jvp=None, vjp=None, broadcasting=False, value_and_jvp=None):
        self.name, self.value, self.jvp_rule, self.vjp_rule = name, value, jvp, vjp
        self.broadcasting, self.value_and_jvp = broadcasting, value_and_jvp

    def __call__(self, *args, **params):
        if self.broadcasting:
            args = _broadcast_duals(self.name, args)
        return bind(self, args, params)

    def __repr__(self):
        return f"Primitive({self.name})"

    def jvp(self, tangents, out, args, params):
        rule = self.jvp_rule
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

    def vjp(self, cotangent, out, args, params, needed):
        """Cotangents of the arguments flagged in ``needed`` (others are ``None``)."""
        rule = self.vjp_rule
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
    shapes = [numpy.shape(a.value if isinstance(a, Dual) else a) for a in args]
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


def _zeros_like(x):
    return ns(x).zeros_like(x)


def _max_mask(x, out, axes, keepdims):
    """Indicator of the maxima, ties split evenly (each tied entry gets 1/count)."""
    module = ns(x)
    full = out if keepdims else module.expand_dims(out, axes)
    mask = (x == full).astype(x.dtype)
    return mask / mask.sum(axis=axes, keepdims=True)


# ---------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------
add = Primitive("add", lambda x, y: x + y,
                jvp=(lambda t, out, x, y: t, lambda t, out, x, y: t),
                vjp=(lambda g, out, x, y: g, lambda g, out, x, y: g),
                broadcasting=True)
sub = Primitive("sub", lambda x, y: x - y,
                jvp=(lambda t, out, x, y: t, lambda t, out, x, y: -t),
                vjp=(lambda g, out, x, y: g, lambda g, out, x, y: -g),
                broadcasting=True)
mul = Primitive("mul", lambda x, y: x * y,
                jvp=(lambda t, out, x, y: t * y, lambda t, out, x, y: x * t),
                vjp=(lambda g, out, x, y: g * y, lambda g, out, x, y: g * x),
                broadcasting=True)
div = Primitive("div", lambda x, y: x / y,
                jvp=(lambda t, out, x, y: t / y, lambda t, out, x, y: -t * (out / y)),
                vjp=(lambda g, out, x, y: g / y, lambda g, out, x, y: -g * out / y),
                broadcasting=True)
neg = Primitive("neg", lambda x: -x,
                jvp=(lambda t, out, x: -t,), vjp=(lambda g, out, x: -g,))
def _power_value(x, p):
    return x ** _weak(p)


def _power_slope(x, p):
    """d(x**p)/dx = p x**(p-1) for a constant exponent p."""
    p = _weak(p)
    return p * x ** (p - 1)


def _weak(p):
    """A NumPy scalar exponent as a Python number, so float32 bases stay float32."""
    return p.item() if isinstance(p, numpy.generic) else p


power = Primitive("power", _power_value,  # the exponent is a constant (not differentiated)
                  jvp=(lambda t, out, x, p: t * _power_slope(x, p), None),
                  vjp=(lambda g, out, x, p: g * _power_slope(x, p), None))
exp = Primitive("exp", lambda x: ns(x).exp(x),
                jvp=(lambda t, out, x: t * out,), vjp=(lambda g, out, x: g * out,))
log = Primitive("log", lambda x: ns(x).log(x),
                jvp=(lambda t, out, x: t / x,), vjp=(lambda g, out, x: g / x,))
sqrt = Primitive("sqrt", lambda x: ns(x).sqrt(x),
                 jvp=(lambda t, out, x: t / (2 * out),), vjp=(lambda g, out, x: g / (2 * out),))
tanh = Primitive("tanh", lambda x: ns(x).tanh(x),
                 jvp=(lambda t, out, x: t * (1 - out * out),), vjp=(lambda g, out, x: g * (1 - out * out),))
sigmoid = Primitive("sigmoid", lambda x: 0.5 * (ns(x).tanh(0.5 * x) + 1),
                    jvp=(lambda t, out, x: t * (out * (1 - out)),),
                    vjp=(lambda g, out, x: g * (out * (1 - out)),))
def _positive(x):
    """1.0 where x > 0 else 0.0, in x's dtype (a float mask multiplies faster than a bool one)."""
    return (x > 0).astype(x.dtype)


relu = Primitive("relu", lambda x: ns(x).maximum(x, 0),
                 jvp=(lambda t, out, x: t * _positive(x),), vjp=(lambda g, out, x: g * _positive(x),))
abs = Primitive("abs", lambda x: ns(x).abs(x),
                jvp=(lambda t, out, x: t * ns(x).sign(x),), vjp=(lambda g, out, x: g * ns(x).sign(x),))


def _pick(x, y, first):
    """Weight of ``x`` in max/min: 1 where it wins, 1/2 on ties, 0 where it loses."""
    wins = (x > y) if first else (x < y)
    return (wins + 0.5 * (x == y)).astype(ns(x, y).result_type(x, y))


maximum = Primitive("maximum", lambda x, y: ns(x, y).maximum(x, y),
                    jvp=(lambda t, out, x, y: t * _pick(x, y, True), lambda t, out, x, y: t * _pick(y, x, True)),
                    vjp=(lambda g, out, x, y: g * _pick(x, y, True), lambda g, out, x, y: g * _pick(y, x, True)),
                broadcasting=True)
minimum = Primitive("minimum", lambda x, y: ns(x, y).minimum(x, y),
                    jvp=(lambda t, out, x, y: t * _pick(x, y, False), lambda t, out, x, y: t * _pick(y, x, False)),
                    vjp=(lambda g, out, x, y: g * _pick(x, y, False), lambda g, out, x, y: g * _pick(y, x, False)),
                broadcasting=True)
where = Primitive("where", lambda c, x, y: ns(x, y).where(c, x, y),
                  jvp=(None, lambda t, out, c, x, y: ns(t).where(c, t, 0),
                       lambda t, out, c, x, y: ns(t).where(c, 0, t)),
                  vjp=(None, lambda g, out, c, x, y: ns(g).where(c, g, 0),
                       lambda g, out, c, x, y: ns(g).where(c, 0, g)),
                broadcasting=True)
def _inside(x, lo, hi):
    """1.0 where ``lo <= x <= hi`` (a bound of ``None`` is absent), else 0.0, in x's dtype."""
    inside = ns(x).ones(x.shape, bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    return inside.astype(x.dtype)


clip = Primitive("clip", lambda x, lo, hi: ns(x).clip(x, lo, hi),  # bounds are constants (or None)
                 jvp=(lambda t, out, x, lo, hi: t * _inside(x, lo, hi), None, None),
                 vjp=(lambda g, out, x, lo, hi: g * _inside(x, lo, hi), None, None),
                 broadcasting=True)

# ---------------------------------------------------------------------------------------
# reductions (params: axis, keepdims)
# ---------------------------------------------------------------------------------------
def _count(x, axis):
    return int(numpy.prod([x.shape[a] for a in normalize_axes(axis, x.ndim)]))


sum = Primitive(
    "sum", lambda x, axis=None, keepdims=False: x.sum(axis=axis, keepdims=keepdims),
    jvp=(lambda t, out, x, axis=None, keepdims=False: t.sum(axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=None, keepdims=False: ns(g).broadcast_to(
        _expand_reduced(g, x.shape, normalize_axes(axis, x.ndim), keepdims), x.shape),))
mean = Primitive(
    "mean", lambda x, axis=None, keepdims=False: x.mean(axis=axis, keepdims=keepdims),
    jvp=(lambda t, out, x, axis=None, keepdims=False:
         t.mean(axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=None, keepdims=False: ns(g).broadcast_to(
        _expand_reduced(g, x.shape, normalize_axes(axis, x.ndim), keepdims) / _count(x, axis), x.shape),))
max = Primitive(  # ties share the derivative evenly
    "max", lambda x, axis=None, keepdims=False: x.max(axis=axis, keepdims=keepdims),
    jvp=(lambda t, out, x, axis=None, keepdims=False: (
        t * _max_mask(x, out, normalize_axes(axis, x.ndim), keepdims)).sum(
            axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=None, keepdims=False: _expand_reduced(
        g, x.shape, normalize_axes(axis, x.ndim), keepdims)
        * _max_mask(x, out, normalize_axes(axis, x.ndim), keepdims),))


def _logsumexp(x, axis=-1, keepdims=False):
    module = ns(x)
    top = module.max(x, axis=axis, keepdims=True)
    top = module.where(module.isfinite(top), top, 0)
    out = module.log(module.exp(x - top).sum(axis=axis, keepdims=True)) + top
    return out if keepdims else module.squeeze(out, axis=axis)


def _softmax(x, axis=-1):
    e = ns(x).exp(x - _logsumexp(x, axis=axis, keepdims=True))
    return e


def _softmax_jvp(t, out, x, axis=-1):
    return out * (t - (t * out).sum(axis=_k(normalize_axes(axis, x.ndim)), keepdims=True))


logsumexp = Primitive(
    "logsumexp", _logsumexp,
    jvp=(lambda t, out, x, axis=-1, keepdims=False: (t * _softmax(x, axis)).sum(
        axis=_k(normalize_axes(axis, x.ndim)), keepdims=keepdims),),
    vjp=(lambda g, out, x, axis=-1, keepdims=False: _expand_reduced(
        g, x.shape, normalize_axes(axis, x.ndim), keepdims) * _softmax(x, axis),))
softmax = Primitive(
    "softmax", _softmax,
    jvp=(_softmax_jvp,),
    vjp=(lambda g, out, x, axis=-1: out * (g - (g * out).sum(axis=axis, keepdims=True)),))
log_softmax = Primitive(
    "log_softmax", lambda x, axis=-1: x - _logsumexp(x, axis=axis, keepdims=True),
    jvp=(lambda t, out, x, axis=-1:
         t - (t * ns(x).exp(out)).sum(axis=_k(normalize_axes(axis, x.ndim)), keepdims=True),),
    vjp=(lambda g, out, x, axis=-1: g - ns(g).exp(out) * g.sum(axis=axis, keepdims=True),))

# ---------------------------------------------------------------------------------------
# linear algebra
# ---------------------------------------------------------------------------------------
def _mT(a):
    return a.swapaxes(-1, -2)


def _matmul_jvp_left(t, out, x, w):
    """ẋ @ w for ẋ of shape (K,) + x.shape."""
    if w.ndim == 2:  # one GEMM over all directions and rows
        return (t.reshape(-1, t.shape[-1]) @ w).reshape(t.shape[:-1] + (w.shape[-1],))
    return lift(t, out.ndim) @ w


def _matmul_jvp_right(t, out, x, w):
    """x @ ẇ for ẇ of shape (K,) + w.shape (batched over K by matmul broadcasting)."""
    return x @ lift(t, out.ndim)


def _matmul_value_and_jvp(tangents, x, w):
    """Value rows and tangent rows of x in one GEMM: [x; ẋ_1; ...; ẋ_K] @ w, then + x @ ẇ.

    Applies when x carries a tangent and w is a matrix; returns None otherwise (the plain
    value + jvp path is used).
    """
    tangent_x, tangent_w = tangents
    if tangent_x is None or w.ndim != 2 or x.ndim < 2:
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
    """w̄ = Σ_batch xᵀ g; for a matrix w, one GEMM over the stacked rows (no [batch, p, q] temporary)."""
    if w.ndim == 2:
        return _mT(_rows(x)) @ _rows(g)
    return unbroadcast(_mT(x) @ g, w.shape)


_matmul = Primitive(  # operands of >= 2 dims; dualnet.matmul promotes 1-D operands
    "matmul", _matmul_value,
    jvp=(_matmul_jvp_left, _matmul_jvp_right),
    vjp=(lambda g, out, x, w: unbroadcast(_matmul_value(g, _mT(w)), x.shape), _matmul_vjp_right),
    value_and_jvp=_matmul_value_and_jvp)


def _einsum_parse(spec, *shapes):
    """Expand ``...`` and return (input index strings, output index string)."""
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


def _einsum_value(spec, x, y):
    return ns(x, y).einsum(spec, x, y)


def _einsum_jvp(slot):
    def rule(t, out, spec, x, y):
        (a, b), c, k = _einsum_parse(spec, x.shape, y.shape)
        ops = (t, y) if slot == 0 else (x, t)
        subs = (k + a, b) if slot == 0 else (a, k + b)
        return ns(t).einsum(f"{subs[0]},{subs[1]}->{k}{c}", *ops)
    return rule


def _einsum_vjp(slot):
    def rule(g, out, spec, x, y):
        (a, b), c, _ = _einsum_parse(spec, x.shape, y.shape)
        target, other, other_arg, arg = (a, b, y, x) if slot == 0 else (b, a, x, y)
        if len(set(target)) != len(target):
            raise NotImplementedError(f"einsum: reverse mode of repeated indices in {spec!r}")
        kept = "".join(i for i in target if i in c or i in other)
        grad = ns(g).einsum(f"{c},{other}->{kept}", g, other_arg)
        if kept != target:  # an index summed inside this operand alone: broadcast back over it
            grad = grad.reshape([arg.shape[target.index(i)] if i in kept else 1 for i in target])
        summed = tuple(i for i, (m, n) in enumerate(zip(grad.shape, arg.shape)) if n == 1 and m != 1)
        return ns(g).broadcast_to(grad.sum(axis=summed, keepdims=True) if summed else grad, arg.shape)
    return rule


einsum = Primitive("einsum", _einsum_value,
                   jvp=(None, _einsum_jvp(0), _einsum_jvp(1)),
                   vjp=(None, _einsum_vjp(0), _einsum_vjp(1)))

# ---------------------------------------------------------------------------------------
# shape manipulation (params are static)
# ---------------------------------------------------------------------------------------
def _to_out_shape(t, out, x, *args, **params):
    return t.reshape((t.shape[0],) + out.shape)


def _to_in_shape(g, out, x, *args, **params):
    return g.reshape(x.shape)


reshape = Primitive("reshape", lambda x, shape: x.reshape(shape),
                    jvp=(_to_out_shape, None), vjp=(_to_in_shape, None))
expand_dims = Primitive("expand_dims", lambda x, axis: ns(x).expand_dims(x, axis),
                        jvp=(_to_out_shape, None), vjp=(_to_in_shape, None))
squeeze = Primitive("squeeze", lambda x, axis=None: ns(x).squeeze(x, axis=axis),
                    jvp=(_to_out_shape,), vjp=(_to_in_shape,))


def _axes_or_reversed(axes, ndim):
    return tuple(range(ndim))[::-1] if axes is None else tuple(a % ndim for a in axes)


transpose = Primitive(
    "transpose", lambda x, axes=None: x.transpose(axes),
    jvp=(lambda t, out, x, axes=None: t.transpose((0,) + _k(_axes_or_reversed(axes, x.ndim))),),
    vjp=(lambda g, out, x, axes=None:  # the inverse permutation, as Python ints (CuPy takes a tuple)
         g.transpose(tuple(numpy.argsort(_axes_or_reversed(axes, x.ndim)).tolist())),))
broadcast_to = Primitive(
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
    module = ns(t)
    moved = module.moveaxis(t, 0, -1)[_index_with_k(index, x.ndim)]
    return module.moveaxis(moved, -1, 0)


def _getitem_vjp(g, out, x, index):
    grad = ns(g).zeros(x.shape, dtype=g.dtype)
    parts = index if isinstance(index, tuple) else (index,)
    if builtins.any(getattr(i, "dtype", bool) != bool or isinstance(i, list) for i in parts
                    if not isinstance(i, (int, slice)) and i is not None and i is not Ellipsis):
        return backend.scatter_add(grad, index, g)  # integer arrays may repeat an index
    grad[index] = g
    return grad


getitem = Primitive("getitem", lambda x, index: x[index],
                    jvp=(_getitem_jvp, None), vjp=(_getitem_vjp, None))


def _pieces_jvp(join):
    """Joint jvp of concatenate/stack: zero-fill symbolic zeros, broadcast K, join along axis+1."""
    def rule(tangents, out, *xs, axis=0):
        module = ns(out)
        k = builtins.max(t.shape[0] for t in tangents if t is not None)
        parts = [module.zeros((k,) + x.shape, out.dtype) if t is None else module.broadcast_to(t, (k,) + x.shape)
                 for t, x in zip(tangents, xs)]
        return join(module, parts, (axis % out.ndim) + 1)
    return rule


def _concatenate_vjp(g, out, *xs, axis=0):
    bounds = numpy.cumsum([x.shape[axis] for x in xs])[:-1]
    return ns(g).split(g, bounds, axis=axis)


def _stack_vjp(g, out, *xs, axis=0):
    module = ns(g)
    return [module.take(g, i, axis=axis) for i in range(len(xs))]


_concatenate = Primitive("concatenate", lambda *xs, axis=0: ns(*xs).concatenate(xs, axis=axis),
                         jvp=_pieces_jvp(lambda m, parts, axis: m.concatenate(parts, axis=axis)),
                         vjp=_concatenate_vjp)
_stack = Primitive("stack", lambda *xs, axis=0: ns(*xs).stack(xs, axis=axis),
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
    return ns(t).pad(t, ((0, 0),) + _pad_pairs(pad_width, x.ndim))


def _unpad(g, out, x, pad_width, constant=0.0):
    return g[tuple(slice(lo, lo + n) for (lo, _), n in zip(_pad_pairs(pad_width, x.ndim), x.shape))]


pad = Primitive("pad", _pad_value,  # constant padding: pad(x, pad_width, constant=0.0)
                jvp=(_pad_jvp, None), vjp=(_unpad, None))
stop_gradient = Primitive("stop_gradient", lambda x: x,
                          jvp=lambda tangents, out, x: None,
                          vjp=lambda g, out, x: (None,))



# ---------------------------------------------------------------------------------------
# public functions whose call signature differs from the primitive's
# ---------------------------------------------------------------------------------------
def matmul(x, y):
    """``x @ y`` with NumPy semantics: 1-D operands are promoted to matrices and squeezed back.

    Shapes: (..., n, p) @ (..., p, q) -> (..., n, q), batch dimensions broadcast.
    """
    if numpy.ndim(_value_of(x)) == 0 or numpy.ndim(_value_of(y)) == 0:
        raise ValueError(f"matmul: operands must have at least one dimension, got shapes "
                         f"{numpy.shape(_value_of(x))} and {numpy.shape(_value_of(y))}")
    vector_x, vector_y = numpy.ndim(_value_of(x)) == 1, numpy.ndim(_value_of(y)) == 1
    shape_x, shape_y = numpy.shape(_value_of(x)), numpy.shape(_value_of(y))
    if shape_x[-1] != shape_y[-2 if len(shape_y) > 1 else 0]:
        raise ValueError(f"matmul: inner dimensions differ, shapes {shape_x} and {shape_y}")
    out = _matmul(expand_dims(x, 0) if vector_x else x, expand_dims(y, -1) if vector_y else y)
    squeezed = (-2,) * vector_x + (-1,) * vector_y
    return squeeze(out, axis=squeezed) if squeezed else out


def concatenate(xs, axis=0):
    """Join a sequence of arrays/Duals along an existing axis."""
    return _concatenate(*xs, axis=axis)


def stack(xs, axis=0):
    """Join a sequence of equally shaped arrays/Duals along a new axis."""
    return _stack(*xs, axis=axis)


def _value_of(x):
    return x.value if isinstance(x, Dual) else x


TABLE = {p.name: p for p in (
    add, sub, mul, div, neg, power, exp, log, sqrt, tanh, sigmoid, relu, abs, maximum, minimum, where,
    clip, sum, mean, max, _matmul, einsum, reshape, transpose, broadcast_to, expand_dims, squeeze,
    getitem, _concatenate, _stack, pad, stop_gradient, logsumexp, softmax, log_softmax)}
"""Every primitive of the engine by name (fused ops register themselves here too)."""
