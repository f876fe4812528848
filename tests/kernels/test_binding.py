"""``dualnet.kernels`` is the kernels package of the very checkout (or wheel) ``dualnet`` came from."""
import pathlib

import dualnet
import dualnet.kernels.cpu


def test_kernels_come_from_the_same_checkout_as_dualnet():
    package = pathlib.Path(dualnet.__file__).resolve().parent
    kernels = pathlib.Path(dualnet.kernels.__file__).resolve().parent
    assert kernels in (package / "kernels", package.parent / "kernels")
    assert pathlib.Path(dualnet.kernels.cpu.__file__).resolve().parent == kernels / "cpu"
