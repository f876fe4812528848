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

Every op is a primitive in ``dualnet.primitives.TABLE``, K-aware in forward mode, with exact
reverse rules.  The LN ops compute value and K tangents in one kernel call and declare σ
[..., 1] as a *residual* of their forward pass (``Primitive(residuals=True)``): the engine keeps
it with the tape node and hands it to the vjp, which therefore never recomputes the statistics,
and ``return_sigma=True`` returns it to the caller (for ``layer_norm_pullback``).

Kernel dispatch contract.  The memory-bound loops are three *contracts*, each with a NumPy/CuPy
reference here (``reference_<contract>``) and kernels of the same name, signature and results in
``dualnet.kernels.cpu.<module>`` (Numba) and ``dualnet.kernels.cuda.<module>`` (CuPy):

  ``layer_norm_forward(x, tangent, eps) -> (y, y_tangent, sigma)``              (module layer_norm)
  ``layer_norm_jacobian(normalized, sigma, vectors) -> J vectors``              (module layer_norm)
  ``normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions)
  -> (out, out_tangent, sigma)``                                        (module normalize_epilogue)

``implementation(contract, array)`` asks ``backend.kernel`` (the one dispatcher) for the kernel
or the reference.  ``DUALNET_KERNELS=reference`` forces the references everywhere.  All arrays
given to a contract share one dtype.  ``backend.warm_up_kernels()`` compiles the CPU kernels
ahead of time.
"""
import numpy

from . import backend
from .dual import value_of
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


_CONTRACTS = {  # contract -> (kernel module, reference)
    "layer_norm_forward": ("layer_norm", reference_layer_norm_forward),
    "layer_norm_jacobian": ("layer_norm", reference_layer_norm_jacobian),
    "normalize_epilogue": ("normalize_epilogue", reference_normalize_epilogue),
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
    return x_shape[:-2] + (w_shape[0], w_shape[2])


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


def _layer_norm_value_and_jvp(tangents, x, eps=1e-5):
    return implementation("layer_norm_forward", x)(x, _like(tangents[0], x), eps)


def _layer_norm_vjp(g, out, x, eps=1e-5, *, residuals):
    return [implementation("layer_norm_jacobian", out)(out, residuals, _like(g, out)[None])[0]]


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
    z_bar = implementation("layer_norm_jacobian", out)(out, residuals, _like(g, out)[None])[0]
    return _grouped_linear_vjp(z_bar, out, x, weight, bias)


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


TABLE.update({p.name: p for p in (_layer_norm, _grouped_linear, _grouped_linear_layer_norm)})
