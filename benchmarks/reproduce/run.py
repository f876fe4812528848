"""Reproduce the papers' accuracy tables at a budget this machine affords, as their authors ran them.

    # Bacho & Chu (FDFA) fully-connected nets, docs/papers.md
    python benchmarks/reproduce/run.py fdfa --dataset fashion-mnist --layers 3 --epochs 3
    # Ren et al. (LocalMixer) Table 3 rows
    python benchmarks/reproduce/run.py ren --dataset fashion-mnist --config S/1/1 --epochs 3
    # Fournier et al. (ResNet-18, gradient guesses)
    python benchmarks/reproduce/run.py fournier --dataset fashion-mnist --epochs 1 --rules bp,local-activity
    # one rule with an option
    python benchmarks/reproduce/run.py fdfa --layers 3 --epochs 10 --rules fg-a --rule-opt batch_coupling=own
    # Baydin et al. Figures 4-5: FG-W vs BP loss against iterations and wall time (see baydin.py)
    python benchmarks/reproduce/run.py baydin --seeds 5 --mlp-iterations 600 --cnn-iterations 25

Each preset sets its paper's hyper-parameters and the options that run each rule as the authors'
public code does (docs/fidelity.md; the preset prints that paper's rows of the fidelity table):

* fdfa — Adam 1e-4 (FG-W 1e-3), batch 64, inputs in [-1, 1], ×0.95 per epoch; FG-W perturbs the
  read-out too; DKP and FDFA learn B by Adam 1e-4, FDFA after using it.
* ren — SGD 0.01, momentum 0.9, batch 128, linear decay; LN before and after every linear layer
  and before every head (begin/middle/inter/last-layer LN); read-out lr ×0.1; weight decay 1e-4 on
  weights; global FG-A on the batch sum; LG-FG-W's dense columns per group; "DFA" is Ren's fixed
  random local classifier (dfa-local).
* fournier — ResNet-18 (8 blocks), SGD 0.05, momentum 0.9, weight decay 5e-4, batch 128, ×0.2
  every 30 epochs, crop-and-flip; the last block on its exact gradient; every example projected
  on its own guess in both spaces (N one-example directions where a BatchNorm mixes the batch);
  weight-space guesses projected per module, random ones normalised.
* baydin (its own driver, baydin.py: loss curves per iteration) — SGD with lr·e^(−1e-4·step),
  batch 64, FG-W perturbing every parameter, the read-out's included (orobix/fwdgrad).

``--unaligned`` runs dualnet's defaults instead of the authors' options (the reproduction before
the fidelity options existed), so that the effect of the alignment can be measured.  The measured
numbers are printed next to the paper's as a markdown table (also written to ``--out``).
"""
import argparse
import os

from dualnet import rules as rule_registry
from dualnet.cli import key_values
from dualnet.train import Config, train

HERE = os.path.dirname(os.path.abspath(__file__))
FIDELITY = os.path.join(HERE, "..", "..", "docs", "fidelity.md")

