"""load(): lookup order, verification, simulated downloads, and the messages a researcher reads."""
import gzip
import hashlib
import os
import tarfile

import numpy as np
import pytest

from dualnet.data import (
    REGISTRY,
    ChecksumMismatch,
    CorruptFile,
    DatasetNotFound,
    DatasetSpec,
    DownloadError,
    FileSpec,
    available,
    cache_dir,
    cifar,
    load,
)

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def _no_fetch(url, destination):
    raise AssertionError(f"no download expected, asked for {url}")


def _assert_dataset_equals(dataset, arrays):
    size = arrays["train_images"].shape[-1]
    np.testing.assert_array_equal(dataset.train_x, arrays["train_images"].reshape(-1, 1, size, size) / np.float32(255))
    np.testing.assert_array_equal(dataset.train_y, arrays["train_labels"])
    np.testing.assert_array_equal(dataset.test_x, arrays["test_images"].reshape(-1, 1, size, size) / np.float32(255))
    np.testing.assert_array_equal(dataset.test_y, arrays["test_labels"])
    assert dataset.train_x.dtype == np.float32 and dataset.train_y.dtype == np.int64
    assert dataset.input_shape == (1, size, size) and dataset.num_classes == 10


def test_lookup_order_data_dir_env_cache_system(tmp_path, monkeypatch, builders):
    """Four places hold different copies: each is used only when every earlier place is absent."""
    places = {label: tmp_path / label for label in ("data_dir", "env", "cache", "system")}
    copies = {label: builders.toy_arrays(seed) for seed, label in enumerate(places)}
    for label, root in places.items():
        builders.write_idx_set(root / "toy", copies[label])
    registry = {"toy": builders.toy_spec(copies["data_dir"])}
    monkeypatch.setenv("DUALNET_DATA", str(places["env"]))
    options = dict(cache=places["cache"], system_dirs=[places["system"]], fetch=_no_fetch, registry=registry,
                   verify=False)
    expected = [("data_dir", dict(data_dir=places["data_dir"])), ("env", {}), ("cache", {}), ("system", {})]
    for label, extra in expected:
        dataset = load("toy", **extra, **options)
        _assert_dataset_equals(dataset, copies[label])
        assert dataset.source.endswith(str(places[label] / "toy"))
        if label == "env":
            monkeypatch.delenv("DUALNET_DATA")
        if label == "cache":
            options["cache"] = tmp_path / "empty-cache"


def test_missing_data_dir_warns_and_search_continues(tmp_path, builders):
    arrays = builders.toy_arrays(17)
    builders.write_idx_set(tmp_path / "system" / "toy", arrays)
    with pytest.warns(UserWarning, match="is not a directory"):
        dataset = load("toy", data_dir=tmp_path / "typo", system_dirs=[tmp_path / "system"], fetch=_no_fetch,
                       registry={"toy": builders.toy_spec(arrays)})
    assert dataset.source.startswith("system: ")


def test_env_may_list_several_directories(tmp_path, monkeypatch, builders):
    arrays = builders.toy_arrays(3)
    builders.write_idx_set(tmp_path / "second", arrays)
    monkeypatch.setenv("DUALNET_DATA", os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second")]))
    dataset = load("toy", system_dirs=[], fetch=_no_fetch, registry={"toy": builders.toy_spec(arrays)})
    assert dataset.source == f"$DUALNET_DATA: {tmp_path / 'second'}"


@pytest.mark.parametrize("subfolder", ["", "toy", "toy_sub"])
@pytest.mark.parametrize("compress", [True, False])
def test_files_found_in_root_or_subfolder_gzipped_or_not(tmp_path, builders, subfolder, compress):
    """Raw (gunzip-ed) files verify through the digest of the decompressed content."""
    arrays = builders.toy_arrays(4)
    builders.write_idx_set(tmp_path / subfolder, arrays, compress=compress)
    dataset = load("toy", data_dir=tmp_path, system_dirs=[], fetch=_no_fetch,
                   registry={"toy": builders.toy_spec(arrays)})
    _assert_dataset_equals(dataset, arrays)
    assert dataset.source == f"data_dir: {os.path.join(str(tmp_path), subfolder) if subfolder else tmp_path}"


def test_recompressed_copy_passes_on_content_digest(tmp_path, builders):
    """Like Debian's Fashion-MNIST: other gzip header bytes, same content -> accepted."""
    arrays = builders.toy_arrays(5)
    builders.write_idx_set(tmp_path, arrays)
    path = tmp_path / builders.IDX_NAMES["train_images"]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), mtime=123456))
    dataset = load("toy", data_dir=tmp_path, system_dirs=[], fetch=_no_fetch,
                   registry={"toy": builders.toy_spec(arrays)})
    _assert_dataset_equals(dataset, arrays)


