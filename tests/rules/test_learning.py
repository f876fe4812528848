"""Every rule learns on a model it applies to, and the local rules refuse a model without local heads.

Tasks (512 examples, batch 32, Adam lr 1e-2, float64, seed 0): a fixed random ReLU teacher for the
MLPs, Gaussian class prototypes + noise for the LocalMixer (its read-out sees the patch mean).
The measure is the mean cross-entropy on all 512 examples before and after training; each rule's
threshold on after/before is ≥ 1.35 × the ratio measured in that very run (shown next to each
case), room for BLAS round-off differences between machines.  The heads (read-out, local heads)
get exact gradients in every rule, so a control trains the heads alone: it must stay above every
threshold of its model by 10 %, i.e. no case can pass unless the rule's hidden-layer updates learn.
"""
import numpy as np
import pytest

from dualnet import optim, rules
from dualnet.rules import exact_gradients
from dualnet.rules.base import Estimate, Rule, mean_value

EXAMPLES, STEPS, LR = 512, 300, 1e-2

SETTINGS = {  # name: (model, task, objective of the heads-only control)
    "mlp": (lambda tiny: tiny.mlp(hidden=16), "teacher", "global"),
    "mlp-local": (lambda tiny: tiny.mlp(hidden=16, local_heads=True), "teacher", "local-greedy"),
    "mixer": (lambda tiny: tiny.mixer(), "clusters", "local-greedy"),
}

CASES = [  # rule, setting, options, steps, threshold   (measured after/before)
    ("bp", "mlp", {}, STEPS, 0.3),  # 0.05
    ("fa", "mlp", {}, STEPS, 0.4),  # 0.17
    ("dfa", "mlp", {}, STEPS, 0.3),  # 0.08
    ("dkp", "mlp", {}, STEPS, 0.3),  # 0.06
    ("fdfa", "mlp", {}, STEPS, 0.3),  # 0.05
    ("dfa-local", "mlp", {}, STEPS, 0.35),  # 0.25
    ("fg-w", "mlp", {"directions": 4}, STEPS, 0.65),  # 0.47
    ("fg-a", "mlp", {}, STEPS, 0.5),  # 0.31
    ("l-bp", "mlp-local", {}, STEPS, 0.3),  # 0.06
    ("lg-bp", "mlp-local", {}, STEPS, 0.3),  # 0.07
    ("l-fa", "mlp-local", {}, STEPS, 0.3),  # 0.14
    ("lg-fa", "mlp-local", {}, STEPS, 0.3),  # 0.13
    ("lg-fg-w", "mlp-local", {"directions": 4}, STEPS, 0.5),  # 0.35
    ("lg-fg-a", "mlp-local", {}, STEPS, 0.4),  # 0.26
    ("l-bp", "mixer", {}, STEPS, 0.3),  # 0.13
    ("lg-bp", "mixer", {}, STEPS, 0.4),  # 0.28
    ("l-fa", "mixer", {}, STEPS, 0.6),  # 0.44
    ("lg-fa", "mixer", {}, STEPS, 0.6),  # 0.44
    ("lg-fg-w", "mixer", {"directions": 8}, 500, 0.7),  # 0.47
    ("lg-fg-a", "mixer", {}, STEPS, 0.7),  # 0.51
]


class HeadsOnly(Rule):
    """The control: exact gradients of the heads (read-out and local heads), nothing else."""

    def __init__(self, target, is_head):
        super().__init__()
        self.target, self.is_head = target, is_head

    def estimate(self, model, params, x, labels, rng, state, batch):
        grads, trace = exact_gradients(model, params, x, labels, self.target, state)
        heads = {name: g for name, g in grads.items() if self.is_head(model, name)}
        return Estimate(heads, mean_value(trace.loss), trace.state)


def loss_ratio(tiny, setting, rule, steps=STEPS):
    """Mean training cross-entropy on all examples after / before ``steps`` Adam steps."""
    make, task, _ = SETTINGS[setting]
    model = make(tiny)
    params = model.init(0, dtype=np.float64)
    x, labels = getattr(tiny, task)(model, EXAMPLES)
    before = float(model.forward(params, x, labels).loss.mean())
    tiny.train(rule, model, params, x, labels, steps, optimizer=optim.Adam(LR))
    return float(model.forward(params, x, labels).loss.mean()) / before


@pytest.mark.parametrize("name, setting, options, steps, threshold", CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in CASES])
def test_rule_lowers_the_training_loss(name, setting, options, steps, threshold, tiny):
    assert loss_ratio(tiny, setting, rules.create(name, **options), steps) < threshold


def test_every_rule_is_covered():
    """Fournier's guesses (being added separately) have their own tests."""
    assert {case[0] for case in CASES} == {name for name in rules.names() if not name.startswith("guess")}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_the_heads_alone_stays_above_the_thresholds(setting, tiny):
    ratio = loss_ratio(tiny, setting, HeadsOnly(SETTINGS[setting][2], tiny.is_head))
    assert ratio > 1.1 * max(case[4] for case in CASES if case[1] == setting), ratio


LOCAL_RULES = ["l-bp", "lg-bp", "l-fa", "lg-fa", "lg-fg-w", "lg-fg-a"]


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_local_rule_on_a_model_without_local_heads_says_what_is_missing(name, tiny):
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 4)
    rule = rules.create(name)
    rule.setup(model, params, 0)
    with pytest.raises(ValueError, match="local losses need local heads; build the model with local_heads=True"):
        rule(model, params, x, labels, np.random.default_rng(0))
