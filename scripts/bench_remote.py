"""A store read from object storage (moto S3 on loopback) against a plain download and the local store.

    PYTHONPATH=. python scripts/bench_remote.py --store bench_out/store_200000 --rounds 4
    PYTHONPATH=. python scripts/bench_remote.py --store bench_out/store_200000_zarr --format-label zarr

moto.server runs in its own process (loopback only); the store is uploaded once with
``upload_store``. Then, B=512, worker_mode="thread":
  1. upload time and MB/s;
  2. T_plain: every object of the store fetched with obstore directly, 16 MiB ranges, 16 threads,
     os.pwrite into files; T_cold: a fresh cache_dir, create_loader(url) and one full pass over
     the train batches; interleaved plain, cold, plain, cold (``--cold-rounds``), each in a
     fresh process (as a run starts: a long-lived process downloads faster from its second
     download on, into memory it has freed), then a warm pass over the cache just filled. Ratio
     T_cold / T_plain per round; where the cold time goes (open / ensure waits); CPU seconds of
     this process and of the server for each, and the CPU floor of the cold epoch on this
     machine: (CPU of the plain download + CPU of the warm pass) / cores;
  3. warm cache: samples/s over ``--batches`` batches after 20, the filled cache against the
     local store (partition=True, the catalog's unit_rows), interleaved local, remote, remote, local,
     ... each round a new loader; then one loader each, kept, ``--alternations`` chunks of 150
     batches of one then the other (less noisy: a slow drift of the machine hits both alike);
  4. bytes fetched per node, 1 node and 2 simulated nodes (each its own fresh cache_dir),
     against the whole files + the pair-keyed (sparse) bytes / W.
``--throttle-mbit N`` limits what the server sends to N Mbit/s (``tc`` on the loopback interface,
for its port only; needs root; removed at the end): a network link's pace, where the download
leaves the cores free, as on a real node. Prints one JSON summary line last (docs/perf.jsonl
is not written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import obstore

from jasper_mmap import create_loader
from jasper_mmap.remote import upload_store
from jasper_mmap.remote.cache import RemoteMirror

B, THREADS = 512, 16
ENV = {"AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
       "AWS_REGION": "us-east-1"}  # fmt: skip
TIMES: dict[str, float] = {}  # seconds inside RemoteMirror calls, by "method@thread"
_tl = threading.Lock()


def timed(name: str):  # script-side instrumentation of the mirror (wraps, changes nothing)
    orig = getattr(RemoteMirror, name)

    def wrapper(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            key = (
                f"{name}@{'fetch-ahead' if 'fetch' in threading.current_thread().name else 'main'}"
            )
            with _tl:
                TIMES[key] = TIMES.get(key, 0.0) + time.perf_counter() - t

    setattr(RemoteMirror, name, wrapper)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ep = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(ep, timeout=1)
            break
        except OSError as e:
            if hasattr(e, "code"):  # an HTTP answer: up
                break
            time.sleep(0.1)
    return proc, ep


def throttle(port: int, mbit: int) -> None:
    """Limit what the server on ``port`` sends over the loopback interface to ``mbit`` Mbit/s
    (``tc``: an htb class for that source port; root only): a network link's pace, so that
    the download does not take every core of this machine. :func:`unthrottle` removes it."""
    out = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    if "noqueue" not in out.stdout:
        raise SystemExit(f"lo has a queueing discipline already ({out.stdout.strip()}): not ours")
    for cmd in (
        "qdisc add dev lo root handle 1: htb default 10",
        "class add dev lo parent 1: classid 1:10 htb rate 100gbit",
        f"class add dev lo parent 1: classid 1:20 htb rate {mbit}mbit",
        f"filter add dev lo parent 1: protocol ip u32 match ip sport {port} 0xffff flowid 1:20",
    ):
        subprocess.run(["tc", *cmd.split()], check=True)


def unthrottle() -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def plain_download(url: str, dest: Path, rng: int) -> tuple[float, int]:
    """Every object under ``url``: 16 MiB range GETs, 16 threads, pwrite. (seconds, bytes)"""
    store = obstore.store.from_url(url, client_options={"allow_http": True})
    t0 = time.perf_counter()
    objs = [m for batch in obstore.list(store) for m in batch]
    fds, jobs = {}, []
    for m in objs:
        p = dest / m["path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        fds[m["path"]] = fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, m["size"])
        step = rng or m["size"] or 1
        jobs += [(m["path"], a, min(a + step, m["size"])) for a in range(0, m["size"], step)]

    def one(job):
        path, a, b = job
        os.pwrite(fds[path], obstore.get_range(store, path, start=a, end=b), a)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, jobs))
    for fd in fds.values():
        os.close(fd)
    return time.perf_counter() - t0, sum(m["size"] for m in objs)


def _cpu(server_pid: int) -> tuple[float, float]:
    """CPU seconds so far of this process and of the server process."""
    import psutil

    r = resource.getrusage(resource.RUSAGE_SELF)
    m = psutil.Process(server_pid).cpu_times()
    return r.ru_utime + r.ru_stime, m.user + m.system


def child(what: str, url: str, server_pid: int, tmp: Path) -> dict:
    """One timed job in this (fresh) process: ``plain`` or ``cold`` (+ a warm pass)."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    try:
        c0 = _cpu(server_pid)
        if what == "plain":
            t, nbytes = plain_download(url, d, 16 << 20)
            c1 = _cpu(server_pid)
            return {"t": t, "bytes": nbytes, "cpu": [c1[0] - c0[0], c1[1] - c0[1]]}
        for name in ("open", "ensure", "prefetch"):  # (only here: it costs the warm path)
            timed(name)
        t, n, summ = full_pass(url, d, 4)
        c1 = _cpu(server_pid)
        tw = time.perf_counter()
        warm = sum(1 for _ in create_loader(url, "train", B, num_workers=4, cache_dir=d))
        tw = time.perf_counter() - tw
        c2 = _cpu(server_pid)
        return {"t": t, "batches": n, "summary": summ, "cpu": [c1[0] - c0[0], c1[1] - c0[1]],
                "times": TIMES, "warm_t": tw, "warm_batches": warm,
                "warm_cpu": [c2[0] - c1[0], c2[1] - c1[1]]}  # fmt: skip
    finally:
        shutil.rmtree(d, ignore_errors=True)