FDFA_RULES = ["bp", "fg-w", "fg-a", "lg-fg-a", "dfa", "dkp", "fdfa"]
FDFA_PAPER = {  # test accuracy %, (layers, rule) -> (MNIST, Fashion-MNIST, CIFAR-10)
    (2, "bp"): (98.25, 89.37, 56.20), (2, "fg-w"): (85.87, 77.72, 30.47), (2, "fg-a"): (93.39, 84.73, 47.39),
    (2, "dfa"): (98.04, 88.67, 54.80), (2, "dkp"): (98.12, 89.09, 55.41), (2, "fdfa"): (98.21, 89.27, 55.74),
    (3, "bp"): (98.39, 90.01, 56.66), (3, "fg-w"): (82.36, 73.94, 27.52), (3, "fg-a"): (90.86, 82.21, 43.39),
    (3, "lg-fg-a"): (91.64, 82.41, 43.08), (3, "dfa"): (98.18, 89.19, 54.20), (3, "dkp"): (98.28, 89.63, 55.15),
    (3, "fdfa"): (98.30, 89.82, 55.70),
    (4, "bp"): (98.46, 89.99, 56.92), (4, "fg-w"): (80.03, 71.72, 25.17), (4, "fg-a"): (83.40, 77.62, 35.53),
    (4, "lg-fg-a"): (86.89, 77.98, 34.56), (4, "dfa"): (98.15, 89.15, 53.61), (4, "dkp"): (98.27, 89.48, 54.35),
    (4, "fdfa"): (98.32, 89.56, 54.97),
}
REN_RULES = ["bp", "l-bp", "lg-bp", "fa", "dfa", "fg-w", "fg-a", "lg-fg-w", "lg-fg-a"]
REN_PAPER = {  # MNIST test error %, config -> rule -> error
    "S/1/1": {"bp": 2.66, "l-bp": 2.38, "lg-bp": 2.43, "fa": 2.82, "dfa": 3.31, "fg-w": 9.25, "fg-a": 3.24,
              "lg-fg-w": 9.25, "lg-fg-a": 3.24},
    "M/1/16": {"bp": 2.41, "l-bp": 2.16, "lg-bp": 2.81, "fa": 2.90, "dfa": 3.17, "fg-w": 8.56, "fg-a": 3.76,
               "lg-fg-w": 5.66, "lg-fg-a": 2.55},
}
FOURNIER_ROWS = {  # label -> (rule, options); ResNet-18, 8 blocks, global target
    "bp": ("bp", {}),
    "local-activity": ("guess", {"guess": "local", "space": "activity"}),
    "local-weight": ("guess", {"guess": "local", "space": "weight"}),
    "gaussian-activity": ("guess", {"guess": "gaussian", "space": "activity"}),
    "gaussian-weight": ("guess", {"guess": "gaussian", "space": "weight"}),
}
FOURNIER_PAPER = {  # test accuracy %, dataset -> label -> accuracy (local guesses: MLP aux on Fashion-MNIST,
    # CNN aux on CIFAR-10)
    "fashion-mnist": {"bp": 93.9, "local-activity": 93.6, "local-weight": 94.0, "gaussian-activity": 87.5,
                      "gaussian-weight": 89.5},
    "cifar10": {"bp": 94.5, "local-activity": 90.4, "local-weight": 92.0},
}
DATASET_COLUMN = {"mnist": 0, "fashion-mnist": 1, "cifar10": 2}
# The per-example projections' one-example directions per forward pass: at batch 128 a pass then holds
# 32 × 128 examples' tangents (about 1 GiB per activation of the first stage in float32), not N × 128.
FOURNIER_DIRECTIONS_PER_PASS = 32


def _run_name(prefix, label, args):
    return f"{prefix}-{label}" + "".join(f"-{key}={value}" for key, value in sorted(args.rule_options.items())) + (
        "-unaligned" if args.unaligned else "")


# --- Bacho & Chu ----------------------------------------------------------------------------------
def fdfa_authors_options(rule):
    """Bacho & Chu's code: FG-W perturbs every parameter, the output layer's included; DKP and FDFA
    learn B by Adam (rate 1e-4), FDFA after using it for the step's error."""
    return {"fg-w": {"readout": "perturbed"}, "dkp": {"adam": True},
            "fdfa": {"adam": True, "update": "after"}}.get(rule, {})


def fdfa_config(label, args):
    rule = label
    options = {"hidden": 1000 if args.dataset == "cifar10" else 800, "layers": args.layers,
               "batch_norm": rule != "fg-w"}  # FG-W without BatchNorm, as in the paper
    rule_options = {"feedback_lr": 1e-4} if rule in ("dkp", "fdfa") else {}
    if not args.unaligned:
        rule_options.update(fdfa_authors_options(rule))
    return Config(model="mlp", model_options=options, rule=rule, rule_options={**rule_options, **args.rule_options},
                  dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, batch_size=64, optimizer="adam",
                  lr=1e-3 if rule == "fg-w" else 1e-4, schedule="epoch_decay", normalize="symmetric",
                  seed=args.seed, train_limit=args.train_limit,
                  out=os.path.join(args.out, _run_name(f"fdfa-{args.layers}layers-{args.dataset}", rule, args)))


