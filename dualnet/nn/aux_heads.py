"""Fournier et al.'s auxiliary classifiers (appendix A.2): the local head of a ResNet block.

On a block output h [N, C, H, W]:

* ``linear``: BatchNorm → adaptive avg pool 2×2 → flatten → linear [4C → classes];
* ``mlp``:    adaptive avg pool 2×2 → flatten → [FC d → BatchNorm → ReLU] × depth → linear [d → classes];
* ``cnn``:    1×1 conv [C → c] → ReLU → [3×3 conv, stride 2, padding 1 → ReLU] × depth →
  adaptive avg pool 2×2 → flatten → linear [4c → classes].

The paper picks d = 1024 and c = 32 for the standard width (64 base channels); its extracted
text lost the depth it kept, so ``depth`` is an option.  Parameters live under
``blocks.{k}.head.`` (the final projection is ``blocks.{k}.head.weight`` / ``.bias``), the
BatchNorm running statistics under the matching ``blocks.{k}.head.….bn`` state keys.
"""
from .conv import adaptive_avg_pool2d, flatten
from .units import Unit, declare_norm, identity

KINDS = ("linear", "mlp", "cnn")
POOL = 2  # the adaptive average pool's output grid, POOL × POOL


class AuxHead:
    """The ``kind`` aux net of a block with ``channels`` output channels; ``prefix`` = 'blocks.{k}.head'."""

    def __init__(self, kind, prefix, channels, num_classes, width, depth):
        self.kind, self.prefix, self.channels = kind, prefix, channels
        self.convs, self.fcs = [], []
        if kind == "cnn":
            self.convs = [Unit(f"{prefix}.conv0", channels, width, 1, norm=False)] + [
                Unit(f"{prefix}.conv{i}", width, width, 3, stride=2, padding=1, norm=False)
                for i in range(1, depth + 1)]
            channels = width
        features = channels * POOL * POOL
        if kind == "mlp":
            for i in range(depth):
                self.fcs.append(Unit(f"{prefix}.fc{i}", features, width, bias=False))
                features = width
        self.out = Unit(prefix, features, num_classes, norm=False)

    @property
    def has_norm(self):
        return self.kind in ("linear", "mlp")

    def declare(self, model, init, block):
        """Declare the net's parameters on ``model`` as block ``block``'s local head."""
        if self.kind == "linear":
            declare_norm(model, self.prefix, self.channels, block=block, local_head=True)
        for unit in self.convs + self.fcs + [self.out]:
            unit.declare(model, init, block=block, local_head=True)

    def __call__(self, params, h, running, feedback=None):
        """Logits [N, classes] of the block output ``h``; ``running``: the BatchNorm statistics
        (``units.Running``); ``feedback``: FA's {weight name: B}."""
        if self.kind == "linear":
            gamma, beta = params[f"{self.prefix}.bn.gamma"], params[f"{self.prefix}.bn.beta"]
            h = running.normalizer(f"{self.prefix}.bn")(h, gamma, beta)
        for unit in self.convs:
            h = unit.apply(h, params, running, feedback)
        h = flatten(adaptive_avg_pool2d(h, POOL))
        for unit in self.fcs:
            h = unit.apply(h, params, running, feedback)
        return self.out.apply(h, params, running, feedback, activation=identity)
