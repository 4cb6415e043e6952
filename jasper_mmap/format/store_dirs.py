"""Store directories on disk, where a writer must know a store when it sees one
(:func:`is_store`): the clean-up of what killed writers left (NOTE [a killed replacement]), the
warning about other destinations' leftovers, and :func:`publishing` (NOTE [never destroy what we
did not make] in ``_fs/publish.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from jasper_mmap._fs.files import read_json
from jasper_mmap._fs.lock import store_lock
from jasper_mmap._fs.partials import (
    HOST_TAG,
    dead_writers,
    marked_entries,
    moved_aside,
    moved_aside_advice,
    partial_dir,
    remove_dead,
    swapped_out,
    swapped_out_advice,
)
from jasper_mmap._fs.publish import (
    check_destination,
    fsync_dir,
    fsync_tree,
    is_empty_dir,
    publish_dir,
)
from jasper_mmap.errors import (
    JasperError,
)

__all__ = [
    "is_store",
    "publishing",
    "remove_stale_partials",
    "settle_swapped_out",
    "warn_stale_partials",
]

log = logging.getLogger(__name__)


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove ``.<dst>.partial-*`` directories whose writer process no longer exists, and
    settle the stores such a writer swapped out (:func:`settle_swapped_out`)."""
    removed = remove_dead(marked_entries(dst.parent, f".{dst.name}.partial-"))
    settle_swapped_out(dst)
    return removed


def settle_swapped_out(dst: Path) -> list[Path]:
    """Put back, or remove, the stores killed replacements of ``dst`` moved away.

    NOTE [a killed replacement]: without ``renameat2(RENAME_EXCHANGE)`` (NFS, CIFS, many FUSE
    filesystems) :func:`_replace` renames the old store to ``.<name>.old-PID-TOKEN-HOST``, then
    the new one into place. A writer killed between the two renames leaves no store at the path;
    one killed after them leaves the whole old store beside the new one. Under the store lock,
    a dead writer's ``.old-`` directory that is a store (:func:`is_store`) is renamed back when
    nothing (or an empty directory) is at the path, and removed when a store is in place; one
    that is not a store is never touched (it is named). One whose writer cannot be known to be
    gone (another host or PID namespace: a container restarted after the kill; or a PID now
    running, perhaps reused) is never restored or removed, but named, with the ``mv`` that
    puts it back, in every message about the missing store (:func:`moved_aside_advice`: opening,
    ``jasper-mmap info``) and by :func:`warn_stale_partials`. A conversion without
    ``--overwrite`` to a path left empty beside any moved-aside store is refused at once,
    naming it (:func:`check_destination`): it never resurrects the old store under a new
    conversion (which then failed at its end), and never publishes over it silently; with
    ``--overwrite`` the old store is restored first and then replaced. Returns the
    directories settled.
    """
    dst = Path(dst)
    if not swapped_out(dst):
        return []
    settled = []
    with store_lock(dst, "restoring the store"):
        for old, pid in swapped_out(dst):  # again, under the lock
            if not is_store(old):
                log.warning(
                    "%s: a directory left by a replacement of %s whose process (pid %d) is "
                    "gone is not a jasper_mmap store; it is kept. Remove it if you do not "
                    "need it: rm -r %s",
                    old,
                    dst,
                    pid,
                    shlex.quote(str(old)),
                )
                continue
            empty = not os.path.lexists(dst) or (
                dst.is_dir() and not dst.is_symlink() and is_empty_dir(dst)
            )
            if empty:
                os.rename(old, dst)  # replaces an empty directory
                fsync_dir(dst.parent)
                log.warning(
                    "%s: restored the store that a replacement (pid %d, killed) had moved to %s",
                    dst,
                    pid,
                    old,
                )
            elif is_store(dst):
                shutil.rmtree(old, ignore_errors=True)
                log.info(
                    "removed %s, the store a killed replacement of %s (pid %d) had replaced",
                    old,
                    dst,
                    pid,
                )
            else:
                continue
            settled.append(old)
    return settled


