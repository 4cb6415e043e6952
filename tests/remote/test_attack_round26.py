"""Attack round 26: reboot verification, bundles, whole-file pieces, prune."""

from __future__ import annotations

import numpy as np
from remote_helpers import assert_batches_equal, unit_piece

from jasper_mmap import JASPERSteeringDataset


def _reboot(remote) -> None:
    (remote.root / "have" / "boot_id").write_text("another-boot")


def test_after_a_reboot_a_missing_sparse_file_with_present_units_is_fetched_again(
    bucket, store_path
):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    local = JASPERSteeringDataset(store_path, "train")
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    remote = ds._remote
    idx = list(range(len(ds)))
    ds.__getitems__(idx)  # every unit present
    _, file, _, _ = unit_piece(remote.catalog, "steering", 1)
    (remote.path / file).unlink()  # its rename never reached the disk
    del ds
    _reboot(remote)
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
    assert (remote.path / file).read_bytes() == (store_path / file).read_bytes()


def test_after_a_reboot_a_missing_whole_file_is_fetched_again(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    local = JASPERSteeringDataset(store_path, "train")
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    remote = ds._remote
    idx = list(range(len(ds)))
    ds.__getitems__(idx)
    cat = remote.catalog
    whole = max(cat["whole"], key=lambda rel: cat["whole"][rel]["size"])
    (remote.path / whole).unlink()
    del ds
    _reboot(remote)
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
    assert np.asarray(again._remote._have_map("steering").view).all()
