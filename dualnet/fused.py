"""Fused layer primitives of LocalMixer: local layer norm, grouped linear, and their epilogue.

Math (normalisation is over the last axis, no affine parameters — Ren's "local" LN, per token,
or per token and group on a [..., G, c] tensor; σ = √(var + ε), biased variance):

* ``layer_norm(x, eps)``:  y = (x − mean x)/σ.  Its Jacobian J = (I − 11ᵀ/c − y yᵀ/c)/σ is
  symmetric, so the jvp ẏ = (ẋ − mean ẋ − y·mean(y ẋ))/σ and the vjp
  x̄ = (g − mean g − y·mean(y g))/σ are the same product, ``layer_norm_pullback``.
* ``grouped_linear(x, W, b)``:  x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] →
  z[..., g, :] = x[..., g, :] W[g] + b[g];  ż = ẋW + xẆ + ḃ;  x̄ = g Wᵀ, W̄[g] = Σ x_gᵀ g_g, b̄ = Σ g.
* ``layer_norm_relu(x, shift)``:  relu(LN(x) + shift), the LN → (+ residual or perturbation) →
  ReLU step of every LocalMixer layer.
* ``grouped_linear_layer_norm(x, W, b, shift, relu)``:  relu?(LN(xW + b) + shift) — the GEMMs in
  BLAS/cuBLAS, then one epilogue pass (bias, layout, LN, shift, ReLU, value and K tangents).

Every op is a primitive in ``dualnet.primitives.TABLE``, K-aware in forward mode, with exact
reverse rules.  In pure forward mode (no argument on a reverse-mode tape) the value and the K
tangents of the LN ops come out of one kernel call (``FusedPrimitive``).

Kernel dispatch contract.  The memory-bound loops are three *contracts*, each with a NumPy/CuPy
reference here (``reference_<contract>``) and kernels of the same name, signature and results in
``dualnet.kernels.cpu.<module>`` (Numba) and ``dualnet.kernels.cuda.<module>`` (CuPy):

  ``layer_norm_forward(x, tangent, eps) -> (y, y_tangent, sigma)``              (module layer_norm)
  ``layer_norm_jacobian(normalized, sigma, vectors) -> J vectors``              (module layer_norm)
  ``normalize_epilogue(value, tangent, bias, bias_tangent, shift, shift_tangent, eps, relu,
  directions) -> (out, out_tangent, sigma)``                                    (module grouped_linear)

``implementation(contract, array)`` asks ``backend.kernel`` (the one dispatcher) for the kernel
or the reference.  ``DUALNET_KERNELS=reference`` forces the references everywhere.  All arrays
given to a contract share one dtype.  ``backend.warm_up_kernels()`` compiles the CPU kernels
ahead of time.
"""
import numpy

from . import backend
from .dual import Dual, bind, split, top_tag, value_of
from .primitives import TABLE, Primitive

ns = backend.namespace


# ---------------------------------------------------------------------------------------
# references of the kernel contracts (xp-neutral: NumPy or CuPy)
# ---------------------------------------------------------------------------------------
def reference_layer_norm_jacobian(normalized, sigma, vectors):
    """J v = (v − mean v − y·mean(y v))/σ for each of K vectors (J is symmetric: also Jᵀ v).

    normalized [..., c] (the LN output y), sigma [..., 1], vectors [K, ..., c] -> [K, ..., c].
    """
    mean = vectors.mean(axis=-1, keepdims=True)
    projection = (normalized * vectors).mean(axis=-1, keepdims=True)
    return (vectors - mean - normalized * projection) / sigma


def reference_layer_norm_forward(x, tangent, eps):
    """LN over the last axis and its jvp for K directions.

    x [..., c]; tangent [K, ..., c] or None.  Returns (y [..., c], y_tangent [K, ..., c] or
    None, sigma [..., 1]) with y = (x − mean x)/σ, σ = √(var x + eps).
    """
    centred = x - x.mean(axis=-1, keepdims=True)
    sigma = ns(x).sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    y = centred / sigma
    return y, (None if tangent is None else reference_layer_norm_jacobian(y, sigma, tangent)), sigma


