"""``site_gradient``: the replicas' loss derivatives times a layer's noise, summed over the
directions and masked — bit for bit the products, sum and mask that NumPy gives on the expanded
derivatives, for every replica mapping and layer layout, with the kernels and without."""
import numpy as np
import pytest

from dualnet.rules.base import replica_factors, site_gradient

SHAPES = {"flat": lambda p, g: (5, p, g * 3), "grouped": lambda p, g: (5, p, g, 3), "examples": lambda p, g: (5, 7)}


def expanded(d, shape, replica):
    """The derivative each unit of a layer of ``shape`` takes, [K, *shape], written out unit by unit."""
    k, n = d.shape[:2]
    out = np.empty((k,) + shape, d.dtype)
    for index in np.ndindex(*shape):
        example = index[0]
        if d.ndim == 2:
            out[(slice(None),) + index] = d[:, example]
        elif replica == "example" or d.shape[2:] == (1, 1):
            out[(slice(None),) + index] = d[:, example].sum(axis=(1, 2))
        elif replica == "token":
            out[(slice(None),) + index] = d[:, example, index[1]].sum(axis=1)
        else:  # 'own': the group of the unit, from its channel (flat [N, P, C]) or its own axis ([N, P, G, c])
            group = index[2] if len(shape) == 4 else index[2] // (shape[2] // d.shape[3])
            out[(slice(None),) + index] = d[:, example, index[1], group]
    return out


def composed(d, u, mask, replica):
    """The NumPy composition site_gradient replaces: the products, their sum over K, then the mask."""
    products = expanded(d, u.shape[1:], replica) * u
    total = products[0] if len(u) == 1 else products.sum(axis=0)
    return total if mask is None else total * mask


@pytest.mark.parametrize("kernels", ["auto", "reference"])
@pytest.mark.parametrize("directions", [1, 3])
@pytest.mark.parametrize("patches, groups", [(1, 16), (4, 4), (1, 1), (2, 1)])
@pytest.mark.parametrize("layout, replica", [("flat", "own"), ("grouped", "own"), ("flat", "token"),
                                             ("flat", "example"), ("examples", "example")])
def test_site_gradient_is_the_masked_sum_of_expanded_products(monkeypatch, kernels, directions, patches, groups,
                                                              layout, replica):
    monkeypatch.setenv("DUALNET_KERNELS", kernels)
    rng = np.random.default_rng(0)
    shape = SHAPES[layout](patches, groups)
    d = rng.standard_normal((directions, 5, patches, groups)).astype(np.float32)
    u = rng.standard_normal((directions,) + shape).astype(np.float32)
    for mask in (rng.random(shape) < 0.5, None):
        ours, expected = site_gradient(d, u, replica, mask), composed(d, u, mask, replica)
        assert ours.shape == expected.shape == shape and ours.dtype == expected.dtype
        assert ours.tobytes() == expected.tobytes()


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_site_gradient_of_per_example_derivatives(monkeypatch, kernels):
    monkeypatch.setenv("DUALNET_KERNELS", kernels)
    rng = np.random.default_rng(1)
    d, u, mask = rng.standard_normal((2, 5)), rng.standard_normal((2, 5, 3, 4)), rng.random((5, 3, 4)) < 0.5
    assert site_gradient(d, u, "own", mask).tobytes() == composed(d, u, mask, "own").tobytes()
    d32 = d.astype(np.float32)  # float32 derivatives against float64 noise: NumPy's float64 result
    assert site_gradient(d32, u, "own", mask).tobytes() == composed(d32, u, mask, "own").tobytes()


def test_replica_factors_blocks_and_errors():
    d = np.ones((2, 3, 4, 5))
    assert [a.shape for a in [replica_factors(d, (3, 4, 10), "token")[0]]] == [(2, 3, 4)]
    assert replica_factors(d, (3, 4, 10), "token")[1] == 10
    assert replica_factors(d, (3, 4, 5, 6), "own")[0].shape == (2, 3, 20)
    assert replica_factors(d, (3, 4, 5, 6), "own")[1] == 6
    assert replica_factors(d, (3, 4, 10), "example")[0].shape == (2, 3, 1)
    with pytest.raises(ValueError, match="unknown replica mapping 'channel'"):
        replica_factors(d, (3, 4, 10), "channel")
