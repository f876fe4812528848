"""ResNet-18 (He et al.) split into blocks for local learning, as in Fournier et al. (appendix A.1).

Eight basic blocks of widths w·(1, 1, 2, 2, 4, 4, 8, 8) (w = ``width``, 64 standard): conv1 3×3
(stride 2 at the first block of stages 2–4) → BN → ReLU → conv2 3×3 → BN → (+ skip) → ReLU, the
skip being the block input, or a 1×1 conv (same stride) → BN where the shape changes.  The CIFAR
stem — a 3×3 conv of w channels, stride 1, BN, ReLU, no max-pool — opens the first block.
Convolutions have no bias (BatchNorm follows each).

* ``blocks=8``: one model block per basic block.
* ``blocks=16``: the no-skip variant — every conv its own block (block 0: stem + first conv), no
  skip connections, hence no 1×1 shortcut convs.

Every block k has an auxiliary classifier (``aux``: 'linear', 'mlp' or 'cnn', see ``aux_heads``)
for its local loss, under ``blocks.{k}.head.``; the read-out is global average pool → linear
[8w → classes].  The hidden-layer sites: 'pre' after each BN (in a basic block's conv2, before the
skip is added); the 1×1 shortcut is a hidden layer of its own whose 'pre' site is after its BN,
and it shares conv2's ReLU (its ``Point.mask`` is that of the sum).
"""
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

from .. import losses
from .. import primitives as P
from .aux_heads import KINDS, AuxHead
from .cnn import check_image
from .model import Model
from .units import Running, Unit, identity

STAGE_WIDTHS = (1, 1, 2, 2, 4, 4, 8, 8)  # basic block i has width·STAGE_WIDTHS[i] channels
DOWNSAMPLE = (2, 4, 6)                   # basic blocks whose first conv has stride 2


@dataclass(frozen=True)
class BlockLayout:
    """The hidden layers of one model block, in order.  ``residual``: the last two form a basic
    block, whose input (through ``shortcut`` when given) is added before the last layer's ReLU."""
    layers: tuple
    residual: bool = False
    shortcut: Unit | None = None

    @property
    def units(self):
        return self.layers + ((self.shortcut,) if self.shortcut else ())