# --- Ren et al. -----------------------------------------------------------------------------------
REN_AUTHORS_RULE = {"dfa": "dfa-local"}  # the row Ren et al. label DFA is a fixed random local classifier
REN_AUTHORS_MODEL = {"begin_ln": True, "middle_ln": True, "inter_ln": True, "last_layer_ln": True}


def ren_authors_options(rule):
    """Ren et al.'s code: global FG-A on the batch sum; LG-FG-W's dense columns from their own group."""
    return {"fg-a": {"loss_reduction": "sum"}, "lg-fg-w": {"dense_groups": "own"}}.get(rule, {})


def ren_config(label, args):
    aligned = not args.unaligned
    rule = REN_AUTHORS_RULE.get(label, label) if aligned else label
    rule_options = ren_authors_options(rule) if aligned else {}
    model_options = {"config": args.config, **(REN_AUTHORS_MODEL if aligned else {})}
    setup = dict(readout_lr=0.1, weight_decay_on="weights") if aligned else {}
    optimizer_options = {"momentum": 0.9, **({"weight_decay": 1e-4} if aligned else {})}
    return Config(model="localmixer", model_options=model_options, rule=rule,
                  rule_options={**rule_options, **args.rule_options}, dataset=args.dataset, data_dir=args.data_dir,
                  epochs=args.epochs, batch_size=128, optimizer="sgd", lr=0.01, optimizer_options=optimizer_options,
                  schedule="linear", seed=args.seed, train_limit=args.train_limit,
                  out=os.path.join(args.out, _run_name(f"ren-{args.config.replace('/', '-')}", label, args)), **setup)


# --- Fournier et al. ------------------------------------------------------------------------------
def fournier_config(label, args):
    rule, rule_options = FOURNIER_ROWS[label]
    rule_options = dict(rule_options)
    if rule == "guess" and not args.unaligned:
        rule_options["last_block"] = "exact"  # the authors train the last block on its exact gradient
        # every example projected on its own guess, in both spaces, in passes of a bounded number of directions
        rule_options["directions_per_pass"] = FOURNIER_DIRECTIONS_PER_PASS
        if rule_options.get("space") == "weight":  # one normalised projection per conv / BatchNorm and example
            rule_options.update(weight_unit="module", normalise_random=True, weight_examples="example")
        else:
            rule_options["coupled_activity"] = "example"
    aux = "mlp" if args.dataset == "fashion-mnist" else "cnn"  # the paper's aux nets for these columns
    return Config(model="resnet18", model_options={"aux": aux}, rule=rule,
                  rule_options={**rule_options, **args.rule_options}, dataset=args.dataset, data_dir=args.data_dir,
                  epochs=args.epochs, batch_size=128, optimizer="sgd", lr=0.05,
                  optimizer_options={"momentum": 0.9, "weight_decay": 5e-4}, schedule="step",
                  augment=None if args.unaligned else "crop-flip", seed=args.seed, train_limit=args.train_limit,
                  out=os.path.join(args.out, _run_name("fournier", label, args)))


# --- the tables -----------------------------------------------------------------------------------
def fidelity_rows(paper):
    """The fidelity table's section for ``paper`` (docs/fidelity.md, '## {paper}' up to the next '## ')."""
    with open(FIDELITY) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and paper in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip()


