"""torchrun check of a store on object storage: gloo ranks, each node (torchrun's GROUP_RANK)
its own cache_dir; every rank's batches equal the local store's (same partitioned order); every
sample of the epoch once across ranks; bytes fetched per rank.

Run (moto on 127.0.0.1:45222, the store uploaded to s3://trb/s from /tmp/trw/store, the AWS_*
environment set as in tests/remote/conftest.py), two simulated nodes of two ranks each:

    for n in 0 1; do torchrun --nnodes 2 --node-rank $n --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port 29533 scripts/check_torchrun_remote.py \
        s3://trb/s /tmp/trw/store /tmp/trw/cache & done; wait
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from jasper_mmap import create_loader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
node = int(os.environ["GROUP_RANK"])
url, local, base = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(distributed=True, seed=5, num_workers=2)
rl = create_loader(url, "train", 8, cache_dir=f"{base}/node{node}", **kw)
unit = rl.dataset_obj._remote.unit_rows
ll = create_loader(local, "train", 8, partition=True, unit_rows=unit, **kw)
same, n, rel = True, 0, []
for a, b in zip(ll, rl, strict=True):
    same &= all(torch.equal(a[k], b[k]) for k in a)
    n += len(a["relevance"])
    rel.append(b["relevance"])
flags = [None] * world
dist.all_gather_object(
    flags,
    {
        "rank": rank,
        "node": node,
        "same": bool(same),
        "samples": n,
        "fetched": rl.dataset_obj._remote.summary()["bytes_fetched"],
        "rel": torch.cat(rel).tolist(),
    },
)
if rank == 0:
    allrel = sorted(sum((f["rel"] for f in flags), []))
    full = sorted(
        torch.cat(
            [b["relevance"] for b in create_loader(local, "train", 8, seed=5, drop_last=True)]
        ).tolist()
    )
    print(json.dumps([{k: v for k, v in f.items() if k != "rel"} for f in flags]))
    print(
        "every rank equal to local:",
        all(f["same"] for f in flags),
        "| samples",
        len(allrel),
        "of",
        len(full),
        "| each sample at most once:",
        len(set(allrel)) == len(allrel),
    )
dist.destroy_process_group()
