"""Downloading dataset files: verified before they are visible, written atomically.

Each file is fetched into a temporary ``.<name>.<random>.part`` file in the target directory, its
digest is checked against the registry, and only then is it renamed onto its final name with
``os.replace`` (atomic on POSIX and Windows).  An interrupted or corrupt download therefore never
leaves a file that a later run would pick up.  Mirrors are tried in order.

``fetch(url, destination)`` is pluggable: tests and air-gapped setups pass their own function that
writes the bytes of ``url`` to the path ``destination`` (raising on failure).
"""
import os
import shutil
import sys
import tempfile
import urllib.request

from .errors import ChecksumMismatch, CorruptFile, DataError, DownloadError
from .idx import read_bytes
from .integrity import verify_file

OFFLINE_ENV = "DUALNET_OFFLINE"
_TIMEOUT_S = 60


def offline():
    """True when ``$DUALNET_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def urllib_fetch(url, destination):
    """Default fetch: stream ``url`` into the file ``destination`` with the standard library."""
    request = urllib.request.Request(url, headers={"User-Agent": "dualnet"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _check(path, file_spec):
    """Verify a freshly downloaded file: its own digests, else (IDX) the digest of its content."""
    try:
        verify_file(path, file_spec)
    except ChecksumMismatch as mismatch:
        if not file_spec.content_sha256:
            raise
        try:
            payload = read_bytes(path)[1]
        except CorruptFile:
            raise mismatch from None
        verify_file(path, file_spec, payload=payload)


def download_file(file_spec, urls, directory, fetch=None):
    """Fetch one file into ``directory`` from the first mirror that yields verified bytes.

    Returns the final path.  Raises ``DownloadError`` listing every URL tried and why it failed.
    """
    fetch = fetch or urllib_fetch
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, file_spec.name)
    failures = []
    for url in urls:
        handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{file_spec.name}.", suffix=".part")
        os.close(handle)
        try:
            print(f"dualnet: downloading {url}", file=sys.stderr)
            fetch(url, partial)
            _check(partial, file_spec)
            os.replace(partial, target)
            return target
        except (OSError, DataError, ValueError) as error:  # network, HTTP, checksum, corrupt gzip
            failures.append(f"  {url}: {type(error).__name__}: {error}")
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    raise DownloadError(f"could not download {file_spec.name}; tried:\n" + "\n".join(failures))
