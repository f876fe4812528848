"""Fournier et al.'s per-example projections (``rules.create('guess', coupled_activity='example')`` and
``weight_examples='example'``, dualnet/rules/guesses.py) against their formulas, in float64.

* Activity space under a coupling BatchNorm: for every block k, ĝ_n = d_n / (‖G_n‖² + ε) · G_n with
  d_n = ⟨Σ_m ∂ℓ_m/∂y_{k,n}, G_n⟩ from central finite differences that move example n's block output
  alone; the block's gradient is that cotangent / N carried back through the block.  Where nothing
  couples the batch the option changes nothing.
* Weight space: for every unit u (block or module), mean_n d_{n,u} / (‖G_{n,u}‖² + ε) · G_{n,u}
  (Gaussian guesses: mean_n d_{n,u} G_{n,u}) with d_{n,u} from central finite differences that move
  example n's copy of the unit's tensors alone (the batch's other examples keep θ), on an MLP with
  and without BatchNorm, a LocalMixer and a tiny ResNet-18.  The local guesses G_{n,u} are example
  n's share of the aux-loss gradient: they sum to the shared guess and match finite differences.
* The per-example layer pieces (``example_tangent``, ``example_pullback``) equal a loop over the
  examples of single-example forward and reverse mode, for random shapes (hypothesis).
* Directions split over several passes give the same estimate; with nothing left to estimate the
  pass still runs; a shard, an invalid combination or a layer without per-example pieces is one
  clear error.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualnet import autodiff, models, rules
from dualnet.dual import Dual
from dualnet.nn.conv import conv_layer
from dualnet.nn.layers import grouped, linear, token_mixing
from dualnet.nn.plan import Context, Plan
from dualnet.rules.base import Batch
from dualnet.rules.guesses import _block_pullback, _block_streams

EPS = 1e-5  # step length of the central differences, Richardson-extrapolated: error O(EPS⁴)


def _derivative(f):
    """f'(0) of a scalar function of a step length: central differences at EPS and EPS/2, Richardson-
    extrapolated (the O(EPS²) terms cancel; a BatchNorm over 3 examples is strongly curved)."""
    def central(h):
        return (f(h) - f(-h)) / (2 * h)
    return (4 * central(EPS / 2) - central(EPS)) / 3


def _model(name, tiny):
    if name == "mlp":
        return tiny.mlp(local_heads=True)
    if name == "mlp-bn":
        return tiny.mlp(batch_norm=True, local_heads=True)
    if name == "mixer":
        return tiny.mixer()
    return models.create("resnet18", input_shape=(3, 8, 8), num_classes=3, width=2, aux="cnn", aux_width=2,
                         aux_depth=1)


def _setup(name, tiny, n=4, **options):
    model = _model(name, tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, n)
    state = model.init_state(np.float64)
    rule = rules.create("guess", **options)
    rule.setup(model, params, 0)
    return model, params, x, labels, state, rule


def _values(rule, model, params, x, labels, state):
    return rule._block_values(model, x, model.forward(params, x, labels, Plan(record_points=False), state))


def _assert_close(grads, expected):
    """grads[t] ≈ expected[t] for every t, to 1e-6 relative, with a floor 1e-9 × the largest entry
    (a bias before a BatchNorm has a zero gradient up to rounding)."""
    floor = 1e-9 * max(float(np.abs(v).max()) for v in expected.values())
    for name, value in expected.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-6, atol=floor, err_msg=name)


def _projected(guesses, derivatives, eps, normalised):
    """mean_n c_n G_n for guesses {name: [N, ...]} of one unit, c_n = d_n / (Σ_t ‖G_{n,t}‖² + ε) or d_n."""
    squared = sum((g.reshape(len(g), -1) ** 2).sum(axis=1) for g in guesses.values())
    scale = derivatives / (squared + eps) if normalised else derivatives
    return {t: np.tensordot(scale, g, axes=1) / len(g) for t, g in guesses.items()}


# --- activity space ----------------------------------------------------------------------------------
def _output_derivatives(model, params, outputs, labels, state, k, guess):
    """d_n = ⟨Σ_m ∂ℓ_m/∂y_{k,n}, G_n⟩ by central differences moving example n's block-k output alone."""
    def total(h):
        later = range(k + 1, model.num_blocks)
        stage = model.forward(params, h, labels, Plan(record_points=False), state, blocks=later)
        return float(stage.loss.sum())
    d = np.zeros(len(guess))
    for n in range(len(guess)):
        norm = np.linalg.norm(guess[n])  # 0: a dead example, whose term is 0 · G_n
        step = np.zeros_like(guess)
        step[n] = guess[n] / max(norm, 1e-300)
        d[n] = norm * _derivative(lambda h: total(outputs[k] + h * step))
    return d


