"""Run several rules on the same data and seed; write ``results.md`` and ``curves.png``.

A comparison directory holds ``compare.json`` (the runs' configs, in order), one run directory per
rule, ``results.md`` and ``curves.png``.  A rule that diverges or fails is recorded as such and the
others still run; ``resume_compare`` finishes an interrupted comparison without rerunning the
rules that finished.
"""
import dataclasses
import json
import os
import sys

from . import data, distributed
from .run import Config, RunError, TrainingDiverged, holds_run, read_config
from .train import train

# One fixed colour and marker per rule, so every comparison plot reads the same.
COLOURS = {
    "bp": "#000000", "l-bp": "#555555", "lg-bp": "#999999", "fa": "#1f77b4", "l-fa": "#6baed6",
    "lg-fa": "#9ecae1", "dfa": "#2ca02c", "dkp": "#98df8a", "fdfa": "#d62728", "fg-w": "#ff7f0e",
    "lg-fg-w": "#ffbb78", "fg-a": "#9467bd", "lg-fg-a": "#c5b0d5", "guess": "#8c564b",
}
MARKERS = "osD^v<>pP*Xh"


def compare(configs, out, overwrite=False, progress=None, on_epoch=None):
    """Train each config (same dataset, seed and budget) and summarise them side by side.

    ``on_epoch(config, metrics)`` is called after each epoch of each rule.  ``out`` must not hold
    a comparison already (``overwrite=True`` replaces it; ``resume_compare`` continues it).
    """
    def start():  # on rank 0 alone
        if os.path.exists(os.path.join(out, "compare.json")) and not overwrite:
            raise RunError(f"{out} already holds a comparison; choose another --out, finish it with "
                           f"compare --resume {out}, or replace it with --overwrite")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "compare.json"), "w") as f:
            json.dump([dataclasses.asdict(c) for c in configs], f, indent=2)
    distributed.from_rank_zero(distributed.world(configs[0].parallel), start)
    return _run_all(configs, out, {c.rule: overwrite for c in configs}, progress, on_epoch)


def resume_compare(out, progress=None, on_epoch=None):
    """Finish the comparison in ``out``: finished rules are kept, interrupted ones resume, the rest start."""
    path = os.path.join(out, "compare.json")
    try:
        with open(path) as f:
            stored = json.load(f)
        configs = [dataclasses.replace(Config.from_dict({k: v for k, v in c.items() if k != "out"}),
                                       out=os.path.join(out, c["rule"])) for c in stored]
    except FileNotFoundError:
        raise RunError(f"{path}: not found; compare --resume needs the directory of a comparison") from None
    except (ValueError, TypeError, KeyError) as error:
        raise RunError(f"{path} is damaged ({error})") from None
    return _run_all(configs, out, {}, progress, on_epoch)


def _run_all(configs, out, overwrite, progress, on_epoch):
    summaries, curves = [], {}
    for config in configs:
        report = (lambda metrics, config=config: on_epoch(config, metrics)) if on_epoch else None
        summaries.append(_run_one(config, overwrite.get(config.rule, False), progress, report))
        curves[config.rule] = _read_metrics(config.out)
    if distributed.world(configs[0].parallel).rank:  # rank 0 writes the comparison
        return {"results": os.path.join(out, "results.md"), "summaries": summaries}
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(render_table(summaries, configs[0]))
    plot_curves(curves, os.path.join(out, "curves.png"), f"{configs[0].model} on {configs[0].dataset}")
    return {"results": os.path.join(out, "results.md"), "summaries": summaries}


def _run_one(config, overwrite, progress, on_epoch):
    """One rule's summary, with ``status`` 'finished', 'diverged: ...' or 'failed: ...'."""
    try:
        found, value = distributed.from_rank_zero(distributed.world(config.parallel),
                                                  lambda: _found(config, overwrite))
        if found == "finished":
            return {**value, "status": "finished"}
        if found == "resumable":
            return {**train(dataclasses.replace(value, epochs=config.epochs), resume=True, progress=progress,
                            on_epoch=on_epoch), "status": "finished"}
        return {**train(config, overwrite=value, progress=progress, on_epoch=on_epoch), "status": "finished"}
    except TrainingDiverged as error:
        status = f"diverged: {error}"
    except (RunError, ValueError, data.DataError) as error:
        status = f"failed: {error}"
    print(f"compare: {config.rule} {status}", file=sys.stderr)
    history = _read_metrics(config.out)
    last = history[-1] if history else {}
    return {"rule": config.rule, "model": config.model, "dataset": config.dataset, "epochs": len(history),
            "test_error": last.get("test_error"), "train_error": last.get("train_error"),
            "wall_s": last.get("wall_s"), "status": status}


def _found(config, overwrite):
    """What ``config.out`` holds for the comparison: ('finished', its summary), ('resumable', its
    stored config) or ('start', whether to replace what is there)."""
    if overwrite or not holds_run(config.out):
        return "start", overwrite
    summary_path = os.path.join(config.out, "summary.json")
    if os.path.exists(summary_path) and len(_read_metrics(config.out)) >= config.epochs:
        with open(summary_path) as f:
            return "finished", json.load(f)
    if os.path.exists(os.path.join(config.out, "checkpoint.npz")):
        return "resumable", read_config(config.out)
    return "start", True  # a run that stopped before its first checkpoint starts again


def _read_metrics(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def render_table(summaries, config):
    """results.md: one row per rule; a rule that did not finish says why in its status."""
    def percent(value):
        return "—" if value is None else f"{100 * value:.2f}"

    lines = [f"# {config.model} on {config.dataset}, {config.epochs} epochs, seed {config.seed}", "",
             "| rule | test error % | train error % | epochs | wall s | status |", "|---|---|---|---|---|---|"]
    for s in summaries:
        wall = "—" if s.get("wall_s") is None else f"{s['wall_s']:.1f}"
        status = s["status"].replace("|", "/")
        lines.append(f"| {s['rule']} | {percent(s.get('test_error'))} | {percent(s.get('train_error'))} | "
                     f"{s.get('epochs', 0)} | {wall} | {status} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves, path, title):
    """Train error, test error and training loss against epoch, one line per rule (a distinct colour
    and marker each); skipped with a note on stderr if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("compare: matplotlib not installed (pip install -e .[plot]); curves.png not written", file=sys.stderr)
        return
    for history in curves.values():  # --diagnostics: the mean cosine over the rule's tensors
        for h in history:
            if h.get("cosine"):
                h["mean_cosine"] = sum(h["cosine"].values()) / len(h["cosine"])
    panels = [("train_error", "train error %", 100), ("test_error", "test error %", 100), ("loss", "training loss", 1)]
    if any(h.get("mean_cosine") is not None for history in curves.values() for h in history):
        panels.append(("mean_cosine", "mean cosine to the exact gradient", 1))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4))
    for i, (rule, history) in enumerate(curves.items()):
        for axis, (key, _, scale) in zip(axes, panels):
            points = [(h["epoch"], scale * h[key]) for h in history if h.get(key) is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], label=rule,
                      color=COLOURS.get(rule), marker=MARKERS[i % len(MARKERS)])
    for axis, (_, label, _) in zip(axes, panels):
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[1].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
