"""Gradient guesses × gradient targets (Fournier et al. 2023, "Can forward gradient match backprop?").

For every block k, with output y_k = f_k(y_{k−1}; θ_k) [N, ...] and a target loss L_T, a guess G
is pushed as a tangent through the rest of the network in a genuine forward-mode pass; the
target's directional derivative ⟨T, G⟩ comes out of that pass — T itself is never computed.

Targets: ``global`` — the model's final loss; ``local`` — block k's auxiliary loss;
``intermediate`` — block k+1's auxiliary loss.  The last block has no next block: there it
uses the global target, as Fournier et al. do.

* Activity space: one guess G_n per example at block k's output; the pass gives
  d_n = ⟨T_n, G_n⟩ with T_n = ∂ℓ_n/∂y_{k,n} (example n's target loss).  The estimate of T_n is
      random guesses (Gaussian, Rademacher; E[u uᵀ] = I):  ĝ_n = d_n u_n               (unbiased)
      other guesses (local, NTK, fixed NTK):             ĝ_n = d_n / (‖G_n‖² + ε) · G_n
  (the best multiple of G_n: a descent direction, ⟨ĝ_n, T_n⟩ = ‖ĝ_n‖² (1 + ε/‖G_n‖²) ≥ 0; for an
  isotropic random G in ℝ^D it would be biased, E = T/D).  ``projection='span'`` projects T_n on
  the span of the whole batch's guesses instead:
      ĝ_n = Gᵀ (G Gᵀ)⁺ A[:, n],   G = [G_1; …; G_N] flattened [N, D],   A[m, n] = ⟨T_n, G_m⟩,
  with A from one forward pass of N directions (direction m puts G_m at every example).  The
  cotangent ĝ/N of the batch-mean loss is then carried to θ_k by one reverse pass through
  block k alone, from its stored input (the paper's "backprop inside the block").
  Where BatchNorm in training mode lies between block k's output and the target loss
  (``model.couples_examples_after_output``), example n's activity reaches every example's loss, and a
  forward pass only gives the batch total Σ_m d_m = ⟨T, G⟩ with T_n = Σ_m ∂ℓ_m/∂y_{k,n}: the
  batch is then projected as ONE vector, ĝ = ⟨T, G⟩ / (‖G‖² + ε) · G (random: ⟨T, G⟩ · G, still
  unbiased; ``coupled_activity='batch'``, the default), and ``projection='span'`` is refused (it
  would need N² directions).  ``coupled_activity='example'`` projects every example there too, as
  Fournier et al.'s code does: direction n of N one-example directions carries G_n at example n
  only, and the tangent of the batch's total target loss in it is d_n = ⟨T_n, G_n⟩ exactly; then
  ĝ_n = d_n / (‖G_n‖² + ε) · G_n as above.  Cost: N directions per coupled block instead of one.
* Weight space: one guess G (all of θ_k's tensors) shared by the batch; D = ⟨∇_{θ_k} L_T, G⟩ is
  the JVP of the batch-mean target loss with tangent G on θ_k; ĝ = D·G (random guesses) or
  D / (‖G‖² + ε) · G.  ``weight_unit='module'`` projects each module of the block (a conv or
  linear map with its bias, a norm's scale and shift: the spec's ``module``) on its own scalar
  D_m = ⟨∇_{θ_m} L_T, G_m⟩, every module in its own direction of the one pass, as Fournier et
  al.'s code does.  ``weight_examples='example'`` projects per example too, as their code also
  does: example n has its own guess G_{n,u} for each unit u (random: its own draws; local, NTK:
  its share of the aux-loss gradient, x_nᵀ δ_n for a linear map), d_{n,u} = ⟨∇_{θ_u} ℓ_n, G_{n,u}⟩
  and ĝ_u = mean_n d_{n,u} / (‖G_{n,u}‖² + ε) · G_{n,u} (random, unnormalised: d_{n,u} G_{n,u}).
  A weight tangent of example n's own is the output tangent it causes at its layer — ż_n = x_n Ġ_n
  + ḃ_n for a linear map, example n's own convolution for a conv, γ̇_n x̂_n + β̇_n for a norm —
  injected there (``Plan.layer_hook``) and carried forward through the rest of the network.  One
  direction per unit gives d_{n,u} as the tangent of ℓ_n; where a BatchNorm in training mode lies
  in or after the unit's block, N one-example directions per unit give it as the tangent of the
  batch total (∇_{θ_u} ℓ_n is then N × example n's share of the batch's gradient).  Cost: N × the
  units' directions, and the guesses hold N × the estimated blocks' weights.
  ``normalise_random=True`` normalises random guesses too (D / (‖G‖² + ε) · G: biased, E = T/d,
  as the authors' code does); by default they are not (unbiased).

Passes per step: with the sample projection every block's guess rides in ONE forward pass of
K = (number of blocks) directions — direction k carries block k's guess and is zero at every
other block, so the contributions separate; the span projection runs one pass per block with
K = N directions.  The one-example directions of ``coupled_activity='example'`` and
``weight_examples='example'`` ride in the same pass, or in passes of at most
``directions_per_pass`` directions (0: one pass), which bounds the tangents' memory.  Guesses
that need activations (local, NTK) add one plain forward pass before it; per-example local
weight guesses add, per block, one plain and one reverse pass through the block alone.

Guesses: ``gaussian`` / ``rademacher`` are drawn every step, independently per example and
unit (activity) or per weight (weight).  ``local``: the gradient of block k's trained
auxiliary loss Σ_n ℓ_aux,n w.r.t. y_k (activity: reverse mode through the aux net) or w.r.t.
θ_k (weight: the same cotangent carried back through block k).  ``ntk``: the same with an aux
net re-initialised every step and never trained; ``fixed-ntk``: one random aux net per block,
drawn once and never trained.

Auxiliary nets — ``aux=None`` (default): the model's own local heads ``blocks.{k}.head.*``
when it has them (a linear head on MLP / LocalMixer / small CNNs, Fournier's aux nets on
ResNet-18), trained by the optimiser on their exact gradient like every head (so guess=local ×
target=local is local greedy backprop), and re-drawn from the model's head initialisers for
the NTK guesses; a rule-owned ``'linear'`` net when it has none.  ``aux='linear' | 'mlp' |
'cnn'``: rule-owned nets of that kind (the model's heads, if any, are trained as probes):
    linear  pooled block output → linear [F → classes]
    mlp     pooled → [linear → LN → ReLU] × ``aux_depth`` (width ``aux_width``, 1024) → linear
    cnn     [N, C, H, W] only: 1×1 conv [C → w] → ReLU → [3×3 conv, stride 2, padding 1 → ReLU]
            × ``aux_depth`` (w = ``aux_width``, 32) → pooled → linear
Pooling: [N, F] as is, tokens [N, T, C] averaged over T, images [N, C, H, W] adaptively averaged
to 2×2 and flattened (appendix A.2).  The paper's linear and MLP aux nets use BatchNorm; these
use per-example layer norm (or none), so that their losses keep examples apart.  Rule-owned
nets live in ``rule.state`` (``aux.{k}.{i}.weight/bias`` trained, ``ntk.{k}.…`` fixed NTK),
are created on first use from the setup seed, round-trip through ``state_dict``, and the
trained ones take a plain SGD step of rate ``aux_lr`` on their exact gradient every step.
The read-out always gets its exact gradient (heads always backprop).  ``last_block='exact'``: the
last block too, from the final loss by reverse mode through the read-out and that block alone, as
Fournier et al.'s code trains it (on ResNet-18's 8-block split it holds about 40 % of the weights).

``diagnostics`` compare with the exact gradient of the objective the rule follows: local greedy
for target=local on the model's heads, the global loss otherwise (Fournier's alignment measure).
"""
from collections.abc import Callable
from dataclasses import dataclass

