"""Every rule's estimate on a fixed seed, for an MLP, a LocalMixer and a ResNet-18, is pinned
bit for bit under each BLAS kernel set that pinned it (``pin.py`` says how the cases are built
and how to re-pin them).  A refactoring that claims not to change behaviour must leave every case
identical; under a kernel set without pins, every tensor's norm must hold."""
import json

import numpy as np
import pytest

from . import pin

with open(pin.PINS) as f:
    PINNED = json.load(f)


@pytest.fixture(autouse=True)
def reference_paths(monkeypatch):
    """The pins were made on the NumPy reference paths (see pin.py)."""
    monkeypatch.setenv("DUALNET_KERNELS", "reference")


def test_every_registered_rule_is_pinned_on_every_model():
    pinned = {name.split("/")[1].split("[")[0] for name in PINNED}
    assert pinned == set(pin.rules.names())
    assert set(PINNED) == {name for name, *_ in pin.cases()}


@pytest.mark.parametrize("name, model, rule, options", list(pin.cases()), ids=[name for name, *_ in pin.cases()])
def test_estimate_is_unchanged(name, model, rule, options):
    expected, got = PINNED[name], pin.pin(model, rule, options)
    if "refused" in expected or "refused" in got:
        assert got == expected
        return
    names = sorted(pin.estimates(model, rule, options))
    floor = 1e-10 * max(expected["norms"], default=0.0)  # round-off on a tensor that is zero in exact arithmetic
    moved = [f"{n}: norm {b:.9g} (pinned {a:.9g})" for n, a, b in zip(names, expected["norms"], got["norms"])
             if not np.isclose(a, b, rtol=1e-8, atol=floor)]
    kernels = pin.blas_kernels()
    if kernels not in expected["sha256"]:  # pinned under other BLAS kernels only: the norms must hold
        assert len(got["norms"]) == len(expected["norms"]) and not moved, \
            f"{name}: the estimate changed (no pin for {kernels}); tensors whose norm moved: {moved}"
    elif got["sha256"] != expected["sha256"][kernels]:
        pytest.fail(f"{name}: the estimate changed ({len(expected['norms'])} pinned tensors, {len(got['norms'])} now); "
                    f"tensors whose norm moved: {moved or 'none beyond round-off'}")
