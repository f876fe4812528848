"""``times_replicas``: the replicas' loss derivatives times a layer's noise, as ``expand_replicas``
then a product gives them (bit for bit), for every replica mapping and layer layout."""
import numpy as np
import pytest

from dualnet.rules.base import expand_replicas, times_replicas


@pytest.mark.parametrize("directions", [1, 3])
@pytest.mark.parametrize("patches, groups", [(1, 16), (4, 4), (1, 1), (2, 1)])
@pytest.mark.parametrize("layout, replica", [("flat", "own"), ("grouped", "own"), ("flat", "token"),
                                             ("flat", "example"), ("examples", "example")])
def test_times_replicas_is_the_expanded_product(directions, patches, groups, layout, replica):
    rng = np.random.default_rng(0)
    shape = {"flat": (5, patches, groups * 3), "grouped": (5, patches, groups, 3), "examples": (5, 7)}[layout]
    d = rng.standard_normal((directions, 5, patches, groups)).astype(np.float32)
    u = rng.standard_normal((directions,) + shape).astype(np.float32)
    ours, expanded = times_replicas(d, u, replica), expand_replicas(d, shape, replica) * u
    assert ours.shape == expanded.shape and ours.dtype == expanded.dtype
    assert ours.tobytes() == expanded.tobytes()


def test_times_replicas_of_per_example_derivatives():
    rng = np.random.default_rng(1)
    d, u = rng.standard_normal((2, 5)), rng.standard_normal((2, 5, 3, 4))
    assert times_replicas(d, u, "own").tobytes() == (expand_replicas(d, (5, 3, 4), "own") * u).tobytes()
