"""The backprop family's gradients are the derivatives of their objectives (``rules.base.objective``
under the plans of ``rules.base.PLANS``), checked against central finite differences in float64.

Stop-gradients decide which part of the objective a parameter's gradient differentiates:

* bp (global): the whole objective (the mean final loss);
* l-bp (local): backbone and local heads follow the sum of the local losses, end to end; the
  read-out, trained on stop-gradient features, follows the final loss;
* lg-bp (local greedy): block k's parameters (and its head) follow block k's local loss only;
  the read-out follows the final loss.

For each parameter tensor, one random direction v: ⟨g, v⟩ must equal (f(θ+εv) − f(θ−εv)) / 2ε of
that part, ε = 1e-6.  Central differences are exact up to O(ε²) ≈ 1e-12 (parameters jittered off
the ReLU kinks) plus round-off ≈ 1e-16 / ε = 1e-10, so the tolerance is 1e-7 · max(1, |f'|).
A companion test shows the split matters: for the greedy rule, differences of the *whole*
objective disagree with the gradient.
"""
import numpy as np
import pytest

from dualnet import primitives as P
from dualnet import rules
from dualnet.dual import value_of
from dualnet.nn.plan import Plan
from dualnet.rules.base import PLANS, objective

EPS = 1e-6
TOLERANCE = 1e-7

TARGETS = {"bp": "global", "l-bp": "local", "lg-bp": "local-greedy"}


def followed_loss(trace, target, block):
    """The part of the objective that a parameter of ``block`` ('head' = read-out) descends."""
    if target == "global":
        return objective(trace)
    if block == "head":
        return P.mean(trace.loss)
    if target == "local":
        return objective(trace) - P.mean(trace.loss)  # the final loss sees stop-gradient features
    return P.mean(trace.local_losses[block])


@pytest.fixture(params=["mixer", "mlp-bn"])
def setting(request, tiny):
    """A LocalMixer (LN, token mixing, residual) or an MLP with BatchNorm and local heads."""
    model = tiny.mixer() if request.param == "mixer" else tiny.mlp(batch_norm=True, local_heads=True)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 5)
    return model, params, x, labels, model.init_state(np.float64)


def central_difference(model, params, x, labels, state, target, name, direction, loss_of):
    plan = Plan(**PLANS[target])

    def at(step):
        shifted = dict(params, **{name: params[name] + step * direction})
        return float(value_of(loss_of(model.forward(shifted, x, labels, plan, state))))
    return (at(EPS) - at(-EPS)) / (2 * EPS)


@pytest.mark.parametrize("rule_name", list(TARGETS))
def test_gradient_equals_central_differences_of_its_objective(rule_name, setting):
    model, params, x, labels, state = setting
    target = TARGETS[rule_name]
    grads = rules.create(rule_name)(model, params, x, labels, np.random.default_rng(0), state).grads
    assert set(grads) == set(params)
    rng = np.random.default_rng(1)
    for name, g in grads.items():
        direction = rng.standard_normal(g.shape)
        block = model.block_of(name)
        finite = central_difference(model, params, x, labels, state, target, name, direction,
                                    lambda trace: followed_loss(trace, target, block))
        analytic = float(np.sum(g * direction))
        assert abs(analytic - finite) <= TOLERANCE * max(1.0, abs(finite)), (name, analytic, finite)


def test_greedy_gradient_is_not_the_derivative_of_the_summed_objective(setting):
    """Block 0 also changes the input of every later block; LG-BP ignores that path."""
    model, params, x, labels, state = setting
    grads = rules.create("lg-bp")(model, params, x, labels, np.random.default_rng(0), state).grads
    name = "blocks.0.linear.weight" if "blocks.0.linear.weight" in params else "blocks.0.dense.weight"
    direction = np.random.default_rng(1).standard_normal(params[name].shape)
    whole = central_difference(model, params, x, labels, state, "local-greedy", name, direction, objective)
    analytic = float(np.sum(grads[name] * direction))
    assert abs(analytic - whole) > 1e3 * TOLERANCE * max(1.0, abs(whole)), (analytic, whole)
