"""One run of the experiment runner: its config, its directory and files, and its loop (``Run``).

One run = one directory that is never overwritten, mixed up or lost.  ``dualnet.train.train`` starts
or resumes a run (choosing ``Run`` or the block pipeline's ``PipelineRun``, which extends it).

``train(config)`` starts a run in ``config.out`` and writes ``config.json``, ``checkpoint.npz``
(parameters, running statistics, optimiser and rule state, the position in the epoch, the epoch
metrics so far, the learning-rate schedule), ``metrics.jsonl`` (one line per finished epoch,
always the checkpoint's own history) and ``summary.json``.  A directory that already holds a run
is refused unless ``overwrite=True``.

``train(config, resume=True)`` continues the run stored in ``config.out`` (that directory itself,
wherever it was moved or copied) and ends bit-identical to an uninterrupted run: the batch order
depends only on (seed, epoch) and each step's random draws only on (seed, epoch, step).  On
resume only the ``RESUMABLE_FIELDS`` (``epochs``, the new total; ``lr``; ``device``; ``parallel``,
``stages`` and ``blas_threads``) may differ from the stored run; the changes are recorded in
``config.json`` under ``changes``.  Any other difference is an error.  (A GEMM's rounding can
depend on its thread count, so a run resumed with another ``blas_threads`` is equal to float
rounding, not bit for bit; the stored count is kept unless a new one is given.)

Learning-rate schedules are piecewise: the run starts with one segment spanning all its steps.
Extending a run (more ``epochs``) with a schedule sized to the run's length (``linear``,
``warmup_cosine``) adds a segment that starts from the learning rate the run has reached and
decays over the new remaining steps, so the rate never jumps back up; a new ``lr`` on resume
starts a segment at that rate.

Ctrl-C (SIGINT) is deferred to the end of the current step (or of the epoch's evaluation): a
checkpoint is written there and ``Interrupted`` is raised.  A NaN or infinite loss or gradient
stops the run (``TrainingDiverged``) and leaves the last good checkpoint untouched.  A gradient
the optimiser added into its weight as factors, never formed (``dualnet.gradients``), is checked
through that weight after the update: a NaN or inf in xᵀδ is one in the updated weight.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field

import numpy

from . import backend, data, distributed, models, optim, rules
from .dual import value_of
from .gradients import Gradients
from .nn.plan import Plan

SCHEDULES = ("constant", "linear", "warmup_cosine", "epoch_decay", "step", "exponential")
HORIZON_SCHEDULES = ("linear", "warmup_cosine")
"""Schedules sized to the run's total number of steps (extending a run adds a segment)."""
RESUMABLE_FIELDS = ("epochs", "lr", "device", "parallel", "stages", "blas_threads")
"""The only ``Config`` fields a resumed run may change (recorded under ``changes``)."""


class RunError(Exception):
    """A run cannot start or continue; the message says why and what to do."""


class RunExists(RunError):
    """The output directory already holds a run."""


class TrainingDiverged(RunError):
    """The loss or a gradient became NaN or infinite; the last good checkpoint is intact."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was written; ``str()`` says where and how to resume."""


