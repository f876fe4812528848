"""Baydin et al. (2022), "Gradients without backpropagation", Figures 4 and 5: FG-W against BP,
loss against iterations and against wall time, several seeds, mean ± std bands.

    python benchmarks/reproduce/run.py baydin --out runs/baydin    # the budget of benchmarks/README.md
    python benchmarks/reproduce/run.py baydin --mlp-iterations 50 --cnn-iterations 3 --seeds 2   # smoke
    # the read-out-only ablation, then one table and figure from both runs
    python benchmarks/reproduce/run.py baydin --models mlp --rules readout-only --out runs/baydin-readout
    python benchmarks/reproduce/run.py baydin --merge runs/baydin/baydin-fashion-mnist.json \
        runs/baydin-readout/baydin-fashion-mnist.json --out runs/baydin-all --plot benchmarks/baydin.png

The paper's setting: MNIST, batch 64, plain SGD with the learning rate decaying as
lr_t = lr_0 exp(-1e-4 t) (t the iteration), every run from its own random initialisation and data order;

* MLP 784-1024-1024-10 with ReLU (``mlp`` with ``hidden=1024, layers=3, batch_norm=False``),
  lr_0 = 2e-5 and 2e-4;
* CNN ``cnn-baydin`` (four 3×3 convolutions of 64 channels, two 2×2 max-pools, FC 1024), lr_0 = 2e-4.

Per-iteration curves need the loss of every minibatch, which the runner (``dualnet.train``) does not
record (it keeps per-epoch metrics), so this driver steps dualnet's own rule and optimiser objects
directly: ``rules.create(name)`` gives the estimate, ``optim.create('sgd', ...)`` applies it, the
batch order comes from ``data.batches`` and each step's noise from ``backend.rng([seed, 0, step])``
as in the runner.  The loss at iteration t is the minibatch loss at the parameters before update t
(the same quantity for both rules).  Wall time counts the estimate and the update only (no
evaluation, no data loading), accumulated step by step.  BP and FG-W of one seed see the same
initial parameters and the same batches, and they run back to back (alternating which goes first)
so that a change in the machine's load hits both.

FG-W is dualnet's ``fg-w``: one Gaussian direction per weight tensor, the directional derivative
from one forward-mode pass.  As Baydin et al. do, every parameter is perturbed, the read-out's
included (``readout='perturbed'``, ``AUTHORS_OPTIONS``); ``--unaligned`` gives the read-out its
exact gradient instead, dualnet's default (docs/fidelity.md).
"""
import json
import os
import time

import numpy

from dualnet import backend, data, models, optim, rules
from dualnet.rules.base import Estimate, Rule

LR_DECAY = 1e-4  # lr_t = lr_0 exp(-LR_DECAY t), the paper's schedule
BATCH = 64
MODELS = {
    "mlp": ("mlp", {"hidden": 1024, "layers": 3, "batch_norm": False}),
    "cnn": ("cnn-baydin", {}),
}
EXPERIMENTS = [("mlp", 2e-5), ("mlp", 2e-4), ("cnn", 2e-4)]  # (model, lr_0): Figures 4 (two rows) and 5
RULES = ("bp", "fg-w")
AUTHORS_OPTIONS = {"fg-w": {"readout": "perturbed"}}  # rule -> the options that run it as the authors did


class ReadoutOnly(Rule):
    """An ablation, not in the paper: BP's exact gradient for the read-out layer only, the hidden
    layers frozen at their initialisation.  With ``--unaligned``, dualnet's FG-W also gives the
    read-out its exact gradient, and the gap between FG-W and this rule is what FG-W's forward
    gradients of the hidden layers add."""
    name = "readout-only"

    def __init__(self):
        super().__init__()
        self.backprop = rules.create("bp")

    def estimate(self, model, params, x, labels, rng, state, batch):
        full = self.backprop(model, params, x, labels, rng, state)
        return Estimate({n: g for n, g in full.grads.items() if model.block_of(n) == "head"}, full.loss, full.state)


def make_rule(name, options=AUTHORS_OPTIONS):
    """Rule ``name`` with its entry of ``options`` (rule -> keyword options; {}: dualnet's defaults)."""
    return ReadoutOnly() if name == ReadoutOnly.name else rules.create(name, **options.get(name, {}))


def load(dataset, data_dir=None):
    """(name, train_x, train_y, test_x, test_y): ``dataset`` itself, or when it is 'auto' MNIST if it
    is on disk and Fashion-MNIST otherwise (nothing is downloaded)."""
    names = ["mnist", "fashion-mnist"] if dataset == "auto" else [dataset]
    for name in names:
        try:
            loaded = data.load(name, data_dir=data_dir, download=False)
        except Exception:  # not on disk: try the next one
            if name == names[-1]:
                raise
            continue
        stats = data.channel_stats(loaded.train_x)
        return (name, data.normalize(loaded.train_x, "standardize", stats), loaded.train_y,
                data.normalize(loaded.test_x, "standardize", stats), loaded.test_y)