import numpy

from .. import autodiff, backend, losses
from .. import primitives as P
from ..dual import Dual, add_tangent, value_of
from ..nn import init as initialisers
from ..nn.aux_heads import POOL  # images are pooled to POOL × POOL before an aux net's linear layers
from ..nn.conv import adaptive_avg_pool2d, conv2d, flatten
from ..nn.layers import layer_norm, linear, norm_example_pullback, norm_example_tangent
from ..nn.model import ParamSpec
from ..nn.plan import Plan, Site
from .base import Estimate, Rule, mean_value
from .forward import _batch_means, _gaussian, _head_grads, _tangent, example_noise, signs

GUESSES = ("gaussian", "rademacher", "local", "ntk", "fixed-ntk")
LAST_BLOCK = ("estimate", "exact")
WEIGHT_UNITS = ("block", "module")
COUPLED_ACTIVITY = ("batch", "example")
WEIGHT_EXAMPLES = ("shared", "example")
RANDOM_GUESSES = ("gaussian", "rademacher")
TARGETS = ("global", "local", "intermediate")
SPACES = ("activity", "weight")
PROJECTIONS = ("sample", "span")
AUX_NETS = (None, "linear", "mlp", "cnn")
DEFAULT_AUX_WIDTH = {"linear": None, "mlp": 1024, "cnn": 32}  # the paper's choices (appendix A.2)


# ---------------------------------------------------------------------------------------
# projections of a target on guesses
# ---------------------------------------------------------------------------------------
def _scale(derivative, squared_norm, eps, normalised):
    return derivative / (squared_norm + eps) if normalised else derivative


def sample_projection(guesses, derivatives, eps=0.0, normalised=True):
    """Each sample's target estimated from its own guess.

    ``guesses`` [M, ...] (one guess per sample); ``derivatives`` [M] = ⟨T_m, G_m⟩.  Returns
    [M, ...]: ⟨T_m, G_m⟩ / (‖G_m‖² + ε) · G_m (``normalised``), or ⟨T_m, G_m⟩ · G_m (random guesses
    with E[G Gᵀ] = I, unbiased).
    """
    flat = guesses.reshape(len(guesses), -1)
    scale = _scale(derivatives, (flat * flat).sum(axis=1), eps, normalised)
    return guesses * scale.reshape((-1,) + (1,) * (guesses.ndim - 1))


def span_projection(guesses, inner):
    """Orthogonal projection of every target on the span of all the guesses.

    ``guesses`` [M, ...]; ``inner`` [M, N] with inner[m, n] = ⟨T_n, G_m⟩.  Returns [N, ...]:
    Gᵀ (G Gᵀ)⁺ inner[:, n] for each n (G flattened [M, D]); singular values of G Gᵀ below
    max(M, D)·eps(dtype) times the largest count as zero.
    """
    xp = backend.namespace(guesses)
    flat = guesses.reshape(len(guesses), -1)
    cutoff = max(flat.shape) * float(xp.finfo(flat.dtype).eps)
    coefficients = xp.linalg.pinv(flat @ flat.T, cutoff) @ inner  # [M, N] (CuPy's pinv takes (a, rcond) only)
    return (coefficients.T @ flat).reshape((inner.shape[1],) + guesses.shape[1:])


def _weight_projection(guess, derivative, eps, normalised):
    """Weight space: one guess {name: tensor} for a whole block and the scalar D = ⟨T, G⟩."""
    squared_norm = sum(float((g * g).sum()) for g in guess.values())
    scale = _scale(derivative, squared_norm, eps, normalised)
    return {name: scale * g for name, g in guess.items()}


def random_guess(kind, rng, shape, dtype):
    """Gaussian N(0, 1) or Rademacher ±1 entries of ``shape`` in ``dtype`` (E[u uᵀ] = I)."""
    if kind == "gaussian":
        return _gaussian(rng, 1, shape, dtype)[0]
    signs = rng.random(tuple(shape), dtype=dtype) < 0.5
    return (1 - 2 * signs).astype(dtype)


