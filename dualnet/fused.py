"""Fused layer primitives of LocalMixer: local layer norm and grouped linear.

Each is one primitive with exact value, jvp and vjp rules (NumPy/CuPy reference code written
against ``xp``), registered in ``dualnet.primitives.TABLE``.

* ``layer_norm(x, eps)``: y = (x − μ)/σ over the last axis, σ = √(var + ε) (biased variance),
  no affine parameters — Ren's "local" LN (per token; per token and group on [..., G, c]).
  jvp: ẏ = (ẋ − mean(ẋ) − y·mean(y·ẋ))/σ;  vjp: x̄ = (g − mean(g) − y·mean(y·g))/σ.
* ``grouped_linear(x, W, b)``: x [..., G, c_in], W [G, c_in, c_out], b [G, c_out] (or None)
  → z[..., g, :] = x[..., g, :] W[g] + b[g].  jvp: ż = ẋW + xẆ + ḃ (the K directions of ẋ are
  folded into the rows of one batched GEMM); vjp: x̄ = g Wᵀ, W̄[g] = Σ x_gᵀ g_g, b̄ = Σ g.
"""
from . import primitives as P
from .backend import namespace as ns
from .primitives import Primitive, lift


# ---------------------------------------------------------------------------------------
# layer norm over the last axis
# ---------------------------------------------------------------------------------------
def _sigma(x, eps):
    centred = x - x.mean(axis=-1, keepdims=True)
    return ns(x).sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)


def _layer_norm_value(x, eps=1e-5):
    return (x - x.mean(axis=-1, keepdims=True)) / _sigma(x, eps)


def layer_norm_pullback(y, sigma, g):
    """The exact LN Jacobian transpose: (g − mean(g) − y·mean(y·g))/σ.

    ``y`` [..., c] the normalised output, ``sigma`` [..., 1] its σ, ``g`` [..., c] or with a
    leading direction axis [K, ..., c].  The LN Jacobian is symmetric, so this is also its jvp.
    """
    return (g - g.mean(axis=-1, keepdims=True) - y * (y * g).mean(axis=-1, keepdims=True)) / sigma


layer_norm = Primitive(
    "layer_norm", _layer_norm_value,
    jvp=(lambda t, out, x, eps=1e-5: layer_norm_pullback(out, _sigma(x, eps), t),),
    vjp=(lambda g, out, x, eps=1e-5: layer_norm_pullback(out, _sigma(x, eps), g),))


# ---------------------------------------------------------------------------------------
# grouped linear
# ---------------------------------------------------------------------------------------
def _check_grouped(x, weight):
    if weight.ndim != 3 or x.ndim < 2 or x.shape[-2:] != weight.shape[:2]:
        raise ValueError(f"grouped_linear: x {tuple(x.shape)} must be [..., G, c_in] and W {tuple(weight.shape)} "
                         f"[G, c_in, c_out] with matching G and c_in")


def _grouped_matmul(x, weight):
    """x [..., G, c_in] @ W [G, c_in, c_out] -> [..., G, c_out] as one batched GEMM over G."""
    lead, (groups, c_in) = x.shape[:-2], x.shape[-2:]
    rows = x.reshape(-1, groups, c_in).transpose(1, 0, 2)           # [G, M, c_in]
    out = rows @ weight                                             # [G, M, c_out]
    return out.transpose(1, 0, 2).reshape(lead + (groups, weight.shape[-1]))


def _grouped_value(x, weight, bias=None):
    _check_grouped(x, weight)
    z = _grouped_matmul(x, weight)
    return z if bias is None else z + bias


def _jvp_weight(t, out, x, weight, bias=None):
    """x Ẇ for K directions: [..., G, c_in] with Ẇ [K, G, c_in, c_out] -> [K, ..., G, c_out]."""
    lead, (groups, c_in) = x.shape[:-2], x.shape[-2:]
    rows = x.reshape(-1, groups, c_in).transpose(1, 0, 2)           # [G, M, c_in]
    out_t = rows[None] @ t                                          # [K, G, M, c_out]
    return out_t.transpose(0, 2, 1, 3).reshape((t.shape[0],) + lead + (groups, t.shape[-1]))


def _vjp_weight(g, out, x, weight, bias=None):
    groups, c_in = x.shape[-2:]
    rows = x.reshape(-1, groups, c_in).transpose(1, 2, 0)           # [G, c_in, M]
    return rows @ g.reshape(-1, groups, g.shape[-1]).transpose(1, 0, 2)


grouped_linear = Primitive(
    "grouped_linear", _grouped_value,
    jvp=(lambda t, out, x, weight, bias=None: _grouped_matmul(t, weight),
         _jvp_weight,
         lambda t, out, x, weight, bias=None: ns(t).broadcast_to(lift(t, out.ndim), (t.shape[0],) + out.shape)),
    vjp=(lambda g, out, x, weight, bias=None: _grouped_matmul(g, weight.transpose(0, 2, 1)),
         _vjp_weight,
         lambda g, out, x, weight, bias=None: g.reshape(-1, *g.shape[-2:]).sum(axis=0)))

P.TABLE.update({"layer_norm": layer_norm, "grouped_linear": grouped_linear})
