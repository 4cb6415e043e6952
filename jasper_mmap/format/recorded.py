"""The data files a store records with their sizes, checked in O(number of files) (NOTE
[recorded files] in integrity.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import file_kind
from jasper_mmap.errors import StoreCorruptError, StoreFormatError, StoreNotFoundError
from jasper_mmap.format.schema import (
    Problem,
    bad_rel,
    raise_problems,
    store_fix,
)
from jasper_mmap.format.spec import (
    MANIFEST,
)

__all__ = ["check_files", "data_files", "entry_files", "file_problems"]


def data_files(root: Path, rels: Iterable[str]) -> dict[str, int]:
    """Every file under each of ``rels`` (a file, or a directory walked recursively), with its
    size, keyed by its path relative to ``root`` (``/``-separated, sorted).

    Raises:
        StoreNotFoundError: one of ``rels`` does not exist under ``root``.
    """
    root = Path(root)
    out: dict[str, int] = {}
    for rel in rels:
        path = root / rel
        if path.is_file():
            out[Path(rel).as_posix()] = path.stat().st_size
        elif path.is_dir():
            for dirpath, _, names in os.walk(path):
                for name in names:
                    p = Path(dirpath, name)
                    out[p.relative_to(root).as_posix()] = p.stat().st_size
        else:
            raise StoreNotFoundError(
                f"{path}: data file or directory to record is missing; the store being written "
                f"is incomplete. This is a bug; please report it."
            )
    return dict(sorted(out.items()))


def entry_files(root: Path, entries: dict[str, dict[str, Any]]) -> dict[str, int]:
    """``data_files`` of the arrays ``entries`` describe (manifest entries with ``file``), plus
    the ``zarr.json`` of the zarr groups holding them (for a negatives generation: its group)."""
    rels = {e["file"] for e in entries.values()}
    for rel in list(rels):
        parent = Path(rel).parent
        meta = (parent / "zarr.json").as_posix()
        if (root / rel).is_dir() and (Path(root) / meta).is_file():
            rels.add(meta)
    return data_files(root, sorted(rels))


def _owners(rel: str, entries: dict[str, Any]) -> tuple[str, ...]:
    """Names of the arrays whose data lives in store file ``rel``."""
    return tuple(
        sorted(
            name
            for name, e in entries.items()
            if isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and (rel == e["file"] or rel.startswith(e["file"] + "/"))
        )
    )


def file_problems(
    store_dir: Path,
    files: Any,
    where: str,
    *,
    fix: str | None = None,
    entries: dict[str, Any] | None = None,
) -> list[Problem]:
    """O(number of files): every file in ``files`` exists, is a regular file (NOTE [regular
    files only] in jasper_mmap/_fs/files.py), and has the recorded size.

    ``where`` names the file that records them (for the messages); ``entries`` (manifest
    entries) lets each problem name the arrays it concerns.
    """
    fix = fix or store_fix(Path(store_dir))
    if not isinstance(files, dict):
        return [
            Problem(
                StoreFormatError,
                f"{where}: 'files' should be an object of relative paths to sizes, but got "
                f"{type(files).__name__}. {fix}",
            )
        ]
    problems = []
    base = os.fspath(store_dir)
    label = os.path.basename(where)
    label = "the manifest" if label == MANIFEST else label
    for rel, want in files.items():
        if type(want) is not int or want < 0 or bad_rel(rel):
            problems.append(
                Problem(
                    StoreFormatError,
                    f"{where}: 'files' should map relative paths inside the store to sizes, "
                    f"but has {rel!r}: {want!r}. {fix}",
                )
            )
            continue
        path = os.path.join(base, rel)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            msg = f"{path}: store file is missing ({label} lists it). {fix}"
            problems.append(Problem(StoreNotFoundError, msg, _owners(rel, entries or {})))
            continue
        except OSError as e:  # a symlink loop, no permission on a folder...
            msg = f"{path}: store file cannot be read ({e.strerror}). {fix}"
            problems.append(Problem(StoreCorruptError, msg, _owners(rel, entries or {})))
            continue
        got = st.st_size
        if not stat.S_ISREG(st.st_mode):  # NOTE [regular files only] in jasper_mmap/_fs/files.py
            msg = f"{path}: store file is {file_kind(st.st_mode)}, not a regular file. {fix}"
            problems.append(Problem(StoreCorruptError, msg, _owners(rel, entries or {})))
            continue
        if got != want:
            msg = (
                f"{path}: file is {got} bytes, but {label} records {want} (truncated, "
                f"appended to or replaced). {fix}"
            )
            problems.append(Problem(StoreCorruptError, msg, _owners(rel, entries or {})))
    return problems


def check_files(
    store_dir: Path, files: dict[str, int], where: str, *, fix: str | None = None
) -> None:
    """Raise for the first file of ``files`` that is missing or has another size.

    Raises:
        StoreNotFoundError: a file is missing. StoreCorruptError: a file has another size.
        StoreFormatError: ``files`` is not an object of relative paths to sizes.
    """
    problems = file_problems(store_dir, files, where, fix=fix)
    raise_problems(problems, store_dir)