def run_curve(kind, rule_name, lr, seed, arrays, iterations, test_limit, options=AUTHORS_OPTIONS):
    """Train ``kind`` ('mlp' or 'cnn') with ``rule_name`` for ``iterations`` SGD steps of batch 64.

    Returns {"loss": [iterations] minibatch losses, "time_s": [iterations] cumulative step time,
    "test_loss", "test_acc" on the first ``test_limit`` test examples}.
    """
    _, train_x, train_y, test_x, test_y = arrays
    name, options = MODELS[kind]
    model = models.create(name, input_shape=train_x.shape[1:], num_classes=int(train_y.max()) + 1, **options)
    params, state = model.init(seed), model.init_state()
    rule = make_rule(rule_name, options)
    rule.setup(model, params, seed)
    optimizer = optim.create("sgd", lr=lr, schedule=optim.make_schedule("exponential", rate=LR_DECAY))
    losses, times, elapsed, step, epoch = [], [], 0.0, 0, 0
    while step < iterations:
        for xb, yb in data.batches(train_x, train_y, BATCH, seed, epoch=epoch):
            rng = backend.rng([seed, epoch, step])
            start = time.perf_counter()
            estimate = rule(model, params, xb, yb, rng, state)
            params = optimizer.step(params, estimate.grads)
            elapsed += time.perf_counter() - start
            state = estimate.state or state
            losses.append(float(estimate.loss))
            times.append(elapsed)
            step += 1
            if step == iterations:
                break
        epoch += 1
    from dualnet.train import evaluate
    test_loss, test_error = evaluate(model, params, state, test_x[:test_limit], test_y[:test_limit], batch_size=250)
    return {"loss": losses, "time_s": times, "test_loss": test_loss, "test_acc": 1 - test_error}


def run_all(arrays, seeds, iterations, test_limit, kinds=("mlp", "cnn"), names=RULES, log=print,
            options=AUTHORS_OPTIONS):
    """Every experiment of ``EXPERIMENTS`` on models ``kinds`` × rules ``names`` × ``seeds``;
    {"kind lr": {rule: [curve per seed]}}."""
    results = {}
    for kind, lr in EXPERIMENTS:
        if kind not in kinds:
            continue
        key = f"{kind} {lr:g}"
        results[key] = {rule: [] for rule in names}
        for seed in range(seeds):
            order = tuple(names) if seed % 2 == 0 else tuple(names)[::-1]
            for rule in order:
                curve = run_curve(kind, rule, lr, seed, arrays, iterations[kind], test_limit[kind], options)
                results[key][rule].append(curve)
                log(f"{key:>10} {rule:>5} seed {seed}: final loss {numpy.mean(curve['loss'][-10:]):.4f}  "
                    f"{1000 * curve['time_s'][-1] / len(curve['loss']):.1f} ms/iteration  "
                    f"test acc {100 * curve['test_acc']:.2f}%")
    return results


def _median_ms(curve):
    return 1000 * float(numpy.median(numpy.diff(numpy.concatenate([[0.0], curve["time_s"]]))))


