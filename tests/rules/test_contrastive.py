"""Ren's contrastive setting: two views stacked, InfoNCE local losses, same noise on both views."""
import numpy as np
import pytest

from dualnet import data, models, optim, rules
from dualnet.nn.plan import Plan


def mixer(channels=8, projection_dim=6):
    return models.create("localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2, patches=2,
                         channels=channels, groups=2, projection_dim=projection_dim)


def views(rng, n=8):
    x = rng.standard_normal((n, 1, 8, 8))
    return np.concatenate(data.two_views(x, 0)), rng.integers(0, 3, n)


def test_both_views_get_the_same_perturbation(rng):
    model = mixer()
    params = model.init(0, dtype=np.float64)
    x, y = views(rng)
    rule = rules.create("lg-fg-a", contrastive=True)
    seen = []
    real_forward = model.forward

    def recording_forward(p, xb, labels, plan, state=None):
        trace = real_forward(p, xb, labels, plan, state)
        seen.extend(point.u_pre for point in trace.points)
        return trace
    model.forward = recording_forward
    rule(model, params, x, y, np.random.default_rng(0))
    assert seen and all(u.shape[1] == 16 for u in seen)
    for u in seen:
        np.testing.assert_array_equal(u[:, :8], u[:, 8:])


def test_contrastive_losses_are_per_replica_and_pooled(rng):
    model = mixer()
    params = model.init(0, dtype=np.float64)
    x, y = views(rng)
    replicated = model.forward(params, x, y, Plan(contrastive=True, local_losses=True, replicated=True))
    pooled = model.forward(params, x, y, Plan(contrastive=True, local_losses=True))
    assert replicated.local_losses[0].shape == (8, 4, 2) and pooled.local_losses[0].shape == (8,)
    np.testing.assert_allclose(replicated.local_losses[1][:, 0, 0], pooled.local_losses[1], rtol=1e-10)
    assert pooled.logits.shape == (8, 3)  # the probe reads view 1 only


def test_contrastive_lg_fg_a_points_along_lg_bp(rng):
    """Many directions: the (shared-noise) estimate is a descent direction for the LG-BP objective."""
    model = mixer()
    params = model.init(1, dtype=np.float64)
    x, y = views(rng)
    rule = rules.create("lg-fg-a", contrastive=True, directions=4000, diagnostics=True)
    report = rule(model, params, x, y, np.random.default_rng(0)).diagnostics
    weights = [v["cosine"] for k, v in report.items()
               if k.endswith(".weight") and ".head." not in k and k != "head.weight"]
    assert min(weights) > 0.3, report


@pytest.mark.parametrize("name", ["bp", "lg-bp", "lg-fg-a"])
def test_contrastive_rules_lower_the_infonce_loss(name, rng):
    model = mixer(channels=32, projection_dim=16)
    params = model.init(2)
    x, y = views(rng, n=32)
    x = x.astype(np.float32)
    rule = rules.create(name, contrastive=True)
    adam = optim.Adam(1e-2)
    plan = Plan(contrastive=True, local_losses=True)
    first = None
    for step in range(60):  # from log(32) ≈ 3.47 (chance); BP reaches ~1.7 here
        adam.step(params, rule(model, params, x, y, np.random.default_rng(step)).grads)
        loss = float(model.forward(params, x, y, plan).local_losses[-1].mean())
        first = loss if first is None else first
    assert loss < 0.9 * first, (first, loss)
