"""Fully-connected nets as in Bacho & Chu (FDFA): [Linear → (BatchNorm) → ReLU] × (layers−1) → Linear.

``layers`` counts the output layer (4 layers = 3 hidden + output).  Each hidden layer is a
block; with ``local_heads=True`` each block also gets a linear head [hidden → classes] for
local (greedy) losses.
"""
import numpy

from .. import primitives as P
from .layers import linear
from .model import Model
from .units import Running, declare_norm


class MLP(Model):
    name = "mlp"

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, hidden=800, layers=4, batch_norm=True,
                 local_heads=False, init="kaiming_uniform"):
        super().__init__()
        if layers < 2:
            raise ValueError(f"mlp: layers={layers} is invalid; it counts the output layer and must be >= 2")
        if hidden < 1:
            raise ValueError(f"mlp: hidden={hidden} must be a positive width")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.hidden_width, self.use_batch_norm = hidden, batch_norm
        self.num_blocks, self.has_local_heads = layers - 1, local_heads
        width = int(numpy.prod(input_shape))
        for k in range(self.num_blocks):
            layer = dict(block=k, module=f"blocks.{k}.linear")
            self.add_param(f"blocks.{k}.linear.weight", (width, hidden), width, init, role="weight", **layer)
            self.add_param(f"blocks.{k}.linear.bias", (hidden,), width, init, role="bias", **layer)
            if batch_norm:
                declare_norm(self, f"blocks.{k}", hidden, block=k)
            if local_heads:
                self.add_linear_head(f"blocks.{k}.head", hidden, num_classes, init, block=k)
            width = hidden
        self.add_linear_head("head", width, num_classes, init)

    def embed(self, x):
        return P.reshape(x, (x.shape[0], -1))

    def block(self, k, params, h, ctx):
        normalize, norm_names = None, ()
        if self.use_batch_norm:
            key = f"blocks.{k}.bn"
            normalize, norm_names = Running.of(ctx).normalizer(key), (f"{key}.gamma", f"{key}.beta")
        return self.hidden(ctx, k, "linear", linear, h, params,
                           [f"blocks.{k}.linear.weight", f"blocks.{k}.linear.bias"], normalize, norm_names)

    def pooled_features(self, h):
        return h

    def replica_grid(self, h):
        return P.reshape(h, (h.shape[0], 1, 1, -1))
