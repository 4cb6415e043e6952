"""Attack: the node-wide unit lock must not raise EDEADLK when ranks of one node (processes with
several fetching threads each) wait on units held by each other (a false deadlock: the holders
are other threads, which release)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_SIDE = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    from jasper_mmap.remote.cache import node_lock
    path, mine, other, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    lock = node_lock(Path(path))
    res = []
    def hold():
        with lock(mine):
            open(f"{go}.{mine}", "w").close()
            time.sleep(1.5)
    def want():
        while not os.path.exists(f"{go}.{other}"):
            time.sleep(0.01)
        time.sleep(0.2)
        try:
            with lock(other):
                res.append("ok")
        except OSError as e:
            res.append(f"OSError {e.errno}")
    ts = [threading.Thread(target=hold), threading.Thread(target=want)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(res[0])
    """
)


def test_unit_locks_of_two_processes_never_edeadlk(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    lock, go = tmp_path / "x.lock", tmp_path / "go"
    ps = [
        subprocess.Popen(
            [sys.executable, "-c", _SIDE, str(lock), a, b, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for a, b in (("1", "2"), ("2", "1"))
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in ps]
    assert outs == ["ok", "ok"]
