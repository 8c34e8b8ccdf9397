"""common.cache (build-once folders of generated data) and every task's ``--demo`` under torchrun.

The helper: the same parameters reuse the folder, other parameters or another generator version
rebuild it; a half-built sibling left by a killed build is never taken for the set; a failed build
leaves the previous set as it was; a folder that is not a generated set is refused, untouched; two
processes that ask at once build once. Then each training script runs ``--demo`` with
``torchrun --nproc_per_node 2`` on an empty cache (gloo, CPU, the smallest settings): rank 0
builds the data while the other rank waits, instead of reading a folder not yet written.
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path

import pytest

from common.cache import MANIFEST, build_once, cache_key, read_manifest
from common_testutils import free_port, run_ok


def _write_items(folder: Path, n: int) -> dict:
    for i in range(n):
        (folder / f"item_{i}.txt").write_text(f"{i}\n")
    return {"items": n}


def _items(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != MANIFEST)


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.") and p.is_dir())


# ============================================================================= keyed on the parameters
def test_same_parameters_reuse_the_set_other_parameters_or_version_rebuild_it(tmp_path):
    root, calls = tmp_path / "set", []

    def make(n: int, version: int = 1):
        return build_once(root, lambda folder: calls.append(n) or _write_items(folder, n), {"n": n},
                          generator="test.items", version=version)

    first = make(3)
    assert first.built and first.root == root and calls == [3] and _items(root) == ["item_0.txt", "item_1.txt", "item_2.txt"]
    manifest = read_manifest(root)
    assert manifest == first.manifest and manifest["params"] == {"n": 3} and manifest["info"] == {"items": 3}
    assert manifest["key"] == cache_key("test.items", 1, {"n": 3}) and manifest["generator"] == "test.items"
    stamp = (root / MANIFEST).stat().st_mtime_ns

    again = make(3)
    assert not again.built and again.seconds == 0.0 and again.status == "cached" and calls == [3]
    assert (root / MANIFEST).stat().st_mtime_ns == stamp

    fewer = make(1)  # other parameters: rebuilt, nothing of the old set survives
    assert fewer.built and calls == [3, 1] and _items(root) == ["item_0.txt"]
    assert read_manifest(root)["params"] == {"n": 1}
    assert make(1, version=2).built and calls == [3, 1, 1]  # another generator version: rebuilt
    assert cache_key("test.items", 1, {"n": 1}) != cache_key("test.items", 2, {"n": 1}) != \
        cache_key("other", 2, {"n": 1})
    assert _siblings(root) == []


def test_force_rebuilds_and_sets_from_before_this_module_are_rebuilt(tmp_path):
    root, calls = tmp_path / "set", []

    def make(force: bool = False):
        return build_once(root, lambda folder: calls.append(1) or _write_items(folder, 2), {"n": 2},
                          generator="test.items", version=1, force=force)

    root.mkdir()
    (root / "old_item.txt").write_text("left by an earlier generator\n")
    (root / MANIFEST).write_text(json.dumps({"n": 2}) + "\n")  # an old marker: no key
    assert make().built and _items(root) == ["item_0.txt", "item_1.txt"]
    assert not make().built and make(force=True).built and len(calls) == 2


def test_a_folder_that_is_not_a_generated_set_is_refused_untouched(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "slide.tif").write_text("real data")
    with pytest.raises(FileExistsError, match=f"holds files but no {MANIFEST} manifest"):
        build_once(root, lambda folder: _write_items(folder, 1), {}, generator="test.items", version=1)
    assert _items(root) == ["slide.tif"] and _siblings(root) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder (a fresh tmp dir, say) is fine
    assert build_once(empty, lambda folder: _write_items(folder, 1), {}, generator="test.items", version=1).built


# ============================================================================= atomic
def test_a_half_built_sibling_of_a_killed_build_is_never_taken_for_the_set(tmp_path):
    root, params = tmp_path / "set", {"n": 2}
    key = cache_key("test.items", 1, params)
    killed = tmp_path / ".set.building-12345-deadbeef"  # complete-looking, but never renamed into place
    killed.mkdir()
    (killed / "item_0.txt").write_text("half\n")
    (killed / MANIFEST).write_text(json.dumps({"key": key, "params": params}) + "\n")
    retired = tmp_path / ".set.retired-12345-deadbeef"  # an old set moved aside by a build killed mid-swap
    retired.mkdir()
    assert read_manifest(root) is None

    cache = build_once(root, lambda folder: _write_items(folder, 2), params, generator="test.items", version=1)
    assert cache.built and (root / "item_0.txt").read_text() == "0\n" and _items(root) == ["item_0.txt", "item_1.txt"]
    assert _siblings(root) == []  # leftovers removed under the lock


def test_a_failed_build_leaves_the_previous_set_and_no_sibling(tmp_path):
    root = tmp_path / "set"
    build_once(root, lambda folder: _write_items(folder, 2), {"n": 2}, generator="test.items", version=1)

    def crash(folder: Path) -> None:
        _write_items(folder, 5)
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="generator crashed"):
        build_once(root, crash, {"n": 5}, generator="test.items", version=1)
    assert _items(root) == ["item_0.txt", "item_1.txt"] and read_manifest(root)["params"] == {"n": 2}
    assert _siblings(root) == []


# ============================================================================= locked
def _slow_builder(root: str, probe: str, name: str) -> None:
    """One process asking for the set: the build announces itself, then waits for ``release``."""
    probe_dir = Path(probe)

    def build(folder: Path) -> None:
        (probe_dir / f"build_by_{name}").touch()
        while not (probe_dir / "release").exists():
            time.sleep(0.01)
        _write_items(folder, 2)

    (probe_dir / f"asking_{name}").touch()
    cache = build_once(root, build, {"n": 2}, generator="test.items", version=1)
    (probe_dir / f"result_{name}.json").write_text(json.dumps({"built": cache.built, "items": _items(Path(root))}))


def test_two_processes_asking_at_once_build_once(tmp_path):
    root, probe = tmp_path / "cache" / "set", tmp_path / "probe"
    probe.mkdir()
    ctx = multiprocessing.get_context("fork")  # the children only touch files
    first = ctx.Process(target=_slow_builder, args=(str(root), str(probe), "first"))
    first.start()
    _wait_for(probe / "build_by_first")  # the first holds the lock and is building
    second = ctx.Process(target=_slow_builder, args=(str(root), str(probe), "second"))
    second.start()
    _wait_for(probe / "asking_second")
    time.sleep(0.3)  # the second is now waiting on the lock
    assert read_manifest(root) is None and not (probe / "result_second.json").exists()
    (probe / "release").touch()
    for proc in (first, second):
        proc.join(timeout=30)
        assert proc.exitcode == 0
    results = {name: json.loads((probe / f"result_{name}.json").read_text()) for name in ("first", "second")}
    assert results["first"] == {"built": True, "items": ["item_0.txt", "item_1.txt"]}
    assert results["second"] == {"built": False, "items": ["item_0.txt", "item_1.txt"]}
    assert sorted(p.name for p in probe.glob("build_by_*")) == ["build_by_first"]
    assert _siblings(root) == []


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.01)


# ============================================================================= --demo under torchrun
# script, the smallest settings, and the build-once folders (under PATHMONO_CACHE) the demo makes
DEMOS = {
    "camelyon": ("camelyon/train.py", ["--demo-slide-size", "1024", "1024", "--epochs", "1", "--max-steps-per-epoch",
                                       "1", "--batch-size", "2", "--max-val-regions", "2", "--checkpoint-every", "0"],
                 ["camelyon_demo"]),
    "nuclick": ("nuclick/train.py", ["--demo-images", "3", "--demo-size", "128", "--epochs", "1",
                                     "--max-steps-per-epoch", "1", "--batch-size", "2", "--max-val", "4",
                                     "--features", "4", "8", "8", "8", "8", "4"],
                ["nuclick_demo", "nuclick_demo/prepared"]),
    "spleen": ("spleen/train.py", ["--demo-cases", "3", "--val-count", "1", "--epochs", "1", "--max-steps-per-epoch",
                                   "1", "--channels", "2", "4", "8", "--strides", "2", "2", "--num-res-units", "1",
                                   "--pixdim", "5", "5", "5", "--roi-size", "16", "16", "16", "--num-samples", "2",
                                   "--sw-batch-size", "8"],
               ["spleen_demo"]),
    "segpanda": ("segpanda/train.py", ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "2",
                                       "--num-overlays", "0", "--sw-batch-size", "8"],
                 ["segpanda_demo"]),
    "pretrain": ("pretrain/train.py", ["--method", "simclr", "--demo-per-class", "10", "--epochs", "1",
                                       "--max-updates", "1", "--batch-size", "4", "--knn-bank-size", "16",
                                       "--knn-query-size", "8", "--proj-hidden", "32", "--proj-dim", "16"],
                 ["pretrain_ssl_demo"]),
    "finetune": ("pretrain/finetune.py", ["--epochs", "1", "--max-updates", "1", "--batch-size", "4",
                                          "--max-eval-samples", "16"],
                 ["pretrain_demo/PCam200"]),
}


@pytest.mark.parametrize("task", list(DEMOS))
def test_torchrun_demo_on_an_empty_cache_builds_the_data_once_on_rank_0(task, tmp_path):
    script, flags, folders = DEMOS[task]
    cache, out = tmp_path / "cache", tmp_path / "run"
    res = run_ok([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(free_port()), script, "--demo", "--output-dir", out, "--device", "cpu", "--num-workers", "0",
                  *flags], timeout=300, PATHMONO_CACHE=str(cache))
    reports = [line for line in res.stdout.splitlines() if line.startswith("demo data in")]
    assert len(reports) == 1 and "generated in" in reports[0], res.stdout  # rank 0 built it; rank 1 printed nothing
    for folder in folders:
        manifest = read_manifest(cache / folder)
        assert manifest is not None and manifest["key"], folder
        assert _siblings(cache / folder) == []
    assert (out / "result.json").is_file()
