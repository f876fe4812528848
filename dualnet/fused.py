"""Fused layer primitives of LocalMixer: local layer norm, grouped linear, and the two fused.

Math (normalisation is over the last axis, no affine parameters — Ren's "local" LN, per token,
or per token and group on a [..., G, c] tensor; σ = √(var + ε), biased variance):

* ``layer_norm(x, eps)``:  y = (x − mean x)/σ.  Its Jacobian J = (I − 11ᵀ/c − y yᵀ/c)/σ is
  symmetric, so the jvp ẏ = (ẋ − mean ẋ − y·mean(y ẋ))/σ and the vjp
  x̄ = (g − mean g − y·mean(y g))/σ are the same product, ``layer_norm_pullback``.
* ``grouped_linear(x, W, b)``:  x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] →
  z[..., g, :] = x[..., g, :] W[g] + b[g];  ż = ẋW + xẆ + ḃ;  x̄ = g Wᵀ, W̄[g] = Σ x_gᵀ g_g, b̄ = Σ g.
* ``grouped_linear_layer_norm(x, W, b)``:  LN(xW + b) — the GEMMs in BLAS/cuBLAS, then one
  epilogue pass (bias, layout, LN, value and K tangents); the grouped layers of LocalMixer run
  through it (``dualnet.nn.layers.normalized``).
* ``layer_norm_relu(x, residual)`` and ``grouped_linear_layer_norm_relu(x, W, b, residual)``: a
  hidden layer to its activation, a = relu(h + r) with h = LN(x) (or LN(xW + b)) and ȧ =
  (ḣ + u + ṙ)·[h + r > 0], where u is a tangent ``injected`` at h (FG-A's noise at the 'pre'
  site).  The norm, the injection, the residual add and the ReLU, for the value and all K
  tangents, take one epilogue pass; the reverse rule is ā → p̄ = ā·[a > 0] → (J p̄, p̄).

Every op is a primitive in ``dualnet.primitives.TABLE``, K-aware in forward mode, with exact
reverse rules.  The LN ops compute value and K tangents in one kernel call and declare σ
[..., 1] as a *residual* of their forward pass (``Primitive(residuals=True)``): the engine keeps
it with the tape node and hands it to the vjp, which therefore never recomputes the statistics,
and ``return_sigma=True`` returns it to the caller (for ``layer_norm_pullback``).

Kernel dispatch contract.  The memory-bound loops are four *contracts*, each with a NumPy/CuPy
reference here (``reference_<contract>``) and kernels of the same name, signature and results in
``dualnet.kernels.cpu.<module>`` (Numba) and ``dualnet.kernels.cuda.<module>`` (CuPy):

  ``layer_norm_forward(x, tangent, eps) -> (y, y_tangent, sigma)``              (module layer_norm)
  ``layer_norm_jacobian(normalized, sigma, vectors) -> J vectors``              (module layer_norm)
  ``normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions)
  -> (out, out_tangent, sigma)``                                        (module normalize_epilogue)
  ``normalize_relu(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps,
  directions) -> (normalized, activated, activated_tangent, sigma)``   (module normalize_epilogue)

``implementation(contract, array)`` asks ``backend.kernel`` (the one dispatcher) for the kernel
or the reference.  ``DUALNET_KERNELS=reference`` forces the references everywhere.  All arrays
given to a contract share one dtype.  ``backend.warm_up_kernels()`` compiles the CPU kernels
ahead of time.
"""
import numpy

from . import backend
from .dual import Dual, add_tangent, split, top_tag, value_of
from .primitives import TABLE, Primitive, relu

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


def reference_normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions):
    """The epilogue after grouped GEMMs: out = LN(value + bias) in the layer's layout, value and K tangents.

    value [G, M, c] (GEMM layout); tangent [G, K, M, c] or None; bias [G, c] or None;
    bias_tangent [K, G, c] or None; ``directions`` = K, 0 when nothing carries a tangent.
    Returns (out [M, G, c], out_tangent [K, M, G, c] or None, sigma [M, G, 1]) with
    out_tangent_k = J(tangent_k + bias_tangent_k).
    """
    xp = ns(value)
    pre_norm = value if bias is None else value + bias[:, None, :]
    y, _, sigma = reference_layer_norm_forward(pre_norm.transpose(1, 0, 2), None, eps)
    out = xp.ascontiguousarray(y)
    if not directions:
        return out, None, sigma
    linear = None if tangent is None else tangent.transpose(1, 2, 0, 3)
    if bias_tangent is not None:
        linear = bias_tangent[:, None] if linear is None else linear + bias_tangent[:, None]
    out_tangent = (xp.zeros((directions,) + y.shape, y.dtype) if linear is None
                   else reference_layer_norm_jacobian(y, sigma, linear))
    return out, xp.ascontiguousarray(out_tangent), sigma


