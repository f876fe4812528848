"""The runner never loses work: exact resume, NaN stops with the checkpoint intact, CLI errors."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from dualnet import backend, cli
from dualnet.train import Config, TrainingDiverged, build_model, load_checkpoint, train


@pytest.fixture
def tiny_config(tmp_path):
    return dict(model="mlp", model_options={"hidden": 16, "layers": 3}, dataset="digits", epochs=3,
                batch_size=64, optimizer="sgd", lr=0.05, optimizer_options={"momentum": 0.9}, seed=3,
                train_limit=256, eval_limit=256)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("rule, optimizer_options, rule_options", [
    ("bp", None, {}), ("lg-fg-a", None, {}), ("fdfa", None, {}),
    ("fdfa", None, {"adam": True}),  # the feedback matrices' own Adam state is part of the rule's state
    ("bp", {}, {})])  # {}: plain SGD keeps no state
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_config, rule, optimizer_options,
                                                         rule_options):
    pytest.importorskip("sklearn")
    if optimizer_options is not None:
        tiny_config = {**tiny_config, "optimizer_options": optimizer_options}
    tiny_config = {**tiny_config, "rule_options": rule_options}
    full = Config(rule=rule, out=str(tmp_path / "full"), **tiny_config)
    train(full)
    split = Config(rule=rule, out=str(tmp_path / "split"), **{**tiny_config, "epochs": 1})
    train(split)
    split.epochs = 3
    train(split, resume=True)
    a, _, _ = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, _, _ = load_checkpoint(tmp_path / "split" / "checkpoint.npz")
    for name in a["params"]:
        assert np.array_equal(a["params"][name], b["params"][name]), name
    drop_wall = lambda lines: [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]
    assert drop_wall(read_metrics(tmp_path / "full")) == drop_wall(read_metrics(tmp_path / "split"))
    summary = json.load(open(tmp_path / "full" / "summary.json"))
    assert set(summary) >= {"test_acc", "test_error", "train_error", "epochs", "wall_s"}
    assert summary["epochs"] == 3


def test_mid_epoch_interrupt_resumes_exactly(tmp_path, tiny_config, monkeypatch):
    """Ctrl-C mid-epoch writes a checkpoint at the last finished step; resuming matches."""
    pytest.importorskip("sklearn")
    full = Config(rule="fg-a", out=str(tmp_path / "full"), **tiny_config)
    train(full)
    interrupted = Config(rule="fg-a", out=str(tmp_path / "cut"), **tiny_config)
    import dualnet.run as runner
    real_batches, calls = runner.data.batches, {"n": 0}

    def batches_then_interrupt(*args, **kwargs):
        for item in real_batches(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 6:  # epoch 2, step 2 (4 steps per epoch)
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(runner.data, "batches", batches_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.setattr(runner.data, "batches", real_batches)
    _, position, _ = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    assert position["epoch"] == 1 and position["step"] == 1
    train(interrupted, resume=True)
    a, _, _ = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, _, _ = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    for name in a["params"]:
        assert np.array_equal(a["params"][name], b["params"][name]), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    config = Config(rule="bp", out=str(tmp_path / "run"), **{**tiny_config, "epochs": 1})
    train(config)
    before = open(tmp_path / "run" / "checkpoint.npz", "rb").read()
    exploding = Config(rule="bp", out=str(tmp_path / "run"), **{**tiny_config, "lr": 1e12})
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+"):
        train(exploding, resume=True)
    assert open(tmp_path / "run" / "checkpoint.npz", "rb").read() == before


def test_cli_train_writes_config_metrics_summary(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "localmixer", "--config", "S/1/1", "--channels", "16", "--rule", "lg-fg-a",
                     "--dataset", "digits", "--epochs", "1", "--batch-size", "32", "--train-limit", "128",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.load(open(out / "config.json"))
    assert config["rule"] == "lg-fg-a" and config["model_options"] == {"config": "S/1/1", "channels": 16}
    assert config["device"] == "cpu"  # the device actually used is recorded
    assert len(read_metrics(out)) == 1 and (out / "summary.json").exists()


@pytest.mark.skipif(backend.cuda_available(), reason="checks the error where no GPU can be used")
@pytest.mark.parametrize("how", ["--device cuda", "DUALNET_BACKEND=cupy"])
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, how):
    """`python -m dualnet train --device cuda` (or the environment variable) on a CPU-only machine:
    exit code 1, one line on stderr naming the problem, no traceback, nothing written."""
    command = [sys.executable, "-m", "dualnet", "train", "--dataset", "digits", "--train-limit", "64",
               "--out", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != "DUALNET_BACKEND"}
    if how == "--device cuda":
        command += ["--device", "cuda"]
    else:
        env["DUALNET_BACKEND"] = "cupy"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "no usable CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(backend.cuda_available(), reason="checks the error where no GPU can be used")
def test_a_refused_cuda_request_leaves_the_backend_as_it_was():
    with pytest.raises(backend.DeviceUnavailable, match="no usable CUDA device"):
        with backend.using("cupy"):
            pass
    assert backend.current() == "numpy"


def test_an_unknown_device_is_a_clear_error(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="Config.device='tpu'"):
        train(Config(rule="bp", device="tpu", out=str(tmp_path / "run"), **tiny_config))
    assert not (tmp_path / "run").exists()


def test_cli_unknown_names_suggest_close_ones(capsys):
    with pytest.raises(SystemExit, match="Did you mean: fg-a"):
        cli.main(["train", "--rule", "fga-a", "--dataset", "digits"])
    with pytest.raises(SystemExit, match="localmixer"):
        cli.main(["info", "--model", "localmix"])


def test_cli_list_and_info(capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "lg-fg-a" in listed and "localmixer" in listed and "fashion-mnist" in listed
    assert cli.main(["info", "--model", "localmixer", "--config", "M/8/16", "--input-shape", "3,32,32"]) == 0
    assert "918,770" in capsys.readouterr().out


def test_missing_dataset_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALNET_OFFLINE", "1")
    monkeypatch.setenv("DUALNET_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = cli.main(["train", "--dataset", "cifar10", "--out", str(tmp_path / "run")])
    assert code == 1
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("model, local", [("mlp", True), ("cnn-baydin", True), ("mlp", False)])
def test_local_rules_get_local_heads_where_they_are_optional(model, local):
    dataset = types.SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)
    config = Config(model=model, rule="lg-fg-a" if local else "fg-a")
    assert build_model(config, dataset).has_local_heads is local
    explicit = Config(model=model, rule="lg-fg-a", model_options={"local_heads": False})
    assert not build_model(explicit, dataset).has_local_heads  # an explicit choice is kept


# ---------------------------------------------------------------------------- consistency under interrupts
def _without_wall(lines):
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]


def _same_params(a_dir, b_dir):
    a, _, _ = load_checkpoint(a_dir / "checkpoint.npz")
    b, _, _ = load_checkpoint(b_dir / "checkpoint.npz")
    return all(np.array_equal(a["params"][name], b["params"][name]) for name in a["params"])


def test_an_interrupt_during_evaluation_loses_no_metrics(tmp_path, tiny_config, monkeypatch):
    """The original failure: Ctrl-C during the end-of-epoch evaluation left a checkpoint at epoch 2
    with one history line; epoch 2's metrics were lost and summary.json said 2 epochs after 3."""
    pytest.importorskip("sklearn")
    import dualnet.run as runner
    train(Config(rule="bp", out=str(tmp_path / "full"), **tiny_config))
    real_evaluate, calls = runner.evaluate, {"n": 0}

    def evaluate_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2's first evaluation
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(runner, "evaluate", evaluate_then_interrupt)
    cut = Config(rule="bp", out=str(tmp_path / "cut"), **tiny_config)
    with pytest.raises(runner.Interrupted):
        train(cut)
    _, position, history = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    assert (position["epoch"], position["step"], len(history)) == (1, 4, 1)
    assert len(read_metrics(tmp_path / "cut")) == 1  # metrics.jsonl is the checkpoint's own history
    monkeypatch.setattr(runner, "evaluate", real_evaluate)
    summary = train(cut, resume=True)
    assert summary["epochs"] == 3
    assert _without_wall(read_metrics(tmp_path / "cut")) == _without_wall(read_metrics(tmp_path / "full"))
    assert _same_params(tmp_path / "full", tmp_path / "cut")