def preset(args):
    """(labels, config maker, title, paper column, fidelity section) of ``args.table``."""
    if args.table == "fdfa":
        labels = [r for r in FDFA_RULES if (args.layers, r) in FDFA_PAPER]
        paper = lambda r: f"{FDFA_PAPER[(args.layers, r)][DATASET_COLUMN[args.dataset]]:.2f}% acc"  # noqa: E731
        return labels, fdfa_config, f"FDFA fully-connected, {args.layers} layers, {args.dataset}", paper, "Bacho"
    if args.table == "ren":
        paper = lambda r: f"{100 - REN_PAPER[args.config][r]:.2f}% acc (MNIST)"  # noqa: E731
        return REN_RULES, ren_config, f"Ren Table 3, LocalMixer {args.config}, {args.dataset}", paper, "Ren"
    if args.table == "fournier":
        column = FOURNIER_PAPER.get(args.dataset, {})
        paper = lambda r: f"{column[r]:.1f}% acc" if r in column else "—"  # noqa: E731
        return list(FOURNIER_ROWS), fournier_config, f"Fournier ResNet-18 (8 blocks), {args.dataset}", paper, \
            "Fournier"
    raise ValueError(f"no preset table {args.table!r}")


def _with_dataset(args, default):
    if args.dataset is None:
        args.dataset = default
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("fdfa", "ren", "fournier", "baydin"))
    parser.add_argument("--dataset", choices=tuple(DATASET_COLUMN) + ("auto",),
                        help="default: fashion-mnist (fdfa, ren, fournier); auto = MNIST when on disk, else "
                             "Fashion-MNIST (baydin)")
    parser.add_argument("--data-dir")
    parser.add_argument("--layers", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--config", default="S/1/1", choices=tuple(REN_PAPER))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rules", help="comma-separated subset of the preset's rows (baydin: of bp, fg-w, "
                                        "readout-only; default bp,fg-w)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--rule-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="an option for every rule of the run, e.g. --rules fg-a --rule-opt batch_coupling=own")
    parser.add_argument("--unaligned", action="store_true",
                        help="dualnet's defaults instead of the authors' options (the earlier reproductions)")
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier reproduction")
    baydin_options = parser.add_argument_group("baydin")
    baydin_options.add_argument("--seeds", type=int, default=5)
    baydin_options.add_argument("--mlp-iterations", type=int, default=600)
    baydin_options.add_argument("--cnn-iterations", type=int, default=25)
    baydin_options.add_argument("--test-limit", type=int, default=2000, help="test examples scored (MLP)")
    baydin_options.add_argument("--cnn-test-limit", type=int, default=500, help="test examples scored (CNN)")
    baydin_options.add_argument("--plot", help="where the figure goes (default: beside the results in --out)")
    baydin_options.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    baydin_options.add_argument("--merge", nargs="+", metavar="JSON",
                                help="train nothing: table and plot from saved baydin-*.json files, merged")
    args = parser.parse_args()
    if args.table == "baydin":
        import baydin  # beside this script
        print(fidelity_rows("Baydin"), end="\n\n", flush=True)
        return baydin.main(_with_dataset(args, "auto"))
    if args.dataset == "auto":
        parser.error("--dataset auto applies to the baydin reproduction only")
    args = _with_dataset(args, "fashion-mnist")
    labels, make, title, paper, section = preset(args)
    if args.rules:
        unknown = [r for r in args.rules.split(",") if r and r not in labels]
        if unknown:
            parser.error(f"--rules {','.join(unknown)}: not a row of the {args.table} preset; "
                         f"rows: {', '.join(labels)}")
        labels = [r for r in args.rules.split(",") if r]
    print(fidelity_rows(section), end="\n\n", flush=True)
    setting = "dualnet's defaults" if args.unaligned else "the authors' options"
    lines = [f"### {title}, {args.epochs} epochs, {setting} (paper: full budget)", "",
             "| rule | test acc % | train acc % | paper | wall s |", "|---|---|---|---|---|"]
    for label in labels:
        args.rule_options = {}
        config = make(label, args)
        args.rule_options = key_values(args.rule_opt, "--rule-opt", f"rule {config.rule!r}",
                                       rule_registry.options(config.rule))
        config = make(label, args)
        s = train(config, overwrite=args.overwrite)
        shown = label + "".join(f" {key}={value}" for key, value in sorted(config.rule_options.items()))
        lines.append(f"| {shown} | {100 * s['test_acc']:.2f} | {100 * (1 - s['train_error']):.2f} | {paper(label)} "
                     f"| {s['wall_s']:.0f} |")
        print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{args.table}-{args.dataset}.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
