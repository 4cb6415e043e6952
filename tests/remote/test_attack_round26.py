"""Attack round 26: reboot verification, bundles, whole-file pieces, prune."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
from remote_helpers import assert_batches_equal, filled_mirror, unit_piece

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.errors import StoreCorruptError


def _reboot(remote) -> None:
    (remote.root / "have" / "boot_id").write_text("another-boot")


def test_after_a_reboot_a_missing_sparse_file_with_present_units_is_fetched_again(
    bucket, store_path
):
    url, cache, local, ds, idx = filled_mirror(bucket, store_path)  # every unit present
    remote = ds._remote
    _, file, _, _ = unit_piece(remote.catalog, "steering", 1)
    (remote.path / file).unlink()  # its rename never reached the disk
    del ds
    _reboot(remote)
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
    assert (remote.path / file).read_bytes() == (store_path / file).read_bytes()


def test_after_a_reboot_a_missing_whole_file_is_fetched_again(bucket, store_path):
    url, cache, local, ds, idx = filled_mirror(bucket, store_path)  # every unit present
    remote = ds._remote
    cat = remote.catalog
    whole = max(cat["whole"], key=lambda rel: cat["whole"][rel]["size"])
    (remote.path / whole).unlink()
    del ds
    _reboot(remote)
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
    assert np.asarray(again._remote._have_map("steering").view).all()


def _tamper(url: str, key: str, change) -> None:
    from jasper_mmap.remote.objects import ObjectStore

    objects = ObjectStore(url)
    objects.put(key, change(objects.get(key)))


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b[:-1],
        lambda b: bytes([b[0] ^ 1]) + b[1:],
        lambda b: b"",
    ],
    ids=["truncated", "flipped", "empty"],
)
def test_a_damaged_bundle_is_an_error_naming_it(bucket, store_path, change):
    from jasper_mmap.remote.catalog import BUNDLE

    url = bucket.upload(store_path)
    _tamper(url, BUNDLE, change)
    with pytest.raises(StoreCorruptError, match=BUNDLE):
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())


def test_a_damaged_whole_file_piece_is_an_error_naming_it(bucket, store_path):
    from jasper_mmap.remote.catalog import CATALOG
    from jasper_mmap.remote.objects import ObjectStore

    url = bucket.upload(store_path)
    cat = json.loads(ObjectStore(url).get(CATALOG))
    whole = max(cat["whole"], key=lambda rel: cat["whole"][rel]["size"])
    _tamper(url, whole, lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])
    cache = bucket.cache()
    with pytest.raises(StoreCorruptError, match=re.escape(whole)):
        JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert not [p for p in cache.rglob("*") if ".partial-" in p.name]
    assert not [p for p in cache.rglob(whole)]


def test_a_catalog_whose_bundle_entry_lies_is_an_error(bucket, store_path):
    from jasper_mmap.remote.catalog import BUNDLE, CATALOG
    from jasper_mmap.remote.objects import ObjectStore

    url = bucket.upload(store_path)
    objects = ObjectStore(url)
    cat = json.loads(objects.get(CATALOG))
    bundle = objects.get(BUNDLE)
    # a bundle whose catalog entry was made to match, its bytes not the sparse files'
    bad = bytes(len(bundle))
    objects.put(BUNDLE, bad)
    cat["bundle"]["crc32"] = zlib.crc32(bad)
    objects.put(CATALOG, json.dumps(cat).encode())
    with pytest.raises(StoreCorruptError):
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    # offsets past the bundle's end
    objects.put(BUNDLE, bundle)
    cat["bundle"]["crc32"] = zlib.crc32(bundle)
    for spec in cat["sparse"].values():
        for entry in spec["always"]:
            entry[3] += len(bundle)
    objects.put(CATALOG, json.dumps(cat).encode())
    with pytest.raises(StoreCorruptError):
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())


def test_a_catalog_with_too_few_piece_crcs_is_an_error(bucket, store_path):
    from jasper_mmap.remote.catalog import CATALOG
    from jasper_mmap.remote.objects import ObjectStore

    url = bucket.upload(store_path)
    objects = ObjectStore(url)
    cat = json.loads(objects.get(CATALOG))
    whole = max(cat["whole"], key=lambda rel: cat["whole"][rel]["size"])
    cat["whole"][whole]["crc32"] = []  # its bytes never fetched: zeros
    objects.put(CATALOG, json.dumps(cat).encode())
    with pytest.raises(StoreCorruptError, match=re.escape(whole)):
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())


def test_a_sparse_file_truncated_on_the_server_is_an_error_naming_it(bucket, store_path):
    url = bucket.upload(store_path)
    ds = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    _, file, a, _ = unit_piece(ds._remote.catalog, "steering", len(ds) // 16)
    _tamper(url, file, lambda b: b[:a])  # its later units' rows are past the end now
    with pytest.raises(StoreCorruptError, match=re.escape(file)):
        ds.__getitems__(list(range(len(ds))))


def test_a_generation_catalog_lost_in_a_crash_is_fetched_again(bucket, store_path):
    from test_publish import _negatives

    from jasper_mmap import publish_negatives
    from jasper_mmap.format.spec import generation_name

    url = bucket.upload(store_path)
    cache = bucket.cache("publisher")
    base = JASPERSteeringDataset(url, "train", cache_dir=cache)
    g = publish_negatives(url, *_negatives(base, 1), cache_dir=cache)
    del base
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert ds.negatives_generation == g
    idx = list(range(len(ds)))
    want = ds.__getitems__(idx)
    remote = ds._remote
    # the publisher wrote its catalog in place, unsynced: a power loss leaves it empty
    (remote.root / "have" / f"{generation_name(g)}.catalog.json").write_bytes(b"")
    del ds
    _reboot(remote)
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert_batches_equal(again.__getitems__(idx), want)


def test_a_reader_of_a_pruned_generation_is_told_so(bucket, store_path):
    from test_publish import _negatives

    from jasper_mmap import publish_negatives
    from jasper_mmap.errors import StoreNotFoundError
    from jasper_mmap.remote import prune_generations

    url = bucket.upload(store_path)
    reader = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("reader"))
    g0 = reader.negatives_generation
    reader.__getitems__([0])  # mid-epoch: most units of its generation not fetched yet
    local = JASPERSteeringDataset(store_path, "train")
    g1 = publish_negatives(url, *_negatives(local, 1), cache_dir=bucket.cache("publisher"))
    assert prune_generations(url, 0, keep=1)["removed"] == [g0]  # the user's choice
    with pytest.raises(StoreNotFoundError, match=f"generation {g0} was removed") as e:
        reader.__getitems__(list(range(len(reader))))
    assert "reload_negatives()" in str(e.value)
    assert reader.reload_negatives() == g1
    reader.__getitems__(list(range(len(reader))))


@pytest.mark.parametrize("keep", ["0", "-1", "two"])
def test_prune_cli_refuses_a_keep_below_one_with_a_usage_error(bucket, keep, capsys):
    from jasper_mmap.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prune", bucket.url(), "--older-than", "7d", "--keep", keep])
    assert e.value.code == 2
    assert "--keep" in capsys.readouterr().err


def test_prune_cli_on_a_bucket_that_does_not_exist(bucket, capsys):
    from jasper_mmap.cli import main

    assert main(["prune", f"s3://{bucket.name}-none/ds", "--older-than", "7d"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jasper-mmap: error:") and "Traceback" not in err


def test_a_boot_id_lost_in_a_crash_still_gets_the_mirror_checked(bucket, store_path):
    url, cache, local, ds, idx = filled_mirror(bucket, store_path)  # every unit present
    remote = ds._remote
    _, file, a, b = unit_piece(remote.catalog, "steering", 1)
    with open(remote.path / file, "r+b") as f:  # a unit marked present, its rows lost
        f.seek(a)
        f.write(bytes(b - a))
    del ds
    # a crash soon after the mirror was made: its boot id's rename never reached the disk
    (remote.root / "have" / "boot_id").unlink()
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