def test_ctrl_c_between_the_update_and_the_step_counter_resumes_bit_identically(tmp_path, tiny_config, monkeypatch):
    """SIGINT is deferred to the end of the step: the in-place update and the step counter are
    committed together, and the interrupted epoch's loss covers all of its steps."""
    pytest.importorskip("sklearn")
    import signal

    import dualnet.run as runner
    config = {**tiny_config, "rule": "fg-a"}
    train(Config(out=str(tmp_path / "full"), **config))
    real_step, calls = runner.optim.SGD.step, {"n": 0}

    def step_with_ctrl_c(self, params, grads):
        calls["n"] += 1
        result = real_step(self, params, grads)
        if calls["n"] == 6:  # epoch 2, step 2; the counter is not yet advanced
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(runner.optim.SGD, "step", step_with_ctrl_c)
    cut = Config(out=str(tmp_path / "cut"), **config)
    with pytest.raises(runner.Interrupted, match="--resume"):
        train(cut)
    _, position, _ = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    assert (position["epoch"], position["step"]) == (1, 2)
    monkeypatch.setattr(runner.optim.SGD, "step", real_step)
    train(cut, resume=True)
    assert _same_params(tmp_path / "full", tmp_path / "cut")
    assert _without_wall(read_metrics(tmp_path / "cut")) == _without_wall(read_metrics(tmp_path / "full"))


