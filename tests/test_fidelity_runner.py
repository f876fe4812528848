"""The runner's options for the authors' training setups: the read-out's learning rate, weight decay
on weights only (Ren et al.), and supervised crop-and-flip augmentation (Fournier et al.)."""
import json
import os

import numpy as np
import pytest

from dualnet import data, models
from dualnet.train import Config, build_optimizer, first_segments, parameter_groups, train


def _mixer():
    return models.create("localmixer", input_shape=(1, 8, 8), num_classes=3, config="M/1/16", blocks=2,
                         patches=2, channels=8, groups=2)


def test_parameter_groups_follow_the_specs():
    model = _mixer()
    groups = parameter_groups(Config(readout_lr=0.1, weight_decay_on="weights"), model)
    for name, spec in model.specs.items():
        expected = {}
        if spec.readout:
            expected["lr"] = 0.1
        if spec.role != "weight":
            expected["weight_decay"] = 0.0
        assert groups.get(name, {}) == expected, name
    assert parameter_groups(Config(), model) == {}


def test_one_sgd_step_with_readout_lr_and_weight_decay_on_weights():
    """param ← param − lr·m·(g + λ·param·[weight]) with m = 0.1 on the read-out, 1 elsewhere."""
    model = _mixer()
    params = model.init(0, dtype=np.float64)
    rng = np.random.default_rng(0)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    config = Config(optimizer="sgd", lr=0.5, optimizer_options={"weight_decay": 0.01}, readout_lr=0.1,
                    weight_decay_on="weights", epochs=1)
    optimizer = build_optimizer(config, first_segments(config, 10), model)
    before = {k: v.copy() for k, v in params.items()}
    optimizer.step(params, grads)
    for name, spec in model.specs.items():
        decay = 0.01 * before[name] if spec.role == "weight" else 0.0
        rate = 0.5 * (0.1 if spec.readout else 1.0)
        np.testing.assert_allclose(params[name], before[name] - rate * (grads[name] + decay), rtol=1e-12)


@pytest.mark.parametrize("field, value, message", [
    ("augment", "mixup", "augment='mixup'"), ("readout_lr", -1.0, "readout_lr=-1.0"),
    ("weight_decay_on", "biases", "weight_decay_on='biases'")])
def test_bad_runner_options_are_one_clear_error(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train(Config(rule="bp", out=str(tmp_path / "run"), **{field: value}))


def test_crop_flip_augments_every_training_batch_from_its_seed(tmp_path, monkeypatch):
    """Each step's batch is random_crop_flip(batch, (seed, epoch, step, 2)) before the rule sees it;
    two runs with the same seed agree, and the run differs from one without augmentation."""
    seen = []
    original = data.random_crop_flip

    def spy(x, rng, *args, **kwargs):
        seen.append(rng)
        return original(x, rng, *args, **kwargs)
    monkeypatch.setattr(data, "random_crop_flip", spy)
    base = dict(model="mlp", model_options={"hidden": 16, "layers": 2}, dataset="digits", epochs=2,
                batch_size=64, lr=0.05, seed=3, train_limit=128, eval_limit=128)
    first = train(Config(rule="bp", augment="crop-flip", out=str(tmp_path / "a"), **base))
    assert seen == [(3, epoch, step, 2) for epoch in range(2) for step in range(2)]
    again = train(Config(rule="bp", augment="crop-flip", out=str(tmp_path / "b"), **base))
    plain = train(Config(rule="bp", out=str(tmp_path / "c"), **base))
    loss = lambda run: [line["loss"] for line in _metrics(run)]  # noqa: E731
    assert loss(first) == loss(again)
    assert loss(first) != loss(plain)


def _metrics(summary):
    with open(os.path.join(summary["out"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