def in_child(what: str, url: str, server_pid: int, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--child-url", url, "--child-server",
           str(server_pid), "--tmp", str(tmp), "--batch-size", str(B)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def full_pass(url, cache: Path, workers: int, **kw) -> tuple[float, int, dict]:
    """create_loader on a fresh cache + one full pass: (seconds, batches, mirror summary)"""
    t0 = time.perf_counter()
    loader = create_loader(url, "train", B, num_workers=workers, cache_dir=cache, **kw)
    n = sum(1 for _ in loader)
    return time.perf_counter() - t0, n, loader.dataset_obj._remote.summary()


def _epochs(loader):
    """Batches of epochs 1, 2, ... one after the other (epoch 0 is the cold one)."""
    from jasper_mmap import set_epoch

    epoch = 1
    while True:
        set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def rate(where, workers: int, batches: int, **kw) -> float:
    loader = create_loader(where, "train", B, num_workers=workers, **kw)
    it, n = _epochs(loader), 0
    for _ in range(20):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        n += next(it)["question_emb"].shape[0]
    return n / (time.perf_counter() - t)


ALT_BATCHES = 150


def alternate(store, url, cache, workers: int, unit_rows: int, n: int) -> tuple[float, list]:
    """One loader on the local store and one on the filled cache, each kept across epochs;
    ``ALT_BATCHES`` batches of one, then of the other, ``n`` times (A B, B A...): slow drifts
    of a shared machine hit both alike. (remote/local of all batches, of each alternation)"""
    a = _epochs(create_loader(store, "train", B, num_workers=workers, partition=True,
                              unit_rows=unit_rows))  # fmt: skip
    b = _epochs(create_loader(url, "train", B, num_workers=workers, cache_dir=cache))
    for g in (a, b):
        for _ in range(50):
            next(g)
    ta = tb = 0.0
    pairs = []
    for i in range(n):
        took = {}
        for name, g in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            t = time.perf_counter()
            for _ in range(ALT_BATCHES):
                next(g)
            took[name] = time.perf_counter() - t
        ta, tb = ta + took["a"], tb + took["b"]
        pairs.append(took["a"] / took["b"])
    return ta / tb, pairs


def spread(xs: list[float], fmt: str = ".2f") -> str:
    return (f"{', '.join(format(x, fmt) for x in xs)} (median {statistics.median(xs):{fmt}}, "
            f"spread {min(xs):{fmt}}-{max(xs):{fmt}})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--store", type=Path, default=Path("/work/bench_out/store_200000"))
    ap.add_argument("--batch-size", type=int, default=512, help="B of every loader")
    ap.add_argument("--format-label", default="safetensors")
    ap.add_argument("--rounds", type=int, default=4, help="warm-cache rounds (local, remote)")
    ap.add_argument("--cold-rounds", type=int, default=2, help="plain, cold rounds")
    ap.add_argument("--batches", type=int, default=200, help="timed batches a warm round")
    ap.add_argument(
        "--alternations", type=int, default=40, help="warm: A/B chunks, one loader each"
    )
    ap.add_argument("--workers", default="4,0", help="num_workers values of the warm rounds")
    ap.add_argument("--tmp", type=Path, default=Path("/work/bench_out/remote_tmp"))
    ap.add_argument("--unit-rows", type=int, help="upload_store unit_rows (default: its own)")
    ap.add_argument("--plain-range", type=int, default=16, help="MiB a plain GET; 0: whole")
    ap.add_argument("--skip", default="", help="comma-separated: cold,warm,nodes")
    ap.add_argument("--throttle-mbit", type=int, help="server's bandwidth on loopback (tc; root)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one timed job (in_child)
    ap.add_argument("--child-url", help=argparse.SUPPRESS)
    ap.add_argument("--child-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global B
    B = args.batch_size
    if args.child:
        print(json.dumps(child(args.child, args.child_url, args.child_server, args.tmp)))
        return 0
    skip = set(args.skip.split(","))
    print("$", " ".join([sys.executable, *sys.argv]), flush=True)
    proc, ep = start_moto()
    os.environ.update(ENV, AWS_ENDPOINT_URL=ep)
    if args.throttle_mbit:
        throttle(int(ep.rsplit(":", 1)[1]), args.throttle_mbit)
    args.tmp.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    out: dict = {
        "bench": "remote",
        "format": args.format_label,
        "store": str(args.store),
        "plain_range_mib": args.plain_range,
    }
    try:
        urllib.request.urlopen(urllib.request.Request(f"{ep}/bench", method="PUT"))
        url = "s3://bench/store"
        for p in args.store.rglob("*"):  # page cache warm for the upload and the local store
            if p.is_file():
                p.read_bytes()
        t = time.perf_counter()
        cat = upload_store(args.store, url, unit_rows=args.unit_rows)
        t_up = time.perf_counter() - t
        total = sum(p.stat().st_size for p in args.store.rglob("*") if p.is_file())
        gen = {}
        for m in [m for b in obstore.list(obstore.store.from_url(url)) for m in b]:
            if m["path"].endswith(".catalog.json") and m["path"].startswith("negatives/"):
                gen = json.loads(bytes(obstore.get(obstore.store.from_url(url), m["path"]).bytes()))
        whole = sum(s["size"] for c in (cat, gen) for s in c.get("whole", {}).values())
        sparse = sum(s["size"] for c in (cat, gen) for s in c.get("sparse", {}).values())
        unit_rows = cat["unit_rows"]
        print(f"upload: {total / 1e6:.1f} MB in {t_up:.1f} s = {total / 1e6 / t_up:.0f} MB/s; "
              f"whole files {whole / 1e6:.1f} MB ({len(cat['whole'])}+{len(gen.get('whole', {}))}), "
              f"pair-keyed {sparse / 1e6:.1f} MB ({len(cat['sparse'])}+{len(gen.get('sparse', {}))} "
              f"files), unit_rows {unit_rows}, units {cat['units']}",
              flush=True)  # fmt: skip
        out.update(upload_s=t_up, upload_mb_s=total / 1e6 / t_up, whole=whole, sparse=sparse)
        warm_cache = None
        if "cold" not in skip:
            plain, cold, fetched, floors = [], [], [], []
            cores = os.cpu_count() or 1
            for r in range(args.cold_rounds):
                p = in_child("plain", url, proc.pid, tmp)
                plain.append(p["t"])
                print(f"round {r} plain download {p['bytes'] / 1e6:.1f} MB in {p['t']:.2f} s "
                      f"({p['bytes'] / 1e6 / p['t']:.0f} MB/s); CPU s here {p['cpu'][0]:.2f}, "
                      f"server {p['cpu'][1]:.2f}", flush=True)  # fmt: skip
                c = in_child("cold", url, proc.pid, tmp)
                tc, summ = c["t"], c["summary"]
                cold.append(tc)
                fetched.append(summ["bytes_fetched"])
                floor = (sum(p["cpu"]) + sum(c["warm_cpu"])) / cores
                floors.append(floor)
                where = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(c["times"].items()))
                print(f"round {r} cold epoch (num_workers=4) {c['batches']} batches in {tc:.2f} s: "
                      f"T_cold/T_plain {tc / p['t']:.2f}; fetched {summ['bytes_fetched'] / 1e6:.1f}"
                      f" MB of {total / 1e6:.1f} MB ({summ}); time in {where}; CPU s here "
                      f"{c['cpu'][0]:.2f}, server {c['cpu'][1]:.2f}; then a warm pass in "
                      f"{c['warm_t']:.2f} s, CPU s {c['warm_cpu'][0]:.2f}; CPU floor of the cold "
                      f"epoch on {cores} cores {floor:.2f} s (T_cold/floor {tc / floor:.2f})",
                      flush=True)  # fmt: skip
            ratios = [c / p for c, p in zip(cold, plain, strict=True)]
            print(
                f"T_plain s {spread(plain)}\nT_cold s {spread(cold)}\n"
                f"T_cold/T_plain per round {spread(ratios)} (target <= 1.25)\n"
                f"T_cold/CPU floor per round "
                f"{spread([c / f for c, f in zip(cold, floors, strict=True)])}",
                flush=True,
            )
            out.update(t_plain=plain, t_cold=cold, cold_ratio=statistics.median(ratios),
                       cold_bytes_fetched=fetched, total_bytes=total, cpu_floor=floors)  # fmt: skip
        if "warm" not in skip:
            warm_cache = Path(tempfile.mkdtemp(dir=tmp))
            full_pass(url, warm_cache, 4)  # fills it
            for w in [int(x) for x in args.workers.split(",")]:
                loc, rem = [], []
                for r in range(args.rounds):
                    for which in ("local", "remote")[:: 1 if r % 2 == 0 else -1]:  # A B, B A
                        if which == "local":
                            loc.append(rate(args.store, w, args.batches, partition=True,
                                            unit_rows=unit_rows))  # fmt: skip
                        else:
                            rem.append(rate(url, w, args.batches, cache_dir=warm_cache))
                    print(
                        f"round {r} num_workers={w} local {loc[-1]:,.0f} remote {rem[-1]:,.0f}"
                        f" samples/s: remote/local {rem[-1] / loc[-1]:.2f}",
                        flush=True,
                    )
                ratios = [b / a for a, b in zip(loc, rem, strict=True)]
                print(f"num_workers={w}: local median {statistics.median(loc):,.0f}, remote median "
                      f"{statistics.median(rem):,.0f} samples/s; remote/local per round "
                      f"{spread(ratios)} (target >= 0.9)", flush=True)  # fmt: skip
                out[f"warm_ratio_w{w}"] = statistics.median(ratios)
                out[f"warm_rates_w{w}"] = {"local": loc, "remote": rem}
                total, pairs = alternate(
                    args.store, url, warm_cache, w, unit_rows, args.alternations
                )
                print(f"num_workers={w}, one loader each, {args.alternations} alternations of "
                      f"{ALT_BATCHES} batches: remote/local, all batches {total:.3f}; per "
                      f"alternation {spread(pairs, '.3f')} (target >= 0.9)", flush=True)  # fmt: skip
                out[f"warm_alternating_w{w}"] = {"total": total, "pairs": pairs}
        if warm_cache is not None:
            shutil.rmtree(warm_cache)
        if "nodes" not in skip:
            for world in (1, 2):
                expect = whole + sparse / world
                for rank in range(world):
                    d = Path(tempfile.mkdtemp(dir=tmp))
                    kw = dict(distributed=True, num_replicas=world, rank=rank) if world > 1 else {}
                    tc, n, summ = full_pass(url, d, 4, **kw)
                    shutil.rmtree(d)
                    got = summ["bytes_fetched"]
                    print(f"W={world} rank {rank}: {n} batches in {tc:.1f} s, fetched "
                          f"{got / 1e6:.1f} MB; expected whole + sparse/W = {expect / 1e6:.1f} MB"
                          f" (ratio {got / expect:.3f}); {summ}", flush=True)  # fmt: skip
                    out[f"node_bytes_W{world}_r{rank}"] = got
                out[f"node_bytes_expected_W{world}"] = expect
    finally:
        if args.throttle_mbit:
            unthrottle()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