@pytest.mark.parametrize("model_name", ["mlp-bn", "resnet18"])
def test_coupled_activity_example_is_the_per_example_projection(model_name, tiny):
    model, params, x, labels, state, rule = _setup(model_name, tiny, coupled_activity="example")
    assert any(rule._coupled)
    grads = rule(model, params, x, labels, np.random.default_rng(0), state).grads
    inputs, outputs = _values(rule, model, params, x, labels, state)
    guesses = rule._aux_guesses(model, params, labels, _block_streams(0), outputs)
    n = len(labels)
    for k in model.blocks():
        d = _output_derivatives(model, params, outputs, labels, state, k, guesses[k])
        squared = (guesses[k].reshape(n, -1) ** 2).sum(axis=1)
        estimate = guesses[k] * (d / (squared + rule.eps)).reshape((-1,) + (1,) * (guesses[k].ndim - 1))
        _assert_close(grads, _block_pullback(model, k, params, rule._block_params[k], inputs[k], state)(estimate / n))


@pytest.mark.parametrize("model_name", ["mlp", "mixer", "resnet18"])
@pytest.mark.parametrize("guess", ["local", "gaussian"])
def test_coupled_activity_example_changes_only_coupled_blocks(model_name, guess, tiny):
    """Uncoupled blocks (every block of an MLP without BatchNorm or a LocalMixer, ResNet-18's last
    block under the global target) get the default estimate (to rounding: a pass of more directions),
    coupled ones a different one."""
    model, params, x, labels, state, _ = _setup(model_name, tiny)
    grads = {}
    for option in ("batch", "example"):
        rule = rules.create("guess", guess=guess, coupled_activity=option)
        rule.setup(model, params, 0)
        grads[option] = rule(model, params, x, labels, np.random.default_rng(3), state).grads
    for k in model.blocks():
        names = model.parameters_of(k, local_head=False)
        same = all(np.allclose(grads["batch"][t], grads["example"][t], rtol=1e-12, atol=0) for t in names)
        assert same == (not rule._coupled[k]), (k, rule._coupled[k])


# --- weight space ------------------------------------------------------------------------------------
def _one_example_hook(n, moved):
    """``Plan.layer_hook``: example n runs with the tensors ``moved`` {name: value}, every other example
    with the parameters (values only; the norm keeps the batch's statistics of z)."""
    def replace_row(out, row):
        return np.concatenate([out[:n], row, out[n + 1:]])

    def hook(layer):
        fn, normalize = layer.fn, layer.normalize
        if any(t in moved for t in layer.param_names):
            def fn(x, *weights):
                own = [moved.get(t, w) for t, w in zip(layer.param_names, weights)]
                return replace_row(layer.fn(x, *weights), layer.fn(x[n:n + 1], *own))
        if any(t in moved for t in layer.norm_param_names):
            def normalize(z, *weights):
                own = [moved.get(t, w) for t, w in zip(layer.norm_param_names, weights)]
                return replace_row(layer.normalize(z, *weights), layer.normalize(z, *own)[n:n + 1])
        return fn, normalize
    return hook


def _weight_derivative(model, params, x, labels, state, n, guess):
    """d_n = ⟨∇_θ Σ_m ℓ_m through example n's copy of θ, G_n⟩ by central differences."""
    norm = np.sqrt(sum((g[n] ** 2).sum() for g in guess.values()))  # 0: a dead example, whose term is 0

    def total(h):
        moved = {t: params[t] + h * g[n] / max(norm, 1e-300) for t, g in guess.items()}
        trace = model.forward(params, x, labels, Plan(record_points=False, layer_hook=_one_example_hook(n, moved)),
                              state)
        return float(trace.loss.sum())
    return norm * _derivative(total)


def _example_guesses(rule, model, params, x, labels, state, seed):
    """The per-example guesses the rule draws in ``rule(..., default_rng(seed))``."""
    rng = np.random.default_rng(seed)
    streams = _block_streams(int(rng.integers(0, 2 ** 63 - 1)))
    values = None if rule.guess == "gaussian" else _values(rule, model, params, x, labels, state)
    return rule._example_weight_guesses(model, params, labels, (rng, streams), state, values, Batch.whole(len(labels)))


