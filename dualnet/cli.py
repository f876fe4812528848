"""``python -m dualnet``: train, compare, list, info.

    python -m dualnet train --model localmixer --config M/1/16 --rule lg-fg-a --dataset mnist \\
        --epochs 5 --batch-size 128 --optimizer sgd --lr 0.01 --out runs/fga
    python -m dualnet train --resume runs/fga --epochs 10       # extend to 10 epochs in all
    python -m dualnet compare --rules bp,fg-a,lg-fg-a,fdfa --model mlp --dataset fashion-mnist --epochs 2
    python -m dualnet list
    python -m dualnet info --model localmixer --config M/8/16 --input-shape 3,32,32

Every error is one line on stderr and a non-zero exit (1; 2 for a malformed command line; 130
after Ctrl-C, which writes a checkpoint first).
"""
import argparse
import difflib
import inspect
import json
import math
import os
import sys
import traceback

from . import backend, data, distributed, models, optim, rules
from .nn.localmixer import CONFIGS
from .run import RESUMABLE_FIELDS, SCHEDULES, Config, Interrupted, RunError, default_out, epoch_line, read_config
from .train import train

MODEL_FLAGS = {"config": str, "hidden": int, "layers": int, "blocks": int, "patches": int, "channels": int,
               "groups": int, "aux": str}
RESUME_FLAGS = set(RESUMABLE_FIELDS) | {"resume", "max_steps", "progress"}
"""What ``train --resume`` accepts; any other flag given with it is refused by name."""
APPLIED_ON_RESUME = ", ".join(f"--{name.replace('_', '-')}" for name in RESUMABLE_FIELDS) + " and --max-steps"
"""The flags that change a resumed run, as the help and the errors name them."""
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# ---------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------
def parse_option(owner, key, text, default):
    """``text`` parsed as the type of the option's ``default``: bool (true/false/1/0/yes/no, any
    case), int, float, str; an option without a typed default takes JSON (``[15,40]``) or text."""
    kind = type(default)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in TRUE or lowered in FALSE:
            return lowered in TRUE
        raise ValueError(f"{owner} option {key}={text!r}: expected a boolean (true/false, 1/0, yes/no)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{owner} option {key}={text!r}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{owner} option {key}={text!r}: expected a number") from None
    if kind is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(pairs, flag, owner, accepted):
    """``KEY=VALUE`` pairs of ``flag`` parsed against ``accepted`` ({option: default})."""
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in accepted:
            valid = ", ".join(accepted) or "(none)"
            raise ValueError(f"{flag} {key}: {owner} has no such option; valid: {valid}")
        options[key] = parse_option(owner, key, value, accepted[key])
    return options


def _check_name(kind, name, valid):
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SystemExit(f"unknown {kind} {name!r}; valid: {', '.join(valid)}.{hint}")


