"""The rules' shared pieces (dualnet/rules/base.py)."""
import numpy as np
import pytest

from dualnet import models
from dualnet.gradients import Gradients
from dualnet.nn.plan import Plan
from dualnet.rules.base import PLANS, local_head_grads

MODELS = {
    "mlp": lambda tiny: tiny.mlp(local_heads=True, batch_norm=True),
    "localmixer": lambda tiny: tiny.mixer(),
    "localmixer, LN before the heads": lambda tiny: models.create(
        "localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2, patches=2, channels=8,
        groups=2, inter_ln=True),
    "cnn-fdfa": lambda tiny: models.create("cnn-fdfa", input_shape=(1, 10, 10), num_classes=3, local_heads=True),
}


@pytest.mark.parametrize("label", sorted(MODELS))
def test_linear_heads_closed_form_equals_the_reverse_pass(tiny, label):
    """A linear local head's gradients in closed form (the read-out's (softmax − onehot)/N, no
    reverse pass) equal ``autodiff.vjp`` of the model's own pooled local loss, in float64."""
    model = MODELS[label](tiny)
    params = tiny.params(model)
    x, labels = tiny.batch(model, 6)
    trace = model.forward(params, x, labels, Plan(**PLANS["local-greedy"]), model.init_state(np.float64))
    assert model.linear_local_heads
    closed = Gradients(local_head_grads(model, params, trace, labels))
    model.linear_local_heads = False  # this instance takes the generic reverse pass
    reverse = local_head_grads(model, params, trace, labels)
    assert sorted(closed) == sorted(reverse) and len(closed) == 2 * model.num_blocks, label
    for name, expected in reverse.items():
        np.testing.assert_allclose(closed[name], expected, rtol=1e-12, atol=1e-15, err_msg=f"{label}: {name}")
