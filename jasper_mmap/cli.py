"""``jasper-mmap verify|info STORE``, ``upload STORE URL`` and ``prune URL``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jasper_mmap._fs.files import as_path, describe_path
from jasper_mmap.errors import JasperError
from jasper_mmap.format.spec import CONFIG, MANIFEST

__all__ = ["main", "EXIT_BROKEN_PIPE"]

#: exit status when the reader of our output went away (``info STORE | head -1``), as a shell
#: reports a process killed by SIGPIPE
EXIT_BROKEN_PIPE = 141


def _dataset_stores(src: Path) -> list[Path]:
    """The stores of dataset directory ``src`` that opening it made (beside it, or in the
    cache for a read-only directory), for its ``.pt`` files or its ``dataset.h5``."""
    from jasper_mmap.dataset.resolve import STORE_DIRNAME, store_location

    src = src.expanduser().absolute()
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jasper_mmap"
    found = []
    for fmt in ("pt", "hdf5"):
        suffix = "" if fmt == "pt" else f"_{fmt}"
        for store in (src / f"{STORE_DIRNAME}{suffix}", store_location(src, cache, fmt)):
            # anything there, a FIFO in place of the manifest too: _damaged names it
            if os.path.lexists(store / MANIFEST):
                found.append(store)
    return found


def _damaged(src: Path, store: Path) -> str | None:
    """What to say of dataset directory ``src``'s store ``store`` whose manifest is no regular
    file (a FIFO, a device, a link loop...), or None when it is one."""
    manifest = store / MANIFEST
    if manifest.is_file():
        return None
    return (
        f"{src}: is a dataset directory, not a store, and its store {store} is damaged: "
        f"{manifest} {describe_path(manifest)}, not a regular file. Remove {store} (opening "
        f"{src} converts it again), or restore its manifest.json."
    )


_PASS_STORE = (
    "Pass the store directory that holds manifest.json (one made by `convert-pt DATASET_DIR "
    "STORE`, or the .jasper_mmap_store inside a dataset directory that was opened)."
)


def _not_a_store(path: str, command: str) -> str | None:
    """What to say instead of opening ``path`` when it is plainly no store: an empty path, a
    file, a FIFO or device, a symbolic link loop or to nothing, or a dataset directory (naming
    the store opening it made, if any, and whether it is damaged). None: let the store checks
    speak."""
    if not path:  # Path("") is the current directory, which was not asked for
        return f"{path!r}: the store path is empty. {_PASS_STORE}"
    try:  # a NUL, a ~user with no such user, a name past NAME_MAX: said, never a traceback
        as_path(path, "the store's path")
    except JasperError as e:
        return f"{e} {_PASS_STORE}"
    try:
        return _not_a_store_why(Path(path), command)
    except OSError:  # unreadable: the store checks name the problem
        return None


def _not_a_store_why(p: Path, command: str) -> str | None:
    if not p.exists():
        what = describe_path(p)  # a symbolic link loop, a link to nothing: not "missing"
        if what == "does not exist":
            return None  # read_raw_manifest says so, with the fix
        return f"{p}: {what}, not a store directory. {_PASS_STORE}"
    if (p / MANIFEST).exists():
        return None
    if not p.is_dir():
        parent = p.parent
        if (parent / MANIFEST).is_file():
            return (
                f"{p}: is a file of the store {parent}, not a store. Run `jasper-mmap "
                f"{command} {parent}`."
            )
        stores = _dataset_stores(parent) if (parent / CONFIG).is_file() else []
        if stores:
            return (
                f"{p}: is not a directory but a file of dataset directory {parent}, which has "
                f"the store {stores[0]}. Run `jasper-mmap {command} {stores[0]}`."
            )
        if not p.is_file():  # a FIFO, a device, a socket: say which
            return f"{p}: {describe_path(p)}, not a store directory. {_PASS_STORE}"
        return None  # read_raw_manifest says what a file is not
    stores = _dataset_stores(p) if (p / CONFIG).is_file() else []
    if stores and (why := _damaged(p, stores[0])) is not None:
        return why
    if stores:
        also = "".join(f" (also {s})" for s in stores[1:])
        return (
            f"{p}: is a dataset directory, not a store; its store, converted when the dataset "
            f"was opened, is {stores[0]}{also}. Run `jasper-mmap {command} {stores[0]}`."
        )
    return None


def _mirror(args: argparse.Namespace) -> None:
    """An object-store URL: this node's mirror of it (NOTE [node cache]) is what is read."""
    from jasper_mmap.remote import RemoteMirror, is_remote

    if is_remote(args.store):
        args.url = args.store
        args.mirror = RemoteMirror(args.store, cache_dir=args.cache_dir)
        args.store = str(args.mirror.open())