def test_max_steps_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    train(Config(rule="bp", out=str(tmp_path / "full"), **tiny_config))
    cut = Config(rule="bp", out=str(tmp_path / "cut"), **tiny_config)
    summary = train(cut, max_steps=5)
    assert "max_steps 5" in summary["stopped"] and summary["epochs"] == 1
    _, position, _ = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    assert (position["epoch"], position["step"]) == (1, 1)
    train(cut, resume=True)
    assert _same_params(tmp_path / "full", tmp_path / "cut")
    assert _without_wall(read_metrics(tmp_path / "cut")) == _without_wall(read_metrics(tmp_path / "full"))


# ---------------------------------------------------------------------------- schedules on resume
def _lrs(out):
    return [m["lr"] for m in read_metrics(out)]


def test_extending_a_decaying_run_never_raises_the_learning_rate(tmp_path, tiny_config):
    """The original failure: linear 0.005 -> 0.0, then 0.0025 -> 0.0 after --resume --epochs."""
    pytest.importorskip("sklearn")
    for schedule in ("linear", "warmup_cosine"):
        out = tmp_path / schedule
        config = Config(rule="bp", out=str(out), **{**tiny_config, "epochs": 3, "schedule": schedule, "lr": 0.005})
        train(config, max_steps=8)  # two of three epochs
        before = _lrs(out)
        train(dataclasses.replace(config, epochs=6), resume=True)
        lrs = _lrs(out)
        assert lrs[:2] == before and len(lrs) == 6
        assert all(b <= a for a, b in zip(lrs[1:], lrs[2:])), (schedule, lrs)
        assert lrs[2] > 0.5 * lrs[1] and lrs[5] == pytest.approx(0.0, abs=1e-12)  # it decays over the new end