def _whole(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


# ---------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------
class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has one) and keeps the description's layout."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_run_arguments(parser):
    parser.add_argument("--model", default="mlp", help=f"one of: {', '.join(models.names())}")
    for flag, kind in MODEL_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, help=f"model option {flag}" + (
            f" (localmixer: {', '.join(CONFIGS)})" if flag == "config" else ""))
    parser.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                        help="any other model option, parsed by the option's type")
    parser.add_argument("--rule-opt", action="append", metavar="KEY=VALUE",
                        help="rule option, parsed by its type: e.g. directions=4, norm_grad=false, alpha=0.1")
    parser.add_argument("--dataset", default="digits", help=f"one of: {', '.join(data.available())}")
    parser.add_argument("--data-dir", help="where to look for the dataset first")
    parser.add_argument("--epochs", type=_whole(1), default=1,
                        help="number of epochs; with --resume, the new total (more extends the run)")
    parser.add_argument("--batch-size", type=_whole(1), default=128, help="examples per step")
    parser.add_argument("--optimizer", default="sgd", choices=sorted(optim.OPTIMIZERS), help="the optimiser")
    parser.add_argument("--lr", type=_rate, default=0.01,
                        help="learning rate; with --resume, the rate the rest of the run starts from")
    parser.add_argument("--momentum", type=_rate, help="sgd and lars only")
    parser.add_argument("--weight-decay", type=_rate, help="L2 weight decay")
    parser.add_argument("--schedule", default="constant", choices=SCHEDULES,
                        help="learning-rate schedule (linear and warmup_cosine span the run's epochs)")
    parser.add_argument("--lr-decay-rate", type=_rate, metavar="K",
                        help="per-step rate of --schedule exponential: lr_t = lr exp(-K t)")
    parser.add_argument("--readout-lr", type=_rate, default=1.0,
                        help="the read-out's learning-rate multiplier (Ren et al.: 0.1)")
    parser.add_argument("--weight-decay-on", default="all", choices=("all", "weights"),
                        help="'weights': weight decay on the linear maps' weights only, not biases or norms")
    parser.add_argument("--augment", choices=("crop-flip",),
                        help="supervised augmentation of every training batch: pad 4, random crop, flip")
    parser.add_argument("--seed", type=_whole(0), default=0, help="initialisation, batch order and noise")
    parser.add_argument("--normalize", default="standardize", choices=data.NORMALIZATIONS,
                        help="input normalisation")
    parser.add_argument("--train-limit", type=_whole(0), default=0,
                        help="use only the first N training examples (0: all)")
    parser.add_argument("--eval-limit", type=_whole(0), default=10000,
                        help="measure the training error on at most N examples (0: all)")
    parser.add_argument("--max-steps", type=_whole(1),
                        help="stop after N training steps (a checkpoint is written; --resume continues)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="log each tensor's cosine to the exact gradient of the rule's own objective "
                             "(metrics.jsonl, 'cosine'); costs one backward pass per step")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda with DUALNET_BACKEND=cupy, else cpu; with --resume, "
                             "overrides the run's device (a GPU run can continue on a CPU)")
    parser.add_argument("--parallel", choices=("data", "pipeline"),
                        help="under mpiexec -n P: 'data' splits every batch over the P ranks; 'pipeline' puts "
                             "stage s of the blocks on rank s (local greedy rules; needs the mpi extra)")
    parser.add_argument("--stages", type=_block_counts,
                        help="with --parallel pipeline: blocks per stage, e.g. 2,1 (default: balanced by "
                             "estimated cost)")
    parser.add_argument("--blas-threads", type=_blas_threads,
                        help="BLAS threads (N, or 'auto': the cores not busy now, from the load average); "
                             "default: BLAS's own; on a busy machine more threads than free cores can slow a "
                             "GEMM down 30x")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def free_cores():
    """The cores this process may use minus the 1-minute load average, rounded; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, round(cores - os.getloadavg()[0]))


def _blas_threads(text):
    """``--blas-threads``: a whole number >= 1, or 'auto' (``free_cores()`` when the run starts)."""
    if text == "auto":
        return free_cores()
    return _whole(1)(text)


_blas_threads.__name__ = "whole number >= 1 or 'auto'"


def _warn_if_oversubscribed(config):
    """One line on a terminal's stderr when BLAS would run more threads than the cores left free
    by the load (not in logs: a run's stderr stays its epoch lines and errors)."""
    if config.blas_threads is not None or not sys.stderr.isatty():
        return
    from threadpoolctl import threadpool_info
    threads = max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1)
    free = free_cores()
    if threads > free:
        print(f"warning: BLAS runs {threads} threads but only {free} core(s) are free (load average "
              f"{os.getloadavg()[0]:.1f}); GEMMs can slow down many times: consider --blas-threads {free} "
              f"(or auto)", file=sys.stderr)


