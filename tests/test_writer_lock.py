"""One writer at a time, on the store it opened (DESIGN guarantee 10; issue 24).

Every writer of a store (``convert_pt``/``--overwrite``, ``publish_negatives`` and its
clean-up, the auto-convert of a dataset directory) takes one store-level lock that lives
beside the store (``.NAME.lock``); these tests race them in real processes, bounded in time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt

STRESS = textwrap.dedent(
    """
    import sys, time, traceback
    import numpy as np
    role, src, store, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    from jasper_mmap import publish_negatives
    from jasper_mmap.converters import convert_pt
    from jasper_mmap.errors import JasperError
    deadline, done, lost = time.monotonic() + seconds, 0, 0
    negs = (np.arange(120)[:, None] * 7 + np.arange(6)[None, :] * 3) % 120
    tiers = np.ones((120, 6), dtype=np.int64)
    while time.monotonic() < deadline:
        try:
            if role == "convert":
                convert_pt(src, store, overwrite=True, progress=False)
            else:
                publish_negatives(store, negs, tiers)
            done += 1
        except JasperError as e:  # a lost race must be one of ours, naming the fix
            lost += 1
            print("lost:", e, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            sys.exit(3)
    print(role, done, lost)
    """
)


def _race(src: Path, store: Path, seconds: float) -> list[str]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STRESS, role, str(src), str(store), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("convert", "publish")
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a writer hung racing another one")
        assert p.returncode == 0, f"a writer raised a raw exception:\n{err[-3000:]}"
        outs.append(out)
    return outs


def test_overwrite_racing_publish_never_breaks_the_store(tmp_path, pt_dataset):
    """convert-pt --overwrite in one process, publish_negatives in another, for a few seconds:
    no raw exception, every publish either lands in the store it opened or fails with one of
    our errors, and the store opens (its live generation on disk) after every round."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    for _ in range(3):
        outs = _race(pt_dataset, store, 4.0)
        with open_store(store) as s:  # the live generation's files are there and whole
            g = s.live_generation()
            s.use_generation(g)
        assert all(o.split()[1] != "0" for o in outs), outs  # both really wrote
