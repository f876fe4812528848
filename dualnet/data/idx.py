"""IDX files (the MNIST / Fashion-MNIST container), gzipped or raw.

Layout (all integers big-endian)::

    bytes 0-1   0x00 0x00                       magic, part 1
    byte  2     dtype code (0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64)
    byte  3     number of dimensions D
    4*D bytes   D uint32 sizes
    payload     prod(sizes) items of the dtype, C order

So images are ``magic 0x00000803`` with sizes ``[N, rows, cols]`` and labels ``0x00000801`` with
``[N]``.  ``parse_idx`` checks every field and the payload length exactly; a short file is reported
as truncated, a long one as having trailing bytes, always naming the file.
"""
import gzip
import os
import zlib

import numpy as np

from .errors import CorruptFile

GZIP_MAGIC = b"\x1f\x8b"
# IDX dtype code -> big-endian NumPy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_CODE_OF_DTYPE = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
_MAX_DIMS = 16


def is_gzip(data):
    """True when ``data`` (bytes) starts with the gzip magic number 1f 8b."""
    return data[:2] == GZIP_MAGIC


def read_bytes(path):
    """``(file_bytes, payload)`` of ``path``: the bytes on disk and, if gzipped, their decompression.

    For a raw file both are the same object.  A truncated or damaged gzip stream raises
    ``CorruptFile`` naming the file.
    """
    with open(path, "rb") as handle:
        file_bytes = handle.read()
    if not is_gzip(file_bytes):
        return file_bytes, file_bytes
    try:
        payload = gzip.decompress(file_bytes)
    except (EOFError, OSError, zlib.error) as error:
        raise CorruptFile(
            f"{path}: damaged or truncated gzip stream ({error}). Delete the file and fetch it again.") from None
    return file_bytes, payload


def parse_idx(data, source="<bytes>", expected_ndim=None, expected_code=None):
    """Decode IDX bytes into a native-endian NumPy array of shape ``sizes``.

    ``source`` names the file in error messages.  ``expected_ndim`` / ``expected_code`` (e.g. 3 and
    0x08 for MNIST images) are checked when given.  Raises ``CorruptFile`` on a wrong magic number,
    an unknown dtype code, a missing header, or a payload whose length is not ``prod(sizes) * itemsize``.
    """
    if len(data) < 4:
        raise CorruptFile(f"{source}: {len(data)} bytes is too short for an IDX header (4 bytes of magic)")
    if data[0] != 0 or data[1] != 0:
        raise CorruptFile(
            f"{source}: not an IDX file: magic number starts with {data[:2].hex()} instead of 0000 "
            f"(full magic {data[:4].hex()}); is it a different format, or gzipped twice?")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise CorruptFile(f"{source}: unknown IDX dtype code 0x{code:02X} (magic {data[:4].hex()}); known: {known}")
    if ndim == 0 or ndim > _MAX_DIMS:
        raise CorruptFile(f"{source}: IDX header declares {ndim} dimensions (expected 1..{_MAX_DIMS})")
    if expected_code is not None and code != expected_code:
        raise CorruptFile(f"{source}: IDX dtype code 0x{code:02X}, expected 0x{expected_code:02X}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise CorruptFile(f"{source}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_length = 4 + 4 * ndim
    if len(data) < header_length:
        raise CorruptFile(
            f"{source}: truncated header: {len(data)} bytes, the {ndim} sizes need {header_length}")
    sizes = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected_bytes = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    actual_bytes = len(data) - header_length
    if actual_bytes < expected_bytes:
        raise CorruptFile(
            f"{source}: truncated: header says sizes {list(sizes)} ({expected_bytes} payload bytes) but only "
            f"{actual_bytes} follow. Delete the file and fetch it again.")
    if actual_bytes > expected_bytes:
        raise CorruptFile(
            f"{source}: {actual_bytes - expected_bytes} unexpected trailing bytes after the payload of sizes "
            f"{list(sizes)}")
    array = np.frombuffer(data, dtype=dtype, count=expected_bytes // dtype.itemsize, offset=header_length)
    return array.reshape(sizes).astype(dtype.newbyteorder("="))


def read_idx(path, expected_ndim=None, expected_code=None):
    """Read an IDX file (gzip detected by its magic bytes, not its name) into a NumPy array."""
    _, payload = read_bytes(path)
    return parse_idx(payload, os.fspath(path), expected_ndim, expected_code)


def encode_idx(array):
    """IDX bytes of ``array`` (dtype one of u8, i8, i16, i32, f32, f64): the inverse of ``parse_idx``."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODE_OF_DTYPE:
        raise ValueError(f"encode_idx: dtype {array.dtype} has no IDX code; use one of "
                         f"{sorted(str(d) for d in _CODE_OF_DTYPE)}")
    if array.ndim == 0 or array.ndim > _MAX_DIMS:
        raise ValueError(f"encode_idx: array of shape {array.shape} needs 1..{_MAX_DIMS} dimensions")
    code = _CODE_OF_DTYPE[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path, array, compress=False):
    """Write ``array`` as an IDX file, gzipped when ``compress`` (mtime 0: reproducible bytes)."""
    data = encode_idx(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as handle:
        handle.write(data)
    return path
