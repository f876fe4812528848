"""Optimisers and learning-rate schedules over parameter dicts ``{name: array}`` (NumPy or CuPy).

Usage::

    opt = optim.create("sgd", lr=0.01, momentum=0.9, schedule=optim.LinearDecay(total_steps),
                       groups={"head": 10.0})
    opt.step(params, grads)          # updates the arrays of ``params`` in place, returns ``params``

* ``grads`` has (a subset of) the keys of ``params``; a missing key (or ``None``) means no update
  and no state change for that tensor, as for a PyTorch parameter without ``.grad``.
* Schedules are callables ``step -> multiplier``; the learning rate of update t (t = 0, 1, ...) is
  ``lr * schedule(t) * group_multiplier(name)``.
* ``groups`` maps a name pattern to a learning-rate multiplier (``{"head": 10.0}``) or to a dict of
  options (``{"bias": {"weight_decay": 0.0}}``, keys ``lr`` and ``weight_decay``).  A pattern with
  glob characters (``* ? [``) is matched with ``fnmatch``; otherwise it is a name prefix.  When
  several patterns match, the longest wins.  A feedback-matrix optimiser (DKP, FDFA) is simply a
  second optimiser over a second dict.
* ``state_dict()`` returns plain NumPy arrays and Python numbers; ``load_state_dict`` on an
  optimiser built with the same options continues bit-identically.

Formulas follow PyTorch's (the papers' code is PyTorch), with g = grad (+ wd * param for L2 decay):

* SGD:  b <- mu b + g;  d = g + mu b (Nesterov) or b;  param <- param - lr d.
* Adam: m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
  param <- param - (lr / (1-b1^t)) m / (sqrt(v)/sqrt(1-b2^t) + eps),
  t the tensor's own update count; ``decoupled=True`` (AdamW) instead shrinks param <- param (1 - lr wd).
* LARS (You et al. 2017, SimCLR/BYOL variant): trust = eta |param| / |g| (1 if either norm is 0);
  b <- mu b + lr trust g;  param <- param - b.  Tensors with ndim <= 1 (biases, norms) are excluded from
  weight decay and trust scaling when ``exclude_1d``.
"""
import fnmatch
import inspect
import math

import numpy as np

from . import backend
from .gradients import Gradients, outer_update

# ---------------------------------------------------------------------------------------- schedules


class Schedule:
    """A learning-rate multiplier as a function of the update index ``step`` (0-based)."""

    def __call__(self, step):
        raise NotImplementedError

    def __repr__(self):
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


class Constant(Schedule):
    """Multiplier 1 at every step."""

    def __call__(self, step):
        return 1.0


