"""Stores on object storage, through a real S3-protocol server (moto) on 127.0.0.1: the same
batches as the local store at one and two simulated nodes, bytes per node, elastic resume on
another number of nodes and the cache budget (NOTE [node cache], NOTE [partitioned order],
NOTE [eviction]). Integrity, kill safety, uploads, publishing and the CLI: tests/remote/."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid

import numpy as np
import pytest
import torch

from jasper_mmap import create_loader, set_epoch
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.batches import BATCH_KEYS
from jasper_mmap.remote import upload_store
from jasper_mmap.remote.objects import ObjectStore
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

UNIT = 16
BACKENDS = ("safetensors", "zarr")


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint, monkeypatch):
    name = f"b{uuid.uuid4().hex[:12]}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT")).read()
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    pt = make_pt_dataset(root / "ds", SyntheticSpec(n_pairs=400, seed=2))
    return {f: convert_pt(pt, root / f, format=f, progress=False) for f in BACKENDS}


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in BATCH_KEYS
    )


def epochs(ld, n=1) -> list[dict]:
    out = []
    for e in range(n):
        set_epoch(ld, e)
        out += [{k: b[k].clone() for k in BATCH_KEYS} for b in ld]
    return out


def local_loader(store, world=1, rank=0, batch=8, **kw):
    kw = {"partition": True, "unit_rows": UNIT, "canonical_parts": world, **kw}
    return create_loader(
        store, "train", batch, distributed=True, num_replicas=world, rank=rank, seed=5, **kw
    )


def remote_loader(url, cache, world=1, rank=0, batch=8, **kw):
    kw = {"canonical_parts": world, **kw}
    return create_loader(
        url, "train", batch, distributed=True, num_replicas=world, rank=rank, seed=5,
        cache_dir=cache, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("safetensors", {"num_workers": 4}),
        ("zarr", {"num_workers": 0}),
        ("zarr", {"num_workers": 2, "worker_mode": "process"}),
    ],
    ids=["safetensors-threads4", "zarr-loop", "zarr-processes2"],
)
def test_a_store_on_object_storage_serves_the_local_batches(stores, bucket, tmp_path, fmt, mode):
    url = f"{bucket}/{fmt}"
    upload_store(stores[fmt], url, unit_rows=UNIT)
    for world in (1, 2):  # one node; two simulated nodes, a cache each
        for rank in range(world):
            want = epochs(local_loader(stores[fmt], world, rank, **mode), 2)
            got = epochs(remote_loader(url, tmp_path / f"n{world}{rank}", world, rank, **mode), 2)
            assert same(want, got)
    val = create_loader(url, "val", 8, cache_dir=tmp_path / "v", seed=5)
    assert same(epochs(create_loader(stores[fmt], "val", 8, seed=5)), epochs(val))


def test_each_node_fetches_its_share_once_whatever_its_ranks(stores, bucket, tmp_path):
    url = f"{bucket}/s"
    cat = upload_store(stores["safetensors"], url, unit_rows=UNIT)
    whole = sum(f["size"] for f in cat["whole"].values())
    objects = ObjectStore(url)
    meta = sum(
        len(objects.get(k))
        for k in ("manifest.json", "jasper_remote.json", "negatives/gen-000000.json")
    ) + len(objects.get("negatives/gen-000000.catalog.json"))
    largest = max(
        UNIT * sum(a["row_bytes"] for a in g["arrays"].values()) for g in cat["groups"].values()
    )
    fetched = {}
    for node in range(2):  # two nodes of two ranks each (world 4, parts 4), a cache a node
        units = 0
        for local in range(2):
            ld = remote_loader(url, tmp_path / f"node{node}", 4, 2 * node + local, num_workers=2)
            epochs(ld, 2)
            s = ld.dataset_obj._remote.summary()
            units += s["units_fetched"]
            if local == 1:  # the node's second rank found the whole files there
                assert s["bytes_fetched"] <= meta + s["units_fetched"] * largest < whole
        fetched[node] = units
        have = (tmp_path / f"node{node}").rglob("steering.bin")
        present = int(np.count_nonzero(np.fromfile(next(have), dtype=np.uint8)))
        assert units == 2 * present  # each unit once (steering and negatives groups)
        assert present <= cat["units"] // 2 + 6  # its half, and a few units of the tail
    assert fetched[0] + fetched[1] <= 2 * (cat["units"] + 12)


def test_a_resume_on_another_number_of_nodes_is_exact(stores, bucket, tmp_path):
    url = f"{bucket}/resume"
    upload_store(stores["safetensors"], url, unit_rows=UNIT)
    k, consumed = 5, []
    for rank in range(2):  # two nodes, then a preemption after k batches
        ld = remote_loader(url, tmp_path / f"node{rank}", 2, rank)
        it = iter(ld)
        consumed += [next(it)["relevance"].clone() for _ in range(k)]
        state = ld.state_dict()
    one = create_loader(url, "train", 8, seed=5, cache_dir=tmp_path / "node0")
    one.load_state_dict(state)
    before = one.dataset_obj._remote.summary()["units_fetched"]
    rest = [b["relevance"].clone() for b in one]
    full = epochs(local_loader(stores["safetensors"], canonical_parts=2))
    seen = torch.cat(consumed + rest).sort().values
    assert torch.equal(seen, torch.cat([b["relevance"] for b in full]).sort().values)
    fetched = one.dataset_obj._remote.summary()["units_fetched"] - before
    units = -(-400 // UNIT)
    assert 0 < fetched <= units + 4  # node 0's cache kept its half: about the other half added


def test_a_cache_budget_evicts_and_never_serves_a_hole(stores, bucket, tmp_path):
    url, rows = f"{bucket}/budget", 4  # 100 units
    cat = upload_store(stores["zarr"], url, unit_rows=rows)
    fixed = sum(f["size"] for f in cat["whole"].values())
    fixed += sum(b - a for f in cat["sparse"].values() for a, b, *_ in f["always"])
    gen = json.loads(ObjectStore(url).get("negatives/gen-000000.catalog.json"))
    groups = [*cat["groups"].values(), *gen["groups"].values()]  # steering, negatives
    unit = rows * sum(a["row_bytes"] for g in groups for a in g["arrays"].values())
    with pytest.raises(ValueError, match="window_every_epoch"):
        remote_loader(url, tmp_path / "c0", batch=2, cache_limit=fixed + 80 * unit)
    with pytest.raises(ValueError, match="in flight"):
        remote_loader(
            url, tmp_path / "c0", batch=2, cache_limit=fixed + 60 * unit, window_every_epoch=True
        )
    # batches of 2: 64 batches read ahead span 40 of the 100 units (72 with their windows)
    ld = remote_loader(
        url, tmp_path / "c1", batch=2, cache_limit=fixed + 80 * unit, window_every_epoch=True
    )
    want = epochs(local_loader(stores["zarr"], batch=2, unit_rows=rows, window_every_epoch=True), 2)
    assert same(want, epochs(ld, 2))
    remote = ld.dataset_obj._remote
    assert remote.summary()["units_evicted"] > 0
    assert remote.cached_bytes() <= fixed + 80 * unit
    # an evictor racing the readers: a batch never keeps what it read from an evicted unit
    ld = remote_loader(url, tmp_path / "c2", num_workers=4)
    remote, stop, evicted = ld.dataset_obj._remote, threading.Event(), [0]

    def evict() -> None:
        rng = np.random.default_rng(0)
        while not stop.wait(0.002):
            for name, spec in remote._all_groups():
                evicted[0] += remote._evict_unit(name, spec, int(rng.integers(remote.units)))

    t = threading.Thread(target=evict)
    t.start()
    try:
        got = epochs(ld)
    finally:
        stop.set()
        t.join()
    assert evicted[0] > 20
    assert same(epochs(local_loader(stores["zarr"], unit_rows=rows, num_workers=4)), got)