AUGMENTATIONS = (None, "crop-flip")
WEIGHT_DECAY_ON = ("all", "weights")


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
    lr_decay_rate: float = None  # the per-step rate k of schedule 'exponential' (lr_t = lr e^{-k t})
    seed: int = 0
    normalize: str = "standardize"
    augment: str = None       # 'crop-flip': pad 4, random crop and horizontal flip of every training batch
    readout_lr: float = 1.0   # the read-out's learning-rate multiplier (Ren et al.'s last_layer_lr, 0.1)
    weight_decay_on: str = "all"  # 'weights': the optimiser's weight decay on linear maps' weights only
    train_limit: int = 0      # use only the first N training examples (0: all)
    eval_limit: int = 10000   # training error measured on at most this many examples
    diagnostics: bool = False
    device: str = None        # 'cpu' or 'cuda'; None: the active backend's (DUALNET_BACKEND, backend.use)
    parallel: str = None      # 'data': the ranks of mpiexec split every batch (dualnet.distributed); None: one process
    # parallel 'pipeline': rank s trains stage s of the blocks (distributed/pipeline.py)
    stages: list = None       # with 'pipeline': blocks per stage, e.g. [2, 1]; None: balanced by estimated cost
    blas_threads: int = None  # BLAS threads of this process (threadpoolctl); None: the BLAS library's own default
    out: str = "runs/run"     # where the run lives; never read back from config.json (a run resumes in place)
    changes: list = field(default_factory=list)  # what each resume changed (RESUMABLE_FIELDS), in order

    @classmethod
    def from_dict(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"Config: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**values)

    def check(self):
        """Raise ``ValueError`` naming the first field whose value cannot make a run."""
        positive = (("epochs", self.epochs), ("batch_size", self.batch_size))
        for name, value in positive:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a whole number >= 1")
        for name, value in (("train_limit", self.train_limit), ("eval_limit", self.eval_limit)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r}: must be a whole number >= 0 (0: no limit)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr={self.lr!r}: the learning rate must be a finite number >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule == "exponential" and self.lr_decay_rate is None:
            raise ValueError("schedule 'exponential' needs its per-step rate: give --lr-decay-rate K "
                             "(lr_t = lr * exp(-K t))")
        if self.schedule != "exponential" and self.lr_decay_rate is not None:
            raise ValueError(f"--lr-decay-rate applies to --schedule exponential only, not {self.schedule!r}")
        if self.blas_threads is not None and (not isinstance(self.blas_threads, int) or self.blas_threads < 1):
            raise ValueError(f"blas_threads={self.blas_threads!r}: must be a whole number >= 1 (None: BLAS's default)")
        if self.stages is not None and self.parallel != "pipeline":
            raise ValueError("--stages splits the blocks of --parallel pipeline; give both, or neither")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment={self.augment!r}; choose one of {', '.join(map(str, AUGMENTATIONS))}")
        if not (isinstance(self.readout_lr, (int, float)) and math.isfinite(self.readout_lr) and self.readout_lr >= 0):
            raise ValueError(f"readout_lr={self.readout_lr!r}: the read-out's learning-rate multiplier must be >= 0")
        if self.weight_decay_on not in WEIGHT_DECAY_ON:
            raise ValueError(f"weight_decay_on={self.weight_decay_on!r}; choose one of {', '.join(WEIGHT_DECAY_ON)}")
        if self.normalize not in data.NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r}; choose one of {', '.join(data.NORMALIZATIONS)}")


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
    """The model of ``config`` for ``dataset``'s input shape and classes; a rule that needs local
    heads (``Rule.needs_local_heads``) gets them on models where they are optional (mlp, cnn-fdfa,
    cnn-baydin)."""
    options = dict(config.model_options)
    options.setdefault("input_shape", dataset.input_shape)
    options.setdefault("num_classes", dataset.num_classes)
    needs_local_heads = rules.create(config.rule, **config.rule_options).needs_local_heads
    if needs_local_heads and "local_heads" in models.options(config.model):
        options.setdefault("local_heads", True)
    return models.create(config.model, **options)


def parameter_groups(config, model):
    """The optimiser groups ``config`` asks of ``model``'s parameters, from their specs: the read-out's
    learning-rate multiplier ``readout_lr``, and no weight decay on biases and norms with
    ``weight_decay_on='weights'``.  Each group names one parameter exactly."""
    groups = {}
    for name, spec in model.specs.items():
        options = {}
        if spec.readout and config.readout_lr != 1.0:
            options["lr"] = float(config.readout_lr)
        if config.weight_decay_on == "weights" and spec.role != "weight":
            options["weight_decay"] = 0.0
        if options:
            groups[name] = options
    return groups


def build_optimizer(config, segments, model=None):
    """The optimiser of ``config`` with the piecewise schedule ``segments``, and the groups of
    ``parameter_groups`` when ``model`` is given; its options are checked (an option the optimiser
    does not take is one clear error)."""
    options = dict(config.optimizer_options)
    groups = parameter_groups(config, model) if model is not None else {}
    if groups:
        options["groups"] = {**groups, **options.get("groups", {})}
    try:
        return optim.create(config.optimizer, lr=config.lr, schedule=Segments(segments, config.schedule,
                                                                              config.lr_decay_rate),
                            **options)
    except TypeError as error:
        raise ValueError(str(error)) from None


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