def reference_normalize_epilogue(value, tangent, bias, bias_tangent, shift, shift_tangent, eps, relu, directions):
    """The epilogue after grouped GEMMs: out = relu?(LN(value + bias) + shift), value and K tangents.

    value [G, M, c] (GEMM layout); tangent [G, K, M, c] or None; bias [G, c] or None;
    bias_tangent [K, G, c] or None; shift [M, G, c] or None; shift_tangent [K, M, G, c] or None;
    ``directions`` = K, 0 when nothing carries a tangent.  Returns (out [M, G, c],
    out_tangent [K, M, G, c] or None, sigma [M, G, 1]).  Under ReLU the tangent is masked by
    pre > 0 with pre = LN(value + bias) + shift.
    """
    xp = ns(value)
    pre_norm = value if bias is None else value + bias[:, None, :]
    y, _, sigma = reference_layer_norm_forward(pre_norm.transpose(1, 0, 2), None, eps)
    pre = y if shift is None else y + shift
    out = xp.ascontiguousarray(xp.maximum(pre, 0) if relu else pre)
    if not directions:
        return out, None, sigma
    linear = None if tangent is None else tangent.transpose(1, 2, 0, 3)
    if bias_tangent is not None:
        linear = bias_tangent[:, None] if linear is None else linear + bias_tangent[:, None]
    out_tangent = (xp.zeros((directions,) + y.shape, y.dtype) if linear is None
                   else reference_layer_norm_jacobian(y, sigma, linear))
    if shift_tangent is not None:
        out_tangent = out_tangent + shift_tangent
    if relu:
        out_tangent = out_tangent * (pre > 0)
    return out, xp.ascontiguousarray(out_tangent), sigma


_CONTRACTS = {  # contract -> (kernel module, reference)
    "layer_norm_forward": ("layer_norm", reference_layer_norm_forward),
    "layer_norm_jacobian": ("layer_norm", reference_layer_norm_jacobian),
    "normalize_epilogue": ("grouped_linear", reference_normalize_epilogue),
}


def implementation(contract, array):
    """The function that runs ``contract`` on arrays like ``array``: its kernel or its reference
    (``backend.kernel`` decides)."""
    module_name, reference = _CONTRACTS[contract]
    return backend.kernel(module_name, contract, reference, array)


# ---------------------------------------------------------------------------------------
# a primitive whose value and tangents come out of one call
# ---------------------------------------------------------------------------------------
class FusedPrimitive(Primitive):
    """A primitive defined by ``value_and_jvp(tangents, *args, **params) -> (out, out_tangent)``.

    ``tangents`` is aligned with ``args`` (``None`` = symbolic zero, else a leading K axis);
    with all tangents ``None`` it must return ``(out, None)``.  In pure forward mode (no Dual
    argument on a reverse-mode tape, some tangent present) a call runs ``value_and_jvp`` once;
    otherwise it binds like any primitive, with ``value`` and — unless a cheaper ``jvp`` is
    given — a jvp that calls ``value_and_jvp`` again.
    """

    def __init__(self, name, value_and_jvp, vjp, jvp=None):
        super().__init__(name, lambda *args, **params: value_and_jvp([None] * len(args), *args, **params)[0],
                         jvp=jvp or (lambda tangents, out, *args, **params:
                                     value_and_jvp(tangents, *args, **params)[1]),
                         vjp=vjp)
        self.value_and_jvp = value_and_jvp

    def __call__(self, *args, **params):
        tag = top_tag(args)
        if tag is None:
            return bind(self, args, params)
        values, tangents, parents, single = split(self.name, args, tag)
        if (any(p is not None for p in parents) or all(t is None for t in tangents)
                or any(isinstance(v, Dual) for v in values + tangents)):
            return bind(self, args, params)  # taped, tangent-free or nested: the generic path
        out, out_tangent = self.value_and_jvp(tangents, *values, **params)
        if out_tangent is not None and single:
            out_tangent = out_tangent[0]
        return Dual._make(out, out_tangent, None, tag)


def _num_directions(tangents):
    return next((t.shape[0] for t in tangents if t is not None), 0)


class _Saved:
    """Statistics of a forward pass (σ, shape [..., 1]) handed to the rules through the params."""
    __slots__ = ("sigma",)

    def __init__(self):
        self.sigma = None


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------
def _shape(a):
    return tuple(numpy.shape(value_of(a)))


def _check_floating(name, **arrays):
    for label, a in arrays.items():
        dtype = numpy.asarray(a).dtype if numpy.isscalar(a) else value_of(a).dtype
        if not numpy.issubdtype(dtype, numpy.floating):
            raise TypeError(f"{name}: {label} must be real floating point, got dtype {dtype}")


def _check_normalized(name, shape, eps):
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"{name}: the last axis to normalise over must be non-empty, got shape {shape}")
    if not eps >= 0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")


def _check_shift(name, shift, shape):
    if shift is not None and _shape(shift) != tuple(shape):
        raise ValueError(f"{name}: shift has shape {_shape(shift)}; it must have the output shape {tuple(shape)}")


