"""Every object fetched is checked against the catalog: altered or truncated data is refused,
named, and never marked present."""

from __future__ import annotations

import json

import pytest
from remote_helpers import flip, sample_in_unit, unit_piece

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.errors import JasperError, StoreCorruptError
from jasper_mmap.remote.catalog import CATALOG
from jasper_mmap.remote.objects import ObjectStore


def _catalog(url) -> dict:
    return json.loads(ObjectStore(url).get(CATALOG))


def _biggest_whole(cat) -> str:
    return max(cat["whole"], key=lambda rel: cat["whole"][rel]["size"])


def test_altered_whole_file_refused_at_open(bucket, store_path):
    url = bucket.upload(store_path)
    objects = ObjectStore(url)
    rel = _biggest_whole(_catalog(url))
    data = objects.get(rel)
    objects.put(rel, flip(data, len(data) // 2))
    cache = bucket.cache()
    with pytest.raises(StoreCorruptError) as e:
        JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert f"{url}/{rel}" in str(e.value)
    # nothing of it kept: no file in its place, no manifest (the mirror is unfinished)
    (mirror,) = [p for p in cache.glob("*/v*/store")]
    assert not (mirror / rel).exists()
    assert not (mirror / "manifest.json").exists()
    assert not [p for p in mirror.rglob("*") if ".partial-" in p.name]


@pytest.mark.parametrize("group", ["steering", "negatives"])
def test_altered_unit_rows_refused_when_needed(bucket, store_path, group):
    url = bucket.upload(store_path)
    cat = _catalog(url)
    if group == "negatives":
        gens = ObjectStore(url).list("negatives/")
        (key,) = [m["path"] for m in gens if m["path"].endswith(".catalog.json")]
        cat = json.loads(ObjectStore(url).get(key)) | {"unit_rows": cat["unit_rows"]}
    unit = 3
    _, file, a, b = unit_piece(cat, group, unit)
    objects = ObjectStore(url)
    data = objects.get(file)
    objects.put(file, flip(data, a + (b - a) // 2))
    ds = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())  # opens: unit not read
    ok = sample_in_unit(ds, 0)
    ds.__getitems__([ok])  # units not altered are served
    bad = sample_in_unit(ds, unit)
    with pytest.raises(StoreCorruptError) as e:
        ds.__getitems__([bad])
    assert f"{url}/{file}" in str(e.value)
    assert f"unit {unit}" in str(e.value)
    name = group if group == "steering" else f"negatives-gen-{ds.negatives_generation:06d}"
    assert ds._remote._have_map(name).view[unit] == 0
    with pytest.raises(StoreCorruptError):  # asked again: refused again, never served
        ds.__getitems__([bad])


def test_truncated_whole_file_is_an_error(bucket, store_path):
    url = bucket.upload(store_path)
    objects = ObjectStore(url)
    rel = _biggest_whole(_catalog(url))
    data = objects.get(rel)
    objects.put(rel, data[: len(data) // 2])
    with pytest.raises(JasperError) as e:
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    assert f"{url}/{rel}" in str(e.value)


def test_truncated_steering_file_is_an_error(bucket, store_path):
    url = bucket.upload(store_path)
    cat = _catalog(url)
    last = int(cat["units"]) - 1
    _, file, a, _b = unit_piece(cat, "steering", last)
    objects = ObjectStore(url)
    data = objects.get(file)
    objects.put(file, data[:a])  # the last unit's rows (and anything after them) cut off
    with pytest.raises(JasperError) as e:
        ds = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
        ds.__getitems__(list(range(len(ds))))
    assert f"{url}/{file}" in str(e.value)
