"""The small CNNs of the forward-gradient papers, one hidden layer per block.

* ``cnn-fdfa`` (Bacho & Chu): 15C5 → 40C5 → max-pool 2 → FC 128 → output, BatchNorm after
  every conv/FC layer, ReLU (convolutions unpadded, stride 1).
* ``cnn-baydin`` (Baydin et al.): four 3×3 convolutions of 64 channels (padding 1), a 2×2
  max-pool after the second and the fourth, FC 1024 → output, ReLU (BatchNorm optional).

Block k is hidden layer k: [conv or linear] → (BatchNorm) → ['pre'] → ReLU → ['post'] → (max-pool).
With ``local_heads=True`` every block also gets a linear head [features_k → classes] on its
flattened output for local (greedy) losses.  A CNN's replica grid is that one flattened vector
per example ([N, 1, 1, features]): its "replicated" local loss is the pooled one.
"""
import itertools

import numpy

from .. import primitives as P
from .conv import flatten, max_pool2d
from .model import Model
from .units import Unit

POOL = 2  # the 2×2 max-pools, stride 2


def check_image(model, input_shape):
    """``input_shape`` must be (channels, height, width) of positive ints."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"{model}: input_shape={tuple(input_shape)} must be (channels, height, width) "
                         f"of positive sizes")


class ConvNet(Model):
    """Conv layers ``convs`` = [(channels, kernel, padding)] (stride 1), a 2×2 max-pool after the
    conv layers whose indices are in ``pools``, linear layers of widths ``fc``, the read-out."""
    name = "cnn"

    def __init__(self, input_shape, num_classes, convs, pools, fc, batch_norm, local_heads, init):
        super().__init__()
        check_image(self.name, input_shape)
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.has_local_heads, self.pools, self.use_batch_norm = local_heads, frozenset(pools), batch_norm
        channels, self.units = self.input_shape[0], []
        for width, kernel, padding in convs:
            self.units.append(Unit(f"blocks.{len(self.units)}.conv", channels, width, kernel, padding=padding,
                                   norm=batch_norm))
            channels = width
        self.shapes = self._conv_shapes(*self.input_shape[1:])
        if self.shapes is None:
            smallest = next(s for s in itertools.count(1) if self._conv_shapes(s, s) is not None)
            raise ValueError(f"{self.name}: input_shape={self.input_shape} is too small for its convolutions and "
                             f"{POOL}x{POOL} max-pools; allowed: images of at least {smallest}x{smallest}")
        features = int(numpy.prod(self.shapes[-1]))
        for width in fc:
            self.units.append(Unit(f"blocks.{len(self.units)}.linear", features, width, norm=batch_norm))
            self.shapes.append((width,))
            features = width
        self.num_blocks = len(self.units)
        for k, unit in enumerate(self.units):
            unit.declare(self, init, block=k)
            if local_heads:
                self.add_linear_head(f"blocks.{k}.head", int(numpy.prod(self.shapes[k])), num_classes, init, block=k)
        self.add_linear_head("head", features, num_classes, init)

    def _conv_shapes(self, height, width):
        """[(C, H, W)] after each conv block (its pool included), or None where a map comes out empty.
        (Called while ``self.units`` holds the conv layers only.)"""
        shapes = []
        for k, unit in enumerate(self.units):
            height, width = unit.out_side(height), unit.out_side(width)
            if k in self.pools:
                height, width = height // POOL, width // POOL
            if min(height, width) < 1:
                return None
            shapes.append((unit.c_out, height, width))
        return shapes

    def embed(self, x):
        return x

    def block(self, k, params, h, ctx):
        h = self.units[k].hidden(self, ctx, k, h, params)
        return max_pool2d(h, POOL) if k in self.pools else h

    def pooled_features(self, h):
        return flatten(h)

    def replica_grid(self, h):
        return P.reshape(flatten(h), (h.shape[0], 1, 1, -1))


class FDFACNN(ConvNet):
    """Bacho & Chu's CNN: ``channels`` = (15, 40) 5×5 convs, a 2×2 max-pool, FC ``hidden`` = 128."""
    name = "cnn-fdfa"

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, channels=(15, 40), hidden=128, batch_norm=True,
                 local_heads=False, init="kaiming_uniform"):
        if numpy.shape(channels) != (2,) or min(channels) < 1 or hidden < 1:
            raise ValueError(f"cnn-fdfa: channels={channels!r} and hidden={hidden!r}; allowed: two positive conv "
                             f"widths (e.g. --model-opt channels=[15,40]) and a positive FC width")
        c1, c2 = channels
        super().__init__(input_shape, num_classes, [(c1, 5, 0), (c2, 5, 0)], {1}, [hidden], batch_norm,
                         local_heads, init)


class BaydinCNN(ConvNet):
    """Baydin et al.'s CNN: four 3×3 convs of ``channels`` = 64 (padding 1), 2×2 max-pools after the
    second and fourth, FC ``hidden`` = 1024."""
    name = "cnn-baydin"

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, channels=64, hidden=1024, batch_norm=False,
                 local_heads=False, init="kaiming_uniform"):
        if channels < 1 or hidden < 1:
            raise ValueError(f"cnn-baydin: channels={channels!r} and hidden={hidden!r} must be positive widths")
        super().__init__(input_shape, num_classes, [(channels, 3, 1)] * 4, {1, 3}, [hidden], batch_norm,
                         local_heads, init)
