"""write_json_atomic, and check_generation before a generation is read."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import pytest
from damage_cases import BOTH, GEN

from jasper_mmap import open_store
from jasper_mmap._fs.files import write_json_atomic
from jasper_mmap.errors import StoreCorruptError, StoreFormatError, StoreWriteError
from jasper_mmap.format.integrity import check_generation

# -- write_json_atomic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "err"), [("fsync", errno.ENOSPC), ("replace", errno.EROFS), ("open", errno.EACCES)]
)
def test_write_json_atomic_failure_leaves_nothing_and_says_cannot_write(
    tmp_path, monkeypatch, where, err
):
    target = tmp_path / "CURRENT.json"
    target.write_text('{"old": 1}')

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    if where == "open":
        monkeypatch.setattr("builtins.open", fail)
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(StoreWriteError, match=r"CURRENT\.json: could not write the pointer: "):
        write_json_atomic(target, {"new": 2}, "the pointer")
    monkeypatch.undo()
    assert target.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT.json"]


def test_write_json_atomic_other_failures_are_raised_as_they_are(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):  # not a "cannot write" errno: left unchanged
        write_json_atomic(tmp_path / "missing" / "x.json", {})
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("backend", BOTH)
def test_check_generation_checks_a_generation_before_it_is_read(good, tmp_path, backend):
    store = shutil.copytree(good[backend], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    path = store / f"{GEN}.json"
    desc = json.loads(path.read_text())
    check_generation(store, desc, m, path)  # a good one passes
    rel = sorted(desc["files"])[-1]
    with open(store / rel, "ab") as f:
        f.write(b"\0")
    with pytest.raises(
        StoreCorruptError,
        match=rf"{re.escape(rel)}: file is \d+ bytes, but gen-000000\.json records",
    ):
        check_generation(store, desc, m, path)
    desc["arrays"]["negative_tiers"]["shape"] = [120, 5]
    with pytest.raises(
        StoreFormatError, match=r"gen-000000\.json: array 'negative_tiers' has shape \[120, 5\]"
    ):
        check_generation(store, desc, m, path)


@pytest.mark.parametrize("backend", BOTH)
def test_open_checks_the_live_generation_once_and_later_ones_at_first_lease(
    good, tmp_path, backend, monkeypatch
):
    """open_store checks the live generation; its first lease does not repeat that check, a
    generation published later is checked when first leased, and a damaged one is refused."""
    import pickle

    from jasper_mmap import publish_negatives
    from jasper_mmap.stores import leases as base

    store_dir = shutil.copytree(good[backend], tmp_path / "s")
    checked = []
    real = base.check_generation
    monkeypatch.setattr(
        base,
        "check_generation",
        lambda d, desc, m, p: checked.append(desc["generation"]) or real(d, desc, m, p),
    )
    store = open_store(store_dir)
    assert store.generation == 0 and checked == []  # verified by open_store itself
    assert pickle.loads(pickle.dumps(store))._verified == {}  # per process
    negs, tiers = store.read("hard_negatives"), store.read("negative_tiers")
    publish_negatives(store_dir, negs, tiers)
    store.use_generation(1)
    assert checked == [1]
    publish_negatives(store_dir, negs, tiers)
    rel = next(
        r for r in json.loads((store_dir / "negatives/gen-000002.json").read_text())["files"]
    )
    with open(store_dir / rel, "ab") as f:
        f.write(b"\0")
    with pytest.raises(StoreCorruptError, match=re.escape(rel)):
        store.use_generation(2)
