"""IDX reader: round trips (gzip and raw, every dtype code) and precise errors on malformed files."""
import gzip

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dualnet.data import CorruptFile, encode_idx, parse_idx, read_idx, write_idx
from dualnet.data.idx import IDX_DTYPES

DTYPES = [dtype.newbyteorder("=") for dtype in IDX_DTYPES.values()]


@given(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
       data=st.data())
def test_encode_parse_round_trip(dtype, shape, data):
    array = data.draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype, allow_nan=False)))
    decoded = parse_idx(encode_idx(array))
    assert decoded.dtype == dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("compress", [True, False])
def test_file_round_trip_detects_gzip_by_magic(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "no-gz-suffix-either-way", images, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    np.testing.assert_array_equal(read_idx(path, expected_ndim=3, expected_code=0x08), images)


def test_header_matches_mnist_convention():
    labels = np.array([7, 2, 1], dtype=np.uint8)
    assert encode_idx(labels)[:8] == bytes.fromhex("00000801") + (3).to_bytes(4, "big")
    assert encode_idx(np.zeros((5, 28, 28), np.uint8))[:4] == bytes.fromhex("00000803")


def test_big_endian_payload_is_decoded():
    data = (bytes.fromhex("00000c01") + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
            + (-2).to_bytes(4, "big", signed=True))
    np.testing.assert_array_equal(parse_idx(data), np.array([1, -2], dtype=np.int32))


def _valid(tmp_path):
    return encode_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x08\x03" + b[2:], "not an IDX file"),
    (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX dtype code 0x07"),
    (lambda b: b[:3] + b"\x00" + b[4:], "declares 0 dimensions"),
    (lambda b: b[:-1], "truncated: header says sizes [2, 3, 4] (24 payload bytes) but only 23 follow"),
    (lambda b: b[:10], "truncated header"),
    (lambda b: b + b"\x00\x00", "2 unexpected trailing bytes"),
    (lambda b: b[:3], "too short"),
])
def test_malformed_file_names_file_and_problem(tmp_path, mutate, message):
    path = tmp_path / "broken-images-idx3-ubyte"
    path.write_bytes(mutate(_valid(tmp_path)))
    with pytest.raises(CorruptFile) as info:
        read_idx(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_wrong_dimensions_and_dtype_are_rejected(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(CorruptFile, match="1 dimensions, expected 3"):
        read_idx(path, expected_ndim=3)
    path = write_idx(tmp_path / "floats", np.zeros((1, 2, 2), np.float32))
    with pytest.raises(CorruptFile, match="dtype code 0x0D, expected 0x08"):
        read_idx(path, expected_code=0x08)


def test_truncated_gzip_names_file(tmp_path):
    data = gzip.compress(encode_idx(np.arange(4000, dtype=np.uint8).reshape(10, 20, 20)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="damaged or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="no IDX code"):
        encode_idx(np.zeros(3, np.uint16))