@pytest.mark.parametrize("guess, unit", [("local", "module"), ("local", "block"), ("gaussian", "module")])
@pytest.mark.parametrize("model_name", ["mlp", "mlp-bn", "mixer", "resnet18"])
def test_weight_examples_example_is_the_per_example_projection(model_name, guess, unit, tiny):
    model, params, x, labels, state, rule = _setup(model_name, tiny, n=3, space="weight", guess=guess,
                                                   weight_unit=unit, weight_examples="example")
    grads = rule(model, params, x, labels, np.random.default_rng(7), state).grads
    guesses = _example_guesses(rule, model, params, x, labels, state, 7)
    units = rule._weight_units(model, guesses)
    assert (len(units) > model.num_blocks) == (unit == "module" and model_name != "mlp")
    for _, unit_guess in units:
        d = np.array([_weight_derivative(model, params, x, labels, state, n, unit_guess) for n in range(len(labels))])
        _assert_close(grads, _projected(unit_guess, d, rule.eps, rule.normalised))


@pytest.mark.parametrize("model_name", ["mlp", "mlp-bn", "mixer", "resnet18"])
def test_local_example_guesses_are_each_examples_share_of_the_aux_gradient(model_name, tiny):
    """Σ_n G_n is the shared guess ∇_θ mean_m ℓ_aux,m; ⟨G_n, v⟩ is the derivative of mean_m ℓ_aux,m when
    example n's copy of θ moves along v (central differences, a random v per tensor)."""
    model, params, x, labels, state, rule = _setup(model_name, tiny, n=3, space="weight",
                                                   weight_examples="example")
    guesses = _example_guesses(rule, model, params, x, labels, state, 0)
    inputs, outputs = _values(rule, model, params, x, labels, state)
    shared = rule._weight_guesses(model, params, labels, _block_streams(0), state, (inputs, outputs),
                                  Batch.whole(len(labels)))
    v_rng = np.random.default_rng(11)
    for k, guess in guesses.items():
        net = rule._guess_net(model, params, k, outputs[k], _block_streams(0))
        for name, g in guess.items():
            np.testing.assert_allclose(g.sum(axis=0), shared[k][name], rtol=1e-9, atol=1e-14)
            v = v_rng.standard_normal(g.shape[1:])
            v /= np.linalg.norm(v)
            for n in range(len(labels)):
                def aux(sign):
                    hook = _one_example_hook(n, {name: params[name] + sign * EPS * v})
                    h = model.block(k, params, inputs[k], Context(Plan(record_points=False, layer_hook=hook), state))
                    return float(net(h, labels).mean())
                expected = (aux(1) - aux(-1)) / (2 * EPS)
                assert np.isclose((g[n] * v).sum(), expected, rtol=1e-6, atol=1e-10), (k, name, n)


@pytest.mark.parametrize("options", [dict(space="weight", weight_examples="example", weight_unit="module"),
                                     dict(coupled_activity="example")])
def test_directions_split_over_passes_give_the_same_estimate(options, tiny):
    model, params, x, labels, state, _ = _setup("mlp-bn", tiny)
    grads = []
    for per_pass in (0, 3):
        rule = rules.create("guess", directions_per_pass=per_pass, **options)
        rule.setup(model, params, 0)
        grads.append(rule(model, params, x, labels, np.random.default_rng(1), state).grads)
    for name in grads[0]:
        np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=1e-12, atol=1e-15)


