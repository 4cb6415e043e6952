"""Every error jasper_mmap raises on purpose.

Each specific error also subclasses the builtin that users already catch, so
``except FileNotFoundError`` or ``except ValueError`` keeps working. Messages say which file,
what was found, what was expected and how to fix it.
"""

from __future__ import annotations

import errno

__all__ = [
    "JasperError",
    "DeviceUnavailableError",
    "ArtifactMissingError",
    "ArtifactError",
    "ConfigError",
    "StoreNotFoundError",
    "StoreFormatError",
    "StoreCorruptError",
    "StoreExistsError",
    "SampleIndexError",
    "SampleIndexTypeError",
    "StoreKeyError",
    "DependencyError",
    "TableReadOnlyError",
    "TableMemoryError",
    "StoreWriteError",
    "StoreStaleError",
    "StoreReplacedError",
    "RemoteStoreError",
    "write_error",
]


class JasperError(Exception):
    """Base class of every error raised on purpose by jasper_mmap and its converters."""


class ArtifactMissingError(JasperError, FileNotFoundError, ValueError):
    """A required input file (``.pt`` artifact, ``config.json``, split) does not exist.

    Also a ValueError: the in-RAM dataset raised ValueError for these, and its users catch it.
    """


class ArtifactError(JasperError, ValueError):
    """An input ``.pt`` artifact is unreadable, unsafe, or holds wrong shapes, dtypes or values."""


class ConfigError(JasperError, ValueError):
    """``config.json`` is missing keys, holds wrong types, or disagrees with the files."""


class StoreNotFoundError(JasperError, FileNotFoundError, ValueError):
    """A store directory or one of its files does not exist (also a ValueError, as
    :class:`ArtifactMissingError`)."""


class StoreFormatError(JasperError, ValueError):
    """A store's manifest is unreadable, of an unknown format, or of an unsupported version."""


class StoreCorruptError(JasperError, ValueError):
    """A store's files disagree with its manifest (sizes, shapes, dtypes, checksums)."""


class StoreExistsError(JasperError, FileExistsError):
    """The destination of a conversion already exists and overwriting was not asked for."""


class StoreStaleError(JasperError, ValueError):
    """A store's source ``.pt`` files changed after it was converted."""


class StoreReplacedError(JasperError, RuntimeError):
    """The store an open dataset (or :class:`~jasper_mmap.stores.Store`) reads was replaced
    (``convert-pt --overwrite``), moved or removed after it was opened: it never reads the
    new store's files in its place (NOTE [store identity]). Open the dataset again."""


class StoreKeyError(JasperError, KeyError):
    """A store was asked for an array it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DependencyError(JasperError, ImportError, ValueError):
    """An optional dependency (h5py) that the requested input needs is not installed.

    An ImportError, and a ValueError as the in-RAM dataset raised for ``storage_format="hdf5"``.
    """


class SampleIndexError(JasperError, IndexError):
    """A sample or row index is outside the valid range."""


class SampleIndexTypeError(JasperError, TypeError):
    """Sample indices that are not integers (booleans, a mask, floats): refused, never cast."""


class DeviceUnavailableError(JasperError, RuntimeError):
    """The device asked for (``device="cuda"``) is not available in this process."""


class StoreWriteError(JasperError, OSError):
    """Writing a store or a negatives generation failed (disk full, read-only, permissions)."""


class RemoteStoreError(JasperError, OSError):
    """An object store could not be reached or refused a request (credentials, endpoint,
    bucket, network), or another writer won a race for the same name."""


class TableReadOnlyError(JasperError, RuntimeError):
    """An in-place write into a table attribute (``dataset.question_embs`` and friends), which
    are the store's data: a write would not change the batches, which are read from the store."""


class TableMemoryError(JasperError, MemoryError):
    """A large table attribute could not be given private copy-on-write memory (the kernel
    refused the mapping), so it is refused rather than served over a read-only map."""


_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EFBIG: "a file would exceed the file size limit (ulimit -f) or the filesystem's",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


#: the fix for each errno of _WRITE_ERRNOS: a read-only or forbidden destination is not
#: helped by freeing space, nor a full disk by permissions
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that filesystem or choose a destination on another",
    errno.EDQUOT: "free space within your quota or choose a destination on another filesystem",
    errno.EROFS: "choose a destination on a writable filesystem (or remount it read-write)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or choose a filesystem that allows "
    "larger files",
    errno.EACCES: "choose a destination you may write (or ask for write permission there)",
    errno.EPERM: "choose a destination you may write (or ask for write permission there)",
}


def write_error(target: object, e: OSError, what: str) -> OSError:
    """Turn an OSError met while writing ``target`` into a StoreWriteError with the fix.

    Errors that are not about the destination (other errnos) are returned unchanged.
    """
    if e.errno not in _WRITE_ERRNOS:
        return e
    err = StoreWriteError(
        f"{target}: could not write {what}: {_WRITE_ERRNOS[e.errno]} ({e.strerror}). "
        f"Nothing was published and the previous state is intact; {_WRITE_FIXES[e.errno]}, "
        f"then run again."
    )
    err.errno = e.errno  # (not strerror: OSError would then print only "[Errno N] strerror")
    return err
