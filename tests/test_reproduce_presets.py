"""benchmarks/reproduce/run.py: every preset builds a valid run for each of its rows, with the
authors' options by default and dualnet's defaults under --unaligned (docs/fidelity.md)."""
import argparse
import importlib.util
import math
import os

import numpy as np
import pytest

from dualnet import models, rules
from dualnet.train import Config, build_optimizer, first_segments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("reproduce_run", os.path.join(ROOT, "benchmarks", "reproduce", "run.py"))
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)

SHAPES = {"fashion-mnist": ((1, 28, 28), 10)}


def _args(table, unaligned=False, **extra):
    values = dict(table=table, dataset="fashion-mnist", data_dir=None, layers=3, config="M/1/16", epochs=1,
                  seed=0, train_limit=0, rule_options={}, unaligned=unaligned, out="runs/test")
    return argparse.Namespace(**{**values, **extra})


def _configs(table, unaligned=False):
    args = _args(table, unaligned)
    labels, make, *_ = run.preset(args)
    return {label: make(label, args) for label in labels}


@pytest.mark.parametrize("table", ["fdfa", "ren", "fournier"])
@pytest.mark.parametrize("unaligned", [False, True])
def test_every_preset_row_builds_its_model_rule_and_optimiser(table, unaligned):
    for config in _configs(table, unaligned).values():
        config.check()
        shape, classes = SHAPES[config.dataset]
        model = models.create(config.model, input_shape=shape, num_classes=classes, **config.model_options)
        rules.create(config.rule, **config.rule_options)
        build_optimizer(config, first_segments(config, 10), model)
    section = run.fidelity_rows(run.preset(_args(table))[4])
    assert section.startswith("## ") and "| aspect | authors | dualnet | why |" in section


def test_ren_preset_is_ren_et_al_s_setup():
    aligned, plain = _configs("ren"), _configs("ren", unaligned=True)
    for label, config in aligned.items():
        assert config.readout_lr == 0.1 and config.weight_decay_on == "weights"
        assert config.optimizer_options == {"momentum": 0.9, "weight_decay": 1e-4}
        assert all(config.model_options[flag] for flag in ("begin_ln", "middle_ln", "inter_ln", "last_layer_ln"))
        assert (plain[label].readout_lr, plain[label].optimizer_options) == (1.0, {"momentum": 0.9})
    assert aligned["dfa"].rule == "dfa-local" and plain["dfa"].rule == "dfa"
    assert aligned["fg-a"].rule_options == {"loss_reduction": "sum"}
    assert aligned["lg-fg-w"].rule_options == {"dense_groups": "own"}


def load_beside(name):
    """A module of benchmarks/reproduce/ (its scripts import each other by plain name)."""
    path = os.path.join(ROOT, "benchmarks", "reproduce", f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"reproduce_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_fdfa_fournier_and_baydin_presets_set_the_authors_options():
    fdfa = _configs("fdfa")
    assert fdfa["fg-w"].rule_options == {"readout": "perturbed"}
    assert fdfa["fdfa"].rule_options == {"feedback_lr": 1e-4, "adam": True, "update": "after"}
    assert fdfa["dkp"].rule_options == {"feedback_lr": 1e-4, "adam": True}
    fournier = _configs("fournier")
    assert all(c.rule_options.get("last_block") == "exact" for c in fournier.values() if c.rule == "guess")
    assert all(c.augment == "crop-flip" and c.schedule == "step" for c in fournier.values())
    for label in ("local-weight", "gaussian-weight"):
        assert fournier[label].rule_options["weight_unit"] == "module"
        assert fournier[label].rule_options["normalise_random"] is True
        assert fournier[label].rule_options["weight_examples"] == "example"  # per example, as the authors
    for label in ("local-activity", "gaussian-activity"):
        assert fournier[label].rule_options["coupled_activity"] == "example"
    for config in fournier.values():  # every preset's options are valid ones
        if config.rule == "guess":
            rules.create(config.rule, **config.rule_options)
    baydin = load_beside("baydin")
    assert baydin.make_rule("fg-w").readout == "perturbed"  # every parameter, as Baydin et al.
    assert baydin.make_rule("fg-w", {}).readout == "exact"  # --unaligned
    assert "## Baydin" in run.fidelity_rows("Baydin")


def test_baydin_exponential_schedule_runs_with_its_rate():
    """lr_t = 2e-4 · exp(−1e-4 · t) at every step t of the run's optimiser."""
    config = Config(optimizer="sgd", lr=2e-4, schedule="exponential", lr_decay_rate=1e-4, epochs=3)
    optimizer = build_optimizer(config, first_segments(config, 100))
    params, grads = {"w": np.zeros(1)}, {"w": np.ones(1)}
    for step in range(250):
        assert math.isclose(optimizer.learning_rate(), 2e-4 * math.exp(-1e-4 * step), rel_tol=1e-12)
        optimizer.step(params, grads)


def test_runs_of_different_configurations_do_not_share_a_directory():
    outs = set()
    for table, extra in (("ren", {"config": "S/1/1"}), ("ren", {"config": "M/1/16"}), ("fdfa", {"layers": 2}),
                         ("fdfa", {"layers": 3}), ("fournier", {})):
        for unaligned in (False, True):
            args = _args(table, unaligned, **extra)
            labels, make, *_ = run.preset(args)
            outs.update(make(label, args).out for label in labels)
    assert len(outs) == 2 * (2 * 9 + 7 + 6 + 5)