def _info(args: argparse.Namespace) -> int:
    from jasper_mmap.stores.verify import store_info

    _mirror(args)
    info = store_info(args.store)
    if getattr(args, "url", None):
        info["url"] = args.url
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    c = info["counts"]
    print(
        f"{info['store']}: {info['backend']} store, format version {info['format_version']}, "
        f"{info['bytes'] / 1e9:.2f} GB of arrays"
    )
    print(
        f"  {c['n_pairs']} pairs, {c['n_questions']} questions, {c['n_sources']} sources, {c['n_keywords']} "
        f"keywords, {c['n_clusters']} clusters, D={c['embedding_dim']}, n_neg={c['n_neg']}"
    )
    print(
        f"  splits: {', '.join(f'{k} {v}' for k, v in info['splits'].items())}; negatives generation "
        f"{info['negatives_generation']}"
    )
    for name, a in info["arrays"].items():
        print(
            f"  {name:28s} {str(a['shape']):18s} {a['stored_dtype']:9s} {a['bytes'] / 1e6:10.1f} MB  {a['file']}"
        )
    for w in info["warnings"]:
        print(f"  warning: {w}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from jasper_mmap.stores.verify import verify_store

    _mirror(args)
    mirror = getattr(args, "mirror", None)
    if mirror is not None:  # every unit fetched and checked against the catalog, then read
        import numpy as np

        gen = mirror.sync_negatives()
        mirror.prefetch(np.arange(mirror.units) * mirror.unit_rows, gen)
        print(
            f"{args.url}: every object fetched into {args.store} and checked against its "
            f"catalog ({mirror.summary()['bytes_fetched'] / 1e6:.1f} MB fetched now)"
        )
    report = verify_store(args.store, progress=False if args.quiet else None)
    print(report)
    return 0 if report.ok else 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


_STORE_HELP = (
    "store directory (it holds manifest.json): one made by convert-pt, or the "
    ".jasper_mmap_store inside a dataset directory that was opened"
)


def _upload(args: argparse.Namespace) -> int:
    from jasper_mmap.remote import upload_store

    upload_store(args.store, args.url, overwrite=args.overwrite, unit_rows=args.unit_rows)
    print(f"uploaded {args.store} to {args.url}")
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or a number of seconds."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _UNITS:
            value = float(t[:-1]) * _UNITS[t[-1]]
        else:
            value = float(t)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a duration such as 7d, 12h, 30m, 90s or a number of seconds"
        )
    return value


def _at_least_one(text: str) -> int:
    """``--keep``: a whole number >= 1 (the newest generation always stays)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a whole number >= 1 (the newest generation always stays)"
        )
    return value


def _prune(args: argparse.Namespace) -> int:
    from jasper_mmap.remote import prune_generations

    got = prune_generations(args.store, args.older_than, keep=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    removed = ", ".join(map(str, got["removed"])) or "none"
    print(
        f"{args.store}: {verb} negatives generations {removed} ({got['objects']} objects, "
        f"{got['bytes'] / 1e6:.1f} MB); kept {', '.join(map(str, got['kept'])) or 'none'}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jasper-mmap", description="Inspect, check and upload jasper_mmap stores."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify", help="check the structure, then read every array once and check it"
    )
    v.add_argument("store", help=_STORE_HELP + ", or an object-store URL (s3://...)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    v.add_argument("--cache-dir", help="node cache for a URL (default: ~/.cache/jasper_mmap)")
    v.set_defaults(run=_verify)
    i = sub.add_parser("info", help="summary of a store (from its manifest; reads no data)")
    i.add_argument("store", help=_STORE_HELP + ", or an object-store URL (s3://...)")
    i.add_argument("--cache-dir", help="node cache for a URL (default: ~/.cache/jasper_mmap)")
    i.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object (for scripts)"
    )
    i.set_defaults(run=_info)
    u = sub.add_parser(
        "upload", help="put a store on object storage (it appears there whole, or not at all)"
    )
    u.add_argument("store", help=_STORE_HELP)
    u.add_argument("url", help="where: s3://bucket/prefix (credentials: the AWS_* environment)")
    u.add_argument("--overwrite", action="store_true", help="replace a store of ours there")
    u.add_argument(
        "--unit-rows",
        type=int,
        default=None,
        help="pair rows a node fetches at once (default: ~8 MiB of steering and negatives rows)",
    )
    u.set_defaults(run=_upload)
    p = sub.add_parser(
        "prune",
        help="remove negatives generations on object storage superseded longer ago than "
        "--older-than (the newest --keep stay)",
    )
    p.add_argument("store", metavar="url", help="the store's URL (s3://bucket/prefix)")
    p.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        help="superseded at least this long ago (7d, 12h, 30m, 90s): longer than your "
        "longest run, which reads the generation it started with",
    )
    p.add_argument(
        "--keep", type=_at_least_one, default=2, help="newest generations kept (default 2)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    p.set_defaults(run=_prune)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Exit status 0: ok (verify: no problems; warnings allowed); 1: problems
    found, or the store cannot be opened; 141: the output pipe was closed early."""
    args = _parser().parse_args(argv)
    try:
        from jasper_mmap.remote import is_remote

        if args.command == "prune" and not is_remote(args.store):
            print(
                f"jasper-mmap: error: {args.store!r} is not an object-store URL (s3://...): "
                f"prune removes generations on object storage; a local store keeps "
                f"its newest ones itself (publish_negatives(keep=...)).",
                file=sys.stderr,
            )
            return 1
        if not is_remote(args.store) and (why := _not_a_store(args.store, args.command)):
            print(f"jasper-mmap: error: {why}", file=sys.stderr)
            return 1
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except JasperError as e:
        print(f"jasper-mmap: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