def test_checksum_mismatch_names_file_digests_and_remedy(tmp_path, builders):
    expected, other = builders.toy_arrays(6), builders.toy_arrays(7)
    builders.write_idx_set(tmp_path, other)
    spec = builders.toy_spec(expected)
    with pytest.raises(ChecksumMismatch) as info:
        load("toy", data_dir=tmp_path, system_dirs=[], fetch=_no_fetch, registry={"toy": spec})
    message = str(info.value)
    bad = tmp_path / builders.IDX_NAMES["train_images"]
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert str(bad) in message and spec.files["train_images"].sha256 in message and actual in message
    assert "Delete it" in message and "verify=False" in message
    _assert_dataset_equals(load("toy", data_dir=tmp_path, system_dirs=[], fetch=_no_fetch,
                                registry={"toy": spec}, verify=False), other)


def test_truncated_file_is_never_used(tmp_path, builders):
    arrays = builders.toy_arrays(8)
    builders.write_idx_set(tmp_path, arrays, compress=False)
    path = tmp_path / builders.IDX_NAMES["test_images"][:-3]
    path.write_bytes(path.read_bytes()[:-7])
    spec = builders.toy_spec(arrays)
    with pytest.raises(ChecksumMismatch, match="expected 196"):
        load("toy", data_dir=tmp_path, system_dirs=[], registry={"toy": spec})
    with pytest.raises(CorruptFile, match="truncated") as info:  # structure is checked even unverified
        load("toy", data_dir=tmp_path, system_dirs=[], registry={"toy": spec}, verify=False)
    assert str(path) in str(info.value)


def test_registry_digests_apply_to_files_in_explicit_data_dir(tmp_path, builders):
    """Synthetic files under MNIST's names fail the real sums, and load with verify=False."""
    arrays = builders.toy_arrays(9, size=28)
    builders.write_idx_set(tmp_path, arrays)
    with pytest.raises(ChecksumMismatch, match=REGISTRY["mnist"].files["train_images"].sha256):
        load("mnist", data_dir=tmp_path, download=False)
    dataset = load("mnist", data_dir=tmp_path, download=False, verify=False)
    _assert_dataset_equals(dataset, arrays)
    assert dataset.name == "mnist" and dataset.classes[0] == "0"


def test_inconsistent_splits_are_reported(tmp_path, builders):
    arrays = builders.toy_arrays(10)
    arrays["train_labels"] = arrays["train_labels"][:-1]
    builders.write_idx_set(tmp_path, arrays)
    with pytest.raises(CorruptFile, match="12 images but 11 labels"):
        load("toy", data_dir=tmp_path, system_dirs=[], registry={"toy": builders.toy_spec(arrays)})
    arrays = builders.toy_arrays(10)
    arrays["test_labels"][0] = 10
    builders.write_idx_set(tmp_path, arrays)
    with pytest.raises(CorruptFile, match=r"labels span \[\d+, 10\]"):
        load("toy", data_dir=tmp_path, system_dirs=[], registry={"toy": builders.toy_spec(arrays)})


class FakeMirrors:
    """A fetch hook serving ``{url: bytes}``; other URLs fail like an unreachable host."""

    def __init__(self, served):
        self.served, self.requested = served, []

    def __call__(self, url, destination):
        self.requested.append(url)
        if url not in self.served:
            raise OSError(f"simulated network failure for {url}")
        with open(destination, "wb") as handle:
            handle.write(self.served[url])


def _leftovers(directory):
    return [name for name in os.listdir(directory) if name.endswith(".part")]


