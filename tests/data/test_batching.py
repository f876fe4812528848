"""Batching: every example once per epoch, order a function of (seed, epoch) only, exact mid-epoch resume."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualnet.data import batches, epoch_order, num_batches


@given(n=st.integers(1, 60), batch_size=st.integers(1, 17), seed=st.integers(0, 2**32), epoch=st.integers(0, 50),
       shuffle=st.booleans())
def test_each_example_exactly_once_per_epoch(n, batch_size, seed, epoch, shuffle):
    x = np.arange(n) * 10
    y = np.arange(n)
    seen = []
    sizes = []
    for xb, yb in batches(x, y, batch_size, seed, epoch=epoch, shuffle=shuffle):
        np.testing.assert_array_equal(xb, yb * 10)  # x and y stay paired
        seen.extend(yb.tolist())
        sizes.append(len(yb))
    assert sorted(seen) == list(range(n))
    assert len(sizes) == num_batches(n, batch_size) and all(s == batch_size for s in sizes[:-1])
    assert seen == (epoch_order(n, seed, epoch).tolist() if shuffle else list(range(n)))


@given(n=st.integers(1, 60), batch_size=st.integers(1, 17))
def test_drop_last_keeps_only_full_batches(n, batch_size):
    got = [len(yb) for _, yb in batches(np.zeros(n), np.arange(n), batch_size, 3, drop_last=True)]
    assert got == [batch_size] * (n // batch_size) == [batch_size] * num_batches(n, batch_size, drop_last=True)


def test_order_depends_only_on_seed_and_epoch():
    n = 1000
    fresh = epoch_order(n, seed=5, epoch=7)
    for epoch in range(7):  # consuming earlier epochs does not change epoch 7
        epoch_order(n, seed=5, epoch=epoch)
    np.testing.assert_array_equal(epoch_order(n, seed=5, epoch=7), fresh)
    assert not np.array_equal(epoch_order(n, seed=5, epoch=8), fresh)
    assert not np.array_equal(epoch_order(n, seed=6, epoch=7), fresh)


def test_resume_mid_epoch_gives_the_remaining_batches():
    x = np.arange(103)
    full = [xb for xb, _ in batches(x, None, 10, 11, epoch=4)]
    resumed = [xb for xb, _ in batches(x, None, 10, 11, epoch=4, start=6)]
    assert len(resumed) == len(full) - 6
    for a, b in zip(full[6:], resumed):
        np.testing.assert_array_equal(a, b)


def test_without_y_and_no_shuffle_gives_views():
    x = np.arange(12.0).reshape(6, 2)
    parts = list(batches(x, None, 4, shuffle=False))
    assert [p[1] for p in parts] == [None, None] and np.shares_memory(parts[0][0], x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(batch_size=2, start=7), r"start=7 outside \[0, 5\]"),
    (dict(batch_size=2, y=np.arange(3)), "x has 10 examples but y has 3"),
])
def test_bad_arguments(kwargs, message):
    arguments = dict(x=np.arange(10), y=None, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        list(batches(**arguments))
