"""The runner never loses work: exact resume, NaN stops with the checkpoint intact, CLI errors."""
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
    import dualnet.train as runner
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
