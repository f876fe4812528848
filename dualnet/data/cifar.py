"""CIFAR-10 "python version" batches: pickled dicts with ``b'data'`` (uint8 [N, 3072]) and ``b'labels'``.

Each row of ``data`` is a 32x32 colour image stored channel-major (1024 red, 1024 green, 1024 blue
values, each plane row-major), so ``data.reshape(N, 3, 32, 32)`` is already NCHW.  Batches are read
from the extracted ``cifar-10-batches-py`` directory or straight from ``cifar-10-python.tar.gz``
(no extraction needed).

Unpickling runs code named by the file, so batches are read with a restricted unpickler that only
resolves the NumPy names an ndarray pickle needs; anything else is refused as a corrupt file.
"""
import io
import os
import pickle
import tarfile

import numpy as np

from .errors import CorruptFile

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
BATCH_DIR = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)
_ROW_LENGTH = 3 * 32 * 32
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def parse_batch(data, source="<bytes>"):
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` from the bytes of one pickled batch."""
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # any unpickling failure means "not a CIFAR batch"
        raise CorruptFile(f"{source}: not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CorruptFile(f"{source}: a CIFAR-10 batch is a dict with b'data' and b'labels'; found {keys}")
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != _ROW_LENGTH:
        raise CorruptFile(f"{source}: b'data' must be uint8 [N, {_ROW_LENGTH}], "
                          f"found {images.dtype} {list(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise CorruptFile(f"{source}: {images.shape[0]} images but {labels.size} labels")
    return images.reshape((-1,) + IMAGE_SHAPE), labels


def read_batch(path):
    """Read one batch file (see ``parse_batch``)."""
    with open(path, "rb") as handle:
        return parse_batch(handle.read(), os.fspath(path))


def _concatenate(parts):
    images, labels = zip(*parts)
    return np.concatenate(images), np.concatenate(labels)


def read_directory(directory):
    """``(train_images, train_labels, test_images, test_labels)`` from an extracted batch directory."""
    train = _concatenate([read_batch(os.path.join(directory, name)) for name in TRAIN_BATCHES])
    test = _concatenate([read_batch(os.path.join(directory, name)) for name in TEST_BATCHES])
    return train + test


def read_archive(path):
    """The same four arrays, read from ``cifar-10-python.tar.gz`` without extracting it."""
    wanted = {f"{BATCH_DIR}/{name}": name for name in TRAIN_BATCHES + TEST_BATCHES}
    found = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise CorruptFile(f"{path}: damaged or truncated tar archive ({error}). "
                          f"Delete it and fetch it again.") from None
    missing = [name for name in TRAIN_BATCHES + TEST_BATCHES if name not in found]
    if missing:
        raise CorruptFile(f"{path}: archive lacks {', '.join(f'{BATCH_DIR}/{m}' for m in missing)}")
    train = _concatenate([parse_batch(found[name], f"{path}:{name}") for name in TRAIN_BATCHES])
    test = _concatenate([parse_batch(found[name], f"{path}:{name}") for name in TEST_BATCHES])
    return train + test


def write_batch(path, images, labels):
    """Write a batch in the original layout (for tests and small synthetic sets)."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(labels), _ROW_LENGTH)
    batch = {b"batch_label": b"synthetic", b"labels": [int(label) for label in labels], b"data": images}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)
    return path
