"""NOTE [remote publish]: pruning while a publisher publishes and a reader reloads and reads.
With ``older_than=0`` and ``keep=1`` (the most a user can ask) a reader may lose the generation
it reads: then it is told so; it never hangs and never serves a batch whose negatives are not
wholly one published generation's."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from remote_helpers import pairs_of
from test_publish import _negatives

from jasper_mmap import JASPERSteeringDataset, publish_negatives
from jasper_mmap.errors import JasperError
from jasper_mmap.remote import prune_generations


def test_prune_racing_a_publisher_and_a_reader(bucket, store_path):
    url = bucket.upload(store_path)
    reader = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("reader"))
    local = JASPERSteeringDataset(store_path, "train")
    source = local.source_embs
    published = {reader.negatives_generation: reader.hard_negatives.numpy().copy()}
    pairs = pairs_of(reader)
    stop = threading.Event()
    errors: list[BaseException] = []
    told: list[str] = []
    served = [0]

    def publisher() -> None:
        try:
            for shift in range(1, 6):
                negs, tiers = _negatives(local, shift)
                g = publish_negatives(url, negs, tiers, cache_dir=bucket.cache(f"pub{shift}"))
                published[g] = negs
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def pruner() -> None:
        try:
            while not stop.is_set():
                prune_generations(url, 0, keep=1)
                time.sleep(0.01)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def read() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set() or served[0] < 20:
            try:
                reader.reload_negatives()
                idx = rng.choice(len(reader), 8, replace=False).tolist()
                batch = reader.__getitems__(idx)
            except JasperError as e:  # the generation read was pruned: said, with the fix
                told.append(str(e))
                assert "removed" in str(e) or "no negatives generation" in str(e), str(e)
                if served[0] >= 20 and stop.is_set():
                    return
                continue
            rows = pairs[idx]
            got = batch["negative_embs"]
            assert any(
                torch.equal(got, source[torch.from_numpy(negs[rows])].to(got.dtype))
                for negs in list(published.values())
            ), "a batch's negatives are not one published generation's"
            served[0] += 1

    threads = [threading.Thread(target=f) for f in (publisher, pruner)]
    for t in threads:
        t.start()
    reading = threading.Thread(target=lambda: errors.extend(_run(read)))
    reading.start()
    for t in [*threads, reading]:
        t.join(timeout=240)
        assert not t.is_alive(), "a thread hung"
    assert not errors, errors
    assert served[0] >= 20
    gens = sorted(published)
    assert prune_generations(url, 0, keep=1)["kept"] == [gens[-1]]


def _run(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return [e]
    return []
