"""The order of an epoch's samples as a pure function of (seed, epoch), and its samplers.

# NOTE [epoch order]
An epoch's order is a permutation of ``[0, n)`` that is computed, not stored: position ``p``
holds sample ``perm(p)``, where ``perm`` is a keyed bijection (a Feistel network over the
smallest even number of bits that covers ``n``, its round keys derived from (seed, epoch),
walked until it lands below ``n``). Any run of positions costs O(its length) to compute, so an
epoch starts in O(1) time and memory whatever ``n`` (``randperm(n)`` took 1.3-1.5 s at 10M and
3.9-6.8 s with ~1.3 GB at 30M, per rank), and resuming at position ``c`` reads and computes
nothing for the first ``c``. Not shuffled: ``perm(p) = p``.

The epoch is served in *global batches* of ``G = num_replicas x batch_size`` positions from a
cursor ``c`` (0 at the start of the epoch), dealt out as ``DistributedSampler`` deals: rank
``r`` takes positions ``c + r, c + r + R, c + r + 2R, ...``, so its batch ``j`` holds
``c + (j B + i) R + r`` for ``i < B``, and global batch ``j`` (all ranks' batch ``j``) is
positions ``[c + j G, c + (j + 1) G)``. With ``drop_last`` the last incomplete global batch is
dropped; without, it is shared out evenly (``ceil(L / R)`` positions each; positions past the
end wrap around to the epoch's first positions), so every rank has the same number of batches
and, from cursor 0, the same samples ``DistributedSampler`` would give it (in our order). The cursor after ``k`` batches handed out is ``c +
k G`` (``n`` after the epoch's last batch): the same on every rank, and it means the same
samples at any world size or batch size, so a run resumes exactly where it stopped, elastic
(NOTE [resuming] in jasper_mmap/loading/resume.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from jasper_mmap.steering import check_epoch, check_seed

__all__ = [
    "EpochOrder",
    "OrderedBatches",
    "Partition",
    "PartitionedOrder",
    "ResumableRandomSampler",
    "ResumableSequentialSampler",
]

_ROUNDS = 4  # a Feistel network of 4 rounds is a pseudo-random permutation (Luby-Rackoff)
#: samples whose order is computed at once (NOTE [epoch order]; _Plan.batches_of)
_CHUNK = 8192


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochOrder:
    """Sample at each position of epoch ``epoch``'s order of ``n`` samples (NOTE above)."""

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool) -> None:
        self.n, self.seed, self.epoch, self.shuffle = int(n), int(seed), int(epoch), shuffle
        bits = max(2, math.ceil(math.log2(max(self.n, 2))))
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        key = np.array([self.seed % 2**64, self.epoch % 2**64], dtype=np.uint64)
        with np.errstate(over="ignore"):
            base = _mix(_mix(key[:1]) ^ key[1:] ^ np.uint64(0x9E3779B97F4A7C15))[0]
            self._keys = _mix(base + np.arange(1, _ROUNDS + 1, dtype=np.uint64))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h, mask = np.uint64(self._half), self._mask
        left, right = x >> h, x & mask
        with np.errstate(over="ignore"):
            for k in self._keys:
                left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << h) | right

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The samples (int64) at ``positions`` (int64 in ``[0, n)``)."""
        p = np.asarray(positions, dtype=np.int64)
        if not self.shuffle or not p.size:
            return p.copy()
        x = self._feistel(p.astype(np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle walking: a bijection of [0, 2**bits) restricted to [0, n)
            x[out] = self._feistel(x[out])
            out[out] = x[out] >= np.uint64(self.n)
        return x.astype(np.int64)


class Partition:
    """A fixed, canonical partition of a split's samples by the unit of their pair row.

    # NOTE [partitioned order]
    For a store read from object storage (NOTE [node cache] in jasper_mmap/remote/cache.py), a
    node should fetch only its share of the pair-keyed rows and keep it across epochs. The
    pair rows are cut into units of ``unit_rows`` rows (the units the node cache fetches);
    the units are dealt, in order, each to the one of ``parts`` *canonical parts* holding the
    fewest of the split's samples so far (a function of the split and the two numbers only:
    never of the epoch, the seed or the world size). Part ``c``'s samples, unit after unit, are
    its *body* but for the ``len - m`` last (``m``: the smallest part's size), which go to a
    common *tail*. The epoch's order is then ``parts``-periodic: position ``p < parts * m``
    holds sample ``j = p // parts`` of part ``c = p % parts``'s own order, and the tail follows
    in a shuffled order of its own. Dealt out as NOTE [epoch order] deals positions (rank ``r``
    of ``R`` takes every ``R``-th from the cursor, a multiple of ``R``), a rank reads only the
    parts ``c = r (mod R)`` when ``R`` divides ``parts``: its node fetches its parts' units
    and, at the epoch's end, the tail (``parts x`` at most about one unit of samples). A
    resume at another world size (another number of nodes) keeps the order, so it is exact
    (NOTE [resuming]); it is also local when the new world size divides ``parts``.
    A part's own order: in epoch 0 its units in a random order, shuffled within windows of
    ``window`` units (a node's first epoch fetches a window of units at a time, each once);
    from epoch 1 (the part cached) uniform over the part, or windowed again with
    ``every_epoch`` (a node cache smaller than the part: NOTE [eviction]). All from (seed,
    epoch, part).
    """

    def __init__(
        self,
        pairs: np.ndarray,
        unit_rows: int,
        parts: int,
        window: int = 16,
        every_epoch: bool = False,
    ) -> None:
        if not (isinstance(parts, int) and parts >= 1):
            raise ValueError(f"canonical_parts should be an integer >= 1, but got {parts!r}")
        if not (isinstance(unit_rows, int) and unit_rows >= 1):
            raise ValueError(f"unit_rows should be an integer >= 1, but got {unit_rows!r}")
        self.unit_rows, self.parts, self.window = unit_rows, parts, max(1, int(window))
        self.every_epoch = bool(every_epoch)
        units = np.asarray(pairs, dtype=np.int64) // unit_rows
        self.n = int(units.size)
        nu = int(units.max()) + 1 if units.size else 0
        counts = np.bincount(units, minlength=nu)
        owner = np.empty(nu, dtype=np.int64)
        load = [(0, c) for c in range(parts)]  # (samples, part): the emptiest first
        import heapq

        heapq.heapify(load)
        for u in range(nu):
            size, c = heapq.heappop(load)
            owner[u] = c
            heapq.heappush(load, (size + int(counts[u]), c))
        by_unit = np.argsort(units, kind="stable")  # samples unit after unit
        part_of = owner[units[by_unit]]
        order = np.argsort(part_of, kind="stable")
        samples = by_unit[order]
        bounds = np.searchsorted(part_of[order], np.arange(parts + 1))
        sizes = np.diff(bounds)
        self.m = int(sizes.min()) if parts else 0
        self._body = [samples[bounds[c] : bounds[c] + self.m] for c in range(parts)]
        self._units = units
        tail = [samples[bounds[c] + self.m : bounds[c + 1]] for c in range(parts)]
        self._tail = np.concatenate(tail) if tail else np.empty(0, np.int64)
        self.owner = owner

    def spec(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "unit_rows": self.unit_rows,
            "window": self.window,
            "every_epoch": self.every_epoch,
        }


class PartitionedOrder:
    """Epoch ``epoch``'s order over a :class:`Partition` (NOTE [partitioned order])."""

    def __init__(self, partition: Partition, seed: int, epoch: int) -> None:
        self.p, self.seed, self.epoch = partition, int(seed), int(epoch)
        self.n = partition.n
        self._orders: dict[int, np.ndarray] = {}
        self._tail = EpochOrder(partition._tail.size, seed, epoch, True)

    def _key(self, values: np.ndarray, c: int, salt: int) -> np.ndarray:
        key = np.array([self.seed % 2**64, self.epoch % 2**64, c, salt], dtype=np.uint64)
        with np.errstate(over="ignore"):
            k = _mix(_mix(_mix(key[:1]) ^ key[1:2]) ^ key[2:3] ^ (key[3:] << np.uint64(32)))
            return _mix(values.astype(np.uint64) ^ k)

    def part_order(self, c: int) -> np.ndarray:
        got = self._orders.get(c)
        if got is None:
            body = self.p._body[c]
            rand = self._key(body, c, 1) >> np.uint64(32)
            if (self.epoch == 0 or self.p.every_epoch) and body.size:  # windows of units
                units = self.p._units[body]
                first = np.unique(units)
                rank = np.argsort(np.argsort(self._key(first, c, 2), kind="stable"))
                block = rank[np.searchsorted(first, units)] // self.p.window
                rand = rand | (block.astype(np.uint64) << np.uint64(32))
            got = self._orders[c] = body[np.argsort(rand, kind="stable")]
        return got

    def at(self, positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        out = np.empty(pos.size, dtype=np.int64)
        parts, m = self.p.parts, self.p.m
        body = pos < parts * m
        c, j = pos[body] % parts, pos[body] // parts
        vals = np.empty(c.size, dtype=np.int64)
        for part in np.unique(c):
            sel = c == part
            vals[sel] = self.part_order(int(part))[j[sel]]
        out[body] = vals
        if (~body).any():
            out[~body] = self.p._tail[self._tail.at(pos[~body] - parts * m)]
        return out


class _Plan:
    """What one rank serves of an epoch from a cursor (NOTE [epoch order])."""

    def __init__(self, n: int, cursor: int, replicas: int, rank: int, batch: int, drop_last: bool):
        self.n, self.cursor, self.replicas, self.rank = n, cursor, replicas, rank
        self.batch, self.drop_last = batch, drop_last
        self.group = replicas * batch
        left = max(0, n - cursor)
        if drop_last:
            self.batches = left // self.group
            self.last = batch
        else:
            self.batches = -(-left // self.group)
            tail = left - (self.batches - 1) * self.group if self.batches else 0
            self.last = -(-tail // replicas) if tail else batch

    def positions_of(self, j0: int, j1: int) -> np.ndarray:
        """Positions (wrapped into ``[0, n)``) of this rank's batches ``j0`` to ``j1 - 1``, one
        after the other: every ``replicas``-th position from the cursor, from the rank's own,
        as DistributedSampler deals them (all but the plan's last batch hold ``batch``)."""
        size = (j1 - j0) * self.batch
        if j1 == self.batches and j1 > j0:
            size += self.last - self.batch
        k = np.arange(j0 * self.batch, j0 * self.batch + size, dtype=np.int64)
        p = self.cursor + k * self.replicas + self.rank
        if p.size and p[-1] >= self.n:
            p %= self.n  # the last batch's padding: the epoch's first positions again
        return p

    def batches_of(self, order: EpochOrder) -> Iterator[list[int]]:
        """This rank's batches of samples, computed ``_CHUNK`` samples at a time (a numpy
        call costs ~1 us whatever its length: one batch at a time cost ~330 us per batch of
        128 here, a chunk of 64 batches ~5 us a batch)."""
        step = max(1, _CHUNK // self.batch)
        for j0 in range(0, self.batches, step):
            j1 = min(self.batches, j0 + step)
            samples = order.at(self.positions_of(j0, j1)).tolist()
            for j in range(j1 - j0):
                yield samples[j * self.batch : (j + 1) * self.batch]

    def cursor_after(self, k: int) -> int:
        """The global cursor once ``k`` batches of this plan were handed out."""
        return self.n if k >= self.batches else self.cursor + k * self.group

    @property
    def samples(self) -> int:
        if not self.batches:
            return 0
        return (self.batches - 1) * self.batch + self.last


class _Resumable:
    """The state every sampler of ours keeps: (seed, epoch, shuffle), the world it serves
    (``num_replicas``, ``rank``) and where the next iterator starts (``cursor``)."""

    def _setup(
        self,
        n: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not (isinstance(num_replicas, int) and num_replicas >= 1):
            raise ValueError(f"num_replicas should be an integer >= 1, but got {num_replicas!r}")
        if not (isinstance(rank, int) and 0 <= rank < num_replicas):
            raise ValueError(f"rank should be in [0, {num_replicas}), but got {rank!r}")
        self.n, self.shuffle = int(n), bool(shuffle)
        self.seed = check_seed(seed, "seed=", "Pass a seed in that range.")
        self.epoch = check_epoch(epoch, "sampler")
        self.num_replicas, self.rank = num_replicas, rank
        self.cursor = 0  # where the next iterator starts (a pending resume)
        self.batch_size, self.drop_last = 1, False  # set by OrderedBatches
        self._handed_out: int | None = None  # batches of the live iterator handed out
        self.partition: Partition | None = None  # NOTE [partitioned order]
        self._pairs: Any = None  # () -> the split's pair rows (to make a partition)

    def set_epoch(self, epoch: int) -> None:
        """Order of epoch ``epoch`` from its first batch; the restored epoch keeps its
        restored position while no batch of it was handed out (NOTE [resuming])."""
        epoch = check_epoch(epoch, "set_epoch")
        if epoch == self.epoch and self._handed_out in (None, 0):
            return
        self.epoch, self.cursor, self._handed_out = epoch, 0, None

    def order(self) -> EpochOrder | PartitionedOrder:
        if self.partition is not None and self.shuffle:
            return PartitionedOrder(self.partition, self.seed, self.epoch)
        return EpochOrder(self.n, self.seed, self.epoch, self.shuffle)

    def partition_by(
        self,
        pairs: Any,
        unit_rows: int,
        parts: int,
        window: int = 16,
        every_epoch: bool = False,
    ) -> None:
        """Order the epochs by a canonical partition (NOTE [partitioned order]); ``pairs``:
        the split's pair rows, or a function returning them."""
        self._pairs = pairs
        rows = pairs() if callable(pairs) else pairs
        self.partition = Partition(rows, unit_rows, parts, window, every_epoch)

    def partition_spec(self) -> dict[str, Any] | None:
        return None if self.partition is None else self.partition.spec()

    def plan(self, from_start: bool = False) -> _Plan:
        """What this rank serves from the cursor (``from_start``: the whole epoch)."""
        cursor = 0 if from_start else self.cursor
        return _Plan(self.n, cursor, self.num_replicas, self.rank, self.batch_size, self.drop_last)

    def _samples(self) -> Iterator[int]:
        for batch in self.plan().batches_of(self.order()):
            yield from batch

    def _len(self) -> int:
        # a whole epoch's, also while a resume is pending: frameworks count an epoch's
        # batches with len() and the batches done since its start (Lightning does)
        return self.plan(from_start=True).samples


class ResumableRandomSampler(_Resumable, RandomSampler):
    """The train shuffle: a ``RandomSampler`` whose order is a function of (seed, epoch) only
    (NOTE [epoch order]); sharded over ``num_replicas`` ranks like ``DistributedSampler``."""

    def __init__(
        self, data_source: Any, seed: int, epoch: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self._setup(len(data_source), seed, epoch, True, num_replicas, rank)
        RandomSampler.__init__(self, data_source)

    def __iter__(self) -> Iterator[int]:
        return self._samples()

    def __len__(self) -> int:
        return self._len()

    @property
    def num_samples(self) -> int:
        return self._len()


class ResumableSequentialSampler(_Resumable, SequentialSampler):
    """Val/test: a ``SequentialSampler`` (in order), resumable and sharded like the train
    sampler."""

    def __init__(
        self, data_source: Any, seed: int, epoch: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self._setup(len(data_source), seed, epoch, False, num_replicas, rank)
        SequentialSampler.__init__(self, data_source)

    def __iter__(self) -> Iterator[int]:
        return self._samples()

    def __len__(self) -> int:
        return self._len()


class OrderedBatches(BatchSampler):
    """The loader's batch sampler over one of our samplers: each batch computed at once
    (vectorized), this rank's share of each global batch (NOTE [epoch order])."""

    def __init__(self, sampler: _Resumable, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        sampler.batch_size, sampler.drop_last = batch_size, drop_last

    def __iter__(self) -> Iterator[list[int]]:
        s = self.sampler
        return s.plan().batches_of(s.order())

    def __len__(self) -> int:
        return self.sampler.plan(from_start=True).batches  # a whole epoch's (see _len)
