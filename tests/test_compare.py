"""``compare``: a failing rule is recorded and the others still run; an interrupted comparison
resumes without rerunning the rules that finished; the JSON on stdout stays parseable."""
import importlib.util
import json
import os

import numpy as np
import pytest

from dualnet import cli
from dualnet.compare import compare, resume_compare
from dualnet.train import Config, Interrupted

pytest.importorskip("sklearn")


def configs(out, rules, **overrides):
    base = dict(model="mlp", model_options={"hidden": 16, "layers": 3}, dataset="digits", epochs=2, batch_size=64,
                lr=0.05, seed=1, train_limit=128, eval_limit=128)
    return [Config(rule=rule, out=os.path.join(out, rule), **{**base, **overrides}) for rule in rules]


def test_a_diverging_rule_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from dualnet.rules.backprop import FeedbackAlignment
    real = FeedbackAlignment.estimate

    def diverging(self, *args):
        estimate = real(self, *args)
        estimate.loss = float("nan")
        return estimate
    monkeypatch.setattr(FeedbackAlignment, "estimate", diverging)
    result = compare(configs(str(tmp_path), ["bp", "fa", "fg-a"]), str(tmp_path))
    statuses = {s["rule"]: s["status"] for s in result["summaries"]}
    assert statuses["bp"] == statuses["fg-a"] == "finished"
    assert statuses["fa"].startswith("diverged: the loss became nan")
    table = open(tmp_path / "results.md").read()
    assert "| fa |" in table and "diverged" in table and "| bp |" in table
    assert (tmp_path / "curves.png").exists() or importlib.util.find_spec("matplotlib") is None


def test_an_interrupted_comparison_resumes_without_rerunning_finished_rules(tmp_path, monkeypatch):
    import dualnet.compare as comparing
    real_train, calls = comparing.train, []

    def counting_train(config, **kwargs):
        calls.append((config.rule, kwargs.get("resume", False)))
        if config.rule == "fg-a" and not kwargs.get("resume") and len(calls) == 2:
            kwargs["max_steps"] = 1
            real_train(config, **kwargs)
            raise Interrupted("interrupted")  # as Ctrl-C in the second rule would
        return real_train(config, **kwargs)
    monkeypatch.setattr(comparing, "train", counting_train)
    chosen = configs(str(tmp_path), ["bp", "fg-a"])
    with pytest.raises(Interrupted):
        compare(chosen, str(tmp_path))
    bp_checkpoint = open(tmp_path / "bp" / "checkpoint.npz", "rb").read()
    result = resume_compare(str(tmp_path))
    assert calls == [("bp", False), ("fg-a", False), ("fg-a", True)]
    assert open(tmp_path / "bp" / "checkpoint.npz", "rb").read() == bp_checkpoint
    assert [s["status"] for s in result["summaries"]] == ["finished", "finished"]
    assert all(s["epochs"] == 2 for s in result["summaries"])
    fresh = compare(configs(str(tmp_path / "fresh"), ["bp", "fg-a"]), str(tmp_path / "fresh"))
    assert [s["test_error"] for s in fresh["summaries"]] == [s["test_error"] for s in result["summaries"]]


def test_an_existing_comparison_is_not_overwritten(tmp_path):
    from dualnet.train import RunError
    compare(configs(str(tmp_path), ["bp"], epochs=1), str(tmp_path))
    with pytest.raises(RunError, match="already holds a comparison"):
        compare(configs(str(tmp_path), ["bp"], epochs=1), str(tmp_path))


def test_cli_compare_prints_json_on_stdout_only(tmp_path, capsys):
    code = cli.main(["compare", "--rules", "bp,fg-w", "--dataset", "digits", "--hidden", "16", "--layers", "3",
                     "--train-limit", "128", "--eval-limit", "128", "--epochs", "2", "--out", str(tmp_path / "c")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert [s["rule"] for s in result["summaries"]] == ["bp", "fg-w"]
    assert sum(line.startswith(("bp: epoch", "fg-w: epoch")) for line in captured.err.splitlines()) == 4


def test_curves_have_a_panel_per_metric_and_integer_epochs(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualnet.compare import plot_curves
    saved = {}
    real_savefig = plt.Figure.savefig

    def keep(self, *args, **kwargs):
        saved["figure"] = self
        return real_savefig(self, *args, **kwargs)
    history = [{"epoch": e, "train_error": 0.5 / e, "test_error": 0.6 / e, "loss": 1.0 / e,
                "cosine": {"w": 0.1 * e}} for e in (1, 2, 3)]
    plt.Figure.savefig = keep
    try:
        plot_curves({"bp": history, "fg-a": history}, str(tmp_path / "curves.png"), "mlp on digits")
    finally:
        plt.Figure.savefig = real_savefig
    figure = saved["figure"]
    axes = figure.axes
    assert [a.get_ylabel() for a in axes] == ["train error %", "test error %", "training loss",
                                              "mean cosine to the exact gradient"]
    assert figure._suptitle.get_text() == "mlp on digits"
    lines = axes[0].get_lines()
    assert lines[0].get_marker() != lines[1].get_marker() and lines[0].get_color() != lines[1].get_color()
    ticks = axes[0].get_xticks()
    assert np.allclose(ticks, np.round(ticks))
