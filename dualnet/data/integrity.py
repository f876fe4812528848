"""Checksums: a found or downloaded file is used only if one of its known digests matches.

``verify_file`` accepts a file when any digest recorded in its ``FileSpec`` matches: the SHA-256 or
MD5 of the file as distributed, or the SHA-256 of its decompressed content (so re-compressed and
gunzip-ed copies of an IDX file pass too).  A mismatch raises ``ChecksumMismatch`` naming the file,
every expected digest, the actual digest and size, and what to do about it.
"""
import hashlib
import os

from .errors import ChecksumMismatch

_CHUNK = 1 << 20


def digest_bytes(data, algorithm="sha256"):
    """Hex digest of in-memory bytes."""
    return hashlib.new(algorithm, data).hexdigest()


def digest_file(path, algorithm="sha256"):
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_digest(path, file_bytes, algorithm):
    return digest_bytes(file_bytes, algorithm) if file_bytes is not None else digest_file(path, algorithm)


def verify_file(path, spec, file_bytes=None, payload=None, advice=""):
    """Return the name of the digest that matched, or raise ``ChecksumMismatch``.

    ``file_bytes`` (the bytes on disk) saves re-reading the file; ``payload`` (decompressed bytes,
    or the same bytes for a raw file) enables the content check.  A spec with no digest at all
    cannot be verified and is accepted (``'unverified'``).
    """
    if not spec.known():
        return "unverified"
    actual = {}
    if spec.sha256:
        actual["sha256"] = _file_digest(path, file_bytes, "sha256")
        if actual["sha256"] == spec.sha256:
            return "sha256"
    if spec.md5:
        actual["md5"] = _file_digest(path, file_bytes, "md5")
        if actual["md5"] == spec.md5:
            return "md5"
    if spec.content_sha256 and payload is not None:
        actual["content sha256"] = digest_bytes(payload)
        if actual["content sha256"] == spec.content_sha256:
            return "content sha256"
    raise ChecksumMismatch(_mismatch_message(path, spec, actual, payload, advice))


def _mismatch_message(path, spec, actual, payload, advice):
    expected = []
    if spec.sha256:
        expected.append(f"sha256 {spec.sha256}")
    if spec.md5:
        expected.append(f"md5 {spec.md5}")
    if spec.content_sha256:
        expected.append(f"sha256 of the decompressed content {spec.content_sha256}")
    found = [f"{name} {value}" for name, value in actual.items()]
    size = os.path.getsize(path)
    sizes = f"{size:,} bytes on disk"
    if spec.size:
        sizes += f" (the distributed file has {spec.size:,})"
    if payload is not None and spec.content_size and len(payload) != spec.content_size:
        sizes += f"; {len(payload):,} bytes of content (expected {spec.content_size:,})"
    return (f"{path}: checksum mismatch for {spec.name}.\n  expected: {' or '.join(expected)}\n"
            f"  found:    {', '.join(found)}; {sizes}\n"
            f"The file is corrupt, truncated or a different version and will not be used. Delete it and run "
            f"again to fetch it anew{advice}. If it is intentionally a modified file, load with verify=False.")
