"""Mini-batches with a shuffle that depends only on ``(seed, epoch)``: exact resume by construction.

The order of epoch ``e`` is ``permutation(n)`` of a generator seeded with the pair ``(seed, e)``, so
epoch 7 is the same whether a run reached it from epoch 0 or was restarted at it; ``start`` skips the
first batches to resume in the middle of an epoch.  Each example appears exactly once per epoch
(``drop_last`` drops the short final batch, i.e. at most ``batch_size - 1`` examples).
"""
import numpy as np

from .. import backend


def num_batches(n, batch_size, drop_last=False):
    """Number of batches in one epoch of ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"num_batches: batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n, seed, epoch, shuffle=True):
    """Example indices of epoch ``epoch``: a permutation determined by ``(seed, epoch)`` alone.

    ``seed`` and ``epoch`` are non-negative integers.  ``shuffle=False`` gives ``arange(n)``.
    """
    if not shuffle:
        return np.arange(n)
    if int(seed) < 0 or int(epoch) < 0:
        raise ValueError(f"epoch_order: seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batches(x, y, batch_size, seed=0, *, epoch=0, shuffle=True, drop_last=False, start=0):
    """Yield ``(x_batch, y_batch)`` for one epoch (``y`` may be ``None``; then ``y_batch`` is ``None``).

    ``x``: [N, ...] and ``y``: [N] arrays (NumPy or CuPy; batches stay on the arrays' device).
    Batch ``b`` holds ``order[b*batch_size:(b+1)*batch_size]`` with ``order = epoch_order(N, seed,
    epoch, shuffle)``; ``start`` is the first batch index yielded (resume mid-epoch).
    """
    n = len(x)
    if y is not None and len(y) != n:
        raise ValueError(f"batches: x has {n} examples but y has {len(y)}")
    count = num_batches(n, batch_size, drop_last)
    if not 0 <= start <= count:
        raise ValueError(f"batches: start={start} outside [0, {count}] for {n} examples in batches of {batch_size}")
    order = epoch_order(n, seed, epoch, shuffle)
    for b in range(start, count):
        chunk = slice(b * batch_size, (b + 1) * batch_size)
        index = order[chunk] if shuffle else chunk
        yield _take(x, index), (None if y is None else _take(y, index))


def _take(array, index):
    """``array[index]`` on the array's own device; a slice ``index`` gives a view."""
    module = backend.namespace(array)
    if isinstance(index, slice) or module is np:
        return array[index]
    return array[module.asarray(index)]