def _warm_up_kernels(announce=True):
    """Compile the Numba kernels before the first step, saying so on stderr when they are not in
    Numba's on-disk cache yet (the first run on a machine)."""
    from .kernels import cpu
    if backend.kernels_mode() != "auto" or backend.current() != "numpy" or not cpu.available():
        return
    if announce and not cpu.cached():
        print("dualnet: compiling the Numba kernels once (a minute or so); later runs load them from the cache",
              file=sys.stderr, flush=True)
    backend.warm_up_kernels(("float32",))


def step_rng(seed, epoch, step):
    """The step's Generator on the active backend (noise is drawn on the device)."""
    return backend.rng([seed, epoch, step])


# ---------------------------------------------------------------------------------------
# the learning-rate schedule: segments
# ---------------------------------------------------------------------------------------
class Segments(optim.Schedule):
    """A piecewise schedule: ``segments`` is a list of ``{"start", "steps", "scale"}`` (global step
    where a piece starts, its length in steps, its multiplier at its start).  At global step t in
    the piece starting at s, the multiplier is ``scale * shape(t - s)``, with ``shape`` the named
    schedule sized to the piece: linear and warm-up + cosine decay over the piece's ``steps``
    (warm-up only in the first piece), ×0.95 per epoch ('epoch_decay', FDFA's code), ×0.2 every
    30 epochs ('step', Fournier), exp(−k t) ('exponential', Baydin), or 1 ('constant').
    """

    def __init__(self, segments, name, rate=None):
        self.segments, self.name, self.rate = [dict(s) for s in segments], name, rate
        self._shapes = [self._shape(i, piece) for i, piece in enumerate(self.segments)]

    def _shape(self, index, piece):
        steps, per_epoch = max(int(piece["steps"]), 1), int(piece["steps_per_epoch"])
        if self.name == "linear":
            return optim.make_schedule("linear", total_steps=steps)
        if self.name == "warmup_cosine":
            warmup = min(per_epoch, steps // 10) if index == 0 else 0
            return optim.make_schedule("warmup_cosine", total_steps=steps, warmup_steps=warmup)
        if self.name == "epoch_decay":
            return optim.make_schedule("step", gamma=0.95, every=per_epoch)
        if self.name == "step":
            return optim.make_schedule("step", gamma=0.2, every=30 * per_epoch)
        if self.name == "exponential":
            return optim.make_schedule("exponential", rate=self.rate)
        return optim.make_schedule("constant")

    def __call__(self, step):
        index = max(i for i, piece in enumerate(self.segments) if piece["start"] <= step or i == 0)
        piece = self.segments[index]
        return piece["scale"] * self._shapes[index](step - piece["start"])

    def __repr__(self):
        return f"Segments({self.name!r}, {self.segments})"


def first_segments(config, steps_per_epoch):
    """The schedule of a new run: one piece over all its steps."""
    return [{"start": 0, "steps": steps_per_epoch * config.epochs, "scale": 1.0, "steps_per_epoch": steps_per_epoch}]


def resumed_segments(segments, config, steps_per_epoch, done_steps, extended, new_lr):
    """The schedule after a resume at global step ``done_steps``: a new piece starts there when the
    run is extended under a schedule sized to its length (from the multiplier reached) or when
    the learning rate changes (from the new rate); otherwise the schedule is unchanged."""
    if not (new_lr is not None or (extended and config.schedule in HORIZON_SCHEDULES)):
        return segments
    total = steps_per_epoch * config.epochs
    if new_lr is not None:
        if config.lr == 0:
            raise RunError("the run was started with lr 0, so a new --lr cannot scale its schedule; start a new run")
        scale = new_lr / config.lr
    else:
        scale = Segments(segments, config.schedule, config.lr_decay_rate)(done_steps)
        if scale == 0.0:
            raise RunError(f"the {config.schedule} schedule of this run has decayed the learning rate to 0; "
                           f"extending it would train at 0. Give --lr for the added epochs")
    kept = [piece for piece in segments if piece["start"] < done_steps]
    return kept + [{"start": done_steps, "steps": max(total - done_steps, 1), "scale": scale,
                    "steps_per_epoch": steps_per_epoch}]


# ---------------------------------------------------------------------------------------
# the run directory: atomic files, checkpoints as flat npz
# ---------------------------------------------------------------------------------------
RUN_FILES = ("config.json", "checkpoint.npz", "metrics.jsonl", "summary.json")


def holds_run(out):
    """True when ``out`` already holds a run (a config.json or checkpoint.npz)."""
    return any(os.path.exists(os.path.join(out, name)) for name in ("config.json", "checkpoint.npz"))


def default_out(model, rule, root="runs"):
    """A fresh run directory ``runs/<model>-<rule>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken)."""
    stem = os.path.join(root, f"{model}-{rule}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = stem, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}"
    return path


def _write_atomic(path, write):
    """Write ``path`` through a temporary file in the same directory, then rename: a reader (or a
    crash, a full disk) never sees a half-written file, and the old one survives any failure."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, value):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2)
    _write_atomic(path, write)


def _write_metrics(out, history):
    def write(tmp):
        with open(tmp, "w") as f:
            for line in history:
                f.write(json.dumps(line) + "\n")
    _write_atomic(os.path.join(out, "metrics.jsonl"), write)


def read_config(out):
    """The ``Config`` stored in ``out/config.json``, with ``out`` set to that directory."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{path}: not found; --resume needs the directory of an existing run")
    try:
        with open(path) as f:
            values = json.load(f)
        values.pop("out", None)
        return dataclasses.replace(Config.from_dict(values), out=out)
    except (ValueError, TypeError, OSError) as error:
        raise RunError(f"{path} is damaged ({error}); the run cannot be resumed from it") from None


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


def save_checkpoint(path, params, state, optimizer, rule, position, history, segments=None):
    """Write the checkpoint atomically: parameters, running statistics, optimiser and rule state, and
    a JSON ``meta`` entry with the position, the epoch history and the schedule segments."""
    flat = {}
    for name, tree in (("params", params), ("state", state), ("optimizer", optimizer.state_dict()),
                       ("rule", rule.state_dict())):
        flat.update(_flatten(tree, f"{name}/"))
    flat["meta"] = numpy.asarray(json.dumps({"position": position, "history": history, "segments": segments}))
    _write_atomic(path, lambda tmp: numpy.savez(tmp, **flat))


def load_checkpoint(path):
    """``(parts, position, history)``; a missing, truncated or damaged file is a ``RunError`` naming it."""
    parts, meta = _read_checkpoint(path)
    return parts, meta["position"], meta["history"]


def _read_checkpoint(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RunError(f"{path}: not found; the run stopped before its first checkpoint (start it again "
                       f"with --overwrite)")
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            flat = {k: archive[k] for k in archive.files}
        meta = json.loads(str(flat.pop("meta")))
        parts = {name: _unflatten(flat, f"{name}/") for name in ("params", "state", "optimizer", "rule")}
        meta["position"], meta["history"]  # noqa: B018 (both must be present)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise RunError(f"{path} is damaged or truncated ({type(error).__name__}: {error}); "
                       f"the run cannot be resumed from it") from None
    return parts, meta


def _check_checkpoint_fits(path, saved, params):
    """The saved parameters must be exactly the model's (names and shapes)."""
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    shapes = sorted(name for name in set(params) & set(saved)
                    if tuple(numpy.shape(saved[name])) != tuple(params[name].shape))
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                           for label, names in (("missing", missing), ("unexpected", unexpected),
                                                ("other shape", shapes)) if names)
        raise RunError(f"{path} belongs to another model than config.json's ({detail})")


