"""CIFAR-10 python-batch reader: directory and tar.gz layouts, NCHW order, refusal of bad pickles."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from dualnet.data import CorruptFile, cifar


def _expected(train, test):
    return (np.concatenate([images for images, _ in train]), np.concatenate([labels for _, labels in train]),
            test[0], test[1])


def test_directory_round_trip(tmp_path, builders):
    train, test = builders.toy_cifar_arrays(0)
    batch_dir = builders.write_cifar_dir(tmp_path, train, test)
    for got, want in zip(cifar.read_directory(batch_dir), _expected(train, test)):
        np.testing.assert_array_equal(got, want)


def test_archive_round_trip(tmp_path, builders):
    train, test = builders.toy_cifar_arrays(1)
    builders.write_cifar_dir(tmp_path / "src", train, test)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / cifar.BATCH_DIR, arcname=cifar.BATCH_DIR)
    for got, want in zip(cifar.read_archive(archive), _expected(train, test)):
        np.testing.assert_array_equal(got, want)


def test_rows_are_channel_major_planes():
    """Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major."""
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 256]).astype(np.uint8)
    data = pickle.dumps({b"data": row[None, :], b"labels": [3]}, protocol=2)
    images, labels = cifar.parse_batch(data)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    assert (images[0, 0] == 10).all() and (images[0, 1] == 20).all()
    assert images[0, 2, 1, 0] == 32  # blue plane, row 1, column 0 = element 32 of the plane


def test_archive_missing_member_and_truncation(tmp_path, builders):
    train, test = builders.toy_cifar_arrays(2)
    batch_dir = builders.write_cifar_dir(tmp_path / "src", train, test)
    os.remove(os.path.join(batch_dir, "test_batch"))
    archive = tmp_path / "partial.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batch_dir, arcname=cifar.BATCH_DIR)
    with pytest.raises(CorruptFile, match="lacks cifar-10-batches-py/test_batch"):
        cifar.read_archive(archive)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(CorruptFile, match="damaged or truncated tar") as info:
        cifar.read_archive(cut)
    assert str(cut) in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps(_Exploit(), protocol=2), "refusing to load global"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, protocol=2), "2 images but 1 labels"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=2), "uint8 [N, 3072]"),
    (pickle.dumps({b"labels": [1]}, protocol=2), "b'data' and b'labels'"),
    (b"not a pickle", "not a readable CIFAR-10 python batch"),
])
def test_bad_batches_are_refused(tmp_path, payload, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(CorruptFile, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        cifar.read_batch(path)
    assert str(path) in str(info.value)


def test_original_python2_style_pickle_is_read():
    """The distributed batches were pickled by Python 2: str keys decoded with encoding='bytes'."""
    buffer = io.BytesIO()
    pickle.dump({b"data": np.ones((1, 3072), np.uint8), b"labels": [9], b"filenames": [b"x.png"]}, buffer, protocol=2)
    images, labels = cifar.parse_batch(buffer.getvalue())
    assert images.sum() == 3072 and labels.dtype == np.int64
