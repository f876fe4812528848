"""Reproduce the papers' accuracy tables at a budget this machine affords.

    # Bacho & Chu (FDFA) fully-connected nets, docs/papers.md
    python benchmarks/reproduce/run.py fdfa --dataset fashion-mnist --layers 3 --epochs 3
    # Ren et al. (LocalMixer) Table 3 rows, docs/papers.md
    python benchmarks/reproduce/run.py ren --dataset fashion-mnist --config S/1/1 --epochs 3
    # one rule with an option
    python benchmarks/reproduce/run.py fdfa --layers 3 --epochs 10 --rules fg-a --rule-opt batch_coupling=own
    # Baydin et al. Figures 4-5: FG-W vs BP loss against iterations and wall time (see baydin.py)
    python benchmarks/reproduce/run.py baydin --seeds 5 --mlp-iterations 600 --cnn-iterations 25

Each rule is trained with the paper's optimiser settings (FDFA: Adam, lr 1e-4 weights and
feedback, batch 64, inputs in [-1, 1], ×0.95 per epoch; FG-W lr 1e-3.  Ren: SGD lr 0.01,
momentum 0.9, batch 128, linear decay) through ``python -m dualnet``'s runner, and the measured
numbers are printed next to the paper's as a markdown table (also written to ``--out``).
"""
import argparse
import os

from dualnet import rules as rule_registry
from dualnet.cli import key_values
from dualnet.train import Config, train

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
DATASET_COLUMN = {"mnist": 0, "fashion-mnist": 1, "cifar10": 2}


def _run_name(prefix, rule, args):
    return f"{prefix}-{rule}" + "".join(f"-{key}={value}" for key, value in sorted(args.rule_options.items()))


def fdfa_config(rule, args):
    options = {"hidden": 1000 if args.dataset == "cifar10" else 800, "layers": args.layers,
               "batch_norm": rule != "fg-w"}  # FG-W without BatchNorm, as in the paper
    rule_options = {"feedback_lr": 1e-4} if rule in ("dkp", "fdfa") else {}
    return Config(model="mlp", model_options=options, rule=rule, rule_options={**rule_options, **args.rule_options},
                  dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, batch_size=64, optimizer="adam",
                  lr=1e-3 if rule == "fg-w" else 1e-4, schedule="epoch_decay", normalize="symmetric",
                  seed=args.seed, train_limit=args.train_limit,
                  out=os.path.join(args.out, _run_name("fdfa", rule, args)))


def ren_config(rule, args):
    return Config(model="localmixer", model_options={"config": args.config}, rule=rule,
                  rule_options=dict(args.rule_options), dataset=args.dataset, data_dir=args.data_dir,
                  epochs=args.epochs, batch_size=128, optimizer="sgd", lr=0.01, optimizer_options={"momentum": 0.9},
                  schedule="linear", seed=args.seed, train_limit=args.train_limit,
                  out=os.path.join(args.out, _run_name("ren", rule, args)))


def _with_dataset(args, default):
    if args.dataset is None:
        args.dataset = default
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("fdfa", "ren", "baydin"))
    parser.add_argument("--dataset", choices=tuple(DATASET_COLUMN) + ("auto",),
                        help="default: fashion-mnist (fdfa, ren); auto = MNIST when on disk, else Fashion-MNIST "
                             "(baydin)")
    parser.add_argument("--data-dir")
    parser.add_argument("--layers", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--config", default="S/1/1", choices=tuple(REN_PAPER))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rules", help="comma-separated subset (baydin: of bp,fg-w,readout-only; default bp,fg-w)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--rule-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="an option for every rule of the run, e.g. --rules fg-a --rule-opt batch_coupling=own")
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
        return baydin.main(_with_dataset(args, "auto"))
    if args.dataset == "auto":
        parser.error("--dataset auto applies to the baydin reproduction only")
    args = _with_dataset(args, "fashion-mnist")
    if args.table == "fdfa":
        names = [r for r in FDFA_RULES if (args.layers, r) in FDFA_PAPER]
        make, title = fdfa_config, f"FDFA fully-connected, {args.layers} layers, {args.dataset}"
        paper = lambda r: f"{FDFA_PAPER[(args.layers, r)][DATASET_COLUMN[args.dataset]]:.2f}% acc"
    else:
        names = REN_RULES
        make, title = ren_config, f"Ren Table 3, LocalMixer {args.config}, {args.dataset}"
        paper = lambda r: f"{100 - REN_PAPER[args.config][r]:.2f}% acc (MNIST)"
    if args.rules:
        names = [r for r in args.rules.split(",") if r]
    lines = [f"### {title}, {args.epochs} epochs (paper: full budget)", "",
             "| rule | test acc % | train acc % | paper | wall s |", "|---|---|---|---|---|"]
    for rule in names:
        args.rule_options = key_values(args.rule_opt, "--rule-opt", f"rule {rule!r}", rule_registry.options(rule))
        s = train(make(rule, args), overwrite=args.overwrite)
        label = rule + "".join(f" {key}={value}" for key, value in sorted(args.rule_options.items()))
        lines.append(f"| {label} | {100 * s['test_acc']:.2f} | {100 * (1 - s['train_error']):.2f} | {paper(rule)} "
                     f"| {s['wall_s']:.0f} |")
        print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{args.table}-{args.dataset}.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