def test_extending_a_fully_decayed_run_asks_for_a_learning_rate(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    from dualnet.train import RunError
    config = Config(rule="bp", out=str(tmp_path / "run"), **{**tiny_config, "epochs": 2, "schedule": "linear",
                                                             "lr": 0.005})
    train(config)
    before = open(tmp_path / "run" / "checkpoint.npz", "rb").read()
    with pytest.raises(RunError, match="decayed the learning rate to 0.*--lr"):
        train(dataclasses.replace(config, epochs=4), resume=True)
    assert open(tmp_path / "run" / "checkpoint.npz", "rb").read() == before
    train(dataclasses.replace(config, epochs=4, lr=0.0025), resume=True)
    lrs = _lrs(tmp_path / "run")  # the lr after each epoch: the new piece decays 0.0025 -> 0 over 2 epochs
    assert lrs[2] == pytest.approx(0.00125) and lrs[3] == pytest.approx(0.0, abs=1e-12)


def test_resume_without_changes_keeps_the_schedule(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    config = {**tiny_config, "schedule": "linear"}
    train(Config(rule="bp", out=str(tmp_path / "full"), **config))
    cut = Config(rule="bp", out=str(tmp_path / "cut"), **config)
    train(cut, max_steps=6)
    train(cut, resume=True)
    assert _lrs(tmp_path / "cut") == _lrs(tmp_path / "full")


def test_resume_refuses_a_changed_field(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    from dualnet.train import RunError
    config = Config(rule="bp", out=str(tmp_path / "run"), **{**tiny_config, "epochs": 1})
    train(config)
    with pytest.raises(RunError, match="rule cannot change"):
        train(dataclasses.replace(config, rule="fa"), resume=True)


# ---------------------------------------------------------------------------- divergence
def test_divergence_before_any_checkpoint_says_none_was_written(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    config = Config(rule="bp", out=str(tmp_path / "run"), **{**tiny_config, "lr": 1e12})
    with pytest.raises(TrainingDiverged, match="no checkpoint was written") as error:
        train(config)
    assert "checkpoint.npz" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.parametrize("rule", ["fg-a", "bp"])
def test_the_runner_adds_factored_weight_gradients_into_the_weights(tmp_path, tiny_config, monkeypatch, rule):
    """FG-A's and BP's linear weight gradients reach SGD as factors and go into the weights unformed."""
    pytest.importorskip("sklearn")
    from dualnet import optim
    calls = []
    real_update = optim.outer_update
    monkeypatch.setattr(optim, "outer_update", lambda *args: calls.append(args[0].shape) or real_update(*args))
    options = {**tiny_config, "epochs": 1, "batch_size": 16, "model_options": {"hidden": 64, "layers": 3}}
    train(Config(rule=rule, out=str(tmp_path / "run"), **options))
    steps = 256 // 16
    # the two hidden layers (16·(64 + 64) ≤ 64·64); the read-out's factors are larger than its gradient
    assert calls == [(64, 64), (64, 64)] * steps


def _poison_formed(grads):
    name = sorted(grads)[0]
    grads[name] = grads[name] * np.inf


def _poison_factors(grads):
    """An inf in the factors of a gradient the optimiser adds into its weight unformed: it is
    checked through the weight after the update."""
    from dualnet.gradients import Outer
    name = sorted(name for name in grads if grads.factors(name) is not None)[0]
    factors = grads.factors(name)
    grads[name] = Outer(factors.left * np.inf, factors.right)


@pytest.mark.parametrize("rule, model_options, batch_size, poison", [
    ("bp", None, 64, _poison_formed), ("fg-a", {"hidden": 64, "layers": 3}, 16, _poison_factors)])
def test_a_non_finite_gradient_stops_the_run(tmp_path, tiny_config, monkeypatch, rule, model_options, batch_size,
                                             poison):
    pytest.importorskip("sklearn")
    from dualnet import rules
    rule_class = type(rules.create(rule))
    real_estimate = rule_class.estimate

    def poisoned(self, *args):
        estimate = real_estimate(self, *args)
        poison(estimate.grads)
        return estimate
    options = {**tiny_config, "epochs": 1, "batch_size": batch_size,
               "model_options": model_options or tiny_config["model_options"]}
    config = Config(rule=rule, out=str(tmp_path / "run"), **options)
    train(config)
    before = open(tmp_path / "run" / "checkpoint.npz", "rb").read()
    monkeypatch.setattr(rule_class, "estimate", poisoned)
    with pytest.raises(TrainingDiverged, match=r"a gradient became non-finite at epoch 2, step 1.*epoch 1 done"):
        train(dataclasses.replace(config, epochs=2), resume=True)
    assert open(tmp_path / "run" / "checkpoint.npz", "rb").read() == before


# ---------------------------------------------------------------------------- what a run records
def test_diagnostics_are_written_every_epoch(tmp_path, tiny_config):
    pytest.importorskip("sklearn")
    train(Config(rule="bp", diagnostics=True, out=str(tmp_path / "bp"), **{**tiny_config, "epochs": 2}))
    train(Config(rule="fg-a", diagnostics=True, out=str(tmp_path / "fga"), **{**tiny_config, "epochs": 2}))
    for line in read_metrics(tmp_path / "bp"):  # BP is its own objective's exact gradient (weights: a
        # bias before BatchNorm has a zero gradient, whose cosine is rounding noise)
        weights = {name: c for name, c in line["cosine"].items() if name.endswith("weight")}
        assert len(weights) == 3 and all(c == pytest.approx(1.0, abs=1e-6) for c in weights.values())
    for line in read_metrics(tmp_path / "fga"):
        cosines = line["cosine"]
        assert cosines["head.weight"] == pytest.approx(1.0, abs=1e-6)  # FG-A's read-out gradient is exact
        assert all(abs(c) <= 1 + 1e-6 for c in cosines.values())
        assert min(cosines.values()) < 0.9  # the hidden layers' estimates are noisy


def test_every_training_step_draws_fresh_noise(tmp_path, tiny_config, monkeypatch):
    """A runner that reused one draw for a whole epoch would pass every other test."""
    pytest.importorskip("sklearn")
    import dualnet.run as runner
    real_rng, states = runner.step_rng, []

    def recording_rng(*args):
        generator = real_rng(*args)
        states.append(generator.standard_normal(4).tobytes())
        return real_rng(*args)
    monkeypatch.setattr(runner, "step_rng", recording_rng)
    train(Config(rule="fg-a", out=str(tmp_path / "run"), **tiny_config))
    assert len(states) == 12 and len(set(states)) == 12