def _check_grouped(name, x, weight, bias):
    x_shape, w_shape = _shape(x), _shape(weight)
    if len(w_shape) != 3 or len(x_shape) < 2 or x_shape[-2:] != w_shape[:2]:
        raise ValueError(f"{name}: x {x_shape} must be [..., G, c_in] and W {w_shape} [G, c_in, c_out] "
                         f"with matching G and c_in")
    if bias is not None and _shape(bias) != (w_shape[0], w_shape[2]):
        raise ValueError(f"{name}: b has shape {_shape(bias)}; expected [G, c_out] = {(w_shape[0], w_shape[2])}")
    return x_shape[:-2] + (w_shape[0], w_shape[2])


def _common(*arrays):
    """Cast the non-None arrays to their common float dtype (kernels take one dtype)."""
    present = [a for a in arrays if a is not None]
    dtype = ns(*present).result_type(*present)
    return [None if a is None else a.astype(dtype, copy=False) for a in arrays]


# ---------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------
def _sigma(x, eps, saved):
    """σ of the forward pass when it was saved, else recomputed from x."""
    if saved is not None and saved.sigma is not None:
        return saved.sigma
    return ns(x).sqrt(x.var(axis=-1, keepdims=True) + eps)


def _layer_norm_value_and_jvp(tangents, x, eps=1e-5, saved=None):
    y, y_tangent, sigma = implementation("layer_norm_forward", x)(x, _like(tangents[0], x), eps)
    if saved is not None:
        saved.sigma = sigma
    return y, y_tangent


def _like(array, reference):
    return None if array is None else array.astype(reference.dtype, copy=False)


def _layer_norm_jvp(tangents, out, x, eps=1e-5, saved=None):
    return implementation("layer_norm_jacobian", out)(out, _sigma(x, eps, saved), _like(tangents[0], out))


def _layer_norm_vjp(g, out, x, eps=1e-5, saved=None):
    return [implementation("layer_norm_jacobian", out)(out, _sigma(x, eps, saved), _like(g, out)[None])[0]]


_layer_norm = FusedPrimitive("layer_norm", _layer_norm_value_and_jvp, vjp=_layer_norm_vjp, jvp=_layer_norm_jvp)


def layer_norm(x, eps=1e-5, *, return_sigma=False):
    """Local layer norm over the last axis, no affine: y = (x − mean x)/σ, σ = √(var x + eps).

    x: array or Dual [..., c] (tangent [..., c] or [K, ..., c]).  Returns y of x's shape (a Dual
    for a Dual input), or ``(y, sigma)`` with ``return_sigma=True``: σ [..., 1], a plain array,
    the statistic of this forward pass, to reuse in ``layer_norm_pullback``.
    """
    _check_normalized("layer_norm", _shape(x), eps)
    _check_floating("layer_norm", x=x)
    saved = _Saved()
    y = _layer_norm(x, eps=float(eps), saved=saved)
    return (y, saved.sigma) if return_sigma else y


def layer_norm_pullback(normalized, sigma, cotangent):
    """The exact LN Jacobian transpose: x̄ = (g − mean g − y·mean(y g))/σ over the last axis.

    normalized: the LN output y [..., c]; sigma: its σ [..., 1] (``layer_norm(...,
    return_sigma=True)``); cotangent g: [..., c] or [K, ..., c] (K estimates at once, e.g. FG-A's
    activity-gradient guesses at the normalised output).  Returns an array of g's shape.  The
    Jacobian is symmetric, so this is also the jvp of ``layer_norm``.
    """
    y_shape, sigma_shape, g_shape = numpy.shape(normalized), numpy.shape(sigma), numpy.shape(cotangent)
    if len(y_shape) < 1 or sigma_shape != y_shape[:-1] + (1,):
        raise ValueError(f"layer_norm_pullback: sigma has shape {sigma_shape}; expected {y_shape[:-1] + (1,)} "
                         f"for normalized {y_shape}")
    if g_shape != y_shape and g_shape[1:] != y_shape:
        raise ValueError(f"layer_norm_pullback: cotangent shape {g_shape} must be {y_shape} or (K,) + {y_shape}")
    normalized, sigma, cotangent = _common(normalized, sigma, cotangent)
    single = g_shape == y_shape
    vectors = cotangent[None] if single else cotangent
    out = implementation("layer_norm_jacobian", normalized)(normalized, sigma, vectors)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------
