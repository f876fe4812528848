"""Input normalisation and seeded image augmentation, for NCHW batches (NumPy or CuPy).

Normalisations, as each paper's code does it:

* ``'unit'``         x in [0, 1] unchanged (images come out of ``load`` this way);
* ``'symmetric'``    2x - 1 in [-1, 1] (FDFA's code);
* ``'standardize'``  (x - mean_c) / std_c per channel c, statistics of the *training* set (Ren, Fournier).

Augmentations draw all their randomness on the host from a NumPy ``Generator`` (or a seed / tuple of
ints turned into one), in a fixed order, so the result depends only on the seed and the input
shape: the same on CPU and GPU, reproducible on resume.
"""
import numpy as np

from .. import backend

NORMALIZATIONS = ("unit", "symmetric", "standardize")


def _generator(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_images(x, op):
    if x.ndim != 4:
        raise ValueError(f"{op}: expected images [N, C, H, W], got shape {tuple(x.shape)}")


def channel_stats(x):
    """Per-channel ``(mean [C], std [C])`` of images ``x`` [N, C, H, W], accumulated in float64."""
    _check_images(x, "channel_stats")
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    var = ((x - mean[None, :, None, None].astype(x.dtype)) ** 2).mean(axis=(0, 2, 3), dtype=np.float64)
    return mean.astype(x.dtype), backend.namespace(x).sqrt(var).astype(x.dtype)


def normalize(x, mode, stats=None):
    """Normalise images ``x`` [N, C, H, W] given in [0, 1]; returns an array of ``x``'s dtype.

    ``mode``: ``'unit'`` -> x; ``'symmetric'`` -> 2x - 1; ``'standardize'`` -> (x - mean) / std with
    ``stats = (mean [C], std [C])``, which should come from ``channel_stats(train_x)`` (computed from
    ``x`` itself when ``None``).
    """
    if mode == "unit":
        return x
    if mode == "symmetric":
        return x * x.dtype.type(2) - x.dtype.type(1)
    if mode == "standardize":
        _check_images(x, "normalize")
        mean, std = channel_stats(x) if stats is None else stats
        xp = backend.namespace(x)
        mean = xp.asarray(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
        std = xp.asarray(std, dtype=x.dtype).reshape(1, -1, 1, 1)
        if mean.shape[1] != x.shape[1] or std.shape[1] != x.shape[1]:
            raise ValueError(f"normalize: stats for {mean.shape[1]} channels, images have {x.shape[1]}")
        return (x - mean) / std
    raise ValueError(f"normalize: unknown mode {mode!r}; choose one of {NORMALIZATIONS}")


def _gather(x, rows, cols):
    """``out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]]`` for integer index arrays [N, H'], [N, W']."""
    xp = backend.namespace(x)
    n, c = x.shape[:2]
    return x[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None],
             xp.asarray(rows)[:, None, :, None], xp.asarray(cols)[:, None, None, :]]


def random_crop_flip(x, rng, pad=4, flip=True):
    """Pad-and-crop with horizontal flip (standard CIFAR augmentation), one draw per image.

    ``x`` [N, C, H, W] is zero-padded by ``pad`` on each side; a window of H x W at offsets
    ``(dy, dx)`` uniform in {0..2*pad}^2 is cut out and mirrored left-right with probability 1/2.
    Draw order: dy [N], dx [N], flip [N].  Returns a new array of ``x``'s shape and dtype.
    """
    _check_images(x, "random_crop_flip")
    generator = _generator(rng)
    n, _, h, w = x.shape
    dy = generator.integers(0, 2 * pad + 1, size=n)
    dx = generator.integers(0, 2 * pad + 1, size=n)
    mirrored = generator.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    padded = backend.namespace(x).pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return _gather(padded, rows, cols)


def random_resized_crop(x, rng, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """Random-area crop resized back to H x W with bilinear interpolation (BYOL/SimCLR-style crop).

    Per image: area fraction s ~ U(area), aspect r = exp(U(log ratio)); the box is
    ``h = min(H, H sqrt(s / r))``, ``w = min(W, W sqrt(s r))`` at a uniform position inside the image.
    Output pixel (i, j) samples the box at ``top + (i + 0.5) h / H - 0.5`` (rows; columns alike,
    mirrored with probability 1/2 when ``flip``).  ``area=(1, 1), ratio=(1, 1), flip=False`` is the
    identity.  Draw order: s, log r, top fraction, left fraction, flip (each [N]).
    """
    _check_images(x, "random_resized_crop")
    generator = _generator(rng)
    n, _, h, w = x.shape
    scale = generator.uniform(area[0], area[1], size=n)
    aspect = np.exp(generator.uniform(np.log(ratio[0]), np.log(ratio[1]), size=n))
    box_h = np.minimum(h, h * np.sqrt(scale / aspect))
    box_w = np.minimum(w, w * np.sqrt(scale * aspect))
    top = generator.random(n) * (h - box_h)
    left = generator.random(n) * (w - box_w)
    mirrored = generator.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    ys = top[:, None] + (np.arange(h) + 0.5) * (box_h / h)[:, None] - 0.5
    xs = left[:, None] + (np.arange(w) + 0.5) * (box_w / w)[:, None] - 0.5
    xs = np.where(mirrored[:, None], xs[:, ::-1], xs)
    return _bilinear(x, np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))


def _bilinear(x, ys, xs):
    """Sample ``x`` [N, C, H, W] at real rows ``ys`` [N, H'] and columns ``xs`` [N, W'] (in range)."""
    xp = backend.namespace(x)
    h, w = x.shape[2:]
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = xp.asarray((ys - y0)[:, None, :, None], dtype=x.dtype)
    wx = xp.asarray((xs - x0)[:, None, None, :], dtype=x.dtype)
    top = _gather(x, y0, x0) * (1 - wx) + _gather(x, y0, x1) * wx
    bottom = _gather(x, y1, x0) * (1 - wx) + _gather(x, y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def two_views(x, rng, area=(0.5, 1.0), flip=True):
    """Two independently augmented views ``(view_a, view_b)`` of the same batch, for contrastive runs.

    Each view is ``random_resized_crop(x, ..., area=area, flip=flip)`` (Ren et al. use crop-area lower
    bound 0.5 on CIFAR-10 M/8, 0.3 for L/8); view a is drawn first from the generator.  Colour
    distortions of BYOL's pipeline are not included.
    """
    generator = _generator(rng)
    return (random_resized_crop(x, generator, area=area, flip=flip),
            random_resized_crop(x, generator, area=area, flip=flip))