def summarise(results):
    """Per experiment and rule: the mean ± std over seeds of the loss over the last 10% of
    iterations, of the test accuracy and of the median milliseconds per iteration (the median
    resists the load spikes of a shared machine); and a rule's median time per iteration as a
    ratio of BP's, per seed (same seed, same batches, back to back)."""
    rows = []
    for key, by_rule in results.items():
        for rule, curves in by_rule.items():
            tail = max(len(curves[0]["loss"]) // 10, 1)
            final = [numpy.mean(c["loss"][-tail:]) for c in curves]
            ms = [_median_ms(c) for c in curves]
            row = {"experiment": key, "rule": rule, "seeds": len(curves), "iterations": len(curves[0]["loss"]),
                   "final_loss": (float(numpy.mean(final)), float(numpy.std(final))),
                   "start_loss": float(numpy.mean([c["loss"][0] for c in curves])),
                   "test_acc": (float(numpy.mean([c["test_acc"] for c in curves])),
                                float(numpy.std([c["test_acc"] for c in curves]))),
                   "ms_per_iteration": (float(numpy.mean(ms)), float(numpy.std(ms)))}
            if rule in RULES and rule != "bp" and "bp" in by_rule:  # RULES run back to back, seed by seed
                ratios = [_median_ms(c) / _median_ms(b) for c, b in zip(curves, by_rule["bp"])]
                row["time_ratio_to_bp"] = (float(numpy.mean(ratios)), float(numpy.std(ratios)))
            rows.append(row)
    return rows


def table(rows, dataset):
    header = ("| experiment | rule | iterations | loss at start | loss, last 10% | test acc % "
              "| ms / iteration (median) | ÷ BP's |")
    lines = [f"### Baydin et al. Figures 4-5 on {dataset}: FG-W vs BP (mean ± std over seeds)", "",
             header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("time_ratio_to_bp")
        lines.append(f"| {r['experiment']} | {r['rule']} | {r['iterations']} | {r['start_loss']:.3f} "
                     f"| {r['final_loss'][0]:.3f} ± {r['final_loss'][1]:.3f} "
                     f"| {100 * r['test_acc'][0]:.1f} ± {100 * r['test_acc'][1]:.1f} "
                     f"| {r['ms_per_iteration'][0]:.1f} ± {r['ms_per_iteration'][1]:.1f} "
                     f"| {f'{ratio[0]:.2f} ± {ratio[1]:.2f}' if ratio else '1' if r['rule'] == 'bp' else '—'} |")
    return "\n".join(lines) + "\n"


def plot(results, dataset, path, smooth=10):
    """One row per experiment: loss (running mean over ``smooth`` iterations, mean ± std over seeds)
    against iterations and against wall time (each rule's mean cumulative time at each iteration)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), squeeze=False)
    colours = {"bp": "tab:blue", "fg-w": "tab:red", "readout-only": "tab:gray"}
    for row, (key, by_rule) in zip(axes, results.items()):
        for rule, curves in by_rule.items():
            losses = numpy.array([c["loss"] for c in curves])
            width = min(smooth, losses.shape[1])
            kernel = numpy.ones(width) / width
            smoothed = numpy.array([numpy.convolve(line, kernel, mode="valid") for line in losses])
            mean, std = smoothed.mean(0), smoothed.std(0)
            steps = numpy.arange(width, losses.shape[1] + 1)
            seconds = numpy.array([c["time_s"] for c in curves]).mean(0)[width - 1:]
            label = f"{rule.upper() if rule in RULES else rule} ({len(curves)} seeds)"
            for axis, x in zip(row, (steps, seconds)):
                axis.plot(x, mean, color=colours.get(rule), label=label)
                axis.fill_between(x, mean - std, mean + std, color=colours.get(rule), alpha=0.25)
        row[0].set(xlabel="iteration", ylabel=f"training loss ({smooth}-iteration mean)", title=f"{key}, {dataset}")
        row[1].set(xlabel="wall time (s, this machine)", title=f"{key}, {dataset}")
        row[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def merge(paths):
    """The curves of several saved runs (``baydin-*.json``), experiment by experiment and rule by rule."""
    results, dataset = {}, None
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        dataset = dataset or saved["dataset"]
        if saved["dataset"] != dataset:
            raise SystemExit(f"{path}: dataset {saved['dataset']}, not {dataset}")
        for key, by_rule in saved["curves"].items():
            results.setdefault(key, {}).update(by_rule)
    order = [f"{kind} {lr:g}" for kind, lr in EXPERIMENTS]
    return {key: results[key] for key in order if key in results}, dataset


def report(results, dataset, out, plot_path):
    """Write the table (``--out``/baydin-DATASET.md) and the figure; print both places."""
    text = table(summarise(results), dataset)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"baydin-{dataset}.md"), "w") as f:
        f.write(text)
    print(text)
    picture = plot(results, dataset, plot_path or os.path.join(out, f"baydin-{dataset}.png"))
    print(f"table: {os.path.join(out, f'baydin-{dataset}.md')}" +
          (f"; plot: {picture}" if picture else " (matplotlib missing: no plot)"))


def main(args):
    if args.merge:
        results, dataset = merge(args.merge)
        return report(results, dataset, args.out, args.plot)
    arrays = load(args.dataset, args.data_dir)
    dataset = arrays[0]
    kinds = tuple(args.models.split(","))
    names = tuple(args.rules.split(",")) if args.rules else RULES
    iterations = {"mlp": args.mlp_iterations, "cnn": args.cnn_iterations}
    test_limit = {"mlp": args.test_limit, "cnn": args.cnn_test_limit}
    result_path = os.path.join(args.out, f"baydin-{dataset}.json")
    if os.path.exists(result_path) and not args.overwrite:
        raise SystemExit(f"{result_path} exists; choose another --out or pass --overwrite")
    print(f"Baydin et al. on {dataset}: {args.seeds} seeds, rules {', '.join(names)}; "
          + ", ".join(f"{k.upper()} {iterations[k]} iterations" for k in kinds)
          + f", batch {BATCH}; SGD lr_t = lr_0 exp(-{LR_DECAY:g} t)", flush=True)
    results = run_all(arrays, args.seeds, iterations, test_limit, kinds, names,
                      log=lambda line: print(line, flush=True),
                      options={} if getattr(args, "unaligned", False) else AUTHORS_OPTIONS)
    os.makedirs(args.out, exist_ok=True)
    with open(result_path, "w") as f:
        json.dump({"dataset": dataset, "seeds": args.seeds, "iterations": iterations, "batch": BATCH,
                   "lr_decay": LR_DECAY, "summary": summarise(results), "curves": results}, f)
    print(f"curves: {result_path}")
    report(results, dataset, args.out, args.plot)
