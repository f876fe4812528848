"""``python -m dualnet``: train, compare, list, info.

    python -m dualnet train --model localmixer --config M/1/16 --rule lg-fg-a --dataset mnist \\
        --epochs 5 --batch-size 128 --optimizer sgd --lr 0.01 --out runs/fga
    python -m dualnet train --resume runs/fga --epochs 10
    python -m dualnet compare --rules bp,fg-a,lg-fg-a,fdfa --model mlp --dataset fashion-mnist --epochs 2
    python -m dualnet list
    python -m dualnet info --model localmixer --config M/8/16 --input-shape 3,32,32
"""
import argparse
import difflib
import json
import os
import sys

from . import backend, data, models, rules
from .nn.localmixer import CONFIGS
from .train import Config, TrainingDiverged, train

MODEL_FLAGS = {"config": str, "hidden": int, "layers": int, "blocks": int, "patches": int, "channels": int,
               "groups": int, "aux": str}


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs, flag):
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"{flag}: expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def _check_name(kind, name, valid):
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SystemExit(f"unknown {kind} {name!r}; valid: {', '.join(valid)}.{hint}")


def _add_run_arguments(parser):
    parser.add_argument("--model", default="mlp")
    for flag, kind in MODEL_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, help=f"model option {flag}")
    parser.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="any other model option")
    parser.add_argument("--rule-opt", action="append", metavar="KEY=VALUE",
                        help="rule option, e.g. directions=4, norm_grad=false, alpha=0.1")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--schedule", default="constant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalize", default="standardize", choices=data.NORMALIZATIONS)
    parser.add_argument("--train-limit", type=int, default=0, help="use only the first N training examples")
    parser.add_argument("--diagnostics", action="store_true", help="log cosine to the exact gradient")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda with DUALNET_BACKEND=cupy, else cpu; with --resume, "
                             "overrides the run's device (a GPU run can continue on a CPU)")


def _config(args, rule, out):
    _check_name("model", args.model, models.names())
    _check_name("rule", rule, rules.names())
    model_options = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    model_options.update(_key_values(args.model_opt, "--model-opt"))
    optimizer_options = {k: v for k, v in (("momentum", args.momentum), ("weight_decay", args.weight_decay))
                         if v is not None}
    return Config(model=args.model, model_options=model_options, rule=rule,
                  rule_options=_key_values(args.rule_opt, "--rule-opt"), dataset=args.dataset,
                  data_dir=args.data_dir, epochs=args.epochs, batch_size=args.batch_size,
                  optimizer=args.optimizer, lr=args.lr, optimizer_options=optimizer_options,
                  schedule=args.schedule, seed=args.seed, normalize=args.normalize, train_limit=args.train_limit,
                  diagnostics=args.diagnostics, device=args.device, out=out)


def cmd_train(args):
    if args.resume:
        with open(os.path.join(args.resume, "config.json")) as f:
            config = Config.from_dict(json.load(f))
        if args.epochs_override is not None:
            config.epochs = args.epochs_override
        if args.device is not None:
            config.device = args.device
        return train(config, resume=True)
    args.epochs = args.epochs_override if args.epochs_override is not None else 1
    return train(_config(args, args.rule, args.out))


def cmd_compare(args):
    from .compare import compare
    chosen = [r.strip() for r in args.rules.split(",") if r.strip()]
    for rule in chosen:
        _check_name("rule", rule, rules.names())
    configs = [_config(args, rule, os.path.join(args.out, rule)) for rule in chosen]
    return compare(configs, args.out)


def cmd_list(args):
    print("models:   " + ", ".join(models.names()))
    print("  localmixer configs: " + ", ".join(CONFIGS))
    print("rules:    " + ", ".join(rules.names()))
    print("datasets: " + ", ".join(data.available()))


def cmd_info(args):
    _check_name("model", args.model, models.names())
    options = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    options.update(_key_values(args.model_opt, "--model-opt"))
    if args.input_shape:
        options["input_shape"] = tuple(int(v) for v in args.input_shape.split(","))
    options.setdefault("num_classes", args.num_classes)
    model = models.create(args.model, **options)
    print(f"{args.model} {options}")
    for block, count in model.param_counts().items():
        print(f"  {'block ' + str(block) if block != 'head' else 'read-out':>10}: {count:,}")
    print(f"  {'total':>10}: {model.num_params():,}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dualnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train one rule on one model")
    _add_run_arguments(p)
    p.set_defaults(epochs=None)
    p.add_argument("--rule", default="bp")
    p.add_argument("--out", default="runs/run")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.set_defaults(func=cmd_train)
    p = commands.add_parser("compare", help="train several rules with the same data and seed")
    _add_run_arguments(p)
    p.add_argument("--rules", required=True, help="comma-separated, e.g. bp,fg-a,lg-fg-a,fdfa")
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(func=cmd_compare)
    p = commands.add_parser("list", help="models, configs, rules and datasets")
    p.set_defaults(func=cmd_list)
    p = commands.add_parser("info", help="parameter counts per block")
    p.add_argument("--model", default="mlp")
    for flag, kind in MODEL_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--model-opt", action="append", metavar="KEY=VALUE")
    p.add_argument("--input-shape", help="C,H,W (default: the model's)")
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    if args.command == "train":
        args.epochs_override = args.epochs
    try:
        result = args.func(args)
    except (ValueError, data.DataError, TrainingDiverged, backend.DeviceUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if isinstance(result, dict):
        print(json.dumps(result, indent=2))
    return 0
