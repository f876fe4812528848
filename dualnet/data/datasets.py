"""``load(name)``: a dataset as NumPy arrays, found on disk or downloaded, always verified.

What a researcher gets::

    ds = dualnet.data.load("fashion-mnist")          # or "mnist", "cifar10", "digits"
    ds.train_x  float32 [N, C, H, W] in [0, 1]        ds.train_y  int64 [N]
    ds.test_x, ds.test_y                              ds.num_classes, ds.input_shape (C, H, W)
    ds.source   where the files were found, e.g. "system: /usr/share/datasets/fashion-mnist"

Lookup order (first complete set of files wins): ``data_dir`` > ``$DUALNET_DATA`` > the user cache
(``$XDG_CACHE_HOME/dualnet`` or ``~/.cache/dualnet``) > system copies (/usr/share/datasets, where
Debian's ``dataset-fashion-mnist`` puts Fashion-MNIST).  Then, if downloading is allowed
(``download=True`` and ``$DUALNET_OFFLINE`` unset), the missing files are fetched into
``<cache>/<name>/`` from the official mirrors.  Otherwise ``DatasetNotFound`` says exactly which files to
put where.

Verification: every file found anywhere (data_dir included) or downloaded is checked against the
registry digests for its file name (``registry.py``); a mismatch raises ``ChecksumMismatch`` naming the
file, the expected and actual digests, and what to do -- it is never used silently.  Pass
``verify=False`` for deliberately modified or synthetic files, or ``registry={...}`` to describe other
files.  The IDX and CIFAR readers also check structure (magic, dims, sizes), so a truncated file fails
even unverified.

``digits`` is scikit-learn's bundled 8x8 digits (1,797 real images, no files or network needed): the
first 1,437 images are the training set, the last 360 the test set (a fixed, writer-ordered split).
"""
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import cifar, idx
from .download import download_file, offline
from .errors import CorruptFile, DatasetNotFound, DownloadError
from .integrity import verify_file
from .locate import cache_dir, find_in_root, search_roots
from .registry import ALIASES, REGISTRY

DIGITS_TEST_SIZE = 360


@dataclass
class Dataset:
    """Train/test arrays of one dataset: images float32 [N, C, H, W] in [0, 1], labels int64 [N]."""
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    source: str
    classes: tuple = field(default=())

    @property
    def input_shape(self):
        """``(C, H, W)`` of one image."""
        return tuple(self.train_x.shape[1:])

    def __repr__(self):
        return (f"Dataset({self.name!r}, train {len(self.train_y)}, test {len(self.test_y)}, "
                f"input {self.input_shape}, {self.num_classes} classes, from {self.source})")


def available(registry=None):
    """Names accepted by ``load``: ``'digits'`` plus every registry entry."""
    return ["digits"] + sorted(REGISTRY if registry is None else registry)