def reference_normalize_relu(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps,
                             directions):
    """The epilogue on through a hidden layer's activation: h = LN(value + bias) and its tangent as in
    ``reference_normalize_epilogue``, then a = relu(h + residual) with the K tangents
    ȧ_k = (ḣ_k + injected_k + residual_tangent_k)·[h + residual > 0].

    The inputs of ``reference_normalize_epilogue``, and injected [K, M, G, c] (a tangent added to
    h's: FG-A's noise at the normalised pre-activation), residual [M, G, c] and its tangent
    residual_tangent [K, M, G, c], each may be None; ``directions`` = K, 0 when nothing carries a
    tangent.  Returns (normalized h [M, G, c], activated a [M, G, c], ȧ [K, M, G, c] or None,
    sigma [M, G, 1]).
    """
    normalized, tangent, sigma = reference_normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions)
    pre = normalized if residual is None else normalized + residual
    activated = ns(pre).maximum(pre, 0)
    if not directions:
        return normalized, activated, None, sigma
    if injected is not None:
        tangent = tangent + injected
    if residual_tangent is not None:
        tangent = tangent + residual_tangent
    return normalized, activated, tangent * (pre > 0), sigma


_CONTRACTS = {  # contract -> (kernel module, reference)
    "layer_norm_forward": ("layer_norm", reference_layer_norm_forward),
    "layer_norm_jacobian": ("layer_norm", reference_layer_norm_jacobian),
    "normalize_epilogue": ("normalize_epilogue", reference_normalize_epilogue),
    "normalize_relu": ("normalize_epilogue", reference_normalize_relu),
}


def implementation(contract, array):
    """The function that runs ``contract`` on arrays like ``array``: its kernel or its reference
    (``backend.kernel`` decides)."""
    module_name, reference = _CONTRACTS[contract]
    return backend.kernel(module_name, contract, reference, array)


# ---------------------------------------------------------------------------------------
# a primitive whose value, tangents and residuals come out of one call
# ---------------------------------------------------------------------------------------
def _fused(name, value_and_jvp, vjp):
    """A primitive defined by ``value_and_jvp(tangents, *args, **params) -> (out, out_tangent,
    residuals)`` (``tangents`` aligned with ``args``, ``None`` = symbolic zero, else a leading K
    axis; with all tangents ``None`` it returns ``(out, None, residuals)``) and a
    ``vjp(g, out, *args, residuals, **params)`` that reads the residuals kept on the tape.  Its
    rules run kernels, so it does not nest."""
    def value(*args, **params):
        out, _, residuals = value_and_jvp([None] * len(args), *args, **params)
        return out, residuals
    return Primitive(name, value, vjp=vjp, value_and_jvp=value_and_jvp, residuals=True)


def _num_directions(tangents):
    return next((t.shape[0] for t in tangents if t is not None), 0)


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


def _check_grouped(name, x, weight, bias):
    x_shape, w_shape = _shape(x), _shape(weight)
    if len(w_shape) != 3 or len(x_shape) < 2 or x_shape[-2:] != w_shape[:2]:
        raise ValueError(f"{name}: x {x_shape} must be [..., G, c_in] and W {w_shape} [G, c_in, c_out] "
                         f"with matching G and c_in")
    if bias is not None and _shape(bias) != (w_shape[0], w_shape[2]):
        raise ValueError(f"{name}: b has shape {_shape(bias)}; expected [G, c_out] = {(w_shape[0], w_shape[2])}")
    return grouped_output_shape(x, weight)


def grouped_output_shape(x, weight):
    """The shape of ``grouped_linear(x, W)``: x [..., G, c_in], W [G, c_in, c_out] -> [..., G, c_out]."""
    return _shape(x)[:-2] + (_shape(weight)[0], _shape(weight)[2])


