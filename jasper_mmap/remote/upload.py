"""Putting a local store on object storage, and publishing negatives generations there.

# NOTE [remote publish]
Object stores have no rename and no lock, so visibility is decided by the order of writes and
by conditional writes (``If-None-Match: *``):
- a store: every data object first, then its bundle of ``always`` bytes and its catalog
  (``jasper_remote.json``, which names the crc32 of the manifest it belongs to), then
  ``manifest.json``, last. Readers need
  ``manifest.json``: a store appears whole or not at all. Replacing a store of ours
  (``overwrite``) removes its ``manifest.json`` first, so no reader opens a half-replaced store;
  a prefix holding anything that is not a store of ours is never written into.
- a negatives generation ``N``: first a conditional create of ``negatives/gen-N.claim`` (of two
  publishers one gets ``N``, the other is told and tries ``N + 1``), then its data objects,
  bundle and catalog, then ``negatives/gen-N.json``, created conditionally, last. Readers take
  the highest ``N`` whose ``gen-N.json`` exists (at open and at ``reload_negatives()``). A publisher killed
  after its claim leaves a claimed number without a json: never read, skipped by the next.
- nothing on object storage is deleted by a publish: old generations stay until
  :func:`prune_generations` (``jasper-mmap prune URL --older-than 7d``) removes them by a time
  rule, there being no lease a run could hold on an object store: a generation goes once it
  has been *superseded* (a newer one published) for longer than ``older_than``, which should
  exceed the longest run (a run reads the generation it started with until its next
  ``reload_negatives()``, and a resume with ``negatives="saved"`` reads the saved one); the
  newest ``keep`` published generations always stay. Its ``gen-N.json`` goes first (no opener
  picks it from then on), then its data, bundle, catalog and claim. A number without a json
  below the newest published one (a publisher killed after its claim, or a prune killed
  midway) goes once its newest object is older than ``older_than``; one above it may be a
  publish under way and stays.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import read_json
from jasper_mmap.errors import RemoteStoreError, StoreExistsError, StoreNotFoundError
from jasper_mmap.format.spec import CONFIG, MANIFEST, NEGATIVES_DIR, POINTER, generation_name
from jasper_mmap.remote.cache import RemoteMirror
from jasper_mmap.remote.catalog import (
    BUNDLE,
    CATALOG,
    build_catalog,
    default_unit_rows,
    generation_bundle,
)
from jasper_mmap.remote.objects import ObjectStore

__all__ = ["upload_store", "publish_remote", "prune_generations"]

log = logging.getLogger(__name__)

_CLAIM = re.compile(r"^gen-(\d{6,})\.(claim|json)$")
#: any object of a generation: its data file or directory, json, catalog, bundle, claim
_GEN_OBJECT = re.compile(rf"^{NEGATIVES_DIR}/gen-(\d{{6,}})(?:/|\.[a-z.]+$)")


def _put_files(objects: ObjectStore, root: Path, rels: list[str], concurrency: int) -> None:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda rel: objects.put(rel, root / rel), rels))


def upload_store(
    store: str | Path,
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    unit_rows: int | None = None,
    concurrency: int = 8,
) -> dict[str, Any]:
    """Upload the local store ``store`` to ``url`` (NOTE [remote publish]); its catalog.

    Raises:
        StoreExistsError: something is at ``url`` already (``overwrite`` replaces a store of
            ours, never anything else).
    """
    root = Path(store)
    fix = "Pass a store made by convert-pt."
    manifest = read_json(root / MANIFEST, what="the store's manifest", fix=fix)
    pointer = read_json(root / NEGATIVES_DIR / POINTER, what="the negatives pointer", fix=fix)
    objects = ObjectStore(url, storage_options)
    existing = {m["path"]: m for m in objects.list()}
    if existing:
        ours = CATALOG in existing or not (set(existing) - {MANIFEST})
        if not overwrite or not ours:
            raise StoreExistsError(
                f"{url}: holds {len(existing)} objects already"
                + (
                    " (a store of ours). Pass overwrite=True (--overwrite) to replace it."
                    if ours
                    else f" and no {CATALOG}: not a store of ours; it is never written into. "
                    f"Choose an empty prefix."
                )
            )
        objects.delete(MANIFEST)  # readers stop opening it before anything changes
    t0 = time.monotonic()
    backend, n_pairs = manifest["backend"], int(manifest["counts"]["n_pairs"])
    g = int(pointer["generation"])
    files = dict(manifest["files"])
    files[CONFIG] = (root / CONFIG).stat().st_size
    if unit_rows is None:
        unit_rows = default_unit_rows(root, {**manifest["arrays"], **pointer["arrays"]}, backend)
    catalog, bundle = build_catalog(
        root, files, manifest["arrays"], backend, n_pairs, unit_rows, BUNDLE
    )
    gen_cat, gen_bundle = build_catalog(
        root, pointer["files"], pointer["arrays"], backend, n_pairs, unit_rows,
        generation_bundle(g),
    )  # fmt: skip
    gen_json = (root / NEGATIVES_DIR / f"{generation_name(g)}.json").read_bytes()
    gen_cat["json_crc32"] = zlib.crc32(gen_json)
    manifest_raw = (root / MANIFEST).read_bytes()
    catalog["manifest_crc32"] = zlib.crc32(manifest_raw)
    rels = sorted(files) + sorted(pointer["files"])
    _put_files(objects, root, rels, concurrency)
    objects.put(BUNDLE, bundle)
    objects.put(generation_bundle(g), gen_bundle)
    objects.put(f"{NEGATIVES_DIR}/{generation_name(g)}.catalog.json", json.dumps(gen_cat).encode())
    objects.put(f"{NEGATIVES_DIR}/{generation_name(g)}.json", gen_json)
    objects.put(CATALOG, json.dumps(catalog).encode())
    if existing:  # a replaced store's objects that the new one does not have: ours, removed
        keep = set(rels) | {
            CATALOG,
            BUNDLE,
            generation_bundle(g),
            MANIFEST,
            f"{NEGATIVES_DIR}/{generation_name(g)}.json",
            f"{NEGATIVES_DIR}/{generation_name(g)}.catalog.json",
        }
        for path in sorted(set(existing) - keep):
            objects.delete(path)
    objects.put(MANIFEST, manifest_raw)  # last: the store appears
    size = sum(files.values()) + sum(pointer["files"].values())
    log.info(
        "uploaded %s to %s: %d objects, %.1f MB in %.1f s",
        root,
        url,
        len(rels) + 7,
        size / 1e6,
        time.monotonic() - t0,
    )
    return catalog


def _next_number(objects: ObjectStore) -> int:
    numbers = [
        int(m.group(1))
        for meta in objects.list(f"{NEGATIVES_DIR}/")
        if (m := _CLAIM.match(meta["path"].rsplit("/", 1)[-1]))
    ]
    return max(numbers, default=-1) + 1


def publish_remote(
    mirror: RemoteMirror, negs: Any, tiers: Any, *, sources: dict[str, Any] | None = None
) -> int:
    """Publish ``negs``/``tiers`` as the next generation of the store on object storage
    (NOTE [remote publish]), validated and written in this node's mirror first; the number."""
    from jasper_mmap.stores.generations import publish_generation

    objects = mirror.objects
    mirror.sync_negatives()
    for _ in range(64):
        g = _next_number(objects)
        try:
            objects.put(f"{NEGATIVES_DIR}/{generation_name(g)}.claim", b"", create=True)
            break
        except RemoteStoreError as e:
            if not getattr(e, "lost", False):
                raise
    else:
        raise RemoteStoreError(f"{mirror.url}: 64 publishers raced for a generation number")
    # validated and written locally (as a local publish), under the number claimed
    publish_generation(mirror.path, negs, tiers, keep=10**9, sources=sources, number=g)
    root = mirror.path
    gen = read_json(root / NEGATIVES_DIR / f"{generation_name(g)}.json", what="generation", fix="")
    cat, bundle = build_catalog(
        root,
        gen["files"],
        gen["arrays"],
        mirror.catalog["backend"],
        int(mirror.catalog["n_pairs"]),
        mirror.unit_rows,
        generation_bundle(g),
    )
    raw = (root / NEGATIVES_DIR / f"{generation_name(g)}.json").read_bytes()
    cat["json_crc32"] = zlib.crc32(raw)
    _put_files(objects, root, sorted(gen["files"]), mirror.concurrency)
    objects.put(generation_bundle(g), bundle)
    objects.put(f"{NEGATIVES_DIR}/{generation_name(g)}.catalog.json", json.dumps(cat).encode())
    mirror._write_bytes(
        mirror.root / "have" / f"{generation_name(g)}.catalog.json", json.dumps(cat).encode()
    )  # (whole or not at all: read after a crash, NOTE [durability])
    if "negatives" in cat["groups"]:
        mirror.mark_all(g)
    try:
        objects.put(f"{NEGATIVES_DIR}/{generation_name(g)}.json", raw, create=True)
    except RemoteStoreError as e:
        if getattr(e, "lost", False):
            raise RemoteStoreError(
                f"{objects.where(NEGATIVES_DIR)}/{generation_name(g)}.json: another publisher wrote "
                f"generation {g} although this one claimed it (its claim object was removed by "
                f"hand?). Publish again."
            ) from None
        raise
    log.info("published negatives generation %d to %s", g, mirror.url)
    return g


