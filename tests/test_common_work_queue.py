"""common.work_queue: largest-first order, dynamic hand-out over a real 2-process gloo group (every
item taken once, the large item alone on one process while the other takes the small ones, no
process idle while items are pending, per-process shares reported), independent queues in one run,
a rank holding other items stops; and common.cache.cached_arrays (the per-folder tissue-mask cache)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from common import dist
from common.cache import cached_arrays
from common.work_queue import WorkQueue, largest_first, shares_by_rank
from common_testutils import run_workers

SECONDS_PER_UNIT = 0.4  # "processing" an item of size s sleeps s * this (the large one 4 s: margin for a busy machine)


@pytest.fixture
def no_launcher_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


# ============================================================================= single process
def test_largest_first_with_ties_by_name():
    assert largest_first(["c", "a", "b", "d"], [1, 1, 5, 1]) == [2, 1, 0, 3]
    assert largest_first(["x", "x"], [2, 2]) == [0, 1]  # same name: by position


def test_single_process_iterates_largest_first_once(no_launcher_env):
    queue = WorkQueue(["s1", "big", "s3", "mid", "s0"], sizes=[1, 10, 1, 5, 1], name="single")
    assert list(queue) == [1, 3, 4, 0, 2]  # big, mid, then the ties by name: s0, s1, s3
    assert [r["item"] for r in queue.taken] == ["big", "mid", "s0", "s1", "s3"]
    assert {r["rank"] for r in queue.taken} == {0} and all(r["finished"] >= r["started"] for r in queue.taken)
    assert list(queue) == []  # the queue is consumed, as in a process group
    (share,) = queue.shares()
    assert (share["rank"], share["items"], share["size"]) == (0, 5, 18.0)
    assert list(WorkQueue(["b", "a", "c"], name="unsized")) == [1, 0, 2]  # equal sizes: name order
    with pytest.raises(ValueError, match="3 items but 2 sizes"):
        WorkQueue(["a", "b", "c"], sizes=[1, 2])


def test_shares_by_rank_counts_idle_ranks():
    records = [{"rank": 1, "size": 3.0, "started": 10.0, "finished": 12.5},
               {"rank": 1, "size": 1.0, "started": 12.5, "finished": 13.0}]
    zero, one = shares_by_rank(records, 2)
    assert (zero["items"], zero["size"], zero["seconds"], zero["last_end"]) == (0, 0, 0, None)
    assert (one["items"], one["size"], one["seconds"], one["first_start"], one["last_end"]) == (2, 4.0, 3.0, 10.0, 13.0)


# ============================================================================= two processes
def _process(queue: WorkQueue) -> None:
    for index in queue:
        time.sleep(queue.sizes[index] * SECONDS_PER_UNIT)


def _mismatch_error(rank: int) -> str | None:
    """What building and iterating a queue does on a rank that sees the inputs differently."""
    queue = WorkQueue(["a", "b"], [1, 2] if rank == 0 else [2, 1], name="mismatch")
    try:
        taken = [queue.names[i] for i in queue]
    except RuntimeError as err:
        return f"{err} (taken: {queue.taken})"
    return f"no error, took {taken}"


def _two_process_worker(ctx, out: str) -> None:
    items = ["small-a", "small-b", "large", "small-c"]
    sizes = [1, 1, 10, 1]
    dist.barrier()  # start together, as after the collective that gathers the sizes
    first, second = WorkQueue(items, sizes, name="slides"), WorkQueue(["x", "y", "z"], [3, 2, 1], name="other")
    _process(first)
    _process(second)
    again = WorkQueue(items, sizes, name="slides")  # same name, built again: a queue of its own
    _process(again)
    result = {"first": first.gather(), "second": second.gather(), "again": again.gather(),
              "shares": first.shares(), "exhausted": dist.all_gather_object(first.exhausted_at),
              "mismatch": dist.all_gather_object(_mismatch_error(ctx.rank))}
    if ctx.is_main:
        Path(out).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    """One 2-process gloo run (spawning costs seconds) whose records the tests below examine."""
    out = tmp_path_factory.mktemp("work_queue") / "result.json"
    run_workers(_two_process_worker, 2, str(out), timeout=60)
    return json.loads(out.read_text())


def test_two_processes_take_each_item_once_largest_first(two_process_run):
    first = two_process_run["first"]
    assert sorted(r["item"] for r in first) == ["large", "small-a", "small-b", "small-c"]  # each exactly once
    assert first[0]["item"] == "large"  # handed out first
    large_rank = first[0]["rank"]
    assert [r["rank"] for r in first[1:]] == [1 - large_rank] * 3  # the other process took all the small ones
    last_start = max(r["started"] for r in first)
    assert all(t >= last_start for t in two_process_run["exhausted"])  # nobody stopped while an item was pending


def test_two_processes_report_their_shares(two_process_run):
    large_rank = two_process_run["first"][0]["rank"]
    shares = {s["rank"]: s for s in two_process_run["shares"]}
    assert sorted(shares) == [0, 1]
    assert (shares[large_rank]["items"], shares[large_rank]["size"]) == (1, 10.0)
    assert (shares[1 - large_rank]["items"], shares[1 - large_rank]["size"]) == (3, 3.0)
    assert shares[large_rank]["seconds"] >= 10 * SECONDS_PER_UNIT
    assert 2.9 * SECONDS_PER_UNIT <= shares[1 - large_rank]["seconds"] < 10 * SECONDS_PER_UNIT  # 3 sleeps, rounded


def test_queues_of_one_run_do_not_interfere(two_process_run):
    for name, items in (("second", ["x", "y", "z"]), ("again", ["large", "small-a", "small-b", "small-c"])):
        assert sorted(r["item"] for r in two_process_run[name]) == items, name  # each exactly once


def test_rank_with_other_items_stops_before_taking_any(two_process_run):
    on_main, on_other = two_process_run["mismatch"]
    assert on_main.startswith("no error, took")  # rank 0's list is the reference
    assert "rank 1 holds other items or sizes than rank 0" in on_other and "(taken: [])" in on_other


# ============================================================================= cached arrays
def test_cached_arrays_reuses_only_under_the_same_key(tmp_path):
    path, calls = tmp_path / "cache" / "slide.npz", []

    def compute(value):
        def run():
            calls.append(value)
            return {"mask": np.full((2, 3), value, bool), "ratio": 64.0}
        return run

    first = cached_arrays(path, compute(True), {"slide": "a", "cell": 64})
    again = cached_arrays(path, compute(False), {"cell": 64, "slide": "a"})  # same key, other key order
    assert calls == [True] and again["mask"].all() and float(again["ratio"]) == 64.0
    assert again.keys() == first.keys() == {"mask", "ratio"}
    changed = cached_arrays(path, compute(False), {"slide": "a", "cell": 32})
    assert calls == [True, False] and not changed["mask"].any()
    path.write_bytes(b"not a zip file")  # a damaged cache is recomputed, not an error
    assert cached_arrays(path, compute(True), {"slide": "a", "cell": 32})["mask"].all() and calls[-1] is True
    assert [p.name for p in path.parent.iterdir()] == ["slide.npz"]  # no temporary files left behind