def _common(*arrays):
    """Cast the non-None arrays to their common float dtype (kernels take one dtype)."""
    present = [a for a in arrays if a is not None]
    dtype = ns(*present).result_type(*present)
    return [None if a is None else a.astype(dtype, copy=False) for a in arrays]


# ---------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------
def _like(array, reference):
    return None if array is None else array.astype(reference.dtype, copy=False)


def _jacobian_times(normalized, sigma, g):
    """J g for one cotangent g at the LN output y = ``normalized`` with its residual σ (the vjp of every LN op)."""
    return implementation("layer_norm_jacobian", normalized)(normalized, sigma, _like(g, normalized)[None])[0]


def _layer_norm_value_and_jvp(tangents, x, eps=1e-5):
    return implementation("layer_norm_forward", x)(x, _like(tangents[0], x), eps)


def _layer_norm_vjp(g, out, x, eps=1e-5, *, residuals):
    return [_jacobian_times(out, residuals, g)]


_layer_norm = _fused("layer_norm", _layer_norm_value_and_jvp, vjp=_layer_norm_vjp)


def layer_norm(x, eps=1e-5, *, return_sigma=False):
    """Local layer norm over the last axis, no affine: y = (x − mean x)/σ, σ = √(var x + eps).

    x: array or Dual [..., c] (tangent [..., c] or [K, ..., c]).  Returns y of x's shape (a Dual
    for a Dual input), or ``(y, sigma)`` with ``return_sigma=True``: σ [..., 1], a plain array —
    the residual of this forward pass (the one the vjp reads from the tape), to reuse in
    ``layer_norm_pullback``; no derivative flows through it.
    """
    _check_normalized("layer_norm", _shape(x), eps)
    _check_floating("layer_norm", x=x)
    y, sigma = _layer_norm.apply(x, eps=float(eps))
    return (y, sigma) if return_sigma else y


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
# grouped linear -> LN: the GEMMs, then one epilogue pass
# ---------------------------------------------------------------------------------------
def _grouped_linear_layer_norm_value_and_jvp(tangents, x, weight, bias=None, eps=1e-5):
    x_tangent, weight_tangent, bias_tangent = tangents
    groups, width = weight.shape[0], weight.shape[2]
    lead = x.shape[:-2]
    x_major = _group_major(x)
    directions = _num_directions(tangents)
    arrays = _common(x_major @ weight, _grouped_tangent_raw(x_tangent, weight_tangent, x_major, weight), bias,
                     bias_tangent)
    out, out_tangent, sigma = implementation("normalize_epilogue", arrays[0])(*arrays, eps, directions)
    shape = lead + (groups, width)
    return (out.reshape(shape), None if out_tangent is None else out_tangent.reshape((directions,) + shape),
            sigma.reshape(lead + (groups, 1)))


def _grouped_linear_layer_norm_vjp(g, out, x, weight, bias=None, eps=1e-5, *, residuals):
    """z̄ = J(y, σ) g with y = out and σ the forward pass's residual, then the grouped linear's vjp."""
    return _grouped_linear_vjp(_jacobian_times(out, residuals, g), out, x, weight, bias)


_grouped_linear_layer_norm = _fused("grouped_linear_layer_norm", _grouped_linear_layer_norm_value_and_jvp,
                                    vjp=_grouped_linear_layer_norm_vjp)


def grouped_linear_layer_norm(x, weight, bias=None, *, eps=1e-5, return_sigma=False):
    """LN(grouped_linear(x, W, b)): a grouped linear layer and its local LN in one fused op.

    x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] or None (arrays or Duals, tangents of any
    subset with an optional leading K axis) -> y [..., G, c_out], normalised per (row, group):
    y = (z − mean z)/σ with z = xW + b, ẏ = J ż.  The GEMMs run in BLAS/cuBLAS; bias, layout
    change and LN run for the value and all K tangents in one epilogue kernel.  Reverse mode:
    ȳ → z̄ = J ȳ with the σ kept on the tape (no recomputation), then x̄, W̄, b̄ as in
    ``grouped_linear``.  ``return_sigma=True`` returns ``(y, sigma)`` with σ [..., G, 1], a plain
    array, for ``layer_norm_pullback``.
    """
    shape = _check_grouped("grouped_linear_layer_norm", x, weight, bias)
    _check_normalized("grouped_linear_layer_norm", shape, eps)
    _check_floating("grouped_linear_layer_norm", x=x, W=weight)
    y, sigma = _grouped_linear_layer_norm.apply(x, weight, bias, eps=float(eps))
    return (y, sigma) if return_sigma else y