def prune_generations(
    url: str,
    older_than: float,
    *,
    keep: int = 2,
    storage_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Remove the negatives generations of the store at ``url`` superseded more than
    ``older_than`` seconds ago, keeping the newest ``keep`` published ones (NOTE [remote
    publish]). Returns ``{"removed": [N, ...], "kept": [N, ...], "objects": n, "bytes": n}``
    (with ``dry_run``, what would be removed; nothing is)."""
    if keep < 1:
        raise ValueError(f"keep={keep}: the newest generation is always kept; pass keep >= 1")
    if older_than < 0:
        raise ValueError(f"older_than={older_than}: a number of seconds >= 0")
    objects = ObjectStore(url, storage_options)
    try:
        objects.get_ranges(CATALOG, [(0, 1)])  # (one byte: is it there)
    except StoreNotFoundError:
        raise StoreNotFoundError(
            f"{url}: no {CATALOG} there: not a store uploaded by jasper_mmap; nothing of it "
            f"is removed. Check the URL."
        ) from None
    found: dict[int, list[dict[str, Any]]] = {}
    for meta in objects.list(f"{NEGATIVES_DIR}/"):
        m = _GEN_OBJECT.match(meta["path"])
        if m:
            found.setdefault(int(m.group(1)), []).append(meta)
    when = {
        n: meta["last_modified"].timestamp()
        for n, metas in found.items()
        for meta in metas
        if meta["path"] == f"{NEGATIVES_DIR}/{generation_name(n)}.json"
    }
    published = sorted(when)
    cutoff = time.time() - older_than
    kept = set(published[-keep:])
    remove = []
    for n, metas in sorted(found.items()):
        if n in kept or not published:
            continue
        if n in when:  # published: superseded when the next one was
            later = [g for g in published if g > n]
            if when[later[0]] <= cutoff:
                remove.append(n)
        elif n < published[-1] and max(m["last_modified"].timestamp() for m in metas) <= cutoff:
            remove.append(n)
    n_objects = sum(len(found[n]) for n in remove)
    n_bytes = sum(int(m["size"]) for n in remove for m in found[n])
    if not dry_run:
        for n in remove:
            first = f"{NEGATIVES_DIR}/{generation_name(n)}.json"  # no opener picks it now
            for meta in sorted(found[n], key=lambda m: m["path"] != first):
                objects.delete(meta["path"])
        log.info(
            "%s: removed negatives generations %s (%d objects, %.1f MB)",
            url,
            remove,
            n_objects,
            n_bytes / 1e6,
        )
    return {
        "removed": remove,
        "kept": sorted(set(found) - set(remove)),
        "objects": n_objects,
        "bytes": n_bytes,
    }
