"""The zip archive of a ``.pt`` file: sniffing the format, the legacy (non-zip) refusal, and the
prefix of the archive's records.
"""

from __future__ import annotations

import errno
import os
import struct
import zipfile
from pathlib import Path

from jasper_mmap._fs.files import describe_path
from jasper_mmap.errors import ArtifactError, ArtifactMissingError

__all__ = ["LEGACY_FIX", "LEGACY_MAGIC"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


LEGACY_FIX = (
    "It was saved by torch < 1.6 (legacy format), which cannot be read without loading it whole. "
    "Re-save it once with a current torch: "
    "`torch.save(torch.load(p, weights_only=True), p)`, then convert again."
)


#: the byteorder record says how multi-byte elements are stored
_BYTEORDERS = {b"little": "<", b"big": ">"}


#: zip parsing errors of a damaged archive (a negative seek raises OSError EINVAL)
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError)


def is_legacy(path: Path) -> bool:
    """Whether ``path`` starts with the pickled magic number of torch's pre-1.6 format."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == LEGACY_MAGIC


def sniff(path: Path) -> str:
    """Return ``zip``, ``pickle`` or ``unknown`` from the first bytes; missing -> error."""
    if not path.is_file():
        what = (
            "is missing"
            if not os.path.lexists(path)
            else f"is not a file: it {describe_path(path)}"
        )
        raise ArtifactMissingError(
            f"{path}: required artifact {what}. Re-run the dataset builder "
            f"or copy the file into the dataset directory."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ArtifactError(
            f"{path}: is empty (0 bytes). Re-run the dataset builder to write it again."
        )
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def corrupt_error(path: Path, e: BaseException) -> ArtifactError:
    return ArtifactError(
        f"{path}: torch archive is corrupt or truncated ({type(e).__name__}: "
        f"{str(e)[:200]}). Re-run the dataset builder to write it again."
    )


def zip_prefix(path: Path) -> tuple[str, str]:
    """Return ``(archive prefix, numpy byte order '<' or '>')`` of a torch zip archive."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise ArtifactError(
                    f"{path}: is a zip file but not a torch archive (no */data.pkl record). "
                    f"Save the object with torch.save."
                )
            prefix = pkl[0][: -len("data.pkl")]
            if prefix + "byteorder" not in names:
                return prefix, "<"
            with z.open(prefix + "byteorder") as f:
                order = f.read(16)
    except OSError as e:
        if e.errno not in (None, errno.EINVAL):
            raise
        raise corrupt_error(path, e) from None
    except _ZIP_ERRORS as e:
        if isinstance(e, ArtifactError):
            raise
        raise corrupt_error(path, e) from None
    if order not in _BYTEORDERS:
        raise ArtifactError(
            f"{path}: its byteorder record says {order[:16]!r}, not little or big (corrupt). "
            f"Re-save the tensor with torch.save."
        )
    return prefix, _BYTEORDERS[order]
