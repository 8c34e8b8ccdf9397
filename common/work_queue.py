"""Dynamic sharing of a list of jobs across the processes of a job: largest first, to whoever is free.

    queue = WorkQueue([s.name for s in slides], sizes=tissue_cells, name="slides")
    for i in queue:                       # i indexes the list given to WorkQueue
        infer(slides[i])
    for share in queue.shares():          # collective: every process calls it
        print(share)                      # {"rank": 0, "items": 1, "size": 1200, "seconds": 80.1, ...}

Every process builds the same queue (same items, same sizes) at the same point of the program. The
order is largest size first, ties by item name, so it is identical on every rank. Each step of the
iteration takes the next position with one atomic ``add`` on a counter in the default process
group's key-value store (the store ``init_process_group`` already runs: no extra service), so a
process that finishes early takes the next item instead of waiting for a precomputed share, and
the largest items start first, when there is the most left to balance them against. Without a
process group the counter is local and the iteration is simply the largest-first order.

Each queue has its own counter key (its name plus the number of queues of that name this process
has built before, the same on every rank), so two queues in one run never take from each other. Before the first
item, every rank checks that it holds the same order as rank 0 (a hash through the store) and
stops with an error otherwise: a folder listed differently on two nodes would silently skip or
duplicate work.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Iterator, Sequence

from common import dist

_built: dict[str, int] = {}  # queues built by this process, per name: keys differ between queues of one run


class _LocalCounter:
    """The single-process stand-in for the store's atomic ``add``/``set``/``get``."""

    def __init__(self):
        self.values: dict[str, Any] = {}

    def add(self, key: str, amount: int) -> int:
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.values[key]


def largest_first(names: Sequence[str], sizes: Sequence[float]) -> list[int]:
    """Indices ordered by size, largest first; equal sizes by name, then by position."""
    return sorted(range(len(names)), key=lambda i: (-sizes[i], names[i], i))


def default_store():
    """The key-value store of the default process group (None without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class WorkQueue:
    """Hands out indices of ``items`` largest ``sizes`` first, each to exactly one process.

    ``items`` are names (anything ``str`` turns into a name); ``sizes`` default to equal, which
    keeps the queue in name order. ``taken`` records what this process took: item, index, size,
    rank and the wall-clock start and end of its processing (an item ends when the next one is
    asked for, or the iteration ends)."""

    def __init__(self, items: Sequence[Any], sizes: Sequence[float] | None = None, name: str = "work"):
        self.names = [str(item) for item in items]
        self.sizes = [1.0] * len(self.names) if sizes is None else [float(s) for s in sizes]
        if len(self.sizes) != len(self.names):
            raise ValueError(f"work queue {name!r}: {len(self.names)} items but {len(self.sizes)} sizes")
        self.order = largest_first(self.names, self.sizes)
        self.rank = dist.get_rank()
        store = default_store()
        self.store = _LocalCounter() if store is None else store
        self.key = f"work_queue/{name}/{_built.setdefault(name, 0)}"
        _built[name] += 1
        self.taken: list[dict] = []
        self.exhausted_at: float | None = None
        self._checked = False

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[int]:
        self._check_same_order()
        try:
            while (position := self.store.add(f"{self.key}/next", 1) - 1) < len(self.order):
                yield self._take(self.order[position])
                self.taken[-1]["finished"] = time.time()
        finally:
            self.exhausted_at = time.time()

    def _take(self, index: int) -> int:
        self.taken.append({"item": self.names[index], "index": index, "size": self.sizes[index],
                           "rank": self.rank, "started": time.time(), "finished": None})
        return index

    def _order_digest(self) -> str:
        text = json.dumps([[self.names[i], self.sizes[i]] for i in self.order])
        return hashlib.sha256(text.encode()).hexdigest()

    def _check_same_order(self) -> None:
        """Rank 0 publishes the hash of its order; every other rank compares (waiting for it)."""
        if self._checked:
            return
        digest = self._order_digest()
        if self.rank == 0:
            self.store.set(f"{self.key}/order", digest)
        elif self.store.get(f"{self.key}/order").decode() != digest:
            raise RuntimeError(f"work queue {self.key}: rank {self.rank} holds other items or sizes than rank 0 "
                               f"({len(self.names)} items here); every process must list the same inputs")
        self._checked = True

    def gather(self) -> list[dict]:
        """Every process's ``taken`` records, ordered by start (collective: every rank calls it)."""
        records = [r for part in dist.all_gather_object(self.taken) for r in part]
        return sorted(records, key=lambda r: r["started"])

    def shares(self) -> list[dict]:
        """Each process's share (collective): items, summed size, busy seconds, first start, last end."""
        return shares_by_rank(self.gather(), dist.get_world_size())


def shares_by_rank(records: Sequence[dict], world_size: int) -> list[dict]:
    """Per-rank totals of ``WorkQueue.taken`` records (ranks that took nothing included)."""
    shares = []
    for rank in range(world_size):
        mine = [r for r in records if r["rank"] == rank]
        done = [r for r in mine if r["finished"] is not None]
        shares.append({"rank": rank, "items": len(mine), "size": sum(r["size"] for r in mine),
                       "seconds": round(sum(r["finished"] - r["started"] for r in done), 3),
                       "first_start": min((r["started"] for r in mine), default=None),
                       "last_end": max((r["finished"] for r in done), default=None)})
    return shares