def _block_counts(text):
    """``--stages 2,1``: positive block counts, one per stage."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive block counts separated by commas, e.g. 2,1")
    return counts


def build_parser():
    """The ``python -m dualnet`` parser."""
    parser = _Parser(prog="python -m dualnet", description=__doc__, formatter_class=_Help)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = commands.add_parser("train", help="train one rule on one model", formatter_class=_Help)
    _add_run_arguments(p)
    p.add_argument("--rule", default="bp", help=f"one of: {', '.join(rules.names())}")
    p.add_argument("--out", help="run directory (default: a fresh runs/<model>-<rule>-<time>)")
    p.add_argument("--resume", metavar="DIR",
                   help=f"continue the run in DIR itself; only {APPLIED_ON_RESUME} apply")
    p.set_defaults(func=cmd_train)
    p = commands.add_parser("compare", help="train several rules with the same data and seed",
                            formatter_class=_Help)
    _add_run_arguments(p)
    p.add_argument("--rules", help="comma-separated, e.g. bp,fg-a,lg-fg-a,fdfa")
    p.add_argument("--out", help="comparison directory (default: a fresh runs/compare-<model>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="finish the comparison in DIR: rules that finished are kept")
    p.set_defaults(func=cmd_compare)
    p = commands.add_parser("list", help="models, configs, rules and datasets", formatter_class=_Help)
    p.set_defaults(func=cmd_list)
    p = commands.add_parser("info", help="parameter counts per block", formatter_class=_Help)
    p.add_argument("--model", default="mlp", help=f"one of: {', '.join(models.names())}")
    for flag, kind in MODEL_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, help=f"model option {flag}")
    p.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="any other model option")
    p.add_argument("--input-shape", help="C,H,W (default: the model's)")
    p.add_argument("--num-classes", type=_whole(1), default=10)
    p.set_defaults(func=cmd_info)
    return parser


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
def _optimizer_options(args):
    accepted = inspect.signature(optim.OPTIMIZERS[args.optimizer]).parameters
    options = {}
    for key in ("momentum", "weight_decay"):
        value = getattr(args, key)
        if value is None:
            continue
        if key not in accepted:
            takers = ", ".join(n for n, c in optim.OPTIMIZERS.items() if key in inspect.signature(c).parameters)
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --optimizer {args.optimizer}; "
                             f"drop it (it applies to: {takers})")
        options[key] = value
    return options


def _model_options(args):
    accepted = models.options(args.model)
    options = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    for key in options:
        if key not in accepted:
            raise ValueError(f"--{key} is not an option of model {args.model!r}; its options: "
                             f"{', '.join(k for k in accepted if k not in ('input_shape', 'num_classes'))}")
    options.update(key_values(args.model_opt, "--model-opt", f"model {args.model!r}", accepted))
    return options


def _config(args, rule, out):
    _check_name("model", args.model, models.names())
    _check_name("rule", rule, rules.names())
    return Config(model=args.model, model_options=_model_options(args), rule=rule,
                  rule_options=key_values(args.rule_opt, "--rule-opt", f"rule {rule!r}", rules.options(rule)),
                  dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, batch_size=args.batch_size,
                  optimizer=args.optimizer, lr=args.lr, optimizer_options=_optimizer_options(args),
                  schedule=args.schedule, lr_decay_rate=args.lr_decay_rate, seed=args.seed,
                  augment=args.augment, readout_lr=args.readout_lr, weight_decay_on=args.weight_decay_on,
                  normalize=args.normalize, train_limit=args.train_limit, eval_limit=args.eval_limit,
                  diagnostics=args.diagnostics, device=args.device, parallel=args.parallel, stages=args.stages,
                  blas_threads=args.blas_threads, out=out)


def _report(epochs):
    def on_epoch(metrics):
        print(epoch_line(metrics, epochs), file=sys.stderr, flush=True)
    return on_epoch


def _report_rule(config, metrics):
    print(f"{config.rule}: {epoch_line(metrics, config.epochs)}", file=sys.stderr, flush=True)


def cmd_train(args, given):
    config = distributed.together(distributed.world(args.parallel), lambda: _train_config(args, given))
    _warn_if_oversubscribed(config)
    return train(config, resume=bool(args.resume), progress=args.progress, on_epoch=_report(config.epochs),
                 overwrite=args.overwrite, max_steps=args.max_steps)


def _train_config(args, given):
    if not args.resume:
        return _config(args, args.rule, args.out or default_out(args.model, args.rule))
    refused = sorted(set(given) - RESUME_FLAGS)
    if refused:
        flag = "--" + refused[0].replace("_", "-")
        raise ValueError(f"{flag} cannot be given with --resume (the run keeps its own; only {APPLIED_ON_RESUME} "
                         f"apply); start a new run with --out to change it")
    stored = read_config(args.resume)
    config = Config(**{**stored.__dict__, **{k: getattr(args, k) for k in RESUMABLE_FIELDS
                                              if k in given and k != "stages"}})
    if "parallel" in given or "stages" in given:  # a new layout: the stored partition does not carry over
        config.stages = getattr(args, "stages", None)
    return config


def cmd_compare(args, given):
    from .compare import compare, resume_compare
    if args.resume:
        refused = sorted(set(given) - {"resume", "progress"})
        if refused:
            raise ValueError(f"--{refused[0].replace('_', '-')} cannot be given with compare --resume "
                             f"(the comparison keeps its own settings)")
        out, run = args.resume, lambda: resume_compare(args.resume, progress=args.progress, on_epoch=_report_rule)
    else:
        if not args.rules:
            raise ValueError("compare needs --rules, e.g. --rules bp,fg-a,lg-fg-a")
        chosen = [r.strip() for r in args.rules.split(",") if r.strip()]
        for rule in chosen:
            _check_name("rule", rule, rules.names())
        out = args.out or default_out("compare", args.model)
        configs = distributed.together(distributed.world(args.parallel),
                                       lambda: [_config(args, rule, os.path.join(out, rule)) for rule in chosen])
        _warn_if_oversubscribed(configs[0])
        run = lambda: compare(configs, out, overwrite=args.overwrite, progress=args.progress,  # noqa: E731
                              on_epoch=_report_rule)
    try:
        return run()
    except Interrupted as stop:
        raise Interrupted(f"{str(stop).split(';')[0]}; finish the comparison with "
                          f"`python -m dualnet compare --resume {out}`") from None


def cmd_list(args, given):
    print("models:   " + ", ".join(models.names()))
    print("  localmixer configs: " + ", ".join(CONFIGS))
    print("rules:    " + ", ".join(rules.names()))
    print("datasets: " + ", ".join(data.available()))


def cmd_info(args, given):
    _check_name("model", args.model, models.names())
    options = _model_options(args)
    if args.input_shape:
        options["input_shape"] = tuple(int(v) for v in args.input_shape.split(","))
    options.setdefault("num_classes", args.num_classes)
    model = models.create(args.model, **options)
    print(f"{args.model} {options}")
    for block, count in model.param_counts().items():
        print(f"  {'block ' + str(block) if block != 'head' else 'read-out':>10}: {count:,}")
    print(f"  {'total':>10}: {model.num_params():,}")


def given_flags(argv):
    """The destinations of the options present on the command line ``argv`` (not defaulted)."""
    parser = build_parser()
    for subparsers in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for sub in subparsers.choices.values():
            for action in sub._actions:
                action.default = argparse.SUPPRESS
            sub._defaults.clear()
    return set(vars(parser.parse_args(argv))) - {"command"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    try:
        world = distributed.world(getattr(args, "parallel", None))
    except (ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stderr = sys.stderr
    if world.rank:  # under mpiexec, rank 0 speaks for every rank
        sys.stderr = sys.stdout = open(os.devnull, "w")
    try:
        result = args.func(args, given)
    except Interrupted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; every file on disk is a complete one
        print("\nstopped at once (second Ctrl-C); the run's last checkpoint is intact", file=sys.stderr)
        return 130
    except (ValueError, RunError, data.DataError, backend.DeviceUnavailable, distributed.TransportUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        print(f"error: cannot write{where}: {error.strerror or error}; choose a writable --out with free space",
              file=sys.stderr)
        return 1
    except Exception as error:  # a bug on one rank: the others would wait for it in their next collective
        if world.size == 1:
            raise
        traceback.print_exc(file=stderr)
        print(f"error: rank {world.rank}: {type(error).__name__}: {error}; every rank stopped", file=stderr,
              flush=True)
        world.abort(1)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2))
    return 0
