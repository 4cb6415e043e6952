"""Render the history tables of docs/perf.jsonl into docs/performance.md.

    python scripts/render_perf.py           # rewrite the part between the markers
    python scripts/render_perf.py --check   # exit 1 if docs/performance.md is not current

One record per line, as the benchmark scripts write them (`--json docs/perf.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf-history:start -->", "<!-- perf-history:end -->"
TRAIN_ROWS = {
    "loader-free bound (one batch reused)": "bound steps/s",
    "create_loader, num_workers=0": "0",
    "create_loader, num_workers=2": "2",
    "create_loader, num_workers=4": "4",
    "gather floor (large rows only, index_select)": "floor",
    "in-RAM seed dataset, num_workers=4": "in-RAM",
    "create_loader (zarr), num_workers=0": "zarr 0",
    "create_loader (zarr), num_workers=4": "zarr 4",
}
ALONE_ROWS = {
    "raw bound: numpy gather per array from RAM": "raw bound",
    "create_loader, num_workers=0": "0",
    "create_loader, num_workers=2": "2",
    "create_loader, num_workers=4": "4",
    "in-RAM seed dataset, num_workers=4": "in-RAM",
    "create_loader (zarr), num_workers=0": "zarr 0",
    "create_loader (zarr), num_workers=4": "zarr 4",
}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def render(records: list[dict]) -> str:
    """The Markdown put between the markers."""
    runs: dict[tuple, dict] = {}  # (time, cmd) -> {"meta": record, section: {row: record}}
    for r in records:
        if r["bench"] == "train":
            run = runs.setdefault((r.get("time"), r.get("cmd")), {"meta": r})
            run.setdefault(r["section"], {})[r["row"]] = r
    train, alone = [], []
    for (time, _), run in runs.items():
        meta = run["meta"]
        lead = [str(time).replace("T", " "), meta.get("code") or "-", str(meta.get("rounds", "-"))]
        t, a = run.get("train", {}), run.get("loader_alone", {})
        train.append(
            lead
            + [
                f"{t[k]['steps_per_s']:.1f}"
                if k in t and c == "bound steps/s"
                else f"{t[k]['frac_bound']:.3f}"
                if k in t
                else "-"
                for k, c in TRAIN_ROWS.items()
            ]
        )
        alone.append(
            lead + [f"{a[k]['samples_per_s']:,.0f}" if k in a else "-" for k in ALONE_ROWS]
        )
    out = [
        "Training loop (`scripts/bench_train.py`): the loader-free bound in steps/s, then each",
        "row's fraction of it (median over rounds); columns 0 / 2 / 4 are `create_loader`'s",
        "`num_workers`, in-RAM is the in-RAM dataset with 4 worker processes, zarr 0 / 4 the",
        "same store converted to zarr (`--also-store`, in the same rounds).",
        "",
        *_table(["run", "code", "rounds", *TRAIN_ROWS.values()], train),
        "",
        "Loader alone in the same runs, samples/s (median over rounds):",
        "",
        *_table(["run", "code", "rounds", *ALONE_ROWS.values()], alone),
        "",
        "Other records (`bench_loader.py`: `loader`; `bench_large.py`: `large`;",
        "`bench_formats.py`: `formats`), samples/s, in file order:",
        "",
    ]
    other = [r for r in records if r["bench"] != "train"]
    rows = []
    for i, r in enumerate(other, 1):
        rates = "; ".join(f"{k} {v:,.0f}" for k, v in r["rates"].items())
        size = f"{r['store_bytes'] / 1e9:.2f} GB" if r.get("store_bytes") else "-"
        bench = r["bench"] + "".join(f", {k} {r[k]}" for k in ("format", "dtype") if r.get(k))
        rows.append([str(i), bench, size, rates + (f" ({r['from']})" if r.get("from") else "")])
    return "\n".join(out + _table(["#", "bench", "store", "rates"], rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is not current")
    p.add_argument("--jsonl", type=Path, default=ROOT / "docs" / "perf.jsonl")
    p.add_argument("--page", type=Path, default=ROOT / "docs" / "performance.md")
    args = p.parse_args()
    records = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    page = args.page.read_text()
    head, rest = page.split(START, 1)
    new = f"{head}{START}\n{render(records)}\n{END}{rest.split(END, 1)[1]}"
    if args.check:
        if new != page:
            print(f"{args.page} is not current: run python scripts/render_perf.py", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