def test_simulated_download_verifies_writes_atomically_and_caches(tmp_path, builders):
    arrays = builders.toy_arrays(11)
    spec = builders.toy_spec(arrays)
    data = builders.idx_file_bytes(arrays)
    served = {spec.urls(spec.files[role])[1 if role == "train_images" else 0]: data[role] for role in data}
    mirrors = FakeMirrors(served)
    dataset = load("toy", system_dirs=[], fetch=mirrors, registry={"toy": spec})
    target = os.path.join(cache_dir(), "toy")
    assert dataset.source == f"downloaded: {target}"
    _assert_dataset_equals(dataset, arrays)
    assert sorted(os.listdir(target)) == sorted(builders.IDX_NAMES.values())  # no .part files
    assert len(mirrors.requested) == 5  # train images fell back to the second mirror
    again = load("toy", system_dirs=[], fetch=_no_fetch, registry={"toy": spec})
    assert again.source == f"cache: {target}"


def test_corrupt_download_is_discarded_and_reported(tmp_path, builders):
    arrays = builders.toy_arrays(12)
    spec = builders.toy_spec(arrays)
    data = builders.idx_file_bytes(arrays)
    served = {url: data[role] for role in data for url in spec.urls(spec.files[role])}
    for url in spec.urls(spec.files["test_labels"]):
        served[url] = data["test_labels"][:-3]  # truncated on every mirror
    with pytest.raises(DownloadError) as info:
        load("toy", system_dirs=[], fetch=FakeMirrors(served), registry={"toy": spec})
    message = str(info.value)
    assert all(url in message for url in spec.urls(spec.files["test_labels"]))
    assert "t10k-labels-idx1-ubyte.gz" in message and "mismatch" in message
    target = os.path.join(cache_dir(), "toy")
    assert not os.path.exists(os.path.join(target, "t10k-labels-idx1-ubyte.gz")) and not _leftovers(target)
    assert isinstance(info.value, DatasetNotFound)


def test_interrupted_fetch_leaves_nothing(tmp_path, builders):
    spec = builders.toy_spec(builders.toy_arrays(13))

    def dies_midway(url, destination):
        with open(destination, "wb") as handle:
            handle.write(b"\x1f\x8b partial")
        raise ConnectionResetError("simulated reset")

    with pytest.raises(DownloadError, match="ConnectionResetError"):
        load("toy", system_dirs=[], fetch=dies_midway, registry={"toy": spec})
    assert os.listdir(os.path.join(cache_dir(), "toy")) == []


@pytest.mark.parametrize("offline", [True, False])
def test_downloads_disabled_raise_not_found_without_fetching(monkeypatch, builders, offline):
    spec = builders.toy_spec(builders.toy_arrays(14))
    if offline:
        monkeypatch.setenv("DUALNET_OFFLINE", "1")
    with pytest.raises(DatasetNotFound) as info:
        load("toy", download=offline, system_dirs=[], fetch=_no_fetch, registry={"toy": spec})
    assert ("$DUALNET_OFFLINE is set" if offline else "download=False") in str(info.value)


def test_not_found_message_lists_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALNET_DATA", str(tmp_path / "shared-data"))
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetNotFound) as info:
        load("fashion_mnist", data_dir=tmp_path / "mine", download=False, system_dirs=[tmp_path / "sys"])
    message = str(info.value)
    for file_spec in REGISTRY["fashion-mnist"].files.values():
        assert file_spec.name in message
    for needle in ("--data-dir", "DUALNET_DATA", str(tmp_path / "mine"), str(tmp_path / "shared-data"),
                   str(tmp_path / "sys"), os.path.join(cache_dir(), "fashion-mnist"),
                   "apt-get install dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist",
                   "fashion-mnist.s3-website.eu-central-1.amazonaws.com"):
        assert needle in message, needle
    assert message.index(str(tmp_path / "mine")) < message.index(str(tmp_path / "shared-data")) \
        < message.index(cache_dir()) < message.index(str(tmp_path / "sys"))


