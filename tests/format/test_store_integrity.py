"""A catalogue of structurally bad stores: each is refused at open with our error naming the
file (never a raw KeyError/TypeError/JSONDecodeError/ValueError, never zeros), the dataset
refuses it too, and `jasper-mmap verify` lists the problem and exits 1.

Each case copies a good store (both backends unless it is backend-specific), breaks one thing
and states the error class and a pattern of the message, which always names the file.
"""

from __future__ import annotations

import re
import shutil

import pytest
from damage_cases import FIX, PARAMS

from jasper_mmap import JASPERSteeringDataset, open_store
from jasper_mmap.cli import main as cli_main
from jasper_mmap.errors import JasperError


def test_catalogue_is_large_and_ids_are_distinct():
    ids = [p.id for p in PARAMS]
    assert len(ids) == len(set(ids)) and len(ids) >= 150, len(ids)


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_bad_store_is_refused_at_open_and_by_verify(case, backend, good, tmp_path, capsys):
    store = shutil.copytree(good[backend], tmp_path / "s")
    case.mutate(store)
    with pytest.raises(case.error) as info:
        open_store(store)
    msg = str(info.value)
    assert re.search(case.match, msg), msg
    assert FIX.search(msg) or "is not a jasper_mmap store" in msg, msg
    with pytest.raises(JasperError):
        JASPERSteeringDataset(store, check_sources=False)
    assert cli_main(["verify", str(store), "-q"]) == 1
    out = capsys.readouterr().out
    assert re.search(case.match, out), out
    assert "Traceback" not in out
