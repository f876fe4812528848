"""Shared pieces of the rule-theory tests: tiny models and batches (``tiny``) and Monte-Carlo
statistics over repeated calls of a stochastic rule (``monte_carlo``)."""
import types

import numpy as np
import pytest

from dualnet import models


def _mlp(batch_norm=False, layers=3, hidden=6, local_heads=False, input_shape=(1, 4, 4), classes=3):
    return models.create("mlp", input_shape=input_shape, num_classes=classes, hidden=hidden, layers=layers,
                         batch_norm=batch_norm, local_heads=local_heads)


def _mixer(blocks=2, patches=2, channels=8, groups=2, image=8, classes=3):
    """≥ 2 blocks (so token mixing and the residual are present), patches=2 (4 tokens), ≥ 2 groups."""
    return models.create("localmixer", input_shape=(1, image, image), num_classes=classes, config="M/1/16",
                         blocks=blocks, patches=patches, channels=channels, groups=groups)


def _params(model, seed=0, jitter=0.1):
    """float64 parameters with a small Gaussian jitter: the zero biases and the zero read-out of the
    default initialisation would put units exactly on ReLU kinks and make every read-out row equal."""
    rng = np.random.default_rng(seed + 1000)
    return {k: v + jitter * rng.standard_normal(v.shape) for k, v in model.init(seed, dtype=np.float64).items()}


def _batch(model, n, seed=0):
    rng = np.random.default_rng(seed + 2000)
    return rng.standard_normal((n,) + model.input_shape), rng.integers(0, model.num_classes, n)


def _teacher(model, n, seed=0, width=32):
    """A learnable synthetic task: labels from a fixed random one-hidden-layer ReLU teacher
    (argmax of relu(x W₁) W₂) on Gaussian inputs of the model's input shape."""
    rng = np.random.default_rng(seed + 3000)
    dim = int(np.prod(model.input_shape))
    first, second = rng.standard_normal((dim, width)), rng.standard_normal((width, model.num_classes))
    x = rng.standard_normal((n,) + model.input_shape)
    return x, np.argmax(np.maximum(x.reshape(n, -1) @ first, 0) @ second, axis=1)


def _clusters(model, n, seed=0, noise=2.0):
    """A learnable synthetic task: one random Gaussian prototype image per class plus isotropic
    noise of standard deviation ``noise`` (2: no single pixel separates the classes)."""
    rng = np.random.default_rng(seed + 4000)
    prototypes = rng.standard_normal((model.num_classes,) + model.input_shape)
    labels = rng.integers(0, model.num_classes, n)
    return prototypes[labels] + noise * rng.standard_normal((n,) + model.input_shape), labels


def _train(rule, model, params, x, labels, steps, lr=None, optimizer=None, batch=32, seed=0):
    """Train ``params`` in place on random minibatches of (x, labels) with the rule's estimates:
    plain SGD (``params[n] -= lr * g``), or ``optimizer.step(params, grads)`` when given.
    Returns the rule's reported mean loss at every step."""
    rule.setup(model, params, seed)
    state, order, history = model.init_state(params[next(iter(params))].dtype), np.random.default_rng(seed), []
    for step in range(steps):
        rows = order.choice(len(x), batch, replace=False)
        estimate = rule(model, params, x[rows], labels[rows], np.random.default_rng(seed + 10_000 + step), state)
        if optimizer is not None:
            optimizer.step(params, estimate.grads)
        else:
            for name, g in estimate.grads.items():
                params[name] -= lr * g
        state = estimate.state
        history.append(estimate.loss)
    return history


def _is_head(model, name):
    return model.block_of(name) == "head" or model.is_local_head(name)


@pytest.fixture
def tiny():
    return types.SimpleNamespace(mlp=_mlp, mixer=_mixer, params=_params, batch=_batch, teacher=_teacher,
                                 clusters=_clusters, train=_train, is_head=_is_head)


def _samples(rule, model, params, x, labels, calls, state=None, seed=100):
    """{name: [calls, ...]}: the rule's estimate from ``calls`` independent noise seeds."""
    out = {}
    for call in range(calls):
        grads = rule(model, params, x, labels, np.random.default_rng(seed + call), state).grads
        for name, g in grads.items():
            out.setdefault(name, []).append(g)
    return {name: np.stack(g) for name, g in out.items()}


def _t_statistics(samples, target, floor):
    """{name: max_i |mean_i − target_i| / (se_i + floor)} with se the standard error of the mean
    estimated from the samples.  ``floor`` (an absolute error scale, far below any real bias) keeps
    coordinates whose true value and spread are both zero up to round-off (biases just before a
    normalisation) from dividing round-off by round-off."""
    stats = {}
    for name, s in samples.items():
        se = s.std(axis=0, ddof=1) / np.sqrt(len(s))
        stats[name] = float(np.max(np.abs(s.mean(axis=0) - target[name]) / (se + floor)))
    return stats


@pytest.fixture
def monte_carlo():
    return types.SimpleNamespace(samples=_samples, t_statistics=_t_statistics)