# ---------------------------------------------------------------------------------------
# Ctrl-C at safe points
# ---------------------------------------------------------------------------------------
class _InterruptRequest:
    """Set by SIGINT; the loop stops at the next safe point.  A second Ctrl-C stops at once (the
    last checkpoint on disk stays consistent: every file is written atomically)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def _deferred_interrupts():
    request = _InterruptRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals reach the main thread only: a plain KeyboardInterrupt still works
        return
    previous = signal.signal(signal.SIGINT, request)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
def _resumed_config(config):
    """The stored run's config with the allowed changes of ``config`` applied and recorded."""
    stored = read_config(config.out)
    differing = [f.name for f in dataclasses.fields(Config)
                 if f.name not in RESUMABLE_FIELDS + ("out", "changes", "data_dir")
                 and getattr(config, f.name) != getattr(stored, f.name)]
    if differing:
        name = differing[0]
        raise RunError(f"resume: {name} cannot change ({getattr(stored, name)!r} in {config.out}/config.json, "
                       f"{getattr(config, name)!r} given); start a new run with --out")
    changes = [{"field": name, "from": getattr(stored, name), "to": getattr(config, name)}
               for name in RESUMABLE_FIELDS if getattr(config, name) != getattr(stored, name)]
    # the optimiser keeps the run's first lr: a new lr starts a schedule piece scaled to it
    return dataclasses.replace(stored, epochs=config.epochs, device=config.device, parallel=config.parallel,
                               stages=config.stages, blas_threads=config.blas_threads,
                               data_dir=config.data_dir or stored.data_dir), changes


