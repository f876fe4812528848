"""``python -m dualnet``: bad input is one line and a non-zero exit with nothing overwritten; options
are parsed by their declared types; --resume applies or refuses every flag by name."""
import json
import os
import shutil

import numpy as np
import pytest

from dualnet import cli

pytest.importorskip("sklearn")  # the runs below train on scikit-learn's bundled digits

TINY = ["--dataset", "digits", "--model", "mlp", "--hidden", "16", "--layers", "3", "--train-limit", "128",
        "--eval-limit", "128", "--batch-size", "64"]


def run(argv, capsys):
    """(exit code, stdout, stderr) of ``python -m dualnet argv``, in process."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse: malformed command line
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, expected_code=1):
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.fixture
def finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", *TINY, "--epochs", "1", "--out", str(out)], capsys)
    assert code == 0, err
    return out


# ---------------------------------------------------------------------------- bad input, table-driven
def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _garble(path):
    open(path, "w").write("{ not json")


BROKEN_RUNS = {  # what is done to a finished run -> a fragment the one-line error must contain
    "truncated checkpoint": (lambda out: _truncate(out / "checkpoint.npz"), "checkpoint.npz is damaged"),
    "missing checkpoint": (lambda out: os.remove(out / "checkpoint.npz"), "checkpoint.npz: not found"),
    "damaged config": (lambda out: _garble(out / "config.json"), "config.json is damaged"),
    "missing config": (lambda out: os.remove(out / "config.json"), "config.json: not found"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RUNS))
def test_a_broken_run_directory_is_one_line_naming_the_file(finished_run, capsys, case):
    damage, fragment = BROKEN_RUNS[case]
    damage(finished_run)
    before = snapshot(finished_run)
    line = one_line_error(*run(["train", "--resume", str(finished_run), "--epochs", "2"], capsys)[::2])
    assert fragment in line
    assert snapshot(finished_run) == before


def test_a_checkpoint_of_another_model_is_refused(tmp_path, finished_run, capsys):
    other = tmp_path / "other"
    code, _, err = run(["train", *[a if a != "16" else "32" for a in TINY], "--out", str(other)], capsys)
    assert code == 0, err
    shutil.copy(other / "checkpoint.npz", finished_run / "checkpoint.npz")
    before = snapshot(finished_run)
    line = one_line_error(*run(["train", "--resume", str(finished_run), "--epochs", "2"], capsys)[::2])
    assert "belongs to another model" in line and "checkpoint.npz" in line
    assert snapshot(finished_run) == before


BAD_COMMANDS = {  # argv after TINY -> (exit code, fragment of the one-line error)
    "epochs 0": (["--epochs", "0"], 2, "--epochs"),
    "negative epochs": (["--epochs", "-3"], 2, "--epochs"),
    "negative train limit": (["--train-limit", "-5"], 2, "--train-limit"),
    "zero batch size": (["--batch-size", "0"], 2, "--batch-size"),
    "lr nan": (["--lr", "nan"], 2, "--lr"),
    "exponential without a rate": (["--schedule", "exponential"], 1, "--lr-decay-rate"),
    "a rate without exponential": (["--lr-decay-rate", "0.1"], 1, "--schedule exponential"),
    "momentum with adam": (["--optimizer", "adam", "--momentum", "0.9"], 1, "--momentum does not apply"),
    "unknown schedule": (["--schedule", "cosine"], 2, "--schedule"),
    "boolean maybe": (["--rule", "fg-a", "--rule-opt", "norm_grad=maybe"], 1, "norm_grad='maybe': expected a boolean"),
    "integer 2.5": (["--rule", "fg-a", "--rule-opt", "directions=2.5"], 1, "directions='2.5': expected an integer"),
    "integer abc": (["--rule", "fg-w", "--rule-opt", "directions=abc"], 1, "directions='abc': expected an integer"),
    "unknown rule option": (["--rule", "fg-w", "--rule-opt", "alpha=0.1"], 1, "valid: directions"),
    "unknown model option": (["--model-opt", "width=3"], 1, "valid: input_shape"),
    "flag not of the model": (["--config", "M/1/16"], 1, "--config is not an option of model 'mlp'"),
    "no key=value": (["--rule-opt", "directions"], 1, "expected KEY=VALUE"),
    "zero blas threads": (["--blas-threads", "0"], 2, "--blas-threads"),
    "blas threads many": (["--blas-threads", "many"], 2, "--blas-threads"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_command_lines_are_one_line_and_write_nothing(tmp_path, capsys, case):
    extra, expected_code, fragment = BAD_COMMANDS[case]
    out = tmp_path / "run"
    line = one_line_error(*run(["train", *TINY, *extra, "--out", str(out)], capsys)[::2], expected_code)
    assert fragment in line, line
    assert not out.exists()


def test_an_existing_run_is_never_overwritten_without_asking(finished_run, capsys):
    before = snapshot(finished_run)
    line = one_line_error(*run(["train", *TINY, "--rule", "fa", "--out", str(finished_run)], capsys)[::2])
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert snapshot(finished_run) == before
    os.remove(finished_run / "config.json")  # a checkpoint alone is a run too
    one_line_error(*run(["train", *TINY, "--out", str(finished_run)], capsys)[::2])
    code, _, err = run(["train", *TINY, "--rule", "fa", "--out", str(finished_run), "--overwrite"], capsys)
    assert code == 0, err
    assert json.load(open(finished_run / "config.json"))["rule"] == "fa"


def test_the_default_out_is_a_fresh_directory_per_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outs = []
    for _ in range(2):
        code, stdout, err = run(["train", *TINY], capsys)
        assert code == 0, err
        outs.append(json.loads(stdout)["out"])
    assert outs[0] != outs[1] and all(o.startswith(os.path.join("runs", "mlp-bp-")) for o in outs)
    assert all((tmp_path / o / "checkpoint.npz").exists() for o in outs)


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_line_error(*run(["train", *TINY, "--out", str(blocker / "run")], capsys)[::2])
    assert "cannot write" in line


def test_a_full_disk_keeps_the_last_checkpoint(finished_run, capsys, monkeypatch):
    before = open(finished_run / "checkpoint.npz", "rb").read()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    line = one_line_error(*run(["train", "--resume", str(finished_run), "--epochs", "2"], capsys)[::2])
    assert "No space left on device" in line
    assert open(finished_run / "checkpoint.npz", "rb").read() == before
    assert [name for name in os.listdir(finished_run) if name.startswith(".tmp")] == []


# ---------------------------------------------------------------------------- typed options
@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("False", False), ("0", False), ("no", False)])
def test_boolean_options_accept_the_usual_spellings(text, value):
    assert cli.key_values([f"norm_grad={text}"], "--rule-opt", "rule 'fg-a'", {"norm_grad": True}) == \
        {"norm_grad": value}


def test_options_are_parsed_by_their_declared_type():
    accepted = {"directions": 1, "alpha": 0.1, "site": "pre", "channels": (15, 40), "aux_width": None}
    parsed = cli.key_values(["directions=4", "alpha=1", "site=post", "channels=[8,16]", "aux-width=32"],
                            "--rule-opt", "rule", accepted)
    assert parsed == {"directions": 4, "alpha": 1.0, "site": "post", "channels": [8, 16], "aux_width": 32}
    assert type(parsed["alpha"]) is float


def test_norm_grad_false_reaches_the_rule(tmp_path, capsys):
    """The original failure: ``norm_grad=False`` was the truthy string "False"."""
    out = tmp_path / "run"
    code, _, err = run(["train", *TINY, "--rule", "fg-a", "--rule-opt", "norm_grad=False", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.load(open(out / "config.json"))["rule_options"] == {"norm_grad": False}


# ---------------------------------------------------------------------------- --resume and its flags
@pytest.mark.parametrize("flag", [["--model", "cnn-baydin"], ["--hidden", "32"], ["--rule", "fa"],
                                  ["--seed", "9"], ["--schedule", "linear"], ["--model-opt", "layers=4"],
                                  ["--batch-size", "32"], ["--dataset", "digits"]])
def test_resume_refuses_a_flag_it_cannot_apply_by_name(finished_run, capsys, flag):
    before = snapshot(finished_run)
    line = one_line_error(*run(["train", "--resume", str(finished_run), *flag], capsys)[::2])
    assert f"{flag[0]} cannot be given with --resume" in line
    assert snapshot(finished_run) == before


def test_resume_applies_and_records_a_new_lr(finished_run, capsys):
    code, _, err = run(["train", "--resume", str(finished_run), "--epochs", "2", "--lr", "0.002"], capsys)
    assert code == 0, err
    config = json.load(open(finished_run / "config.json"))
    assert config["lr"] == 0.01  # the run's own first rate; the change is in its history
    assert {"field": "lr", "from": 0.01, "to": 0.002, "at": {"epoch": 1, "step": 0}} in config["changes"]
    assert {"field": "epochs", "from": 1, "to": 2, "at": {"epoch": 1, "step": 0}} in config["changes"]
    lines = [json.loads(line) for line in open(finished_run / "metrics.jsonl")]
    assert [line["lr"] for line in lines] == [0.01, pytest.approx(0.002)]


def test_resume_continues_the_directory_itself_wherever_it_is(tmp_path, capsys, monkeypatch):
    """The original failure: a relative ``out`` stored in config.json made --resume from another
    working directory continue another run, and a copied run write into the original."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("a")
    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run(["train", *TINY, "--rule", "fa", "--seed", "9", "--out", "runs/x"], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/x")  # a different run at the same relative path from here
    code, _, err = run(["train", *TINY, "--out", "runs/x", "--overwrite"], capsys)
    assert code == 0, err
    shutil.copytree(tmp_path / "a" / "runs" / "x", tmp_path / "copy")
    original, other = snapshot(tmp_path / "a" / "runs" / "x"), snapshot(tmp_path / "runs" / "x")
    monkeypatch.chdir(tmp_path / "runs")
    code, stdout, err = run(["train", "--resume", str(tmp_path / "copy"), "--epochs", "2"], capsys)
    assert code == 0, err
    assert snapshot(tmp_path / "a" / "runs" / "x") == original and snapshot(tmp_path / "runs" / "x") == other
    summary = json.loads(stdout)
    assert summary["rule"] == "fa" and summary["epochs"] == 2
    config = json.load(open(tmp_path / "copy" / "config.json"))
    assert config["rule"] == "fa" and config["seed"] == 9


# ---------------------------------------------------------------------------- what the user sees
def test_one_line_per_epoch_on_stderr(tmp_path, capsys):
    code, stdout, err = run(["train", *TINY, "--epochs", "3", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(f in lines[0] for f in ("loss", "train error", "test error", "lr", " s"))
    json.loads(stdout)  # stdout carries the summary only


def test_help_shows_defaults_and_choices(capsys):
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    assert "(default: 128)" in out and "linear" in out and "adam" in out and "lg-fg-a" in out


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch):
    import signal

    import dualnet.run as runner
    real_step, calls = runner.optim.SGD.step, {"n": 0}

    def step_then_ctrl_c(self, params, grads):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # arrives between the in-place update and the step counter
        return real_step(self, params, grads)
    monkeypatch.setattr(runner.optim.SGD, "step", step_then_ctrl_c)
    out = tmp_path / "run"
    code, _, err = run(["train", *TINY, "--epochs", "3", "--out", str(out)], capsys)
    line = one_line_error(code, err.replace(next(line for line in err.splitlines() if line.startswith("epoch 1")),
                                            ""), 130)
    assert f"--resume {out}" in line and "checkpoint.npz" in line


# ---------------------------------------------------------------------------- BLAS threads
def blas_threads():
    from threadpoolctl import threadpool_info
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_blas_threads_hold_during_the_run_and_are_restored(tmp_path, capsys, monkeypatch):
    from dualnet import run as run_module
    seen, before = [], blas_threads()
    original = run_module.Run.loop
    monkeypatch.setattr(run_module.Run, "loop", lambda self, *a: seen.append(blas_threads()) or original(self, *a))
    code, _, err = run(["train", *TINY, "--blas-threads", "1", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert seen == [{1}] and blas_threads() == before
    assert json.load(open(tmp_path / "run" / "config.json"))["blas_threads"] == 1


def test_auto_blas_threads_are_the_cores_the_load_leaves_free(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, free in [(0.2, 4), (1.6, 2), (3.4, 1), (9.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert cli.build_parser().parse_args(["train", "--blas-threads", "auto"]).blas_threads == free


def test_a_busy_terminal_is_warned_once_and_a_log_is_not(tmp_path, capsys, monkeypatch):
    from dualnet.train import Config
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.9, 1.9))
    with __import__("threadpoolctl").threadpool_limits(2, user_api="blas"):
        for tty, warned in [(True, 1), (False, 0)]:
            monkeypatch.setattr("sys.stderr.isatty", lambda tty=tty: tty, raising=False)
            cli._warn_if_oversubscribed(Config())
            err = capsys.readouterr().err
            assert err.count("warning: BLAS runs 2 threads but only 1 core(s) are free") == warned, err
        cli._warn_if_oversubscribed(Config(blas_threads=1))  # chosen explicitly: nothing to say
        assert capsys.readouterr().err == ""


def test_resume_applies_and_records_new_blas_threads(finished_run, capsys):
    code, _, err = run(["train", "--resume", str(finished_run), "--epochs", "2", "--blas-threads", "1"], capsys)
    assert code == 0, err
    config = json.load(open(finished_run / "config.json"))
    assert {"field": "blas_threads", "from": None, "to": 1, "at": {"epoch": 1, "step": 0}} in config["changes"]