def test_weight_examples_with_only_an_exact_block_is_that_exact_gradient(tiny):
    """One block, trained on its exact gradient: no unit to estimate, the pass still runs (heads, loss)."""
    model = tiny.mlp(layers=2, local_heads=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    grads = {}
    for option in ("shared", "example"):
        rule = rules.create("guess", space="weight", last_block="exact", weight_examples=option)
        rule.setup(model, params, 0)
        grads[option] = rule(model, params, x, labels, np.random.default_rng(0)).grads
    assert sorted(grads["example"]) == sorted(grads["shared"])
    for name, value in grads["shared"].items():
        np.testing.assert_allclose(grads["example"][name], value, rtol=1e-12, atol=1e-15)


def test_one_example_directions_refuse_a_shard(tiny):
    model, params, x, labels, state, rule = _setup("mlp-bn", tiny, coupled_activity="example")
    with pytest.raises(ValueError, match="data-parallel"):
        rule.estimate(model, params, x, labels, np.random.default_rng(0), state, Batch(0, len(labels), 8))


@pytest.mark.parametrize("options, message", [
    ({"coupled_activity": "each"}, "coupled_activity='each'"),
    ({"weight_examples": "all"}, "weight_examples='all'"),
    ({"coupled_activity": "example", "space": "weight"}, "space='activity' with projection='sample'"),
    ({"coupled_activity": "example", "projection": "span"}, "space='activity' with projection='sample'"),
    ({"weight_examples": "example"}, "applies to space='weight'"),
    ({"directions_per_pass": -1}, "directions_per_pass=-1"),
    ({"directions_per_pass": 4}, "applies to coupled_activity='example' or weight_examples='example'"),
])
def test_invalid_per_example_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        rules.create("guess", **options)


def test_a_layer_without_per_example_tangents_is_named(tiny):
    model, params, x, labels, state, rule = _setup("mlp", tiny, space="weight", weight_examples="example")
    original = model.block

    def block(k, params, h, ctx):  # block 0's linear map through a function with no per-example pieces
        if k == 0:
            return model.hidden(ctx, k, "plain", lambda a, w, b: linear(a, w, b), h, params,
                                ["blocks.0.linear.weight", "blocks.0.linear.bias"])
        return original(k, params, h, ctx)
    model.block = block
    with pytest.raises(ValueError, match="layer 'plain' of block 0"):
        rule(model, params, x, labels, np.random.default_rng(0), state)


@pytest.mark.parametrize("guess", ["local", "gaussian"])
def test_a_tensor_outside_the_hidden_layers_is_named(guess, tiny):
    model, params, x, labels, state, rule = _setup("mlp", tiny, guess=guess, space="weight",
                                                   weight_examples="example")
    original = model.block

    def block(k, params, h, ctx):  # block 0's linear map applied directly, not as a hidden layer
        if k == 0:
            return linear(h, params["blocks.0.linear.weight"], params["blocks.0.linear.bias"])
        return original(k, params, h, ctx)
    model.block = block
    with pytest.raises(ValueError, match=r"also has \['blocks.0.linear.bias', 'blocks.0.linear.weight'\]"):
        rule(model, params, x, labels, np.random.default_rng(0), state)


# --- the per-example layer pieces ---------------------------------------------------------------------
def _layer_case(kind, n, size, rng):
    """(fn, x, weight, bias) of one layer kind with small random shapes."""
    if kind == "linear":
        return linear, rng.standard_normal((n, size, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    if kind == "grouped":
        return grouped, rng.standard_normal((n, size, 2, 3)), rng.standard_normal((2, 3, 4)), \
            rng.standard_normal((2, 4))
    if kind == "token":
        return token_mixing, rng.standard_normal((n, size, 3)), rng.standard_normal((2, size)), rng.standard_normal(2)
    kernel, stride, padding = {"conv3": (3, 1, 1), "conv-strided": (3, 2, 1), "conv1": (1, 2, 0)}[kind]
    return conv_layer(kernel, stride, padding), rng.standard_normal((n, 2, size + 2, size + 3)), \
        rng.standard_normal((3, 2, kernel, kernel)), rng.standard_normal(3)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["linear", "grouped", "token", "conv3", "conv-strided", "conv1"]),
       n=st.integers(1, 3), size=st.integers(1, 4), seed=st.integers(0, 2 ** 16), bias=st.booleans())
def test_example_tangent_and_pullback_are_the_single_example_ones(kind, n, size, seed, bias):
    rng = np.random.default_rng(seed)
    fn, x, weight, b = _layer_case(kind, n, size, rng)
    weights = [weight, b] if bias else [weight]
    moves = [rng.standard_normal((n,) + w.shape) for w in weights]
    tangent = fn.example_tangent(x, *moves)
    z = fn(x, *weights)
    delta = rng.standard_normal(z.shape)
    shares = fn.example_pullback(x, delta)
    for i in range(n):
        one = fn(x[i:i + 1], *[Dual(w, m[i]) for w, m in zip(weights, moves)])
        np.testing.assert_allclose(tangent[i:i + 1], one.tangent, rtol=1e-12, atol=1e-12)
        _, pullback = autodiff.vjp(lambda *w: fn(x[i:i + 1], *w), weight, b)
        for share, exact in zip(shares, pullback(delta[i:i + 1])):
            np.testing.assert_allclose(share[i], exact, rtol=1e-12, atol=1e-12)
