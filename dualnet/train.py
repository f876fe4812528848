"""The experiment runner: one run = one directory that never loses work.

``train(config)`` writes ``config.json``, ``metrics.jsonl`` (one line per epoch), atomic
checkpoints (``checkpoint.npz``: parameters, running statistics, optimiser and rule state,
position in the epoch) and ``summary.json``.  ``train(config, resume=True)`` continues from the
checkpoint and ends bit-identical to an uninterrupted run: the batch order depends only on
(seed, epoch) and each step's random draws only on (seed, epoch, step).  Ctrl-C writes a
checkpoint at the last finished step; a NaN/inf loss stops the run (``TrainingDiverged``,
naming the step) and leaves the last good checkpoint untouched.
"""
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy

from . import backend, data, models, optim, rules
from .nn.layers import value_of
from .nn.plan import Plan

LOCAL_RULES = {"l-bp", "lg-bp", "l-fa", "lg-fa", "lg-fg-w", "lg-fg-a", "guess"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is intact."""


@dataclass
class Config:
    """Everything that defines a run (saved as ``config.json``)."""
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)
    rule: str = "bp"
    rule_options: dict = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str = None
    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    optimizer_options: dict = field(default_factory=dict)
    schedule: str = "constant"
    seed: int = 0
    normalize: str = "standardize"
    train_limit: int = 0      # use only the first N training examples (0: all)
    eval_limit: int = 10000   # training error measured on at most this many examples
    diagnostics: bool = False
    device: str = None        # 'cpu' or 'cuda'; None: the active backend's (DUALNET_BACKEND, backend.use)
    out: str = "runs/run"

    @classmethod
    def from_dict(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"Config: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------
# building blocks of a run
# ---------------------------------------------------------------------------------------
def prepare_data(config):
    """Load and normalise the dataset; returns (Dataset, train_x, train_y, test_x, test_y)."""
    dataset = data.load(config.dataset, data_dir=config.data_dir)
    stats = data.channel_stats(dataset.train_x) if config.normalize == "standardize" else None
    train_x = data.normalize(dataset.train_x, config.normalize, stats)
    test_x = data.normalize(dataset.test_x, config.normalize, stats)
    train_y = dataset.train_y
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    to = backend.to_device
    return dataset, to(train_x), to(train_y), to(test_x), to(dataset.test_y)


def build_model(config, dataset):
    """The model of ``config`` for ``dataset``'s input shape and classes; local rules get local
    heads on models where they are optional (mlp, cnn-fdfa, cnn-baydin)."""
    options = dict(config.model_options)
    options.setdefault("input_shape", dataset.input_shape)
    options.setdefault("num_classes", dataset.num_classes)
    model_class = models.MODELS.get(config.model)
    if config.rule in LOCAL_RULES and model_class and "local_heads" in inspect.signature(model_class).parameters:
        options.setdefault("local_heads", True)
    return models.create(config.model, **options)


def evaluate(model, params, state, x, y, batch_size=1000):
    """(mean loss, error rate) in evaluation mode (running statistics, no tangents)."""
    total_loss, wrong = 0.0, 0
    plan = Plan(train=False)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        trace = model.forward(params, xb, yb, plan, state)
        total_loss += float(value_of(trace.loss).sum())
        wrong += int((value_of(trace.logits).argmax(axis=1) != yb).sum())
    return total_loss / len(y), wrong / len(y)


def _schedule(name, steps_per_epoch, epochs):
    """The papers' schedules, sized to the run: linear decay to 0 (Ren), ×0.95 per epoch
    (FDFA's code), ×0.2 every 30 epochs (Fournier), warm-up + cosine, or constant."""
    total = steps_per_epoch * epochs
    if name == "linear":
        return optim.make_schedule("linear", total_steps=total)
    if name == "warmup_cosine":
        return optim.make_schedule("warmup_cosine", total_steps=total, warmup_steps=min(steps_per_epoch, total // 10))
    if name == "epoch_decay":
        return optim.make_schedule("step", gamma=0.95, every=steps_per_epoch)
    if name == "step":
        return optim.make_schedule("step", gamma=0.2, every=30 * steps_per_epoch)
    return optim.make_schedule(name)


def _step_rng(seed, epoch, step):
    """The step's Generator on the active backend (noise is drawn on the device)."""
    return backend.rng([seed, epoch, step])


# ---------------------------------------------------------------------------------------
# checkpoints: flat npz, written atomically
# ---------------------------------------------------------------------------------------
def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}{i}#/"))
        return out
    return {prefix[:-1]: backend.to_numpy(tree) if backend.is_array(tree) else numpy.asarray(tree)}


def _unflatten(flat, prefix):
    tree = {}
    for path, value in flat.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value.item() if value.ndim == 0 and value.dtype.kind in "biuf" else value
    return _lists(tree)


def _lists(tree):
    if isinstance(tree, dict):
        if tree and all(k.endswith("#") for k in tree):
            return [_lists(tree[f"{i}#"]) for i in range(len(tree))]
        return {k: _lists(v) for k, v in tree.items()}
    return tree


def save_checkpoint(path, params, state, optimizer, rule, position, history):
    flat = {}
    for name, tree in (("params", params), ("state", state), ("optimizer", optimizer.state_dict()),
                       ("rule", rule.state_dict())):
        flat.update(_flatten(tree, f"{name}/"))
    flat["meta"] = numpy.asarray(json.dumps({"position": position, "history": history}))
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp.npz")
    os.close(handle)
    try:
        numpy.savez(tmp, **flat)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    with numpy.load(path, allow_pickle=False) as archive:
        flat = {k: archive[k] for k in archive.files}
    meta = json.loads(str(flat.pop("meta")))
    parts = {name: _unflatten(flat, f"{name}/") for name in ("params", "state", "optimizer", "rule")}
    return parts, meta["position"], meta["history"]


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
def train(config, resume=False, progress=None, on_epoch=None):
    """Run (or resume) the experiment described by ``config``; returns the summary dict.

    The run uses the backend of ``config.device`` ('cpu': NumPy, 'cuda': CuPy; None: the active
    one) and restores the previous backend afterwards; ``config.json`` records the device used.
    'cuda' without a usable GPU raises ``backend.DeviceUnavailable`` before anything is written.
    ``on_epoch(metrics)`` is called after every epoch with that epoch's metrics line.
    """
    device = config.device or backend.device()
    if device not in backend.DEVICES:
        raise ValueError(f"Config.device={device!r}; choose one of {sorted(backend.DEVICES)}")
    with backend.using(backend.DEVICES[device]):
        return _run(dataclasses.replace(config, device=device), resume, progress, on_epoch)


def _run(config, resume, progress, on_epoch):
    os.makedirs(config.out, exist_ok=True)
    checkpoint = os.path.join(config.out, "checkpoint.npz")
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    dataset, train_x, train_y, test_x, test_y = prepare_data(config)
    model = build_model(config, dataset)
    rule = rules.create(config.rule, diagnostics=config.diagnostics, **config.rule_options)
    params, state = model.init(config.seed), model.init_state()
    rule.setup(model, params, config.seed)
    steps_per_epoch = data.num_batches(len(train_y), config.batch_size)
    optimizer = optim.create(config.optimizer, lr=config.lr,
                             schedule=_schedule(config.schedule, steps_per_epoch, config.epochs),
                             **config.optimizer_options)
    position, history = {"epoch": 0, "step": 0, "wall_s": 0.0}, []
    if resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"train --resume: no checkpoint at {checkpoint}")
        parts, position, history = load_checkpoint(checkpoint)
        to = backend.to_device
        params = {k: to(v) for k, v in parts["params"].items()}
        state = {k: tuple(to(a) for a in v) for k, v in parts["state"].items()}
        optimizer.load_state_dict(parts["optimizer"])
        rule.load_state_dict(parts["rule"])
    _write_metrics(config.out, history)
    started = time.perf_counter() - position["wall_s"]
    epoch, step = position["epoch"], position["step"]
    try:
        while epoch < config.epochs:
            losses = []
            bar = _progress(progress, steps_per_epoch, step, f"epoch {epoch + 1}/{config.epochs}")
            for xb, yb in data.batches(train_x, train_y, config.batch_size, config.seed, epoch=epoch, start=step):
                if rule.contrastive:  # two augmented views, stacked: [view 1; view 2]
                    xb = backend.namespace(xb).concatenate(
                        data.two_views(xb, (config.seed, epoch, step, 1)), axis=0)
                estimate = rule(model, params, xb, yb, _step_rng(config.seed, epoch, step), state)
                if not numpy.isfinite(estimate.loss):
                    raise TrainingDiverged(
                        f"loss became {estimate.loss} at epoch {epoch + 1}, step {step + 1}; stopped. "
                        f"The last good checkpoint is {checkpoint}")
                params = optimizer.step(params, estimate.grads)
                state = estimate.state or state
                losses.append(estimate.loss)
                step += 1
                bar.update(1)
            bar.close()
            epoch, step = epoch + 1, 0
            history.append(_epoch_metrics(model, params, state, config, epoch, losses, optimizer,
                                          train_x, train_y, test_x, test_y, time.perf_counter() - started))
            _append_metrics(config.out, history[-1])
            if on_epoch is not None:
                on_epoch(history[-1])
            save_checkpoint(checkpoint, params, state, optimizer, rule,
                            {"epoch": epoch, "step": 0, "wall_s": time.perf_counter() - started}, history)
    except KeyboardInterrupt:
        save_checkpoint(checkpoint, params, state, optimizer, rule,
                        {"epoch": epoch, "step": step, "wall_s": time.perf_counter() - started}, history)
        print(f"\ninterrupted: checkpoint written to {checkpoint}; continue with "
              f"`python -m dualnet train --resume {config.out}`", file=sys.stderr)
        raise
    summary = _summary(history, config)
    with open(os.path.join(config.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _epoch_metrics(model, params, state, config, epoch, losses, optimizer, train_x, train_y, test_x, test_y, wall):
    limit = config.eval_limit or len(train_y)
    _, train_error = evaluate(model, params, state, train_x[:limit], train_y[:limit])
    test_loss, test_error = evaluate(model, params, state, test_x, test_y)
    return {"epoch": epoch, "loss": float(numpy.mean(losses)) if losses else float("nan"),
            "train_error": train_error, "test_error": test_error, "test_acc": 1 - test_error,
            "test_loss": test_loss, "lr": float(optimizer.learning_rate()), "wall_s": wall}


def _summary(history, config):
    last = history[-1] if history else {}
    return {"test_acc": last.get("test_acc"), "test_error": last.get("test_error"),
            "train_error": last.get("train_error"), "epochs": len(history), "wall_s": last.get("wall_s"),
            "rule": config.rule, "model": config.model, "dataset": config.dataset}


def _write_metrics(out, history):
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for line in history:
            f.write(json.dumps(line) + "\n")


def _append_metrics(out, line):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


class _Silent:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled, total, initial, description):
    """A tqdm bar on stderr when stderr is a terminal (or when asked), else nothing."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return _Silent()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=description, file=sys.stderr, leave=False)
