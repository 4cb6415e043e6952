"""``jasper-mmap verify STORE`` and ``jasper-mmap info STORE``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import JasperError

__all__ = ["main", "EXIT_BROKEN_PIPE"]

#: exit status when the reader of our output went away (``info STORE | head -1``), as a shell
#: reports a process killed by SIGPIPE
EXIT_BROKEN_PIPE = 141


def _info(args: argparse.Namespace) -> int:
    from .verify import store_info

    info = store_info(args.store)
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
    from .verify import verify_store

    report = verify_store(args.store, progress=False if args.quiet else None)
    print(report)
    return 0 if report.ok else 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Exit status 0: ok (verify: no problems; warnings allowed); 1: problems
    found, or the store cannot be opened; 141: the output pipe was closed early."""
    ap = argparse.ArgumentParser(
        prog="jasper-mmap", description="Inspect and check jasper_mmap stores."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify", help="check the structure, then read every array once and check it"
    )
    v.add_argument("store")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    v.set_defaults(run=_verify)
    i = sub.add_parser("info", help="summary of a store (from its manifest; reads no data)")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=_info)
    args = ap.parse_args(argv)
    try:
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