def _row_tangent(rows, key, value):
    """The tangent [K, N, ...] of a pass whose K directions are ``rows`` [(key, example)]: ``value``
    [N, ...] (``key``'s guess, or its output tangent) in every direction of ``key`` — all of it where
    example is None, only row ``example`` of it in a one-example direction — zeros elsewhere."""
    tangent = backend.namespace(value).zeros((len(rows),) + value.shape, value.dtype)
    for r, (row_key, example) in enumerate(rows):
        if row_key == key:
            if example is None:
                tangent[r] = value
            else:
                tangent[r, example] = value[example]
    return tangent


def _in_rows(rows, key):
    """Whether any direction of ``rows`` [(key, example)] is ``key``'s."""
    return any(row_key == key for row_key, _ in rows)


def _every_example(guesses):
    """[N, N, ...]: direction m puts example m's guess at every example (the span's ⟨T_n, G_m⟩)."""
    xp = backend.namespace(guesses)
    return xp.broadcast_to(guesses[:, None], (len(guesses),) + guesses.shape).copy()


# ---------------------------------------------------------------------------------------
# rule-owned auxiliary nets
# ---------------------------------------------------------------------------------------
def pooled_features(h):
    """A block output as flat per-example features: [N, F] as is; tokens [N, T, C] → mean over T
    [N, C]; images [N, C, H, W] → adaptive average pool to POOL × POOL, flattened [N, C·POOL²]."""
    ndim = value_of(h).ndim
    if ndim == 2:
        return h
    if ndim == 3:
        return P.mean(h, axis=1)
    if ndim == 4:
        return flatten(adaptive_avg_pool2d(h, POOL))
    raise ValueError(f"guess: block outputs of shape {value_of(h).shape} cannot be pooled for an aux net; "
                     f"allowed: [N, F], [N, T, C] or [N, C, H, W]")


def _pooled_width(shape):
    return {2: shape[-1], 3: shape[-1], 4: shape[1] * POOL * POOL}[len(shape)]


def aux_layer_shapes(kind, output_shape, classes, width, depth):
    """Weight shapes [(shape, fan_in)] of a rule-owned aux net's layers, in order, on block outputs of
    ``output_shape`` [N, ...]: conv [O, C, k, k] (cnn), then linear [p, q] (mlp hidden, read-out)."""
    shapes = []
    if kind == "cnn":
        channels = output_shape[1]
        for kernel in [1] + [3] * depth:
            shapes.append(((width, channels, kernel, kernel), channels * kernel * kernel))
            channels = width
        output_shape = (output_shape[0], width, 1, 1)  # only the channel count matters for the pooled width
    features = _pooled_width(output_shape)
    for _ in range(depth if kind == "mlp" else 0):
        shapes.append(((features, width), features))
        features = width
    return shapes + [((features, classes), features)]


def aux_logits(params, prefix, h, layers):
    """Logits [N, classes] of a rule-owned aux net ``{prefix}{i}.weight/bias`` on block output h:
    the 4-D weights are convs (1×1, then 3×3 stride 2) with ReLU, then pooling, then linear layers
    with LN and ReLU between them."""
    a, pooled = h, False
    for i in range(layers):
        weight, bias = params[f"{prefix}{i}.weight"], params[f"{prefix}{i}.bias"]
        if value_of(weight).ndim == 4:
            first = i == 0
            a = P.relu(conv2d(a, weight, bias, stride=1 if first else 2, padding=0 if first else 1))
            continue
        if not pooled:
            a, pooled = pooled_features(a), True
        a = linear(a, weight, bias)
        if i < layers - 1:
            a = P.relu(layer_norm(a))
    return a


@dataclass
class AuxNet:
    """One block's auxiliary classifier: ``net(h, labels)`` is the per-example cross-entropy [N]."""
    params: dict
    loss: Callable  # (params, h, labels) -> [N]

    def __call__(self, h, labels):
        return self.loss(self.params, h, labels)

    def input_gradient(self, h, labels):
        """∇_h Σ_n ℓ_n [N, ...] at the value h (reverse mode through the net): each example's own
        aux-loss gradient (with batch-coupled heads, that of the batch total)."""
        _, pullback = autodiff.vjp(lambda a: P.sum(self(a, labels)), h)
        return pullback(numpy.ones((), h.dtype))[0]

    def param_gradients(self, h, labels):
        """Exact gradient of the batch-mean aux loss at the value h w.r.t. the net's parameters."""
        names = sorted(self.params)
        _, pullback = autodiff.vjp(lambda *w: P.mean(self.loss(dict(zip(names, w)), h, labels)),
                                   *[self.params[name] for name in names])
        return dict(zip(names, pullback(numpy.ones((), h.dtype))))


def _block_pullback(model, k, params, names, block_input, state):
    """Reverse mode through block k alone, from its stored input [N, ...] (values).

    Returns ``cotangent [N, ...] at the block output -> {name: cotangent}`` for the block's
    parameters ``names``; ``state``: the running statistics the forward pass used.
    """

    def run(*weights):
        return model.block(k, {**params, **dict(zip(names, weights))}, block_input,
                           model.context(Plan(record_points=False), state))
    _, pullback = autodiff.vjp(run, *[params[name] for name in names])
    return lambda cotangent: dict(zip(names, pullback(cotangent)))


