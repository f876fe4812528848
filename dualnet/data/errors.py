"""Exceptions of the data layer: one class per thing a researcher must act on differently.

``DataError`` is the common base.  ``DatasetNotFound`` (also a ``FileNotFoundError``) means "nothing
usable was found and nothing could be downloaded" and its message lists what to do.  ``CorruptFile``
(also a ``ValueError``) means a file was found but is malformed; ``ChecksumMismatch`` is the case where it
parses but is not the file the registry knows.  Both name the file and never let it be used silently.
"""


class DataError(Exception):
    """Base class of every dualnet.data error."""


class DatasetNotFound(DataError, FileNotFoundError):
    """A dataset is not on disk in any searched place and could not (or may not) be downloaded."""


class DownloadError(DatasetNotFound):
    """Every mirror of a file failed (network error or checksum mismatch of the downloaded bytes)."""


class CorruptFile(DataError, ValueError):
    """A data file exists but is malformed: bad magic number, wrong dimensions, truncated payload."""


class ChecksumMismatch(CorruptFile):
    """A data file's digest differs from the registry's known digest for that file name."""
