"""NOTE [remote publish]: old negatives generations removed from object storage by a time rule."""

from __future__ import annotations

import pytest
import torch
from test_publish import _negatives

from jasper_mmap import JASPERSteeringDataset, publish_negatives
from jasper_mmap.cli import main
from jasper_mmap.errors import StoreNotFoundError
from jasper_mmap.remote import prune_generations
from jasper_mmap.remote.objects import ObjectStore


def _numbers(url: str) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for meta in ObjectStore(url).list("negatives/"):
        name = meta["path"].split("/")[1]
        if name.startswith("gen-"):  # (zarr's negatives/zarr.json is the store's)
            out.setdefault(int(name[4:10]), set()).add(meta["path"])
    return out


def _three_generations(bucket, store_path):
    url = bucket.upload(store_path)
    base = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("base"))
    gens = [base.negatives_generation]
    for shift in (1, 2):
        gens.append(publish_negatives(url, *_negatives(base, shift), cache_dir=bucket.cache()))
    return url, gens


def test_superseded_generations_go_the_newest_stay(bucket, store_path):
    url, (g0, g1, g2) = _three_generations(bucket, store_path)
    before = _numbers(url)
    assert set(before) == {g0, g1, g2}
    everything = {m["path"] for m in ObjectStore(url).list()}
    others = everything - {p for ps in before.values() for p in ps}
    # superseded seconds ago: an hour's rule removes nothing
    assert prune_generations(url, 3600, keep=1)["removed"] == []
    assert _numbers(url) == before
    dry = prune_generations(url, 0, keep=1, dry_run=True)
    assert dry["removed"] == [g0, g1] and dry["objects"] == len(before[g0]) + len(before[g1])
    assert _numbers(url) == before
    got = prune_generations(url, 0, keep=2)
    assert got["removed"] == [g0] and got["kept"] == [g1, g2]
    assert set(_numbers(url)) == {g1, g2}
    assert _numbers(url)[g1] == before[g1]  # every object of a kept one stays
    assert others <= {m["path"] for m in ObjectStore(url).list()}  # and all the store's
    # a node opening afresh serves the newest
    fresh = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("fresh"))
    assert fresh.negatives_generation == g2
    reader = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("base"))
    assert torch.equal(fresh.__getitems__([0, 1])["negative_embs"],
                       reader.__getitems__([0, 1])["negative_embs"])  # fmt: skip


def test_claims_without_json_go_only_below_the_newest(bucket, store_path):
    url, (g0, g1, g2) = _three_generations(bucket, store_path)
    objects = ObjectStore(url)
    killed = g2 + 1  # a publisher killed after its claim: a number without a json
    objects.put(f"negatives/gen-{killed:06d}.claim", b"", create=True)
    base = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("b3"))
    g3 = publish_negatives(url, *_negatives(base, 3), cache_dir=bucket.cache())
    assert g3 == killed + 1
    under_way = g3 + 1  # a publisher that has claimed and is uploading now
    objects.put(f"negatives/gen-{under_way:06d}.claim", b"", create=True)
    got = prune_generations(url, 0, keep=1)
    assert got["removed"] == [g0, g1, g2, killed]
    assert set(_numbers(url)) == {g3, under_way}
    # the rule's time holds for claims too: a fresh orphan stays under an hour's rule
    objects.put(f"negatives/gen-{g3 - 1:06d}.claim", b"", create=True)
    assert prune_generations(url, 3600, keep=1)["removed"] == []


def test_a_prefix_that_is_not_ours_is_refused(bucket, store_path):
    objects = ObjectStore(bucket.url("other"))
    objects.put("negatives/gen-000000.json", b"{}")
    with pytest.raises(StoreNotFoundError, match="not a store uploaded by jasper_mmap"):
        prune_generations(bucket.url("other"), 0)
    assert [m["path"] for m in objects.list()] == ["negatives/gen-000000.json"]
    with pytest.raises(ValueError, match="keep"):
        prune_generations(bucket.url("other"), 0, keep=0)


def test_cli_prune(bucket, store_path, capsys):
    url, (g0, g1, g2) = _three_generations(bucket, store_path)
    assert main(["prune", url, "--older-than", "1h"]) == 0
    assert "removed negatives generations none" in capsys.readouterr().out
    assert main(["prune", url, "--older-than", "0s", "--keep", "1", "--dry-run"]) == 0
    assert f"would remove negatives generations {g0}, {g1}" in capsys.readouterr().out
    assert set(_numbers(url)) == {g0, g1, g2}
    assert main(["prune", url, "--older-than", "0", "--keep", "1"]) == 0
    assert set(_numbers(url)) == {g2}
    assert main(["prune", "/some/local/store", "--older-than", "1d"]) == 1
    assert "not an object-store URL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", url, "--older-than", "soon"])