# ---------------------------------------------------------------------------------------
# a hidden layer to its activation: [grouped linear ->] LN -> (+ injected tangent) -> (+ residual) -> ReLU
# ---------------------------------------------------------------------------------------
def _normalize_relu(value, tangent, bias, bias_tangent, residual, residual_tangent, injected, eps, directions,
                    shape):
    """``normalize_relu`` on the GEMM layout value [G, M, c] (tangent [G, K, M, c]); the other
    arrays in the layer's ``shape`` (lead + (G, c)).  Returns (a, ȧ or None, (h, σ [..., 1]))."""
    groups, rows, width = value.shape

    def grid(array, lead):
        return None if array is None else array.reshape(lead + (rows, groups, width))
    value, tangent, bias, bias_tangent, residual, residual_tangent = _common(
        value, tangent, bias, bias_tangent, grid(residual, ()), grid(residual_tangent, (directions,)))
    injected = _like(grid(injected, (directions,)), value)  # a tangent: it never changes the value's dtype
    h, a, a_tangent, sigma = implementation("normalize_relu", value)(
        value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps, directions)
    return (a.reshape(shape), None if a_tangent is None else a_tangent.reshape((directions,) + shape),
            (h.reshape(shape), sigma.reshape(shape[:-1] + (1,))))


def _layer_norm_relu_value_and_jvp(tangents, x, residual=None, eps=1e-5, injected=None):
    x_tangent, residual_tangent = tangents
    directions = _num_directions(list(tangents) + [injected])
    width = x.shape[-1]
    rows = x.size // width
    tangent = None if x_tangent is None else x_tangent.reshape(1, directions, rows, width)
    return _normalize_relu(x.reshape(1, rows, width), tangent, None, None, residual, residual_tangent, injected,
                           eps, directions, x.shape)


def _grouped_linear_layer_norm_relu_value_and_jvp(tangents, x, weight, bias=None, residual=None, eps=1e-5,
                                                  injected=None):
    x_tangent, weight_tangent, bias_tangent, residual_tangent = tangents
    x_major = _group_major(x)
    directions = _num_directions(list(tangents) + [injected])
    return _normalize_relu(x_major @ weight, _grouped_tangent_raw(x_tangent, weight_tangent, x_major, weight), bias,
                           bias_tangent, residual, residual_tangent, injected, eps, directions,
                           grouped_output_shape(x, weight))


def _relu_pullback(g, out, residuals):
    """(z̄, p̄) for a = relu(p), p = LN(z) + r: p̄ = g·[a > 0] and z̄ = J(h, σ) p̄."""
    normalized, sigma = residuals
    pre_bar = g * (out > 0)
    return _jacobian_times(normalized, sigma, pre_bar), pre_bar


def _layer_norm_relu_vjp(g, out, x, residual=None, eps=1e-5, injected=None, *, residuals):
    z_bar, pre_bar = _relu_pullback(g, out, residuals)
    return [z_bar, None if residual is None else pre_bar]


def _grouped_linear_layer_norm_relu_vjp(g, out, x, weight, bias=None, residual=None, eps=1e-5, injected=None, *,
                                        residuals):
    z_bar, pre_bar = _relu_pullback(g, out, residuals)
    return _grouped_linear_vjp(z_bar, out, x, weight, bias) + [None if residual is None else pre_bar]


_layer_norm_relu = _fused("layer_norm_relu", _layer_norm_relu_value_and_jvp, vjp=_layer_norm_relu_vjp)
_grouped_linear_layer_norm_relu = _fused("grouped_linear_layer_norm_relu",
                                         _grouped_linear_layer_norm_relu_value_and_jvp,
                                         vjp=_grouped_linear_layer_norm_relu_vjp)