def _block_example_pullback(model, k, params, block_input, state):
    """Per-example reverse mode through block k alone, from its stored input [N, ...] (values).

    Returns ``cotangent [N, ...] at the block output -> {name: [N, *shape]}``: example n's share of
    each parameter's cotangent (the shares sum over n to ``_block_pullback``'s).  One reverse pass
    gives the cotangents δ at every hidden layer's linear-map output z and norm output y (zero
    probes added there are its primals); then example n's share is the layer's
    ``fn.example_pullback(x, δ_z)`` (x_nᵀ δ_n for a linear map) and, for a norm's scale and shift,
    ``norm_example_pullback`` (Σ δ_n x̂_n, Σ δ_n).
    """
    layers = []  # [layer, x, z, y] in the order the block runs them (values)

    def record(layer):
        def fn(x, *weights):
            z = layer.fn(x, *weights)
            layers.append([layer, value_of(x), value_of(z), None])
            return z

        def normalize(z, *weights):
            y = layer.normalize(z, *weights)
            layers[-1][3] = value_of(y)
            return y
        return fn, normalize if layer.normalize is not None else None
    model.block(k, params, block_input, model.context(Plan(record_points=False, layer_hook=record), state))

    def probed(*probes):
        added = iter(probes)

        def hook(layer):
            def normalize(z, *weights):
                return layer.normalize(z, *weights) + next(added)
            return (lambda x, *weights: layer.fn(x, *weights) + next(added),
                    normalize if layer.normalize is not None else None)
        return model.block(k, params, block_input, model.context(Plan(record_points=False, layer_hook=hook), state))
    xp = backend.namespace(block_input)
    zeros = [xp.zeros_like(a) for *_, z, y in layers for a in (z, y) if a is not None]
    _, pullback = autodiff.vjp(probed, *zeros)

    def shares(cotangent):
        deltas, out = iter(pullback(cotangent)), {}
        for layer, x, z, y in layers:
            out.update(zip(layer.param_names, _per_example(layer, "example_pullback")(x, next(deltas))))
            if y is not None:
                delta = next(deltas)
                if layer.norm_param_names:
                    out.update(zip(layer.norm_param_names, norm_example_pullback(layer.normalize, z, delta)))
        return out
    return shares


def _per_example(layer, what):
    """``layer.fn``'s per-example ``what`` (``example_tangent`` / ``example_pullback``), or a clear error."""
    method = getattr(layer.fn, what, None)
    if method is None:
        raise ValueError(f"guess: weight_examples='example' needs the per-example {what} of every guessed layer; "
                         f"layer {layer.name!r} of block {layer.block} ({getattr(layer.fn, '__name__', layer.fn)}) "
                         f"has none; supported: linear, grouped, token-mixing and conv layers, and affine norms")
    return method


def _block_streams(step_seed):
    """``streams(k)``: block k's generator for this step (on the active backend), a function of the
    step's seed and k only, so that a block draws the same guesses whichever process runs it (the
    block pipeline) and whichever blocks run with it."""
    made = {}

    def streams(k):
        if k not in made:
            made[k] = backend.rng(int(numpy.random.SeedSequence((step_seed, k)).generate_state(1)[0]))
        return made[k]
    return streams
def _last_block_exact(model, params, trace, block_input, labels, state, names):
    """The last block's exact gradient of the mean final loss: the cotangent at its output by reverse
    mode through the read-out alone (pooling and linear layer), then through the block alone from
    its input value ``block_input``."""
    k = model.num_blocks - 1
    output = value_of(trace.outputs[k])

    def readout_loss(h):
        ctx = model.context(Plan(record_points=False), state)
        logits = model.readout(params, model.pooled_features(h), ctx)
        return P.mean(losses.cross_entropy(logits, labels, reduction="none"))
    _, pullback = autodiff.vjp(readout_loss, output)
    cotangent = pullback(numpy.ones((), dtype=output.dtype))[0]
    return _block_pullback(model, k, params, names, block_input, state)(cotangent)


def _example_weight_hook(units, owner, rows, reached):
    """``Plan.layer_hook`` for the directions ``rows`` [(unit index, example)] of per-example weight
    guesses ``units`` [(block, {name: [N, *shape]})] (``owner``: name → unit index): a hidden layer
    whose linear map holds a guessed tensor adds ż = ``fn.example_tangent(x, Ġ_n…)`` at its output
    (ż_n = x_n Ġ_n + ḃ_n for a linear map, example n's own conv for a conv), and one whose norm does,
    ẏ_n = γ̇_n x̂_n + β̇_n at the norm's output; the names it reached go into ``reached``."""
    def added(out, names, tangent_of):
        i = owner[names[0]]
        if not _in_rows(rows, i):
            return out
        return add_tangent(out, _row_tangent(rows, i, tangent_of([units[i][1][name] for name in names])))

    def hook(layer):
        fn, normalize = layer.fn, layer.normalize
        if any(name in owner for name in layer.param_names):
            example_tangent = _per_example(layer, "example_tangent")

            def fn(x, *weights):
                return added(layer.fn(x, *weights), layer.param_names,
                             lambda guess: example_tangent(value_of(x), *guess))
        if any(name in owner for name in layer.norm_param_names):
            def normalize(z, *weights):
                return added(layer.normalize(z, *weights), layer.norm_param_names,
                             lambda guess: norm_example_tangent(layer.normalize, value_of(z), *guess))
        reached.update(layer.param_names + layer.norm_param_names)
        return fn, normalize
    return hook


def _check_choice(option, value, allowed):
    if value not in allowed:
        raise ValueError(f"guess: {option}={value!r}; allowed: {', '.join(map(repr, allowed))}")


