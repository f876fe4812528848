"""Datasets, batching and augmentation for dualnet experiments.

* ``load(name, data_dir=None, download=True)`` -> ``Dataset`` (``train_x``, ``train_y``, ``test_x``,
  ``test_y``, ``num_classes``, ``input_shape``, ``name``, ``source``); ``available()`` lists names.
  Lookup order, download and checksum rules: ``dualnet.data.datasets``.
* ``batches(x, y, batch_size, seed, epoch=e)``: a shuffle determined by ``(seed, epoch)`` only.
* ``normalize(x, mode)`` with ``'unit' | 'symmetric' | 'standardize'``; ``random_crop_flip``,
  ``random_resized_crop``, ``two_views`` for seeded augmentation.
* Readers: ``read_idx`` / ``parse_idx`` / ``write_idx`` (IDX, gzipped or raw) and the CIFAR-10 batch
  reader in ``dualnet.data.cifar``.
"""
from .batching import batches, epoch_order, num_batches
from .datasets import Dataset, available, load, load_digits
from .download import urllib_fetch
from .errors import ChecksumMismatch, CorruptFile, DataError, DatasetNotFound, DownloadError
from .idx import encode_idx, parse_idx, read_idx, write_idx
from .locate import SYSTEM_DIRS, cache_dir, search_roots
from .registry import REGISTRY, DatasetSpec, FileSpec
from .transforms import NORMALIZATIONS, channel_stats, normalize, random_crop_flip, random_resized_crop, two_views

__all__ = ["batches", "epoch_order", "num_batches", "Dataset", "available", "load", "load_digits", "urllib_fetch",
           "ChecksumMismatch", "CorruptFile", "DataError", "DatasetNotFound", "DownloadError", "encode_idx",
           "parse_idx", "read_idx", "write_idx", "SYSTEM_DIRS", "cache_dir", "search_roots", "REGISTRY",
           "DatasetSpec", "FileSpec", "NORMALIZATIONS", "channel_stats", "normalize", "random_crop_flip",
           "random_resized_crop", "two_views"]