# grouped linear: GEMMs over the group axis in the layout [G, M, c]
# ---------------------------------------------------------------------------------------
def _group_major(x):
    """[..., G, c] -> a [G, M, c] view (M = product of the leading dims) for batched GEMMs."""
    groups, width = x.shape[-2:]
    return x.reshape(-1, groups, width).transpose(1, 0, 2)


def _ungroup(raw, bias=None):
    """[G, ..., M, c] (GEMM layout) -> contiguous [..., M, G, c], plus ``bias`` in the same pass."""
    xp = ns(raw)
    moved = xp.moveaxis(raw, 0, -2)
    if bias is None:
        return xp.ascontiguousarray(moved)
    out = xp.empty(moved.shape, xp.result_type(moved, bias))
    xp.add(moved, bias, out=out)
    return out


def _grouped_tangent_raw(x_tangent, weight_tangent, x_major, weight):
    """ẋW + xẆ in the GEMM layout [G, K, M, c_out] (None when both tangents are zero).

    The K directions of ẋ are folded into the rows of one batched GEMM; stacking the value rows
    in too was measured slower on the CPU (the concatenation costs more than the call saves).
    """
    groups, rows = x_major.shape[:2]
    raw = None
    if x_tangent is not None:
        directions = x_tangent.shape[0]
        raw = (_group_major(x_tangent) @ weight).reshape(groups, directions, rows, weight.shape[-1])
    if weight_tangent is not None:
        part = x_major[:, None] @ weight_tangent.transpose(1, 0, 2, 3)
        if raw is None:
            raw = part
        else:
            raw += part
    return raw


def _grouped_linear_value(x, weight, bias=None):
    out = _ungroup(_group_major(x) @ weight, bias)
    return out.reshape(x.shape[:-2] + out.shape[-2:])


def _grouped_linear_jvp(tangents, out, x, weight, bias=None):
    x_tangent, weight_tangent, bias_tangent = tangents
    raw = _grouped_tangent_raw(x_tangent, weight_tangent, _group_major(x), weight)
    directions = _num_directions(tangents)
    if raw is None:  # only the bias moves
        lifted = bias_tangent.reshape((directions,) + (1,) * (out.ndim - 2) + out.shape[-2:])
        return ns(out).broadcast_to(lifted, (directions,) + out.shape).copy()
    tangent = _ungroup(raw, None if bias_tangent is None else bias_tangent[:, None])
    return tangent.reshape((directions,) + out.shape)


def _grouped_linear_vjp(g, out, x, weight, bias=None):
    g_major = _group_major(g)
    x_bar = _ungroup(g_major @ weight.transpose(0, 2, 1)).reshape(x.shape)
    weight_bar = _group_major(x).transpose(0, 2, 1) @ g_major
    return [x_bar, weight_bar, None if bias is None else g_major.sum(axis=1)]


_grouped_linear = Primitive("grouped_linear", _grouped_linear_value,
                            jvp=_grouped_linear_jvp, vjp=_grouped_linear_vjp)


def grouped_linear(x, weight, bias=None):
    """Grouped linear: z[..., g, :] = x[..., g, :] @ W[g] + b[g].

    x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] or None (arrays or Duals; tangents of any
    subset, each with an optional leading K axis) -> z [..., G, c_out].  The GEMMs are batched
    over G (BLAS/cuBLAS); K tangent directions of x share one GEMM.
    """
    _check_grouped("grouped_linear", x, weight, bias)
    _check_floating("grouped_linear", x=x, W=weight)
    return _grouped_linear(x, weight, bias)


# ---------------------------------------------------------------------------------------
# LN -> (+ shift) -> ReLU epilogues
# ---------------------------------------------------------------------------------------
def _epilogue(raw, raw_tangent, bias, bias_tangent, shift, shift_tangent, eps, relu, directions):
    """Dispatch ``normalize_epilogue`` with every present array in one dtype."""
    arrays = _common(raw, raw_tangent, bias, bias_tangent, shift, shift_tangent)
    return implementation("normalize_epilogue", arrays[0])(*arrays, eps, relu, directions)


def _grouped_linear_layer_norm_value_and_jvp(tangents, x, weight, bias=None, shift=None, relu=False, eps=1e-5,
                                             saved=None):
    x_tangent, weight_tangent, bias_tangent, shift_tangent = tangents
    groups, width = weight.shape[0], weight.shape[2]
    lead = x.shape[:-2]
    x_major = _group_major(x)
    raw = x_major @ weight
    rows = raw.shape[1]
    directions = _num_directions(tangents)
    out, out_tangent, sigma = _epilogue(
        raw, _grouped_tangent_raw(x_tangent, weight_tangent, x_major, weight), bias, bias_tangent,
        None if shift is None else shift.reshape(rows, groups, width),
        None if shift_tangent is None else shift_tangent.reshape(directions, rows, groups, width),
        eps, relu, directions)
    if saved is not None:
        saved.sigma = sigma.reshape(lead + (groups, 1))
    shape = lead + (groups, width)
    return out.reshape(shape), (None if out_tangent is None else out_tangent.reshape((directions,) + shape))