def warn_stale_partials(dst: Path, max_entries: int = 1000) -> list[Path]:
    """Warn about the partial directories of OTHER destinations beside ``dst``; delete nothing.

    A writer removes only its own destination's leftovers (:func:`remove_stale_partials`).
    Another destination's ``.<name>.partial-PID-TOKEN-HOST`` written on this host whose process
    is gone is a killed run's; it is named, with its size (its first ``max_entries`` entries
    counted) and the fix. One without a host tag (older versions) is named too, with the
    caveat that a live writer on another host may own it. Returns the directories named.
    """
    own = f".{dst.name}.partial-"
    named = []
    for p, pid in dead_writers(marked_entries(dst.parent)):
        if p.name.startswith(own) or p.is_symlink() or not p.is_dir():
            continue  # dst's own are removed; partial files (json, h5) are other writers'
        target = dst.parent / p.name[1 : p.name.rindex(".partial-")]
        size, complete = _disk_usage(p, max_entries)
        from tqdm import tqdm  # here: importing the package stays free of it

        tagged = p.name.endswith(f"-{HOST_TAG}")
        why = (
            "it is kept: a conversion removes only its own destination's leftovers. Free the"
            if tagged
            else "it is kept, in case a conversion on another host is writing it. If none "
            "is, free the"
        )
        log.warning(
            "%s: a hidden partial directory (%s%s) left by a conversion to %s whose process "
            "(pid %d) is not running on this host; %s space: convert to %s again%s (that run "
            "removes it), or rm -r %s",
            p,
            "" if complete else "at least ",
            tqdm.format_sizeof(size, "B"),
            target,
            pid,
            why,
            shlex.quote(str(target)),
            " with --overwrite" if is_store(target) else "",
            shlex.quote(str(p)),
        )
        named.append(p)
    for p, pid in dead_writers(marked_entries(dst.parent, ".", ".old-"), "old-"):
        if p.name.startswith(f".{dst.name}.old-") or p.is_symlink() or not p.is_dir():
            continue  # dst's own are settled by remove_stale_partials
        target = dst.parent / p.name[1 : p.name.rindex(".old-")]
        log.warning("%s", swapped_out_advice(target, p, pid))
        named.append(p)
    # those never settled here (another host/namespace, a running PID), dst's own included
    targets = {dst.name}
    for p in marked_entries(dst.parent, ".", ".old-"):
        targets.add(p.name[1 : p.name.rindex(".old-")])
    for name in sorted(targets):
        advice = moved_aside_advice(dst.parent / name)
        if advice:
            log.warning("%s", advice)
            named += [old for old, _, why in moved_aside(dst.parent / name) if why is not None]
    return named


def _disk_usage(root: Path, max_entries: int) -> tuple[int, bool]:
    """Bytes used by ``root``'s first ``max_entries`` entries; whether that was all of them."""
    total, seen, stack = 0, 0, [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    seen += 1
                    if seen > max_entries:
                        return total, False
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except OSError:
            continue
    return total, True


def is_store(path: Path) -> bool:
    """Whether ``path`` is a jasper_mmap store: a directory whose manifest names our format."""
    from jasper_mmap.format.spec import FORMAT_NAME, MANIFEST

    try:  # never blocks on a FIFO; nesting bounded (NOTE [regular files only] in jasper_mmap/_fs/files.py)
        manifest = read_json(Path(path) / MANIFEST, what="manifest", fix="")
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME
    except (JasperError, OSError):
        return False


@contextlib.contextmanager
def publishing(
    dst: str | Path,
    *,
    overwrite: bool,
    is_ours: Callable[[Path], bool] = is_store,
    what: str = "a jasper_mmap store",
) -> Iterator[tuple[Path, Path]]:
    """Check ``dst``, yield ``(temporary directory, real destination)``, publish on success.

    The block writes into the temporary directory; when it returns, the directory is fsynced
    and published at the destination with one rename (:func:`publish_dir`; a replacement under
    the destination's writer lock, NOTE [one writer per store]). On any exception it is
    removed and nothing is published.
    """
    real = check_destination(dst, overwrite=overwrite, is_ours=is_ours, what=what)
    remove_stale_partials(real)
    tmp = partial_dir(real)
    try:
        yield tmp, real
        fsync_tree(tmp)
        publish_dir(tmp, real, replace=overwrite, is_ours=is_ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone once published
