"""Fixtures for the data-layer tests: an isolated environment and tiny synthetic datasets on disk."""
import gzip
import hashlib
import os
from types import SimpleNamespace

import numpy as np
import pytest

from dualnet.data import cifar
from dualnet.data.idx import encode_idx
from dualnet.data.registry import DatasetSpec, FileSpec

IDX_NAMES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No real cache, no $DUALNET_DATA / $DUALNET_OFFLINE leaking in from the developer's shell."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("DUALNET_DATA", raising=False)
    monkeypatch.delenv("DUALNET_OFFLINE", raising=False)


def toy_arrays(seed, n_train=12, n_test=5, size=6):
    """uint8 images [N, size, size] and labels in 0..9 for a train and a test split."""
    rng = np.random.default_rng(seed)
    return {"train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
            "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, n_test).astype(np.uint8)}


def idx_file_bytes(arrays):
    """``{role: gzipped IDX bytes}`` (mtime 0, so the bytes are reproducible)."""
    return {role: gzip.compress(encode_idx(array), mtime=0) for role, array in arrays.items()}


def write_idx_set(directory, arrays, compress=True):
    """Write the four files of ``arrays`` into ``directory`` under the MNIST file names."""
    os.makedirs(directory, exist_ok=True)
    for role, data in idx_file_bytes(arrays).items():
        name = IDX_NAMES[role]
        if not compress:
            data, name = gzip.decompress(data), name[:-3]
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    return directory


def toy_spec(arrays, name="toy", mirrors=("https://mirror-a.invalid/toy/", "https://mirror-b.invalid/toy/")):
    """A registry entry whose digests are those of ``arrays`` written by ``write_idx_set``."""
    files = {}
    for role, data in idx_file_bytes(arrays).items():
        content = gzip.decompress(data)
        files[role] = FileSpec(IDX_NAMES[role], len(data), hashlib.sha256(data).hexdigest(),
                               hashlib.md5(data).hexdigest(), hashlib.sha256(content).hexdigest(), len(content))
    size = arrays["train_images"].shape[-1]
    return DatasetSpec(name=name, kind="idx", files=files, mirrors=mirrors, num_classes=10,
                       input_shape=(1, size, size), subdirs=("toy_sub",))


def toy_cifar_arrays(seed, per_batch=4, n_test=3):
    rng = np.random.default_rng(seed)
    train = [(rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, per_batch))
             for _ in cifar.TRAIN_BATCHES]
    test = (rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test))
    return train, test


def write_cifar_dir(directory, train, test):
    """The extracted ``cifar-10-batches-py`` layout under ``directory``; returns the batch folder."""
    batch_dir = os.path.join(directory, cifar.BATCH_DIR)
    os.makedirs(batch_dir, exist_ok=True)
    for name, (images, labels) in zip(cifar.TRAIN_BATCHES, train):
        cifar.write_batch(os.path.join(batch_dir, name), images, labels)
    cifar.write_batch(os.path.join(batch_dir, "test_batch"), *test)
    return batch_dir


@pytest.fixture
def builders():
    """The builders above (a conftest cannot be imported by tests under --import-mode=importlib)."""
    return SimpleNamespace(toy_arrays=toy_arrays, idx_file_bytes=idx_file_bytes, write_idx_set=write_idx_set,
                           toy_spec=toy_spec, toy_cifar_arrays=toy_cifar_arrays, write_cifar_dir=write_cifar_dir,
                           IDX_NAMES=IDX_NAMES)
