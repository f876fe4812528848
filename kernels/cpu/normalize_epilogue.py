"""The epilogue after the grouped GEMMs on the CPU (Numba): LN of each group, value and K tangents in one pass.

The GEMMs of a grouped linear layer stay in BLAS (``numpy.matmul`` over the group axis; measured
faster than a Numba GEMM for every LocalMixer size) and leave their result in the layout
``[G, M, c]``.  One kernel pass (``layer_norm._normalize``, the row kernel of every LN) then adds
the bias, moves to the layer's layout ``[M, G, c]`` and normalises each (row, group) slice
(local LN), for the value and all K tangents together.  ``normalize_relu`` goes on in the same
pass through a hidden layer's activation: the tangent injected after the norm (FG-A's noise), the
residual add and the ReLU, value and tangents.
"""
import numpy as np

from .layer_norm import run_normalize


def normalize_epilogue(value, tangent, bias, bias_tangent, eps, directions):
    """Numba ``dualnet.fused.reference_normalize_epilogue``.

    value [G, M, c]; tangent [G, K, M, c] or None; bias [G, c] or None; bias_tangent [K, G, c] or
    None; ``directions`` = K (0 when nothing carries a tangent).  Returns (out [M, G, c],
    out_tangent [K, M, G, c] or None, sigma [M, G, 1]) with out = LN(value + bias).
    """
    out, out_tangent, sigma, _ = run_normalize(value, tangent, bias, bias_tangent, eps, directions)
    return out, (out_tangent if directions else None), sigma[..., None]


def normalize_relu(value, tangent, bias, bias_tangent, injected, residual, residual_tangent, eps, directions):
    """Numba ``dualnet.fused.reference_normalize_relu``.

    The inputs of ``normalize_epilogue``, and injected [K, M, G, c], residual [M, G, c],
    residual_tangent [K, M, G, c] (each may be None).  Returns (normalized [M, G, c], activated
    [M, G, c], activated_tangent [K, M, G, c] or None, sigma [M, G, 1]).
    """
    out, out_tangent, sigma, activated = run_normalize(value, tangent, bias, bias_tangent, eps, directions,
                                                       injected, residual, residual_tangent, relu=True)
    return out, activated, (out_tangent if directions else None), sigma[..., None]


def warm_up(dtype):
    """Compile (or load from cache) the epilogue kernel for ``dtype``."""
    ones = np.ones((1, 2, 3), dtype)
    normalize_epilogue(ones, ones[:, None], None, None, 1e-5, 1)
    normalize_relu(ones, ones[:, None], None, None, ones.reshape(1, 2, 1, 3), ones.reshape(2, 1, 3), None, 1e-5, 1)
