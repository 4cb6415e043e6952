"""Plot loader throughput against store size from the benchmarks' JSON lines.

    python scripts/plot_throughput.py docs/perf.jsonl --out docs/throughput_vs_size.png

Reads the lines that `bench_loader.py --json` and `bench_large.py --json` append, and draws
samples/s against the store's size for our loader (num_workers 0 and 2) and for the in-RAM
per-sample baseline, which stops where RAM ends (it needs the whole dataset in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SERIES = {
    "jasper_mmap, num_workers=0": ["(b) jasper_mmap create_loader, num_workers=0"],
    "jasper_mmap, num_workers=2 (4 at 32 GB)": [
        "(b) jasper_mmap create_loader, num_workers=2",
        "full pass, num_workers=2",
        "full pass, thread:4",
    ],
    "in-RAM per-sample baseline (seed)": ["(a) in-RAM per-sample baseline, num_workers=0"],
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("jsonl", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/throughput_vs_size.png"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, keys in SERIES.items():
        latest = {  # a later record of the same figure at the same size wins
            round(r["store_bytes"] / 1e9, 2): r["rates"][k]
            for r in rows
            if "rates" in r  # the training benchmark's records have no store-size series
            for k in keys
            if k in r["rates"]
        }
        pts = sorted(latest.items())
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    ax.axvline(ram, color="grey", linestyle="--", label=f"RAM ({ram:.0f} GB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("store size (GB)")
    ax.set_ylabel("samples/s (B=128, D=384, n_neg=12)")
    ax.set_title("Loader throughput vs dataset size (2 cores, 24 GiB RAM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} from {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