def _grouped_linear_layer_norm_vjp(g, out, x, weight, bias=None, shift=None, relu=False, eps=1e-5, saved=None):
    """Reverse mode recomputes z = xW + b and its LN (the tape keeps only inputs and output)."""
    z = _grouped_linear_value(x, weight, bias)
    y, _, sigma = implementation("layer_norm_forward", z)(z, None, eps)
    g = _like(g, out)
    g_pre = g * (out > 0) if relu else g
    z_bar = implementation("layer_norm_jacobian", y)(y, sigma, g_pre[None])[0]
    return _grouped_linear_vjp(z_bar, z, x, weight, bias) + [None if shift is None else g_pre]


_grouped_linear_layer_norm = FusedPrimitive("grouped_linear_layer_norm", _grouped_linear_layer_norm_value_and_jvp,
                                            vjp=_grouped_linear_layer_norm_vjp)


def grouped_linear_layer_norm(x, weight, bias=None, shift=None, *, relu=False, eps=1e-5, return_sigma=False):
    """relu?(LN(grouped_linear(x, W, b)) + shift): a LocalMixer layer in one fused op.

    x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] or None, shift [..., G, c_out] or None
    (the residual, or an activity perturbation as a Dual with zero value); LN is local to each
    (row, group).  The GEMMs run in BLAS/cuBLAS; bias, layout change, LN, shift and ReLU run for
    the value and all K tangents in one epilogue kernel.  With ``relu=False`` and no shift the
    output is the normalised y itself (FG-A injects its perturbation there); ``return_sigma=True``
    returns ``(out, sigma)`` with σ [..., G, 1] for ``layer_norm_pullback``.
    """
    shape = _check_grouped("grouped_linear_layer_norm", x, weight, bias)
    _check_normalized("grouped_linear_layer_norm", shape, eps)
    _check_floating("grouped_linear_layer_norm", x=x, W=weight)
    _check_shift("grouped_linear_layer_norm", shift, shape)
    saved = _Saved()
    out = _grouped_linear_layer_norm(x, weight, bias, shift, relu=bool(relu), eps=float(eps), saved=saved)
    return (out, saved.sigma) if return_sigma else out


def _layer_norm_relu_value_and_jvp(tangents, x, shift=None, eps=1e-5):
    x_tangent, shift_tangent = tangents
    width = x.shape[-1]
    rows = x.size // width
    directions = _num_directions(tangents)
    out, out_tangent, _ = _epilogue(
        x.reshape(1, rows, width),
        None if x_tangent is None else x_tangent.reshape(1, directions, rows, width), None, None,
        None if shift is None else shift.reshape(rows, 1, width),
        None if shift_tangent is None else shift_tangent.reshape(directions, rows, 1, width),
        eps, True, directions)
    return out.reshape(x.shape), (None if out_tangent is None else out_tangent.reshape((directions,) + x.shape))


def _layer_norm_relu_vjp(g, out, x, shift=None, eps=1e-5):
    y, _, sigma = implementation("layer_norm_forward", x)(x, None, eps)
    g_pre = _like(g, out) * (out > 0)
    x_bar = implementation("layer_norm_jacobian", y)(y, sigma, g_pre[None])[0]
    return [x_bar, None if shift is None else g_pre]


_layer_norm_relu = FusedPrimitive("layer_norm_relu", _layer_norm_relu_value_and_jvp, vjp=_layer_norm_relu_vjp)


def layer_norm_relu(x, shift=None, eps=1e-5):
    """relu(LN(x) + shift): local LN over the last axis, an optional shift, ReLU — one pass.

    x [..., c], shift [..., c] or None (a residual, or a perturbation carried as a Dual's
    tangent).  Value and K tangents come out of one kernel: ẏ = 1[pre > 0]·(J ẋ + ṡ) with
    pre = LN(x) + shift.
    """
    _check_normalized("layer_norm_relu", _shape(x), eps)
    _check_floating("layer_norm_relu", x=x)
    _check_shift("layer_norm_relu", shift, _shape(x))
    return _layer_norm_relu(x, shift, eps=float(eps))


TABLE.update({p.name: p for p in (_layer_norm, _grouped_linear, _layer_norm_relu, _grouped_linear_layer_norm)})
