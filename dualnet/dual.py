"""The dual-number tensor and the one function that evaluates a primitive on it.

A ``Dual`` carries a primal ``value`` and a ``tangent``:

* ``None`` — a *symbolic zero*: no array exists and no tangent work is done for it;
* an array of ``value.shape`` — one direction;
* an array of ``(K,) + value.shape`` — K directions pushed through the same primal pass.

``bind(primitive, args, params)`` is forward mode in one place: it computes the value, asks
the primitive's jvp rule for the output tangent (rules always see tangents with a leading
direction axis, so every rule is written once, K-aware), and, when some input is being
recorded for reverse mode, appends a node to the tape.
"""
import numpy

from . import backend


class Node:
    """One recorded application for reverse mode: ``out = primitive(*args, **params)``."""
    __slots__ = ("primitive", "parents", "args", "params", "out")

    def __init__(self, primitive, parents, args, params, out):
        self.primitive, self.parents, self.args, self.params, self.out = (
            primitive, parents, args, params, out)


def _check_float(dtype, what):
    if not numpy.issubdtype(dtype, numpy.floating):
        raise TypeError(f"Dual: {what} must be real floating point, got dtype {dtype}")


class Dual:
    """``Dual(value, tangent=None)``: a value and its directional derivative(s).

    ``value`` is converted to an array (float32 by default; float64 and other float dtypes are
    kept).  ``tangent`` is ``None`` (symbolic zero), an array of ``value.shape``, or of
    ``(K,) + value.shape`` for K directions.  Integer or complex tangents raise ``TypeError``;
    a tangent of another shape raises ``ValueError``.
    """
    __slots__ = ("value", "tangent", "node")
    __array_ufunc__ = None  # make `ndarray (op) Dual` defer to Dual's reflected operators

    def __init__(self, value, tangent=None):
        value = _as_float_array(value)
        if tangent is not None:
            module = backend.namespace(value)
            tangent = module.asarray(tangent)
            _check_float(tangent.dtype, "tangent")
            if tangent.shape != value.shape and tangent.shape[1:] != value.shape:
                raise ValueError(
                    f"Dual: tangent shape {tangent.shape} must be the value shape {value.shape} "
                    f"or (K,) + {value.shape} for K directions")
            if tangent.ndim == value.ndim + 1 and tangent.shape[0] == 0:
                raise ValueError(f"Dual: the direction axis K must be >= 1, got tangent shape {tangent.shape}")
            tangent = tangent.astype(value.dtype, copy=False)
        self.value, self.tangent, self.node = value, tangent, None

    @classmethod
    def _make(cls, value, tangent, node=None):
        self = object.__new__(cls)
        self.value, self.tangent, self.node = value, tangent, node
        return self

    # --- shape information -------------------------------------------------------------
    shape = property(lambda self: self.value.shape)
    ndim = property(lambda self: self.value.ndim)
    dtype = property(lambda self: self.value.dtype)
    size = property(lambda self: self.value.size)

    @property
    def num_directions(self):
        """K when the tangent has a leading direction axis, else ``None``."""
        t = self.tangent
        return t.shape[0] if t is not None and t.ndim == self.value.ndim + 1 else None

    def __len__(self):
        return len(self.value)

    def __repr__(self):
        tangent = "zero" if self.tangent is None else f"array{self.tangent.shape}"
        return f"Dual(value={self.value!r}, tangent={tangent})"

    # --- operators dispatch to the primitive table ---------------------------------------
    def __add__(self, other): return P.add(self, other)
    def __radd__(self, other): return P.add(other, self)
    def __sub__(self, other): return P.sub(self, other)
    def __rsub__(self, other): return P.sub(other, self)
    def __mul__(self, other): return P.mul(self, other)
    def __rmul__(self, other): return P.mul(other, self)
    def __truediv__(self, other): return P.div(self, other)
    def __rtruediv__(self, other): return P.div(other, self)
    def __matmul__(self, other): return P.matmul(self, other)
    def __rmatmul__(self, other): return P.matmul(other, self)
    def __pow__(self, exponent): return P.power(self, exponent)
    def __neg__(self): return P.neg(self)
    def __pos__(self): return self
    def __getitem__(self, index): return P.getitem(self, index)

    def __lt__(self, other): return self.value < _value(other)
    def __le__(self, other): return self.value <= _value(other)
    def __gt__(self, other): return self.value > _value(other)
    def __ge__(self, other): return self.value >= _value(other)
    def __eq__(self, other): return self.value == _value(other)
    def __ne__(self, other): return self.value != _value(other)
    __hash__ = object.__hash__

    def reshape(self, *shape):
        return P.reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def transpose(self, *axes):
        return P.transpose(self, axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else (axes or None))

    T = property(lambda self: P.transpose(self))
    def sum(self, axis=None, keepdims=False): return P.sum(self, axis=axis, keepdims=keepdims)
    def mean(self, axis=None, keepdims=False): return P.mean(self, axis=axis, keepdims=keepdims)
    def max(self, axis=None, keepdims=False): return P.max(self, axis=axis, keepdims=keepdims)