def canonical_name(name, registry=None):
    """Lower-case name with aliases resolved (``'fashion_mnist'`` -> ``'fashion-mnist'``)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key != "digits" and key not in (REGISTRY if registry is None else registry):
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available(registry))}")
    return key


def load(name, data_dir=None, download=True, *, verify=True, cache=None, system_dirs=None, fetch=None,
         registry=None):
    """Load dataset ``name`` (see the module docstring for lookup, download and verification).

    Arguments: ``data_dir`` an explicit directory searched first (a warning if it does not exist);
    ``download`` allow fetching missing files (also disabled by ``$DUALNET_OFFLINE=1``); ``verify``
    check digests; ``cache`` override the cache directory; ``system_dirs`` override the list of system
    directories; ``fetch(url, path)`` replace the downloader; ``registry`` a ``{name: DatasetSpec}``
    table replacing the built-in one.
    Returns a ``Dataset``.  Raises ``DatasetNotFound`` (``DownloadError`` if fetching failed),
    ``CorruptFile`` / ``ChecksumMismatch`` for bad files, ``ValueError`` for an unknown name.
    """
    registry = REGISTRY if registry is None else registry
    key = canonical_name(name, registry)
    if key == "digits":
        return load_digits()
    spec = registry[key]
    if data_dir is not None and not os.path.isdir(data_dir):
        warnings.warn(f"load({name!r}): data_dir {os.fspath(data_dir)!r} is not a directory; searching the other "
                      f"places", stacklevel=2)
    roots = search_roots(data_dir, cache, system_dirs)
    partials = []
    for root in roots:
        location, seen = find_in_root(spec, root)
        partials += seen
        if location is not None:
            return _read(spec, location.paths, location.layout, f"{root.label}: {location.directory}", verify)
    cache_root = os.fspath(cache) if cache is not None else cache_dir()
    if not download or offline():
        reason = "downloading is disabled (" + ("download=False" if not download else "$DUALNET_OFFLINE is set") + ")"
        raise DatasetNotFound(not_found_message(spec, roots, partials, reason, cache_root))
    target = os.path.join(cache_root, spec.name)
    paths = {}
    try:
        for role, file_spec in spec.files.items():
            existing = os.path.join(target, file_spec.name)
            paths[role] = existing if os.path.isfile(existing) else download_file(
                file_spec, spec.urls(file_spec), target, fetch)
    except DownloadError as error:
        raise DownloadError(not_found_message(spec, roots, partials, f"the download failed: {error}",
                                              cache_root)) from None
    layout = "archive" if spec.kind == "cifar" else "files"
    return _read(spec, paths, layout, f"downloaded: {target}", verify)


def _advice(spec):
    return f" (mirror: {spec.mirrors[0]})"


def _read(spec, paths, layout, source, verify):
    if spec.kind == "cifar":
        arrays = _read_cifar(spec, paths, layout, verify)
    else:
        arrays = _read_idx(spec, paths, verify)
    train_images, train_labels, test_images, test_labels = arrays
    for images, labels, split in ((train_images, train_labels, "train"), (test_images, test_labels, "test")):
        _check_split(spec, images, labels, split, source)
    return Dataset(spec.name, _to_unit(train_images, spec), train_labels.astype(np.int64),
                   _to_unit(test_images, spec), test_labels.astype(np.int64), spec.num_classes, source,
                   tuple(spec.classes))


def _read_idx(spec, paths, verify):
    arrays = []
    for role, file_spec in spec.files.items():
        path = paths[role]
        file_bytes, payload = idx.read_bytes(path)
        if verify:
            verify_file(path, file_spec, file_bytes, payload, _advice(spec))
        arrays.append(idx.parse_idx(payload, path, expected_ndim=3 if role.endswith("images") else 1,
                                    expected_code=0x08))
    return arrays


def _read_cifar(spec, paths, layout, verify):
    if layout == "directory":
        if verify:
            for name, path in paths.items():
                verify_file(path, spec.members[name], advice=_advice(spec))
        return cifar.read_directory(os.path.dirname(next(iter(paths.values()))))
    path = paths["archive"]
    if verify:
        verify_file(path, spec.files["archive"], advice=_advice(spec))
    return cifar.read_archive(path)


def _check_split(spec, images, labels, split, source):
    if len(images) != len(labels):
        raise CorruptFile(f"{spec.name} ({source}): {split} split has {len(images)} images but {len(labels)} labels")
    shape = tuple(spec.input_shape[-2:])
    if tuple(images.shape[-2:]) != shape:
        raise CorruptFile(f"{spec.name} ({source}): {split} images are {list(images.shape[1:])}, "
                          f"expected {list(shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise CorruptFile(f"{spec.name} ({source}): {split} labels span [{labels.min()}, {labels.max()}], "
                          f"expected [0, {spec.num_classes - 1}]")


def _to_unit(images, spec):
    """uint8 images -> float32 in [0, 1] with the channel axis: [N, C, H, W]."""
    return (images.reshape((len(images),) + tuple(spec.input_shape)).astype(np.float32) / np.float32(255.0))


def not_found_message(spec, roots, partials, reason, cache_root):
    """The full "what to do" text of ``DatasetNotFound`` for ``spec``."""
    lines = [f"dataset {spec.name!r} was not found on disk, and {reason}.", "Looked in, in this order:"]
    labels = {"data_dir": "--data-dir / data_dir", "$DUALNET_DATA": "$DUALNET_DATA", "cache": "user cache",
              "system": "system copies"}
    for label, absent in (("data_dir", "not given"), ("$DUALNET_DATA", "not set")):
        if not any(root.label == label for root in roots):
            lines.append(f"  - {labels[label]}: ({absent})")
    for root in roots:
        lines.append(f"  - {labels[root.label]}: {root.path}")
    lines.append(f"    (each root itself and its sub-folders {', '.join(dict.fromkeys((spec.name,) + spec.subdirs))})")
    for directory, missing in partials:
        lines.append(f"  ! {directory} has only part of the set; missing: {', '.join(missing)}")
    lines.append("To fix it, do one of:")
    lines.append("  1. put these files in one directory (sums in dualnet/data/registry.py):")
    for file_spec in spec.files.values():
        size = f"{file_spec.size:,} bytes" if file_spec.size else "size unknown"
        plain = " (or gunzip-ed)" if file_spec.content_sha256 else ""
        lines.append(f"       {file_spec.name}{plain}  {size}  from {spec.urls(file_spec)[0]}")
    if spec.kind == "cifar":
        lines.append(f"     (or its extracted '{cifar.BATCH_DIR}' folder)")
    lines.append("     then pass it with --data-dir DIR (load(..., data_dir=DIR)) or `export DUALNET_DATA=DIR`,")
    lines.append(f"     or place them in {os.path.join(cache_root, spec.name)}")
    lines.append(f"  2. allow the download (download=True and DUALNET_OFFLINE unset); files go to "
                 f"{os.path.join(cache_root, spec.name)}")
    if spec.system_hint:
        lines.append(f"  3. {spec.system_hint}")
    return "\n".join(lines)


def load_digits():
    """scikit-learn's 8x8 digits: train = first 1,437 images, test = last 360; pixels 0..16 -> [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetNotFound("dataset 'digits' needs scikit-learn, which is not installed: "
                              "pip install -e '.[examples]' (or pip install scikit-learn)") from None
    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    split = len(labels) - DIGITS_TEST_SIZE
    return Dataset("digits", images[:split], labels[:split], images[split:], labels[split:], 10,
                   "scikit-learn (bundled sklearn.datasets.load_digits)", tuple(str(d) for d in range(10)))
