"""Initialisers: ``fn(rng, shape, fan_in, dtype) -> array`` on the active backend.

* ``kaiming_uniform`` — PyTorch's default for Linear/Conv weights and biases: U(-1/√fan_in, 1/√fan_in).
* ``localmixer`` — Ren et al.'s code: N(0, σ²) with σ = min(2/√fan_in, 0.1).
* ``lecun`` — N(0, 1/fan_in).   ``zeros``, ``ones``, ``constant(c)``.
"""
import math

from .. import backend


def kaiming_uniform(rng, shape, fan_in, dtype=backend.DEFAULT_DTYPE):
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def localmixer(rng, shape, fan_in, dtype=backend.DEFAULT_DTYPE):
    return (rng.standard_normal(shape) * min(2.0 / math.sqrt(fan_in), 0.1)).astype(dtype)


def lecun(rng, shape, fan_in, dtype=backend.DEFAULT_DTYPE):
    return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(dtype)


def zeros(rng, shape, fan_in, dtype=backend.DEFAULT_DTYPE):
    return backend.xp.zeros(shape, dtype)


def constant(value):
    def init(rng, shape, fan_in, dtype=backend.DEFAULT_DTYPE):
        return backend.xp.full(shape, value, dtype)
    return init


def ones(rng, shape, fan_in, dtype=backend.DEFAULT_DTYPE):
    return backend.xp.ones(shape, dtype)


INITIALISERS = {"kaiming_uniform": kaiming_uniform, "localmixer": localmixer, "lecun": lecun, "zeros": zeros,
                "ones": ones}


def get(name):
    if callable(name):
        return name
    if name not in INITIALISERS:
        raise ValueError(f"init: unknown initialiser {name!r}; choose one of {sorted(INITIALISERS)}")
    return INITIALISERS[name]
