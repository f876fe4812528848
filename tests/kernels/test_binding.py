"""``dualnet.kernels`` is the kernels package of the very checkout (or wheel) ``dualnet`` came from."""
import importlib
import pathlib

import dualnet


def test_kernels_come_from_the_same_checkout_as_dualnet():
    package = pathlib.Path(dualnet.__file__).resolve().parent
    kernels = pathlib.Path(importlib.import_module("dualnet.kernels").__file__).resolve().parent
    assert kernels in (package / "kernels", package.parent / "kernels")
    cpu = importlib.import_module("dualnet.kernels.cpu")
    assert pathlib.Path(cpu.__file__).resolve().parent == kernels / "cpu"