def _activate(primitive, args, params, injected, unfused):
    """``(a, h, σ)`` from ``primitive`` with ``injected`` (a [K, ...] tangent, or None) added to h's
    tangent.  The injection rides in the fused pass when no input has a tangent and none is on a
    tape (the first perturbed layer), or when the inputs' tangents carry K directions of their own;
    any other case (a taped input without a tangent, a single-direction tangent, another K) runs
    ``unfused()``, the same function from separate primitives."""
    if injected is None:
        a, residuals = primitive.apply(*args, **params)
        return (a,) + residuals
    tag = top_tag(args)
    if tag is None:
        a, a_tangent, residuals = primitive.value_and_jvp([None] * len(args), *args, injected=injected, **params)
        return (Dual._make(a, a_tangent),) + residuals
    _, tangents, _, single = split(primitive.name, args, tag)
    directions = {t.shape[0] for t in tangents if t is not None}
    if not single and directions == {injected.shape[0]}:
        a, residuals = primitive.apply(*args, injected=injected, **params)
        return (a,) + residuals
    if not single and injected.shape[0] != 1 and 1 not in directions:
        raise ValueError(f"{primitive.name}: the inputs carry {directions.pop()} tangent directions and injected "
                         f"{injected.shape[0]}; give injected the same K (or K = 1)")
    return unfused()


def _unfused_activation(h, sigma, residual, injected):
    pre = add_tangent(h, injected)
    return relu(pre if residual is None else pre + residual), value_of(h), sigma


def layer_norm_relu(x, residual=None, *, injected=None, eps=1e-5):
    """A hidden layer's norm and activation in one fused op: a = relu(h + r), h = LN(x).

    x: array or Dual [..., c]; residual r: None or like x; ``injected``: None or an array
    [K, ..., c] added to h's tangent (FG-A's noise at the normalised pre-activation; the output
    then carries a tangent even when x has none).  Tangents: ȧ = (J ẋ + u + ṙ)·[h + r > 0].
    Returns ``(a, h, sigma)``: a of x's shape (a Dual when anything carries a tangent or a tape),
    h the normalised pre-activation and σ [..., 1], plain arrays (``layer_norm_pullback(h, σ, δ)``
    is the norm's exact reverse pass).  Reverse mode: ā → p̄ = ā·[a > 0] → x̄ = J p̄, r̄ = p̄.
    """
    shape = _shape(x)
    _check_normalized("layer_norm_relu", shape, eps)
    _check_floating("layer_norm_relu", x=x)
    _check_residual_and_injected("layer_norm_relu", residual, injected, shape)

    def unfused():
        return _unfused_activation(*layer_norm(x, eps, return_sigma=True), residual, injected)
    return _activate(_layer_norm_relu, (x, residual), dict(eps=float(eps)), injected, unfused)


def grouped_linear_layer_norm_relu(x, weight, bias=None, residual=None, *, injected=None, eps=1e-5):
    """``layer_norm_relu`` after a grouped linear layer, as one fused op: a = relu(h + r) with
    h = LN(grouped_linear(x, W, b)) (``grouped_linear_layer_norm``).

    x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] or None, residual None or [..., G, c_out]
    (arrays or Duals); ``injected`` None or [K, ..., G, c_out].  Returns ``(a, h, sigma)`` as
    ``layer_norm_relu`` does, σ [..., G, 1].  The GEMMs run in BLAS/cuBLAS, then one epilogue
    pass makes h, a and ȧ for the value and all K tangents.
    """
    shape = _check_grouped("grouped_linear_layer_norm_relu", x, weight, bias)
    _check_normalized("grouped_linear_layer_norm_relu", shape, eps)
    _check_floating("grouped_linear_layer_norm_relu", x=x, W=weight)
    _check_residual_and_injected("grouped_linear_layer_norm_relu", residual, injected, shape)

    def unfused():
        h, sigma = grouped_linear_layer_norm(x, weight, bias, eps=eps, return_sigma=True)
        return _unfused_activation(h, sigma, residual, injected)
    return _activate(_grouped_linear_layer_norm_relu, (x, weight, bias, residual), dict(eps=float(eps)),
                     injected, unfused)


def _check_residual_and_injected(name, residual, injected, shape):
    if residual is not None and _shape(residual) != shape:
        raise ValueError(f"{name}: residual has shape {_shape(residual)}; expected the layer's output shape {shape}")
    if injected is not None and (numpy.ndim(injected) != len(shape) + 1 or numpy.shape(injected)[1:] != shape):
        raise ValueError(f"{name}: injected has shape {numpy.shape(injected)}; expected (K,) + the layer's output "
                         f"shape {shape}")


TABLE.update({p.name: p for p in (_layer_norm, _grouped_linear, _grouped_linear_layer_norm, _layer_norm_relu,
                                  _grouped_linear_layer_norm_relu)})
