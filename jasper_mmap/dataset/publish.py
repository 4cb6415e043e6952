"""``publish_negatives``: hot reload from Python (NOTE [hot reload] in
stores/generations.py), for a store or a dataset directory, arrays or ``.pt`` paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jasper_mmap.errors import ArtifactError
from jasper_mmap.remote import RemoteMirror, is_remote, publish_remote
from jasper_mmap.sources.pt.reader import open_tensor
from jasper_mmap.stores.generations import KEEP_GENERATIONS, publish_generation

__all__ = ["publish_negatives", "KEEP_GENERATIONS"]


def publish_negatives(
    path: str | Path,
    hard_negatives: Any,
    negative_tiers: Any,
    *,
    keep: int = KEEP_GENERATIONS,
    sources: dict[str, Any] | None = None,
    storage_format: str = "auto",
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Validate and publish new negatives as the next generation of a store.

    Args:
        path: a store, or a dataset directory (its store is used, converted first if there
            is none; see :func:`jasper_mmap.dataset.resolve.resolve_dataset`).
        hard_negatives: ``[N_pairs, n_neg]`` source rows: tensor, numpy array, ``.pt`` path, or
            a reader of :mod:`jasper_mmap.converters` (``read_rows``).
        negative_tiers: ``[N_pairs, n_neg]`` tiers (usually 1..4), same forms.
        keep: generations kept besides those still mapped by a reader (at least 2).
        sources: fingerprints of the ``.pt`` files the arrays came from; by default those of
            the live generation are carried forward (they say which ``.pt`` files were last
            taken in, so unchanged ``.pt`` files are never republished over this one).
        storage_format, cache_dir: for a dataset directory, the values the dataset was
            opened with, so the negatives reach the store the trainer reads. For an
            object-store URL (``s3://...``), ``cache_dir`` is the node cache and
            ``storage_options`` the client's options: the generation is validated and written
            in this node's mirror, then uploaded, visible whole or not at all (NOTE [remote
            publish] in jasper_mmap/remote/upload.py). A directory
            holding both ``.pt`` files and ``dataset.h5`` with both stores made is refused
            under ``"auto"`` (which one a trainer reads is not knowable here).

    Returns:
        The new generation number. Readers switch at their next ``reload_negatives()``.

    Raises:
        ArtifactError: a ``keep`` or ``sources`` of the wrong kind (checked before anything
            is converted or published), uint64 values past int64,
            wrong shape, non-integer dtype, a negative past the sources, or an
            ambiguous dataset directory (see ``storage_format``). Nothing is published and
            the old generation stays in use. (Tiers outside 1..4 are published with a
            warning: the in-RAM dataset passed tiers through.)
        StoreExistsError: the next generation number would reach ``MAX_GENERATION`` (a
            stray ``gen-NNNNNN`` file of a huge number, named in the message), or the publish
            lock is not a regular file. Nothing is published.
        StoreWriteError: the disk is full, the filesystem read-only, permission denied.
            Nothing is published; leftovers are removed now or by the next publish.
    """
    from jasper_mmap.dataset.resolve import resolve_dataset
    from jasper_mmap.format.schema import sources_problem

    # arguments first: nothing is published (or converted) with one that is wrong
    if type(keep) is not int:  # below 2 is taken as 2, as before
        raise ArtifactError(
            f"keep should be an integer (generations kept, at least 2 are), but got "
            f"keep={keep!r:.40}. Pass e.g. keep=2."
        )
    if sources is not None and (why := sources_problem(sources)) is not None:
        raise ArtifactError(
            f"sources {why}. Pass the fingerprints of the negatives files the arrays came "
            f"from (file name -> jasper_mmap.sources.fingerprints.fingerprint(path)), or leave it out."
        )
    if is_remote(path):
        mirror = RemoteMirror(str(path), cache_dir, storage_options)
        mirror.open()
        return publish_remote(mirror, *_arrays(hard_negatives, negative_tiers), sources=sources)
    store_path = resolve_dataset(
        path,
        cache_dir,
        check_sources=False,  # negatives are not a staleness
        storage_format=storage_format,
        for_publish=True,
    ).store
    negs, tiers = _arrays(hard_negatives, negative_tiers)
    return publish_generation(store_path, negs, tiers, keep=keep, sources=sources)


def _arrays(*values: Any) -> list[Any]:
    """Each value as given, or the reader of the ``.pt`` file it names."""
    return [open_tensor(Path(v)) if isinstance(v, str | os.PathLike) else v for v in values]
