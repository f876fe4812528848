"""Run several rules on the same data and seed; write ``results.md`` and ``curves.png``."""
import json
import os

from .train import train

# One fixed colour per rule, so every comparison plot reads the same.
COLOURS = {
    "bp": "#000000", "l-bp": "#555555", "lg-bp": "#999999", "fa": "#1f77b4", "l-fa": "#6baed6",
    "lg-fa": "#9ecae1", "dfa": "#2ca02c", "dkp": "#98df8a", "fdfa": "#d62728", "fg-w": "#ff7f0e",
    "lg-fg-w": "#ffbb78", "fg-a": "#9467bd", "lg-fg-a": "#c5b0d5", "guess": "#8c564b",
}


def compare(configs, out):
    """Train each config (same dataset, seed and budget) and summarise them side by side."""
    os.makedirs(out, exist_ok=True)
    summaries, curves = [], {}
    for config in configs:
        summaries.append(train(config))
        with open(os.path.join(config.out, "metrics.jsonl")) as f:
            curves[config.rule] = [json.loads(line) for line in f if line.strip()]
    table = render_table(summaries, configs[0])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    plot_curves(curves, os.path.join(out, "curves.png"))
    return {"results": os.path.join(out, "results.md"), "summaries": summaries}


def render_table(summaries, config):
    lines = [f"# {config.model} on {config.dataset}, {config.epochs} epochs, seed {config.seed}", "",
             "| rule | test error % | train error % | wall s |", "|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['rule']} | {100 * s['test_error']:.2f} | {100 * s['train_error']:.2f} | "
                     f"{s['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves, path):
    """Test error vs epoch, one line per rule (skipped with a note if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare: matplotlib not installed (pip install -e .[plot]); curves.png not written")
        return
    figure, axes = plt.subplots(figsize=(6, 4))
    for rule, history in curves.items():
        axes.plot([h["epoch"] for h in history], [100 * h["test_error"] for h in history], marker="o",
                  label=rule, color=COLOURS.get(rule))
    axes.set_xlabel("epoch")
    axes.set_ylabel("test error %")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