def _conv(prefix, c_in, c_out, stride=1):
    return Unit(prefix, c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _basic_convs(width):
    """(c_in, c_out, stride) of the first conv of each basic block."""
    shapes, c_in = [], width
    for i, multiple in enumerate(STAGE_WIDTHS):
        shapes.append((c_in, width * multiple, 2 if i in DOWNSAMPLE else 1))
        c_in = width * multiple
    return shapes


def residual_layout(in_channels, width):
    """Eight blocks: [stem,] conv1, conv2 with the skip around conv1 and conv2."""
    layout = []
    for k, (c_in, c_out, stride) in enumerate(_basic_convs(width)):
        stem = [_conv(f"blocks.{k}.stem", in_channels, width)] if k == 0 else []
        shortcut = (Unit(f"blocks.{k}.shortcut", c_in, c_out, 1, stride=stride, bias=False)
                    if stride != 1 or c_in != c_out else None)
        layers = stem + [_conv(f"blocks.{k}.conv1", c_in, c_out, stride), _conv(f"blocks.{k}.conv2", c_out, c_out)]
        layout.append(BlockLayout(tuple(layers), residual=True, shortcut=shortcut))
    return layout


def plain_layout(in_channels, width):
    """Sixteen blocks, no skips: block 0 = stem + the first conv, then one conv per block."""
    convs = []
    for c_in, c_out, stride in _basic_convs(width):
        convs += [(c_in, c_out, stride), (c_out, c_out, 1)]
    layout = [BlockLayout((_conv("blocks.0.stem", in_channels, width), _conv("blocks.0.conv", *convs[0])))]
    for k, shape in enumerate(convs[1:], start=1):
        layout.append(BlockLayout((_conv(f"blocks.{k}.conv", *shape),)))
    return layout


@contextmanager
def held_points(ctx):
    """Keep the points recorded inside the ``with`` in a local list (yielded) — so that one can be
    amended once a later one is known — then hand them on as the plan asks (``on_point`` or
    ``ctx.points``).  Yields [] when the plan records no points."""
    plan, kept = ctx.plan, ctx.points
    if not plan.record_points and plan.on_point is None:
        yield []
        return
    ctx.plan, ctx.points = dataclasses.replace(plan, record_points=True, on_point=None), []
    try:
        yield ctx.points
    finally:
        held, ctx.plan, ctx.points = ctx.points, plan, kept
    for point in held:
        if plan.on_point is not None:
            plan.on_point(point)
        else:
            kept.append(point)


class ResNet18(Model):
    """Options: ``blocks`` 8 or 16, ``width`` (base channels), ``aux`` ('linear', 'mlp', 'cnn'),
    ``aux_width`` (d of the MLP aux, default 16·width; c of the CNN aux, default width/2) and
    ``aux_depth`` (its FC or strided-conv layers, default 2), ``init`` (weights' initialiser)."""
    name = "resnet18"
    has_local_heads = True
    linear_local_heads = False  # Fournier's aux nets

    def __init__(self, input_shape=(3, 32, 32), num_classes=10, blocks=8, width=64, aux="cnn", aux_width=None,
                 aux_depth=None, init="kaiming_uniform"):
        super().__init__()
        self._validate(input_shape, blocks, width, aux, aux_width, aux_depth)
        self.input_shape, self.num_classes, self.num_blocks = tuple(input_shape), num_classes, blocks
        self.width, self.aux = width, aux
        make = residual_layout if blocks == 8 else plain_layout
        self.layout = make(self.input_shape[0], width)
        default_width = 16 * width if aux == "mlp" else max(1, width // 2)  # 1024 and 32 at width 64
        self.aux_heads = [AuxHead(aux, f"blocks.{k}.head", spec.layers[-1].c_out, num_classes,
                                  aux_width or default_width, aux_depth or 2) for k, spec in enumerate(self.layout)]
        for k, (spec, head) in enumerate(zip(self.layout, self.aux_heads)):
            for unit in spec.units:
                unit.declare(self, init, block=k)
            head.declare(self, init, block=k)
        self.add_linear_head("head", self.layout[-1].layers[-1].c_out, num_classes, init)

    @staticmethod
    def _validate(input_shape, blocks, width, aux, aux_width, aux_depth):
        check_image("resnet18", input_shape)
        if blocks not in (8, 16):
            raise ValueError(f"resnet18: blocks={blocks!r}; allowed: 8 (the residual basic blocks) or 16 "
                             f"(every conv its own block, no skip connections)")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"resnet18: width={width!r} must be a positive int (base channels; 64 is ResNet-18)")
        if aux not in KINDS:
            raise ValueError(f"resnet18: aux={aux!r} is unknown; allowed: {', '.join(KINDS)}")
        for option, value in (("aux_width", aux_width), ("aux_depth", aux_depth)):
            if value is not None and aux == "linear":
                raise ValueError(f"resnet18: {option}={value!r} does not apply to aux='linear'; "
                                 f"allowed with aux='mlp' or 'cnn'")
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"resnet18: {option}={value!r} must be a positive int")

    def couples_examples_after(self, block, plan):
        """Whether a later BatchNorm (in training mode) mixes the batch on the way from block
        ``block``'s perturbation sites to the loss: this block's own later layers, then the aux
        head (local losses) or the later blocks (the final loss, unless greedy)."""
        own_later_layers = plan.train and len(self.layout[block].layers) > 1
        return own_later_layers or self.couples_examples_after_output(block, plan)

    def couples_examples_after_output(self, block, plan):
        """From block ``block``'s output on: the aux head's BatchNorm (local losses), or the later
        blocks' (the final loss, unless greedy).  The last block's output reaches the final loss
        through the pooling and the read-out only, which keep the examples apart."""
        if not plan.train:
            return False
        if plan.local_losses and self.aux_heads[block].has_norm:
            return True
        return not plan.greedy and block < self.num_blocks - 1

    def embed(self, x):
        return x

    def block(self, k, params, h, ctx):
        spec = self.layout[k]
        if not spec.residual:
            for unit in spec.layers:
                h = unit.hidden(self, ctx, k, h, params)
            return h
        *stem, conv1, conv2 = spec.layers
        for unit in stem:
            h = unit.hidden(self, ctx, k, h, params)
        if spec.shortcut is None:
            return conv2.hidden(self, ctx, k, conv1.hidden(self, ctx, k, h, params), params, residual=h)
        with held_points(ctx) as points:
            skip = spec.shortcut.hidden(self, ctx, k, h, params, activation=identity)
            out = conv2.hidden(self, ctx, k, conv1.hidden(self, ctx, k, h, params), params, residual=skip)
            if points:  # the shortcut feeds conv2's ReLU, after the add: that is its activation's mask
                points[0].mask = points[-1].mask
        return out

    def local_loss(self, k, params, h, labels, replicated, feedback=None, ctx=None):
        """Block k's aux-net cross-entropy per example [N].

        An aux net reads the whole block output, so there are no per-patch or per-group replicas
        (Ren's replicated losses do not apply to CNNs): ``replicated=True`` gets the same loss as
        one replica per example, [N, 1, 1] — exactly the pooled loss.
        """
        running = Running.of(ctx) if ctx is not None else Running(self.init_state(), {}, True)
        logits = self.aux_heads[k](params, h, running, feedback)
        loss = losses.cross_entropy(logits, labels, reduction="none")
        return P.reshape(loss, (-1, 1, 1)) if replicated else loss

    def contrastive_loss(self, k, params, h, replicated, temperature=0.5):
        raise ValueError("resnet18: contrastive (InfoNCE) local losses need linear projection heads; the aux "
                         "nets of resnet18 are classifiers — use localmixer, mlp or a small CNN")

    def pooled_features(self, h):
        return P.mean(h, axis=(2, 3))

    def replica_grid(self, h):
        raise ValueError("resnet18: local losses go through the aux nets (local_loss); there is no replica "
                         "grid of patches and groups")
