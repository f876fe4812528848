"""DKP's feedback update B ← B − η (eᵀ a + λ B): the weight decay shrinks B.  Its sign is checked
exactly: B starts at zero, so after a first step B₁ is the same with or without decay, and after
a second step (at fixed weights) the two differ by exactly −η λ B₁."""
import numpy as np
import pytest

from dualnet import rules


@pytest.mark.parametrize("decay", [0.5, 3.0])
def test_dkp_weight_decay_shrinks_the_feedback_matrices(tiny, decay):
    model = tiny.mlp()
    params = tiny.params(model)
    x, labels = tiny.batch(model, 16)
    feedback_lr, first, second = 0.1, {}, {}
    for weight_decay in (0.0, decay):
        rule = rules.create("dkp", feedback_lr=feedback_lr, weight_decay=weight_decay)
        rule.setup(model, params, seed=4)
        rule(model, params, x, labels, np.random.default_rng(0), model.init_state(np.float64))
        first[weight_decay] = {key: np.array(value) for key, value in rule.state.items()}
        rule(model, params, x, labels, np.random.default_rng(1), model.init_state(np.float64))
        second[weight_decay] = rule.state
    assert len(first[0.0]) == 2  # one B per hidden layer
    for key, b1 in first[0.0].items():
        assert np.linalg.norm(b1) > 0
        np.testing.assert_array_equal(first[decay][key], b1)
        np.testing.assert_allclose(second[decay][key] - second[0.0][key], -feedback_lr * decay * b1,
                                   rtol=1e-9, atol=1e-15)
