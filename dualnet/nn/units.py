"""The layer unit the CNNs are built from: conv or linear → (BatchNorm) → activation.

One ``Unit`` describes a layer once; it declares the layer's parameters on a model, gives its
BatchNorm running statistics, and applies it either as a hidden layer (through ``Model.hidden``,
so the rules see a ``Point``) or directly (auxiliary heads).  Parameter names under the unit's
``prefix``: ``{prefix}.weight`` ([c_in, c_out] linear, [c_out, c_in, k, k] conv), ``{prefix}.bias``,
``{prefix}.bn.gamma`` / ``.beta``; the running statistics are ``state['{prefix}.bn']`` = (mean, var).
"""
from dataclasses import dataclass

from .. import primitives as P
from ..dual import value_of
from .conv import conv_layer, flatten, output_size
from .layers import batch_norm, linear, linear_map


def identity(a):
    return a


class Running:
    """BatchNorm running statistics for one pass: reads ``state``, writes updates to ``new_state``;
    ``over_ranks``: the pass's ``RankStatistics`` (a data-parallel shard's) or None."""

    def __init__(self, state, new_state, train, over_ranks=None):
        self.state, self.new_state, self.train, self.over_ranks = state, new_state, train, over_ranks

    @classmethod
    def of(cls, ctx):
        return cls(ctx.state, ctx.new_state, ctx.plan.train, ctx.over_ranks)

    def normalizer(self, key):
        """``normalize(z, gamma, beta)``: BatchNorm with the statistics ``state[key]``."""
        def normalize(z, gamma, beta):
            y, self.new_state[key] = batch_norm(z, gamma, beta, self.state[key], self.train,
                                                over_ranks=self.over_ranks)
            return y
        return normalize


def declare_norm(model, prefix, width, block, local_head=False):
    """A BatchNorm of ``width`` channels in block ``block`` (its local head's with ``local_head``):
    parameters ``{prefix}.bn.gamma`` (ones) and ``.beta`` (zeros), running statistics
    ``state['{prefix}.bn']``."""
    where = dict(block=block, role="norm", local_head=local_head, module=f"{prefix}.bn")
    model.add_param(f"{prefix}.bn.gamma", (width,), width, "ones", **where)
    model.add_param(f"{prefix}.bn.beta", (width,), width, "zeros", **where)
    model.add_running(f"{prefix}.bn", width, block=block, local_head=local_head)


@dataclass(frozen=True)
class Unit:
    """A conv (``kernel`` ≥ 1: kernel×kernel, ``stride``, zero ``padding``) or linear (``kernel`` = 0;
    it flattens its input) layer from ``c_in`` to ``c_out`` channels, with optional bias and BatchNorm."""
    prefix: str
    c_in: int
    c_out: int
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    bias: bool = True
    norm: bool = True

    @property
    def name(self):
        return self.prefix.rsplit(".", 1)[-1]

    @property
    def param_names(self):
        names = [f"{self.prefix}.weight"]
        return names + [f"{self.prefix}.bias"] if self.bias else names

    @property
    def norm_names(self):
        return (f"{self.prefix}.bn.gamma", f"{self.prefix}.bn.beta") if self.norm else ()

    @property
    def fn(self):
        return linear if self.kernel == 0 else conv_layer(self.kernel, self.stride, self.padding)

    def declare(self, model, init, block, local_head=False):
        """Declare the unit's parameters on ``model``, in block ``block`` (its local head's with
        ``local_head``)."""
        fan_in = self.c_in * max(self.kernel, 1) ** 2
        shape = (self.c_in, self.c_out) if self.kernel == 0 else (self.c_out, self.c_in, self.kernel, self.kernel)
        where = dict(block=block, local_head=local_head, module=self.prefix)
        model.add_param(f"{self.prefix}.weight", shape, fan_in, init, role="weight", **where)
        if self.bias:
            model.add_param(f"{self.prefix}.bias", (self.c_out,), fan_in, init, role="bias", **where)
        if self.norm:
            declare_norm(model, self.prefix, self.c_out, block=block, local_head=local_head)

    def out_side(self, side):
        """Spatial side length after this layer (< 1: the input is too small)."""
        return side if self.kernel == 0 else output_size(side, self.kernel, self.stride, self.padding)

    def _input(self, x):
        return flatten(x) if self.kernel == 0 and value_of(x).ndim > 2 else x

    def hidden(self, model, ctx, k, x, params, residual=None, activation=P.relu):
        """As hidden layer of block ``k`` (a ``Point``; 'pre' site after the BatchNorm)."""
        normalize = Running.of(ctx).normalizer(f"{self.prefix}.bn") if self.norm else None
        return model.hidden(ctx, k, self.name, self.fn, self._input(x), params, self.param_names, normalize,
                            self.norm_names, residual=residual, activation=activation)

    def apply(self, x, params, running, feedback=None, activation=P.relu):
        """Directly, without a ``Point`` (auxiliary heads); ``feedback`` {weight name: B} as in FA."""
        z = linear_map(self.fn, self._input(x), [params[name] for name in self.param_names],
                       (feedback or {}).get(self.param_names[0]))
        if self.norm:
            z = running.normalizer(f"{self.prefix}.bn")(z, *[params[name] for name in self.norm_names])
        return activation(z)
