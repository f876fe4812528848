"""LocalMixer (Ren et al. 2023), built as the authors' code builds it.

The image is cut into P = patches² non-overlapping patches, each flattened (no separate
embedding).  Activations are [N, P, C]; grouped tensors are [N, P, G, c] with C = G·c.

* block 0:  dense [D_in→C] → LN → ReLU → grouped [G, c→c] → LN → ReLU
* block k≥1: token mixing [P→P] → LN → ReLU → dense [C→C] → LN → ReLU → grouped [G, c→c] → LN
  → (+ block input) → ReLU

LN has no affine parameters; it normalises per token (and per group on grouped tensors).
``begin_ln`` adds an LN on the block input, ``middle_ln`` an LN before every later linear
layer ("LN before and after every linear layer"); ``post_linear_ln=False`` drops the LN after
the linear layers.  As in the authors' flags of the same names, ``inter_ln`` normalises a block's
output (per token and group) before its local head only, and ``last_layer_ln`` normalises the
patch-mean features (over all channels) before the read-out; the next block and the read-out's
pooling still see the un-normalised output.  Every block has a local linear head [C→classes] shared by all patches and
groups (a projector [C→``projection_dim``] for contrastive runs, Ren uses 128); the read-out
[C→classes] acts on the patch mean of the last block and starts at zero.
"""
from .. import primitives as P
from .layers import grouped, layer_norm, linear, token_mixing
from .model import Model

CONFIGS = {
    "S/1/1": dict(blocks=1, patches=1, channels=256, groups=1),
    "M/1/16": dict(blocks=1, patches=1, channels=512, groups=16),
    "M/8/16": dict(blocks=4, patches=8, channels=512, groups=16),
    "L/8/64": dict(blocks=4, patches=8, channels=2048, groups=64),
    "L/32/64": dict(blocks=4, patches=32, channels=2048, groups=64),
}


class LocalMixer(Model):
    name = "localmixer"
    has_local_heads = True

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, config="M/1/16", blocks=None, patches=None,
                 channels=None, groups=None, begin_ln=False, middle_ln=False, post_linear_ln=True,
                 init="localmixer", projection_dim=None, inter_ln=False, last_layer_ln=False):
        super().__init__()
        if config not in CONFIGS:
            raise ValueError(f"localmixer: config={config!r} is unknown; choose one of {sorted(CONFIGS)}")
        chosen = dict(CONFIGS[config])
        for key, value in dict(blocks=blocks, patches=patches, channels=channels, groups=groups).items():
            if value is not None:
                chosen[key] = int(value)
        self.config = config
        self.num_blocks, self.patches = chosen["blocks"], chosen["patches"]
        self.channels, self.groups = chosen["channels"], chosen["groups"]
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.begin_ln, self.middle_ln, self.post_linear_ln = begin_ln, middle_ln, post_linear_ln
        self.inter_ln, self.last_layer_ln = inter_ln, last_layer_ln
        self._validate()
        in_channels, height, width = self.input_shape
        self.tokens = self.patches ** 2
        self.patch_dim = in_channels * (height // self.patches) * (width // self.patches)
        C, G, c, Ptok = self.channels, self.groups, self.channels // self.groups, self.tokens
        for k in range(self.num_blocks):
            prefix = f"blocks.{k}"
            if k > 0:
                token = dict(block=k, module=f"{prefix}.token")
                self.add_param(f"{prefix}.token.weight", (Ptok, Ptok), Ptok, init, role="weight", **token)
                self.add_param(f"{prefix}.token.bias", (Ptok,), Ptok, "zeros", role="bias", **token)
            fan_in = self.patch_dim if k == 0 else C
            dense, grouped = dict(block=k, module=f"{prefix}.dense"), dict(block=k, module=f"{prefix}.grouped")
            self.add_param(f"{prefix}.dense.weight", (fan_in, C), fan_in, init, role="weight", channel_group_axis=1,
                           **dense)
            self.add_param(f"{prefix}.dense.bias", (C,), fan_in, "zeros", role="bias", channel_group_axis=0, **dense)
            self.add_param(f"{prefix}.grouped.weight", (G, c, c), c, init, role="weight", group_axis=0, **grouped)
            self.add_param(f"{prefix}.grouped.bias", (G, c), c, "zeros", role="bias", group_axis=0, **grouped)
            head = projection_dim or num_classes  # contrastive runs: a linear projector [C→128]
            self.add_linear_head(f"{prefix}.head", C, head, init, block=k, bias_init="zeros")
        self.add_linear_head("head", C, num_classes, "zeros")

    def _validate(self):
        if len(self.input_shape) != 3:
            raise ValueError(f"localmixer: input_shape={self.input_shape} must be (channels, height, width)")
        _, height, width = self.input_shape
        for option in ("blocks", "patches", "channels", "groups"):
            value = {"blocks": self.num_blocks, "patches": self.patches, "channels": self.channels,
                     "groups": self.groups}[option]
            if value < 1:
                raise ValueError(f"localmixer: {option}={value} must be >= 1")
        if height % self.patches or width % self.patches:
            raise ValueError(f"localmixer: patches={self.patches} does not divide the image size {height}x{width}; "
                             f"allowed: a divisor of both")
        if self.channels % self.groups:
            raise ValueError(f"localmixer: channels={self.channels} is not divisible by groups={self.groups}; "
                             f"allowed: a divisor of {self.channels}")

    # --- structure -----------------------------------------------------------------------
    def embed(self, x):
        """[N, C_in, H, W] -> [N, P, C_in·ph·pw] (non-overlapping patches, each flattened)."""
        n, c, height, width = x.shape
        s = self.patches
        grid = P.reshape(x, (n, c, s, height // s, s, width // s))
        return P.reshape(P.transpose(grid, (0, 2, 4, 1, 3, 5)), (n, s * s, -1))

    def _grid(self, h):
        return P.reshape(h, h.shape[:2] + (self.groups, self.channels // self.groups))

    def _flat(self, h):
        return P.reshape(h, h.shape[:2] + (self.channels,))

    def block(self, k, params, h, ctx):
        prefix = f"blocks.{k}"
        norm = layer_norm if self.post_linear_ln else None
        before = layer_norm if self.middle_ln else (lambda a: a)
        block_input = h
        if self.begin_ln:
            h = layer_norm(h)
        if k > 0:
            h = self.hidden(ctx, k, "token", token_mixing, h, params,
                            [f"{prefix}.token.weight", f"{prefix}.token.bias"], norm, replica="token")
            h = before(h)
        h = self.hidden(ctx, k, "dense", linear, h, params,
                        [f"{prefix}.dense.weight", f"{prefix}.dense.bias"], norm, replica="own")
        h = before(self._grid(h))
        residual = self._grid(block_input) if k > 0 else None
        h = self.hidden(ctx, k, "grouped", grouped, h, params,
                        [f"{prefix}.grouped.weight", f"{prefix}.grouped.bias"], norm, replica="own",
                        residual=residual)
        return self._flat(h)

    def pooled_features(self, h):
        pooled = P.mean(h, axis=1)
        return layer_norm(pooled) if self.last_layer_ln else pooled

    def replica_grid(self, h):
        grid = self._grid(h)
        return layer_norm(grid) if self.inter_ln else grid
