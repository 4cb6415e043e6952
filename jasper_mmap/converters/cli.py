"""``convert-pt SRC DST``: the command-line face of :func:`jasper_mmap.converters.convert_pt`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from jasper_mmap.converters.convert import DTYPES, FORMATS, convert_pt
from jasper_mmap.errors import JasperError, StoreExistsError
from jasper_mmap.sources.directory import STORAGE_FORMATS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert-pt",
        description="Convert a directory of JASPER .pt artifacts into a memory-mapped store "
        "(streaming: no artifact is ever held whole in RAM).",
    )
    p.add_argument("src", help="dataset directory: config.json and the .pt files, or dataset.h5")
    p.add_argument(
        "dst",
        help="store directory to create (appears only when complete and verified), or an "
        "object-store URL (s3://bucket/prefix: converted locally, then uploaded; it appears "
        "there whole or not at all)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="store backend (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="keep",
        help="precision of embeddings and steering vectors on disk; readers always return "
        "float32 (default: %(default)s)",
    )
    p.add_argument(
        "--source",
        choices=STORAGE_FORMATS,
        default="auto",
        help="which files of SRC to read: the .pt files, dataset.h5 (hdf5), or auto "
        "(dataset.h5 when present and h5py is installed) (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it is a jasper_mmap store (nothing else is ever replaced)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert NaN/Inf embedding values instead of refusing them",
    )
    p.add_argument(
        "--unit-rows",
        type=int,
        default=None,
        help="DST on object storage: pair rows a node fetches at once (default: ~8 MiB)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notices")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 bad input, 2 usage)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="convert-pt: %(message)s",
        stream=sys.stderr,
    )
    t0 = time.perf_counter()
    try:
        from jasper_mmap.remote import is_remote

        if is_remote(args.dst):
            dst = _convert_and_upload(args)
        else:
            dst = convert_pt(
                args.src,
                args.dst,
                format=args.format,
                dtype=args.dtype,
                overwrite=args.overwrite,
                allow_nonfinite=args.allow_nonfinite,
                progress=False if args.quiet else None,
                source=args.source,
            )
    except (JasperError, ImportError) as e:  # ImportError: h5py missing for dataset.h5
        print(f"convert-pt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert-pt: interrupted; nothing was published", file=sys.stderr)
        return 130
    if not args.quiet:
        _print(f"wrote {dst} ({args.format}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _convert_and_upload(args: argparse.Namespace) -> str:
    """Convert into a temporary directory of the node cache, upload, remove it."""
    import shutil
    import tempfile

    from jasper_mmap.remote import default_cache_dir, upload_store
    from jasper_mmap.remote.objects import ObjectStore

    if ObjectStore(args.dst).list() and not args.overwrite:  # refused before converting
        raise StoreExistsError(
            f"{args.dst}: holds objects already. Pass --overwrite to replace a store of ours "
            f"there (anything else is never written into), or choose an empty prefix."
        )
    work = default_cache_dir() / "uploads"
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="convert-", dir=work))
    try:
        local = convert_pt(
            args.src,
            tmp / "store",
            format=args.format,
            dtype=args.dtype,
            allow_nonfinite=args.allow_nonfinite,
            progress=False if args.quiet else None,
            source=args.source,
        )
        upload_store(local, args.dst, overwrite=args.overwrite, unit_rows=args.unit_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return args.dst


def _print(line: str) -> None:
    """Print for people; a closed pipe (``convert-pt ... | head``) is not an error."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