def _value(x):
    return x.value if isinstance(x, Dual) else x


def _as_float_array(value):
    if isinstance(value, Dual):
        raise TypeError("Dual: the value of a Dual cannot itself be a Dual")
    given_array = backend.is_array(value)
    typed = given_array or isinstance(value, numpy.generic)  # a NumPy scalar keeps its dtype
    array = value if given_array else numpy.asarray(value)
    kind = array.dtype.kind
    if kind in "biu" or (kind == "f" and not typed):
        array = array.astype(backend.DEFAULT_DTYPE)  # Python numbers, lists and integers: float32
    elif kind != "f":
        raise TypeError(f"Dual: value must be real floating point, got dtype {array.dtype}")
    return array if given_array else backend.xp.asarray(array)


def _array(out):
    """Full reductions return NumPy scalars; keep every value an array."""
    return numpy.asarray(out) if isinstance(out, numpy.generic) else out


def _value_and_tangent(primitive, values, tangents, params):
    """The value and the (K,)-leading output tangent (or None) of one application."""
    joint = primitive.value_and_jvp(tangents, *values, **params) if primitive.value_and_jvp else None
    if joint is not None:
        out, out_tangent = joint
    else:
        out = _array(primitive.value(*values, **params))
        out_tangent = primitive.jvp(tangents, out, values, params)
    if out_tangent is not None:
        if out_tangent.shape[1:] != out.shape:
            raise ValueError(
                f"{primitive.name}: jvp produced tangent shape {out_tangent.shape} for value shape "
                f"{out.shape}; expected (K,) + {out.shape}")
        if out_tangent.dtype != out.dtype and out.dtype.kind == "f":  # e.g. float32 tangent, float64 value
            out_tangent = out_tangent.astype(out.dtype)
    return out, out_tangent


def bind(primitive, args, params):
    """Apply ``primitive`` to ``args`` (Duals, arrays or Python scalars) in forward mode.

    Returns a plain array when no argument is a Dual, else a Dual whose tangent is the jvp of
    the inputs' tangents (``None`` when all are symbolic zeros) and whose node records the
    application when any input is on a reverse-mode tape.
    """
    values, tangents, parents = [], [], []
    directions, any_dual, any_node = set(), False, False
    for a in args:
        if isinstance(a, Dual):
            any_dual = True
            values.append(a.value)
            parents.append(a.node)
            any_node = any_node or a.node is not None
            t = a.tangent
            if t is not None:
                if t.ndim == a.value.ndim:
                    t = t[None]
                else:
                    directions.add(t.shape[0])
            tangents.append(t)
        else:
            values.append(a)
            tangents.append(None)
            parents.append(None)
    if len(directions) > 1:
        raise ValueError(f"{primitive.name}: inputs carry different numbers of directions K: {sorted(directions)}")
    if not any_dual:
        return _array(primitive.value(*values, **params))
    if any(t is not None for t in tangents):
        out, out_tangent = _value_and_tangent(primitive, values, tangents, params)
        if out_tangent is not None and not directions:
            out_tangent = out_tangent[0]  # single-direction inputs give a single-direction output
    else:
        out, out_tangent = _array(primitive.value(*values, **params)), None
    node = Node(primitive, parents, values, params, out) if any_node else None
    return Dual._make(out, out_tangent, node)


from . import primitives as P  # noqa: E402  (operators above dispatch to the table)