def test_partial_set_is_reported(tmp_path, builders):
    arrays = builders.toy_arrays(15)
    builders.write_idx_set(tmp_path, arrays)
    os.remove(tmp_path / builders.IDX_NAMES["test_labels"])
    with pytest.raises(DatasetNotFound) as info:
        load("toy", data_dir=tmp_path, download=False, system_dirs=[], registry={"toy": builders.toy_spec(arrays)})
    assert f"{tmp_path} has only part of the set; missing: t10k-labels-idx1-ubyte.gz" in str(info.value)


def test_cache_honours_xdg_then_home(tmp_path, monkeypatch):
    assert cache_dir() == str(tmp_path / "xdg-cache" / "dualnet")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "dualnet")


def test_unknown_name_lists_available():
    assert available() == ["digits", "cifar10", "fashion-mnist", "mnist"]
    expected = "unknown dataset 'imagenet'; available: digits, cifar10, fashion-mnist, mnist"
    with pytest.raises(ValueError, match=expected):
        load("imagenet")


def _cifar_spec(batch_dir, archive=None):
    members = {name: FileSpec(name, md5=hashlib.md5(open(os.path.join(batch_dir, name), "rb").read()).hexdigest())
               for name in cifar.TRAIN_BATCHES + cifar.TEST_BATCHES}
    archive_spec = FileSpec("cifar-10-python.tar.gz",
                            sha256=hashlib.sha256(open(archive, "rb").read()).hexdigest() if archive else None)
    return DatasetSpec(name="tinycifar", kind="cifar", files={"archive": archive_spec}, members=members,
                       mirrors=("https://mirror.invalid/",), num_classes=10, input_shape=(3, 32, 32))


def test_cifar_directory_archive_and_download(tmp_path, builders):
    train, test = builders.toy_cifar_arrays(16)
    batch_dir = builders.write_cifar_dir(tmp_path / "extracted", train, test)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batch_dir, arcname=cifar.BATCH_DIR)
    spec = _cifar_spec(batch_dir, archive)
    expected_train = np.concatenate([images for images, _ in train]).astype(np.float32) / np.float32(255)
    from_dir = load("tinycifar", data_dir=tmp_path / "extracted", system_dirs=[], fetch=_no_fetch,
                    registry={"tinycifar": spec})
    np.testing.assert_array_equal(from_dir.train_x, expected_train)
    assert from_dir.input_shape == (3, 32, 32) and len(from_dir.test_y) == 3
    mirrors = FakeMirrors({"https://mirror.invalid/cifar-10-python.tar.gz": archive.read_bytes()})
    downloaded = load("tinycifar", system_dirs=[], fetch=mirrors, registry={"tinycifar": spec})
    np.testing.assert_array_equal(downloaded.train_x, expected_train)
    np.testing.assert_array_equal(downloaded.test_y, test[1])
    with open(os.path.join(batch_dir, "data_batch_3"), "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ChecksumMismatch, match="data_batch_3"):
        load("tinycifar", data_dir=tmp_path / "extracted", system_dirs=[], registry={"tinycifar": spec})


def test_digits_split_is_fixed():
    pytest.importorskip("sklearn")
    dataset = load("digits")
    assert dataset.train_x.shape == (1437, 1, 8, 8) and dataset.test_x.shape == (360, 1, 8, 8)
    assert dataset.train_x.dtype == np.float32 and 0.0 == dataset.train_x.min() and dataset.train_x.max() == 1.0
    assert set(np.unique(dataset.train_y)) == set(range(10)) and dataset.test_y.dtype == np.int64
    again = load("digits")
    np.testing.assert_array_equal(again.test_x, dataset.test_x)


@pytest.mark.skipif(not os.path.isdir(FASHION_SYSTEM_DIR), reason="Debian package dataset-fashion-mnist absent")
def test_real_fashion_mnist_from_debian_package_verifies(monkeypatch):
    dataset = load("fashion-mnist", download=False)
    assert dataset.source == f"system: {FASHION_SYSTEM_DIR}"
    assert dataset.train_x.shape == (60000, 1, 28, 28) and dataset.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(dataset.train_y).tolist() == [6000] * 10 and np.bincount(dataset.test_y).tolist() == [1000] * 10
    assert dataset.train_y[0] == 9 and dataset.classes[9] == "Ankle boot"