class LinearDecay(Schedule):
    """``1 - (1 - final) * min(step, total_steps) / total_steps``: 1 at step 0, ``final`` (0) at the end."""

    def __init__(self, total_steps, final=0.0):
        if total_steps < 1:
            raise ValueError(f"LinearDecay: total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.final = int(total_steps), float(final)

    def __call__(self, step):
        return 1.0 - (1.0 - self.final) * min(step, self.total_steps) / self.total_steps


class StepDecay(Schedule):
    """``gamma ** (step // every)``: multiply by ``gamma`` every ``every`` steps.

    For epochs, pass ``every = epochs * steps_per_epoch`` (Fournier: gamma 0.2 every 30 epochs;
    FDFA's code: gamma 0.95 every epoch).
    """

    def __init__(self, gamma, every):
        if every < 1:
            raise ValueError(f"StepDecay: every must be >= 1, got {every}")
        self.gamma, self.every = float(gamma), int(every)

    def __call__(self, step):
        return self.gamma ** (step // self.every)


class ExponentialDecay(Schedule):
    """``exp(-rate * step)``: the per-step decay of Baydin et al. (lr_i = lr_0 e^{-i k}, k = rate)."""

    def __init__(self, rate):
        self.rate = float(rate)

    def __call__(self, step):
        return math.exp(-self.rate * step)


class WarmupCosine(Schedule):
    """Linear warm-up then cosine decay (Ren et al.: 10 warm-up epochs, as steps here).

    ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then with
    ``p = min(1, (step - warmup_steps) / (total_steps - warmup_steps))``:
    ``final + (1 - final) * (1 + cos(pi p)) / 2``.
    """

    def __init__(self, total_steps, warmup_steps=0, final=0.0):
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"WarmupCosine: need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
        self.total_steps, self.warmup_steps, self.final = int(total_steps), int(warmup_steps), float(final)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = {"constant": Constant, "linear": LinearDecay, "step": StepDecay, "exponential": ExponentialDecay,
             "warmup_cosine": WarmupCosine}


def make_schedule(spec, **options):
    """A schedule from a name (``make_schedule('linear', total_steps=1000)``), a dict with a ``'name'`` key,
    an existing callable (returned as is) or ``None`` (constant)."""
    if spec is None:
        return Constant()
    if callable(spec):
        return spec
    if isinstance(spec, dict):
        options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
        spec = spec.get("name")
    if spec not in SCHEDULES:
        raise ValueError(f"unknown schedule {spec!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[spec](**options)


# ---------------------------------------------------------------------------------------- optimisers

_GROUP_KEYS = ("lr", "weight_decay")


def _normalise_groups(groups):
    normalised = {}
    for pattern, value in (groups or {}).items():
        options = {"lr": float(value)} if isinstance(value, (int, float)) else dict(value)
        unknown = set(options) - set(_GROUP_KEYS)
        if unknown:
            raise ValueError(f"group {pattern!r}: unknown option(s) {sorted(unknown)}; valid: {_GROUP_KEYS}")
        normalised[pattern] = options
    return normalised


def _matches(pattern, name):
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name.startswith(pattern)


class Optimizer:
    """Common machinery: schedule, groups, key/shape checks, per-tensor state, serialisation.

    Subclasses implement ``_update(param, grad, state, lr, weight_decay)`` updating ``param`` in
    place and ``state`` (a dict of arrays / numbers for this tensor).
    """
    name = None
    _COUNTERS = ("step",)  # per-tensor state entries that are Python ints, not arrays

    def __init__(self, lr, *, weight_decay=0.0, schedule=None, groups=None):
        if lr < 0:
            raise ValueError(f"{self.name}: learning rate must be >= 0, got {lr}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.schedule = make_schedule(schedule)
        self.groups = _normalise_groups(groups)
        self.step_count = 0
        self.state = {}

    # -- options per tensor
    def _group(self, name):
        matching = [pattern for pattern in self.groups if _matches(pattern, name)]
        return self.groups[max(matching, key=len)] if matching else {}

    def learning_rate(self, name=None):
        """Learning rate of the next update (of tensor ``name``, with its group multiplier)."""
        multiplier = self._group(name).get("lr", 1.0) if name is not None else 1.0
        return self.lr * self.schedule(self.step_count) * multiplier

    # -- the update
    def step(self, params, grads):
        """Apply one update to every tensor of ``params`` that has a gradient in ``grads``; in place."""
        unknown = [name for name in grads if name not in params]
        if unknown:
            raise KeyError(f"{self.name}.step: gradients for unknown parameters {unknown}; "
                           f"parameters are {sorted(params)}")
        base = self.lr * self.schedule(self.step_count)
        for name in grads:
            factors = grads.factors(name) if isinstance(grads, Gradients) else None
            grad = grads[name] if factors is None else None
            if factors is None and grad is None:
                continue
            param = params[name]
            shape = tuple((grad if factors is None else factors).shape)
            if shape != tuple(param.shape):
                raise ValueError(f"{self.name}.step: gradient of {name!r} has shape {shape}, "
                                 f"parameter has {tuple(param.shape)}")
            group = self._group(name)
            xp = backend.namespace(param)
            state = self._device_state(name, xp)
            lr, weight_decay = base * group.get("lr", 1.0), group.get("weight_decay", self.weight_decay)
            if factors is not None and self._update_from_factors(param, factors, state, lr, weight_decay):
                continue
            grad = grads[name] if grad is None else grad
            self._update(param, xp.asarray(grad, dtype=param.dtype), state, lr, weight_decay)
        self.step_count += 1
        return params

    def _device_state(self, name, xp):
        """This tensor's state, with arrays moved to ``xp`` (after ``load_state_dict`` on a GPU run)."""
        state = self.state.setdefault(name, {})
        for key, value in state.items():
            if backend.is_array(value) and backend.namespace(value) is not xp:
                state[key] = xp.asarray(value)
        return state

    def _update(self, param, grad, state, lr, weight_decay):
        raise NotImplementedError

    def _update_from_factors(self, param, factors, state, lr, weight_decay):
        """Apply the gradient ``factors`` (a ``gradients.Outer``) without forming it, if this
        optimiser can with these options; returns whether it did (else ``_update`` gets it dense)."""
        return False

    # -- serialisation
    def hyperparameters(self):
        """The constructor options, as plain values (recorded in ``state_dict``)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "schedule": repr(self.schedule),
                "groups": self.groups}

    def state_dict(self):
        """``{'optimizer', 'step_count', 'hyperparameters', 'state'}``: NumPy copies and Python numbers."""
        state = {name: {key: backend.to_numpy(value).copy() if backend.is_array(value) else value
                        for key, value in tensor_state.items()} for name, tensor_state in self.state.items()}
        return {"optimizer": self.name, "step_count": self.step_count, "hyperparameters": self.hyperparameters(),
                "state": state}

    def load_state_dict(self, state_dict):
        """Restore ``state_dict()`` output (arrays are copied); the options of ``self`` are kept."""
        if state_dict.get("optimizer") != self.name:
            raise ValueError(f"{self.name}.load_state_dict: state was saved by optimiser "
                             f"{state_dict.get('optimizer')!r}")
        self.step_count = int(state_dict["step_count"])
        self.state = {name: {key: self._restore(key, value) for key, value in tensor_state.items()}
                      for name, tensor_state in state_dict.get("state", {}).items()}  # empty: absent in npz

    def _restore(self, key, value):
        """Counters back to ``int`` (a checkpoint format may hand them back as 0-d arrays); arrays copied."""
        if key in self._COUNTERS:
            return int(value)
        return np.array(value)

    def __repr__(self):
        options = ", ".join(f"{key}={value!r}" for key, value in self.hyperparameters().items())
        return f"{type(self).__name__}({options})"


def reference_sgd_update(param, grad, buffer, lr, momentum, weight_decay, nesterov):
    """One SGD step in place (PyTorch's formula, dampening 0); every operand of one shape and dtype.

        g ← grad + weight_decay·param                       (when weight_decay ≠ 0)
        buffer ← momentum·buffer + g                         (when ``buffer`` is given)
        d ← g + momentum·buffer if nesterov else buffer      (g without a buffer)
        param ← param − lr·d

    ``param`` and ``buffer`` are updated in place; ``grad`` is read only.  The scalars are rounded
    to the arrays' dtype, as NumPy does with Python numbers.  The Numba and CUDA kernels
    (``sgd_update``) do the same operations, element by element, in the same order.
    """
    if weight_decay:
        grad = grad + weight_decay * param
    if buffer is not None:
        buffer *= momentum
        buffer += grad
        grad = grad + momentum * buffer if nesterov else buffer
    param -= lr * grad


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and L2 weight decay (PyTorch's formula, dampening 0)."""
    name = "sgd"

    def __init__(self, lr, momentum=0.0, *, nesterov=False, weight_decay=0.0, schedule=None, groups=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule, groups=groups)
        if nesterov and momentum <= 0:
            raise ValueError("sgd: nesterov=True needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum, "nesterov": self.nesterov}

    def _momentum_buffer(self, param, state):
        if "momentum" not in state:
            state["momentum"] = backend.namespace(param).zeros_like(param)
        return state["momentum"]

    def _update(self, param, grad, state, lr, weight_decay):
        buffer = self._momentum_buffer(param, state) if self.momentum else None
        update = backend.kernel("sgd", "sgd_update", reference_sgd_update, param, grad,
                                *([] if buffer is None else [buffer]))
        update(param, grad, buffer, lr, self.momentum, weight_decay, self.nesterov)

    def _update_from_factors(self, param, factors, state, lr, weight_decay):
        """Without weight decay or Nesterov: param ← param − lr·xᵀδ as one GEMM into param; with
        momentum, buffer ← μ·buffer + xᵀδ as one GEMM into the buffer, then param ← param − lr·buffer."""
        if weight_decay or self.nesterov:
            return False
        if not self.momentum:
            outer_update(factors, param, -lr)
            return True
        buffer = self._momentum_buffer(param, state)
        outer_update(factors, buffer, 1.0, self.momentum)
        descend = backend.kernel("sgd", "sgd_update", reference_sgd_update, param, buffer)
        descend(param, buffer, None, lr, 0.0, 0.0, False)  # param ← param − lr·buffer
        return True


class Adam(Optimizer):
    """Adam with bias correction; L2 weight decay, or decoupled (AdamW) with ``decoupled=True``."""
    name = "adam"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay=0.0, decoupled=False, schedule=None,
                 groups=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule, groups=groups)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps, self.decoupled = float(eps), bool(decoupled)

    def hyperparameters(self):
        return {**super().hyperparameters(), "betas": (self.beta1, self.beta2), "eps": self.eps,
                "decoupled": self.decoupled}

    def _update(self, param, grad, state, lr, weight_decay):
        xp = backend.namespace(param)
        if "exp_avg" not in state:
            state.update(step=0, exp_avg=xp.zeros_like(param), exp_avg_sq=xp.zeros_like(param))
        state["step"] += 1
        if weight_decay and not self.decoupled:
            grad = grad + weight_decay * param
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= self.beta1
        exp_avg += (1 - self.beta1) * grad
        exp_avg_sq *= self.beta2
        exp_avg_sq += (1 - self.beta2) * grad * grad
        correction1 = 1 - self.beta1 ** state["step"]
        correction2 = 1 - self.beta2 ** state["step"]
        if weight_decay and self.decoupled:
            param *= 1 - lr * weight_decay
        denominator = xp.sqrt(exp_avg_sq) / math.sqrt(correction2) + self.eps
        param -= (lr / correction1) * (exp_avg / denominator)


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling with momentum (You et al. 2017), as in SimCLR/BYOL."""
    name = "lars"

    def __init__(self, lr, momentum=0.9, *, eta=0.001, nesterov=False, weight_decay=0.0, exclude_1d=True,
                 schedule=None, groups=None):
        super().__init__(lr, weight_decay=weight_decay, schedule=schedule, groups=groups)
        self.momentum, self.eta = float(momentum), float(eta)
        self.nesterov, self.exclude_1d = bool(nesterov), bool(exclude_1d)

    def hyperparameters(self):
        return {**super().hyperparameters(), "momentum": self.momentum, "eta": self.eta, "nesterov": self.nesterov,
                "exclude_1d": self.exclude_1d}

    def trust_ratio(self, param, grad):
        """``eta * |param| / |grad|``, or 1 when either norm is zero."""
        xp = backend.namespace(param)
        param_norm, grad_norm = float(xp.linalg.norm(param)), float(xp.linalg.norm(grad))
        return self.eta * param_norm / grad_norm if param_norm > 0 and grad_norm > 0 else 1.0

    def _update(self, param, grad, state, lr, weight_decay):
        adapt = not (self.exclude_1d and param.ndim <= 1)
        if adapt and weight_decay:
            grad = grad + weight_decay * param
        scaled = lr * (self.trust_ratio(param, grad) if adapt else 1.0)
        if "momentum" not in state:
            state["momentum"] = backend.namespace(param).zeros_like(param)
        buffer = state["momentum"]
        buffer *= self.momentum
        buffer += scaled * grad
        param -= (self.momentum * buffer + scaled * grad) if self.nesterov else buffer


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "lars": LARS}


def create(name, **options):
    """An optimiser by name: ``create('adam', lr=1e-4, schedule=..., groups=...)``.

    ``schedule`` is anything ``make_schedule`` accepts (a callable, a name, a dict with ``'name'``).
    Unknown names and options raise an error listing the valid ones.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; valid: {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"optimiser {key!r}: unknown option(s) {unknown}; accepted: {', '.join(accepted)}")
    return cls(**options)