# ---------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------
class GradientGuess(Rule):
    """Fournier et al.'s guesses × targets (see the module docstring for the math and options).

    The option ``target`` is kept as ``target_loss``; ``target`` (the ``Rule`` attribute) names the
    objective the diagnostics compare with.
    """
    name = "guess"
    needs_local_heads = True  # the model's local heads are the default aux nets (and probes otherwise)

    @property
    def pipeline(self):  # each block's own aux loss, through the model's local heads
        return "local" if self.target_loss == "local" and self.aux is None else None

    def pipeline_refusal(self):
        if self.target_loss != "local":
            return (f"guess with target='local' only (each block's own aux loss); target={self.target_loss!r} "
                    f"needs later blocks")
        if self.aux is not None:
            return ("guess with the model's local heads as aux nets (aux=None) only; rule-owned aux nets are not "
                    "gathered across stages")
        return super().pipeline_refusal()

    def __init__(self, guess="local", target="global", space="activity", projection="sample", aux=None,
                 eps=1e-8, aux_width=None, aux_depth=2, aux_lr=0.05, last_block="estimate", weight_unit="block",
                 normalise_random=False, coupled_activity="batch", weight_examples="shared", directions_per_pass=0,
                 diagnostics=False):
        super().__init__(diagnostics)
        for option, value, allowed in (("coupled_activity", coupled_activity, COUPLED_ACTIVITY),
                                       ("weight_examples", weight_examples, WEIGHT_EXAMPLES)):
            _check_choice(option, value, allowed)
        if coupled_activity == "example" and (space, projection) != ("activity", "sample"):
            raise ValueError(f"guess: coupled_activity='example' applies to space='activity' with "
                             f"projection='sample'; got space={space!r}, projection={projection!r}")
        if weight_examples == "example" and space != "weight":
            raise ValueError(f"guess: weight_examples='example' applies to space='weight'; got space={space!r}")
        if int(directions_per_pass) != directions_per_pass or directions_per_pass < 0:
            raise ValueError(f"guess: directions_per_pass={directions_per_pass!r} must be an integer >= 0 "
                             f"(0: all in one pass)")
        if directions_per_pass and (coupled_activity, weight_examples) == ("batch", "shared"):
            raise ValueError("guess: directions_per_pass applies to coupled_activity='example' or "
                             "weight_examples='example' (their one-example directions)")
        self.coupled_activity, self.weight_examples = coupled_activity, weight_examples
        self.directions_per_pass = int(directions_per_pass)
        if weight_unit not in WEIGHT_UNITS:
            raise ValueError(f"guess: weight_unit={weight_unit!r}; allowed: 'block' (one projection per block) or "
                             f"'module' (one per conv, linear map or norm, as Fournier et al.'s code does)")
        if weight_unit == "module" and space != "weight":
            raise ValueError("guess: weight_unit='module' applies to space='weight'")
        self.weight_unit = weight_unit
        if last_block not in LAST_BLOCK:
            raise ValueError(f"guess: last_block={last_block!r}; allowed: 'estimate' (guessed like every block) or "
                             f"'exact' (its exact gradient of the final loss, as Fournier et al.'s code trains it)")
        self.last_block = last_block
        for option, value, allowed in (("guess", guess, GUESSES), ("target", target, TARGETS),
                                       ("space", space, SPACES), ("projection", projection, PROJECTIONS),
                                       ("aux", aux, AUX_NETS)):
            _check_choice(option, value, allowed)
        if projection == "span" and space != "activity":
            raise ValueError(f"guess: projection='span' needs space='activity' (the batch's guesses span one "
                             f"example's activity space); got space={space!r}")
        if not eps >= 0:
            raise ValueError(f"guess: eps={eps!r} must be >= 0")
        for option, value in (("aux_width", aux_width), ("aux_depth", aux_depth)):
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"guess: {option}={value!r} must be an integer >= 1")
        if not aux_lr >= 0:
            raise ValueError(f"guess: aux_lr={aux_lr!r} must be >= 0")
        self.guess, self.target_loss, self.space, self.projection = guess, target, space, projection
        self.aux, self.eps, self.aux_depth, self.aux_lr = aux, eps, int(aux_depth), aux_lr
        self.aux_width = aux_width or DEFAULT_AUX_WIDTH.get(aux)
        self.normalised = guess not in RANDOM_GUESSES or normalise_random
        self.seed, self._model = 0, None

    # --- setup and state -------------------------------------------------------------------
    def setup(self, model, params, seed=0):
        """Bind to ``model``; rule-owned aux nets are drawn from ``seed`` on first use."""
        self.seed, self.state = seed, {}
        self._bind(model)

    def _bind(self, model):
        self._model = model
        self._heads_are_aux = self.aux is None and model.has_local_heads
        self._kind = self.aux or "linear"
        self._block_params = {k: sorted(model.parameters_of(k, local_head=False)) for k in model.blocks()}
        self._coupled = [model.couples_examples_after_output(k, self._target_plan(model, k))
                         for k in range(model.num_blocks)]
        # weight space: a BatchNorm in training mode within block k (after its linear maps) or after it
        self._weight_coupled = [model.couples_examples_after(k, plan) or (plan.train and bool(model.state_of(k, False)))
                                for k, plan in ((k, self._target_plan(model, k)) for k in range(model.num_blocks))]
        if self.projection == "span" and any(self._coupled):
            k = self._coupled.index(True)
            raise ValueError(f"guess: projection='span' needs every example's target derivative in every "
                             f"direction, but {model.name} mixes the batch after block {k}'s output (BatchNorm in "
                             f"training mode), where a forward pass gives only batch totals; allowed here: "
                             f"projection='sample'")
        self.target = "local-greedy" if self.target_loss == "local" and self._heads_are_aux else "global"

    def _target_plan(self, model, k):
        """The plan whose losses hold block k's target (for ``couples_examples_after_output``)."""
        if self.target_loss == "local":
            return Plan(local_losses=True, greedy=True)
        if self.target_loss == "intermediate" and k < model.num_blocks - 1:
            return Plan(local_losses=True)
        return Plan()

    def _head_names(self, model, k):
        return sorted(model.parameters_of(k, local_head=True))

    def _draw(self, model, k, h, generator, prefix):
        """Fresh aux-net parameters for block k's output value h, named ``{prefix}{k}.…``: the model's
        head ``blocks.{k}.head.…`` re-drawn from its initialisers when the heads are the aux nets,
        else a rule-owned net (Kaiming-uniform, PyTorch's default)."""
        if self._heads_are_aux:
            specs = {name.replace(f"blocks.{k}.", f"{prefix}{k}.", 1): model.specs[name]
                     for name in self._head_names(model, k)}
        else:
            if self._kind == "cnn" and h.ndim != 4:
                raise ValueError(f"guess: aux='cnn' needs image block outputs [N, C, H, W]; block {k} of {model.name} "
                                 f"outputs {tuple(h.shape)}; allowed here: aux='linear' or 'mlp'")
            layers = aux_layer_shapes(self._kind, h.shape, model.specs["head.weight"].shape[-1], self.aux_width,
                                      self.aux_depth)
            specs = {}
            for i, (shape, fan_in) in enumerate(layers):
                outputs = shape[0] if len(shape) == 4 else shape[1]
                where = dict(block=k, local_head=True)
                specs[f"{prefix}{k}.{i}.weight"] = ParamSpec(shape, fan_in, "kaiming_uniform", role="weight", **where)
                specs[f"{prefix}{k}.{i}.bias"] = ParamSpec((outputs,), fan_in, "kaiming_uniform", role="bias", **where)
        return {name: backend.to_device(initialisers.get(spec.init)(generator, spec.shape, spec.fan_in, h.dtype))
                for name, spec in specs.items()}

    def _net(self, model, k, arrays, prefix):
        """An ``AuxNet`` on block k from ``arrays`` named ``{prefix}{k}.…``: the model's local loss with
        those head weights, or a rule-owned net."""
        if self._heads_are_aux:
            def as_heads(p):
                return {name.replace(f"{prefix}{k}.", f"blocks.{k}.", 1): value for name, value in p.items()}
            return AuxNet(arrays, lambda p, h, labels: model.local_loss(k, as_heads(p), h, labels, replicated=False))
        layers, net_prefix = len(arrays) // 2, f"{prefix}{k}."
        return AuxNet(arrays, lambda p, h, labels: losses.cross_entropy(aux_logits(p, net_prefix, h, layers), labels,
                                                                         reduction="none"))

    def _stored_net(self, model, k, h, prefix, salt):
        """A rule-owned net kept in ``self.state`` (created on first use from the setup seed)."""
        names = [name for name in self.state if name.startswith(f"{prefix}{k}.")]
        if not names:
            self.state.update(self._draw(model, k, h, numpy.random.default_rng([self.seed, salt, k]), prefix))
            names = [name for name in self.state if name.startswith(f"{prefix}{k}.")]
        return self._net(model, k, {name: self.state[name] for name in names}, prefix)

    def _trained_net(self, model, params, k, h):
        """Block k's local loss: the model's head, or the rule's trained aux net ``aux.{k}.…``."""
        if self._heads_are_aux:
            return self._net(model, k, {name: params[name] for name in self._head_names(model, k)}, "blocks.")
        return self._stored_net(model, k, h, "aux.", 1)

    def _guess_net(self, model, params, k, h, streams):
        if self.guess == "local":
            return self._trained_net(model, params, k, h)
        if self.guess == "fixed-ntk":
            return self._stored_net(model, k, h, "ntk.", 2)
        generator = numpy.random.default_rng(int(streams(k).integers(0, 2 ** 63 - 1)))  # ntk: a new net every step
        return self._net(model, k, self._draw(model, k, h, generator, "ntk."), "ntk.")

    def _trained_blocks(self, model):
        """Blocks (of ``model.blocks()``) whose trained aux net is used (as a guess or as a target)."""
        if self.guess == "local" or self.target_loss == "local":
            return list(model.blocks())
        return [k for k in model.blocks() if k > 0] if self.target_loss == "intermediate" else []

    # --- one step --------------------------------------------------------------------------
    def estimate(self, model, params, x, labels, rng, state, batch):
        if self._model is not model:
            self._bind(model)
        streams = _block_streams(int(rng.integers(0, 2 ** 63 - 1)))
        values = None
        if self.guess not in RANDOM_GUESSES:  # guesses from aux nets need the activations first
            primal = model.forward(params, x, labels, Plan(record_points=False), state)
            values = self._block_values(model, x, primal)
        if self.projection == "span" and batch.stop - batch.start != batch.total:
            raise ValueError("guess: projection='span' projects every target on the span of the whole batch's "
                             "guesses, which a shard does not hold; it cannot run data-parallel (use 'sample')")
        if self.space == "activity":
            grads, trace = self._activity(model, params, x, labels, (rng, streams), state, values, batch)
            batch_wide = frozenset()
        else:
            weight = self._weight if self.weight_examples == "shared" else self._weight_per_example
            grads, trace = weight(model, params, x, labels, (rng, streams), state, values, batch)
            batch_wide = frozenset(grads)
        last = model.num_blocks - 1
        if self.last_block == "exact" and last in self._block_params:  # the stage that holds the last block
            inputs = (values or self._block_values(model, x, trace))[0]
            exact = _last_block_exact(model, params, trace, inputs[last], labels, state, self._block_params[last])
            grads.update(exact)
            batch_wide = batch_wide - set(exact)  # this shard's exact gradient: the runner reduces it
        grads.update(_head_grads(model, params, trace, labels, model.has_local_heads))
        self._train_aux(model, params, {k: value_of(trace.outputs[k]) for k in model.blocks()}, labels, batch)
        return Estimate(grads, mean_value(trace.loss), trace.state, batch_wide=batch_wide)

    @staticmethod
    def _block_values(model, x, trace):
        """({block: input}, {block: output}) as values, for the blocks ``model.blocks()`` (a pipeline
        stage's: the first one's input is ``x``, the previous stage's output)."""
        blocks = list(model.blocks())
        outputs = {k: value_of(trace.outputs[k]) for k in blocks}
        first = value_of(model.embed(x)) if blocks[0] == 0 else value_of(x)
        return {k: outputs[k - 1] if k - 1 in outputs else first for k in blocks}, outputs

    def _aux_guesses(self, model, params, labels, streams, outputs):
        """Activity-space guesses of the aux nets: {k: ∇_{y_k} Σ_n ℓ_aux,n [N, ...]}."""
        return {k: self._guess_net(model, params, k, h, streams).input_gradient(h, labels)
                for k, h in outputs.items()}

    def _target_derivatives(self, model, params, trace, k, labels, directions):
        """[K, N]: the tangent of every example's target loss for block k, from the forward pass."""
        last = model.num_blocks - 1
        if self.target_loss == "global" or (self.target_loss == "intermediate" and k == last):
            return _tangent(trace.loss, directions)
        j = k if self.target_loss == "local" else k + 1
        net = self._trained_net(model, params, j, value_of(trace.outputs[j]))
        return _tangent(net(trace.outputs[j], labels), directions)

    def _activity_estimate(self, k, guess, derivatives, batch):
        """The estimate [N, ...] of block k's per-example targets from its derivatives: [N] per example
        (⟨T_n, G_n⟩), or the span's [N, N]."""
        if self.projection == "span":
            return span_projection(guess, derivatives)
        if self._coupled[k] and self.coupled_activity == "batch":  # only the batch total: one vector
            n = len(guess)
            totals = batch.mean(backend.namespace(guess).stack([derivatives.sum() / n, (guess * guess).sum() / n]))
            return guess * _scale(totals[0] * batch.total, totals[1] * batch.total, self.eps, self.normalised)
        return sample_projection(guess, derivatives, self.eps, self.normalised)

    def _passes(self, model, params, x, labels, state, batch, rows, plan_of, block_of):
        """Forward passes over the directions ``rows`` [(key, example)] (at most ``directions_per_pass``
        per pass; ``plan_of(rows of a pass)`` injects them) and the target derivatives they give:
        {key: d [N]}.  A direction of example None carries every example's guess, and d_n is the
        tangent of example n's target loss (no BatchNorm mixes the batch on the way); a one-example
        direction carries example n's only, and d_n is the tangent of the batch's total target loss
        Σ_m ℓ_m (exact whatever mixes the batch).  ``block_of(key)``: whose target.  Returns
        (derivatives, the trace of the last pass)."""
        isolated = any(example is not None for _, example in rows)
        if isolated and batch.stop - batch.start != batch.total:
            raise ValueError("guess: one-example directions need every example's target loss, which a shard does "
                             "not hold; coupled_activity='example' or weight_examples='example' cannot run "
                             "data-parallel where a BatchNorm mixes the batch")
        size, derivatives = self.directions_per_pass or max(len(rows), 1), {}
        for start in range(0, max(len(rows), 1), size):  # no rows: one plain pass, for the trace
            chunk = rows[start:start + size]
            trace = model.forward(params, x, labels, plan_of(chunk), state)
            tangents = {}
            for r, (key, example) in enumerate(chunk):
                k = block_of(key)
                if k not in tangents:
                    tangents[k] = self._target_derivatives(model, params, trace, k, labels, len(chunk))
                if example is None:
                    derivatives[key] = tangents[k][r]
                else:
                    row = tangents[k][r]
                    derivatives.setdefault(key, backend.namespace(row).zeros(len(row), row.dtype))[example] = row.sum()
        return derivatives, trace

    def _activity(self, model, params, x, labels, generators, state, values, batch):
        rng, streams = generators
        n = len(labels)
        guesses = {} if values is None else self._aux_guesses(model, params, labels, streams, values[1])
        blocks = list(model.blocks())
        # random guesses keyed by (step, block, example row): one draw for every pass
        draw = example_noise(rng, batch, 1, "output", layers="all") if self.guess in RANDOM_GUESSES else None
        if self.projection == "span":  # one pass per block, direction m puts G_m at every example
            derivatives = {}
            for k in blocks:
                perturb = self._activity_tangents([k], guesses, draw, lambda _, guess: _every_example(guess))
                trace = model.forward(params, x, labels, Plan(perturb=perturb, record_points=False), state)
                derivatives[k] = self._target_derivatives(model, params, trace, k, labels, n)
        else:
            isolate = self.coupled_activity == "example"
            rows = [(k, e) for k in blocks for e in (range(n) if isolate and self._coupled[k] else [None])]

            def plan_of(chunk):
                perturb = self._activity_tangents({k for k, _ in chunk}, guesses, draw,
                                                  lambda k, guess: _row_tangent(chunk, k, guess))
                return Plan(perturb=perturb, record_points=False)
            derivatives, trace = self._passes(model, params, x, labels, state, batch, rows, plan_of, lambda k: k)
        inputs = (values or self._block_values(model, x, trace))[0]
        grads = {}
        for k in blocks:  # the block-output cotangent ĝ/N, through block k alone
            estimate = self._activity_estimate(k, guesses[k], derivatives[k], batch)
            pullback = _block_pullback(model, k, params, self._block_params[k], inputs[k], state)
            grads.update(pullback(estimate / n))
        return grads, trace

    def _activity_tangents(self, blocks, guesses, draw, place):
        """``Plan.perturb`` putting the guesses of ``blocks`` at their outputs as ``place(k, guess)``
        (random guesses drawn here by ``draw``, per example and keyed by the block and the example's
        row in the whole batch, as FG-A's noise)."""

        def perturb(site):
            if site.kind != "output" or site.block not in blocks:
                return None
            if site.block not in guesses:
                gaussian = draw(site)[0]
                guesses[site.block] = gaussian if self.guess == "gaussian" else signs(gaussian)
            return place(site.block, guesses[site.block])
        return perturb

    def _weight_guesses(self, model, params, labels, streams, state, values, batch):
        """{k: {name: guess}} — one weight-shaped guess per block, shared by the batch (random ones
        from block k's stream)."""
        if values is None:
            return {k: {name: random_guess(self.guess, streams(k), params[name].shape, params[name].dtype)
                        for name in names} for k, names in self._block_params.items()}
        inputs, outputs = values
        guesses = {}
        for k, activity_guess in self._aux_guesses(model, params, labels, streams, outputs).items():
            # ∇_θ mean_n ℓ_aux,n = (block k's Jacobian)ᵀ (∇_y Σ_n ℓ_aux,n) / N
            pullback = _block_pullback(model, k, params, self._block_params[k], inputs[k], state)
            guesses[k] = _batch_means(batch, pullback(activity_guess / len(labels)))  # the whole batch's
        return guesses

    def _weight(self, model, params, x, labels, generators, state, values, batch):
        guesses = self._weight_guesses(model, params, labels, generators[1], state, values, batch)
        units = self._weight_units(model, guesses)  # direction i carries units[i]
        rows = [(i, None) for i in range(len(units))]
        perturbed = dict(params)
        for row, (_, guess) in enumerate(units):
            for name, g in guess.items():
                perturbed[name] = Dual._make(value_of(params[name]), _row_tangent(rows, row, g))
        trace = model.forward(perturbed, x, labels, Plan(record_points=False), state)
        shard_means = {row: self._target_derivatives(model, params, trace, k, labels, len(units))[row].mean(
            keepdims=True) for row, (k, guess) in enumerate(units) if guess}
        derivatives = _batch_means(batch, shard_means)  # the whole batch's mean directional derivatives
        grads = {}
        for row, (_, guess) in enumerate(units):
            derivative = float(derivatives[row][0])
            grads.update(_weight_projection(guess, derivative, self.eps, self.normalised))
        return grads, trace

    def _example_weight_guesses(self, model, params, labels, generators, state, values, batch):
        """{k: {name: [N, *shape]}}: example n's own guess for every tensor of block k — random draws
        keyed by (step, block, tensor, example row), or example n's share of the aux-loss gradient
        ∇_θ mean_m ℓ_aux,m (``_block_example_pullback``).  With ``last_block='exact'`` the last block
        gets none (its exact gradient replaces any estimate)."""
        rng, streams = generators
        n, last = len(labels), model.num_blocks - 1
        blocks = [k for k in self._block_params if not (self.last_block == "exact" and k == last)]
        if values is None:
            draw = example_noise(rng, batch, 1, "weight", layers="all", distribution=self.guess)
            return {k: {name: draw(Site(k, name, "weight", (n,) + params[name].shape, params[name].dtype))[0]
                        for name in self._block_params[k]} for k in blocks}
        inputs, outputs = values
        activity = self._aux_guesses(model, params, labels, streams, outputs)
        return {k: _block_example_pullback(model, k, params, inputs[k], state)(activity[k] / n) for k in blocks}

    def _weight_per_example(self, model, params, x, labels, generators, state, values, batch):
        """Per-example weight-space projection: for every unit u (a block or a module) and example n,
        ĝ_u = mean_n d_{n,u} / (‖G_{n,u}‖² + ε) · G_{n,u} (random guesses: d_{n,u} G_{n,u}), with
        d_{n,u} = ⟨∇_{θ_u} ℓ_n, G_{n,u}⟩ (∇_{θ_u} ℓ_n: example n's share of the gradient of its target
        loss, N × the share of the batch's where a BatchNorm mixes it) from forward passes whose
        tangent enters at each hidden layer as the output tangent of example n's own weight tangent
        (``Plan.layer_hook``): one direction per unit, or one per (unit, example) where a BatchNorm
        in training mode lies in or after the unit's block."""
        guesses = self._example_weight_guesses(model, params, labels, generators, state, values, batch)
        units = self._weight_units(model, guesses)
        n = len(labels)
        rows = [(i, e) for i, (k, _) in enumerate(units) for e in (range(n) if self._weight_coupled[k] else [None])]
        owner = {name: i for i, (_, guess) in enumerate(units) for name in guess}
        reached = set()

        def plan_of(chunk):
            return Plan(layer_hook=_example_weight_hook(units, owner, chunk, reached), record_points=False)
        derivatives, trace = self._passes(model, params, x, labels, state, batch, rows, plan_of, lambda i: units[i][0])
        missing = {name for k in guesses for name in self._block_params[k]} - reached
        if missing:
            raise ValueError(f"guess: weight_examples='example' gives per-example tangents to the hidden layers' "
                             f"linear maps and norms only; {model.name} also has {sorted(missing)}")
        grads = {}
        for i, (_, guess) in enumerate(units):
            flat = backend.namespace(derivatives[i]).concatenate([g.reshape(n, -1) for g in guess.values()], axis=1)
            mean, offset = sample_projection(flat, derivatives[i], self.eps, self.normalised).mean(axis=0), 0
            for name, g in guess.items():
                size = g[0].size
                grads[name], offset = mean[offset:offset + size].reshape(g.shape[1:]), offset + size
        return (_batch_means(batch, grads) if grads else grads), trace

    def _weight_units(self, model, guesses):
        """[(block, {name: guess})]: what one scalar projects — a whole block (``weight_unit='block'``,
        in block order), or each module of a block (its spec's ``module``: a conv or linear map with
        its bias, a norm's scale and shift; ``'module'``).  Each unit rides in its own direction."""
        if self.weight_unit == "block":
            return list(guesses.items())
        units = {}
        for k, guess in guesses.items():
            for name, g in guess.items():
                units.setdefault((k, model.specs[name].module or name), {})[name] = g
        return [(k, guess) for (k, _), guess in units.items()]

    def _train_aux(self, model, params, outputs, labels, batch):
        """Plain SGD on the rule-owned trained aux nets' exact gradients (model heads are in the estimate)."""
        if self._heads_are_aux:
            return
        for k in self._trained_blocks(model):
            net = self._trained_net(model, params, k, outputs[k])
            for name, g in _batch_means(batch, net.param_gradients(outputs[k], labels)).items():
                self.state[name] = self.state[name] - self.aux_lr * g