class Run:
    """One run's objects; ``loop`` trains.  Everything written goes through atomic replaces."""

    def __init__(self, config, resume, overwrite, world):
        self.out, self.world, self.writes = config.out, world, world.rank == 0
        self.checkpoint = os.path.join(self.out, "checkpoint.npz")
        changes = []
        if resume:
            config, changes = _resumed_config(config)
            parts, meta = _read_checkpoint(self.checkpoint)
        self.config = config
        self.dataset, self.train_x, self.train_y, self.test_x, self.test_y = prepare_data(config)
        self.model = build_model(config, self.dataset)
        self.rule = rules.create(config.rule, diagnostics=config.diagnostics, **config.rule_options)
        self.params, self.state = self.model.init(config.seed), self.model.init_state()
        self.rule.setup(self.model, self.params, config.seed)
        self.steps_per_epoch = data.num_batches(len(self.train_y), config.batch_size)
        self.position = {"epoch": 0, "step": 0, "wall_s": 0.0, "loss_sum": 0.0, "diagnostics": {}}
        self.history, segments = [], first_segments(config, self.steps_per_epoch)
        self.has_checkpoint = False
        if resume:
            self._restore(parts, meta)
            segments = self._resumed_schedule(meta.get("segments") or segments, changes)
        self.segments = segments
        self.optimizer = build_optimizer(self.config, segments, self.model)
        if resume:
            self.optimizer.load_state_dict(parts["optimizer"])
            self.rule.load_state_dict(parts["rule"])
        if config.parallel == "data" and world.size > 1 and config.batch_size < world.size:
            raise RunError(f"--batch-size {config.batch_size} is smaller than the {world.size} ranks; each rank "
                           f"needs at least one example of every batch")
        if self.writes:
            self._prepare_directory(overwrite and not resume)
        _warm_up_kernels(announce=self.writes)

    def _resumed_schedule(self, segments, changes):
        """Check the new total of epochs, extend the schedule, and record the changes in the config."""
        config, position = self.config, self.position
        if config.epochs < position["epoch"]:
            raise RunError(f"resume: the run has already trained {position['epoch']} epochs; --epochs is the "
                           f"new total and must be >= {position['epoch']}")
        done = position["epoch"] * self.steps_per_epoch + position["step"]
        extended = any(c["field"] == "epochs" and c["to"] > c["from"] for c in changes)
        new_lr = next((c["to"] for c in changes if c["field"] == "lr"), None)
        segments = resumed_segments(segments, config, self.steps_per_epoch, done, extended, new_lr)
        at = {"epoch": position["epoch"], "step": position["step"]}
        self.config = dataclasses.replace(config, changes=config.changes + [{**c, "at": at} for c in changes])
        return segments

    def _restore(self, parts, meta):
        _check_checkpoint_fits(self.checkpoint, parts["params"], self.params)
        to = backend.to_device
        self.params = {k: to(v) for k, v in parts["params"].items()}
        self.state = {k: tuple(to(a) for a in v) for k, v in parts["state"].items()}
        self.position = {"loss_sum": 0.0, "diagnostics": {}, **meta["position"]}
        self.history = meta["history"]
        self.has_checkpoint = True

    def _prepare_directory(self, replace):
        """Create the directory (or clear the replaced run's files) and write config.json."""
        os.makedirs(self.out, exist_ok=True)
        if replace:
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out, name))
        write_json(os.path.join(self.out, "config.json"), dataclasses.asdict(self.config))
        _write_metrics(self.out, self.history)

    def _save(self):
        self._check_ranks_agree()
        self._write_checkpoint(self.params, self.state, self.optimizer, self.rule, self.position)

    def _write_checkpoint(self, params, state, optimizer, rule, position):
        """Rank 0 writes the checkpoint and metrics.jsonl; a failed write stops every rank."""
        def write():
            if self.writes:
                save_checkpoint(self.checkpoint, params, state, optimizer, rule, position, self.history,
                                self.segments)
                _write_metrics(self.out, self.history)
        distributed.together(self.world, write)
        self.has_checkpoint = True

    def _check_ranks_agree(self):
        """Every rank applied the same updates: their parameter checksums are equal."""
        if self.world.size > 1:
            sums = self.world.allgather(distributed.data_parallel.checksum(self.params))
            if len(set(sums)) > 1:
                raise RunError(f"the ranks' parameters differ (checksums {sums}) at epoch "
                               f"{self.position['epoch']}, step {self.position['step']}; stopped")

    def _diverged(self, what, value):
        position = self.position
        where = f"epoch {position['epoch'] + 1}, step {position['step'] + 1}"
        if self.has_checkpoint:
            last = f"the last good checkpoint is {self.checkpoint} (epoch {position['epoch']} done)"
        else:
            last = "no checkpoint was written (the run diverged before its first)"
        return TrainingDiverged(f"{what} became {value} at {where}; stopped: {last}. Try a lower --lr")

    def _finite_gradients(self, grads):
        return _finite(grads.values())

    def loop(self, progress, on_epoch, max_steps):
        config, position = self.config, self.position
        started = time.perf_counter() - position["wall_s"]
        self._steps = 0  # training steps taken by this call (max_steps counts them)
        with _deferred_interrupts() as interrupt:
            try:
                while position["epoch"] < config.epochs:
                    epoch, stop = position["epoch"], False
                    bar = _progress(progress if self.writes else False, self.steps_per_epoch, position["step"],
                                    f"epoch {epoch + 1}/{config.epochs}")
                    for xb, yb in data.batches(self.train_x, self.train_y, config.batch_size, config.seed,
                                               epoch=epoch, start=position["step"]):
                        stop = self._train_step(xb, yb, epoch, position["step"], interrupt.requested)
                        stop = stop or (self.world.size == 1 and interrupt.requested)
                        self._steps += 1
                        position["wall_s"] = time.perf_counter() - started
                        bar.update(1)
                        if stop or self._steps == max_steps:
                            break
                    bar.close()
                    if position["step"] == self.steps_per_epoch:
                        self._finish_epoch(time.perf_counter() - started, on_epoch)
                        stop = self._agreed(interrupt.requested)  # Ctrl-C during the evaluation
                    if stop:
                        raise KeyboardInterrupt
                    if self._steps == max_steps and position["epoch"] < config.epochs:
                        if position["step"]:
                            self._save()
                        return self._write_summary(stopped=f"max_steps {max_steps}")
            except KeyboardInterrupt:
                position["wall_s"] = time.perf_counter() - started
                self._save()
                raise Interrupted(f"interrupted at epoch {position['epoch'] + 1}, step {position['step']}: "
                                  f"checkpoint written to {self.checkpoint}; continue with "
                                  f"`python -m dualnet train --resume {self.out}`") from None
        return self._write_summary()

    def _agreed(self, flag):
        """True on every rank when any rank's ``flag`` is set (the ranks stop at the same point)."""
        if self.world.size == 1:
            return bool(flag)
        return bool(self.world.allreduce(numpy.array([float(flag)]))[0] > 0)

    def _train_step(self, xb, yb, epoch, step, interrupted):
        """One update from the batch (xb, yb); returns whether any rank was interrupted."""
        config, position, world = self.config, self.position, self.world
        views = None
        if config.augment == "crop-flip" and not self.rule.contrastive:  # the whole batch, then this rank's rows
            xb = data.random_crop_flip(xb, (config.seed, epoch, step, 2))
        if self.rule.contrastive:  # two augmented views of the whole batch (the ranks take their rows of each)
            views = data.two_views(xb, (config.seed, epoch, step, 1))
        estimate, grads, loss, state, flag = distributed.estimate_on_shard(
            world, self.rule, self.model, self.params, xb, yb, step_rng(config.seed, epoch, step), self.state,
            views, float(interrupted))
        if not math.isfinite(loss):
            raise self._diverged("the loss", loss)
        held = [name for name in grads if grads.factors(name) is not None] if isinstance(grads, Gradients) else []
        if not _finite(grads[name] for name in grads if name not in held):
            raise self._diverged("a gradient", "non-finite")
        self.params = self.optimizer.step(self.params, grads)
        if not _finite(self.params[name] for name in held):  # gradients added into their weights unformed
            raise self._diverged("a gradient", "non-finite")
        self.state = state or self.state
        position["loss_sum"] += float(loss)
        for name, report in estimate.diagnostics.items():  # this rank's shard
            position["diagnostics"][name] = position["diagnostics"].get(name, 0.0) + report["cosine"]
        position["step"] = step + 1
        return flag > 0

    def _finish_epoch(self, wall, on_epoch):
        position = self.position
        self.history.append(self._epoch_metrics(wall))
        position.update(epoch=position["epoch"] + 1, step=0, loss_sum=0.0, diagnostics={}, wall_s=wall)
        self._save()
        if on_epoch is not None and self.writes:
            on_epoch(self.history[-1])

    def _epoch_metrics(self, wall):
        config, position, steps = self.config, self.position, self.steps_per_epoch
        limit = config.eval_limit or len(self.train_y)
        _, train_error = evaluate(self.model, self.params, self.state, self.train_x[:limit], self.train_y[:limit])
        test_loss, test_error = evaluate(self.model, self.params, self.state, self.test_x, self.test_y)
        line = {"epoch": position["epoch"] + 1, "loss": position["loss_sum"] / steps,
                "train_error": train_error, "test_error": test_error, "test_acc": 1 - test_error,
                "test_loss": test_loss, "lr": float(self.optimizer.learning_rate()), "wall_s": wall}
        if config.diagnostics:
            line["cosine"] = {name: total / steps for name, total in sorted(position["diagnostics"].items())}
        return line

    def _write_summary(self, stopped=None):
        config, history = self.config, self.history
        last = history[-1] if history else {}
        summary = {"test_acc": last.get("test_acc"), "test_error": last.get("test_error"),
                   "train_error": last.get("train_error"), "epochs": len(history), "wall_s": last.get("wall_s"),
                   "rule": config.rule, "model": config.model, "dataset": config.dataset, "out": self.out}
        if self.world.size > 1:
            summary.update(ranks=self.world.size, bytes_sent_per_step=self.world.bytes_sent / max(self._steps, 1))
        if not self.writes:
            return summary
        if stopped:
            summary["stopped"] = (f"{stopped}: at epoch {self.position['epoch'] + 1}, step {self.position['step']} "
                                  f"of {self.steps_per_epoch}; continue with --resume {self.out}")
        write_json(os.path.join(self.out, "summary.json"), summary)
        return summary


def epoch_line(metrics, epochs):
    """One line per epoch for stderr: epoch, loss, train and test error, lr, seconds."""
    return (f"epoch {metrics['epoch']}/{epochs}  loss {metrics['loss']:.4f}  "
            f"train error {100 * metrics['train_error']:.2f}%  test error {100 * metrics['test_error']:.2f}%  "
            f"lr {metrics['lr']:.3g}  {metrics['wall_s']:.1f} s")


class _Silent:
    def update(self, n):
        pass

    def close(self):
        pass


def _finite(arrays):
    """Whether every array of ``arrays`` (None skipped) holds only finite numbers (one sum each)."""
    return bool(numpy.isfinite(sum(float(backend.namespace(a).sum(a, dtype=a.dtype)) for a in arrays
                                   if a is not None)))


def _progress(enabled, total, initial, description):
    """A tqdm bar on stderr when stderr is a terminal (or when asked), else nothing; it stays
    visible after its epoch."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return _Silent()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=description, file=sys.stderr, leave=True)
