"""Train a LocalMixer with LG-FG-A — activity-perturbed forward gradients and local greedy
losses (Ren et al. 2023) — on MNIST, then compare with backprop on the same budget.

    python examples/mnist_fga.py                       # M/1/16, 3 epochs (a few minutes on a laptop)
    python examples/mnist_fga.py --dataset fashion-mnist
    python examples/mnist_fga.py --epochs 1 --config S/1/1

Every weight update of LG-FG-A comes from one forward-mode pass: Gaussian noise is injected at
every normalised pre-activation, the per-(patch, group) local losses' tangents give the
directional derivatives, and ΔW = xᵀ(d·u) per layer.  No backward pass through the network.

If MNIST can be neither found nor downloaded, the example says so and falls back to
scikit-learn's bundled 8x8 digits so that it still runs end to end.
"""
import argparse
import json
import os
import sys
import tempfile

from dualnet import data
from dualnet.compare import plot_curves
from dualnet.train import Config, train


def pick_dataset(name, data_dir):
    try:
        found = data.load(name, data_dir=data_dir)
        print(f"dataset: {found}")
        return name
    except data.DataError as error:
        bar = "!" * 78
        print(f"{bar}\n{name} is not available here:\n{error}\n\nFalling back to the bundled 'digits' dataset "
              f"(1,797 real 8x8 handwritten digits from scikit-learn) so the example still runs.{_other_hint(name)}"
              f"\n{bar}", file=sys.stderr)
        return "digits"


def _other_hint(name):
    """Point at Fashion-MNIST when MNIST is missing but Fashion-MNIST is on disk (e.g. Debian's package)."""
    if name != "mnist":
        return ""
    try:
        data.load("fashion-mnist", download=False)
    except data.DataError:
        return ""
    return "\nFashion-MNIST is on this machine: `python examples/mnist_fga.py --dataset fashion-mnist` uses it."


def run(rule, args, dataset, out):
    config = Config(model="localmixer", model_options={"config": args.config}, rule=rule, dataset=dataset,
                    data_dir=args.data_dir, epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd",
                    lr=args.lr, optimizer_options={"momentum": 0.9}, schedule="linear", seed=args.seed,
                    train_limit=args.train_limit, out=out)

    def report(metrics):
        print(f"  {rule:8s} epoch {metrics['epoch']:3d}  loss {metrics['loss']:.4f}  "
              f"train error {100 * metrics['train_error']:6.2f}%  test error {100 * metrics['test_error']:6.2f}%  "
              f"({metrics['wall_s']:.0f} s)", flush=True)
    return train(config, on_epoch=report)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist", "digits"))
    parser.add_argument("--data-dir")
    parser.add_argument("--config", default="M/1/16")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)

    dataset = pick_dataset(args.dataset, args.data_dir)
    if dataset == "digits" and args.epochs == 3:
        args.epochs = 20  # 1,437 training images: more passes for the same few seconds
    out = args.out or tempfile.mkdtemp(prefix="dualnet-mnist-fga-")
    print(f"LocalMixer {args.config} on {dataset}, {args.epochs} epochs, SGD lr {args.lr} momentum 0.9, "
          f"batch {args.batch_size}; runs in {out}")
    fga = run("lg-fg-a", args, dataset, f"{out}/lg-fg-a")
    bp = run("bp", args, dataset, f"{out}/bp")
    print("\nsame budget, same data and seed:")
    print(f"  LG-FG-A (forward mode only): test error {100 * fga['test_error']:.2f}%  ({fga['wall_s']:.0f} s)")
    print(f"  BP (backprop oracle)       : test error {100 * bp['test_error']:.2f}%  ({bp['wall_s']:.0f} s)")
    curves = {rule: [json.loads(line) for line in open(os.path.join(out, rule, "metrics.jsonl"))]
              for rule in ("lg-fg-a", "bp")}
    plot = os.path.join(out, "curves.png")
    plot_curves(curves, plot, f"LocalMixer {args.config} on {dataset}")
    if os.path.exists(plot):
        print(f"learning curves of both rules: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
