"""Build-once folders of generated data (the demos' synthetic sets), keyed on their parameters.

    cache = build_once(root, write_set, {"num_train": 10, "seed": 0}, generator="spleen.demo", version=3)
    cache.built, cache.seconds        # False, 0.0 when ``root`` already held this very set

``write_set(folder)`` writes the set into an empty folder and may return a dict of facts worth
keeping (timings, counts), stored in the manifest. The rules:

- **keyed**: the manifest ``root/.complete`` records the generator, its version, the parameters
  and their hash (the key). A folder with the same key is reused as it is; one built with other
  parameters, by another version of the generator, or by the generators before this module (a
  ``.complete`` without a key) is rebuilt, never silently reused.
- **atomic**: the set is written into a hidden sibling ``.<name>.building-<pid>-<random>``, the
  manifest goes in last and the sibling is renamed to ``root``, so ``root`` only ever holds a
  complete set. A sibling left behind by a killed build is never read, and the next build removes
  it; so is a previous set moved aside (``.<name>.retired-*``) by a build killed mid-swap.
- **locked**: builders serialise on ``.<name>.lock`` next to ``root`` (``fcntl.flock``), so
  concurrent processes build once: the others wait, then reuse.
- **safe**: a non-empty ``root`` without a manifest is not a generated set; it is refused with
  :class:`FileExistsError` rather than replaced.

Under torchrun the task's demo function runs :func:`build_once` through
:func:`common.dist.run_on_main`: rank 0 builds while the other ranks wait, and a failure stops them
all. Files a task adds to ``root`` after the build (patch lists, packed shards) go with the set
when it is rebuilt.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from common.io import atomic_write, atomic_write_text

MANIFEST = ".complete"  # the name the generators used before this module: their sets are recognised
BUILDING, RETIRED = "building", "retired"


@dataclass(frozen=True)
class Cache:
    """A folder holding a complete generated set; ``built``: this call generated it."""

    root: Path
    manifest: dict
    built: bool
    seconds: float  # generation time of this call (0 when reused)

    @property
    def status(self) -> str:
        return f"generated in {self.seconds:.0f}s" if self.built else "cached"


def cache_key(generator: str, version: int | str, params: dict) -> str:
    """Hash of the generator's name, version and parameters (JSON with sorted keys)."""
    text = json.dumps({"generator": generator, "version": version, "params": params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of ``root``, or None when absent or unreadable."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def build_once(root: str | os.PathLike, build: Callable[[Path], dict | None], params: dict, *, generator: str,
               version: int | str, force: bool = False) -> Cache:
    """``root`` holding the set ``build`` writes for ``params``: reused when its key matches (and
    not ``force``), else built under the lock into a sibling renamed into place. See the module
    docstring."""
    root = Path(root)
    key = cache_key(generator, version, params)
    manifest = _matching_manifest(root, key)
    if manifest is not None and not force:
        return Cache(root, manifest, built=False, seconds=0.0)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        manifest = _matching_manifest(root, key)
        if manifest is not None and not force:  # another process built it while this one waited
            return Cache(root, manifest, built=False, seconds=0.0)
        _remove_leftovers(root)
        _check_replaceable(root)
        manifest = {"generator": generator, "version": version, "key": key, "params": params}
        seconds = _build_and_swap(root, build, manifest)
    return Cache(root, manifest, built=True, seconds=seconds)


# ----------------------------------------------------------------------------- internals
def _matching_manifest(root: Path, key: str) -> dict | None:
    manifest = read_manifest(root)
    return manifest if manifest is not None and manifest.get("key") == key else None


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on ``.<name>.lock`` beside ``root`` (outside it: ``root`` itself is swapped)."""
    with open(root.parent / f".{root.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sibling(root: Path, kind: str) -> Path:
    return root.parent / f".{root.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_leftovers(root: Path) -> None:
    """Delete what killed builds left beside ``root`` (called under the lock: no build is running)."""
    prefixes = tuple(f".{root.name}.{kind}-" for kind in (BUILDING, RETIRED))
    for path in root.parent.iterdir():
        if path.name.startswith(prefixes) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _check_replaceable(root: Path) -> None:
    """Only a missing or empty folder, or one holding a manifest, may be replaced."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a folder; expected a generated demo set", str(root))
    if any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise FileExistsError(errno.EEXIST, f"holds files but no {MANIFEST} manifest, so it is not a generated "
                                            "demo set; move it away or choose another folder", str(root))


def _build_and_swap(root: Path, build: Callable[[Path], Any], manifest: dict) -> float:
    """Build into a fresh sibling, write the manifest (updated in place) last, rename it to ``root``."""
    staging = _sibling(root, BUILDING)
    staging.mkdir()
    t0 = time.perf_counter()
    try:
        info = build(staging)
        seconds = time.perf_counter() - t0
        manifest.update(seconds=round(seconds, 2), **({"info": info} if info else {}))
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _swap(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return seconds


def _swap(staging: Path, root: Path) -> None:
    """Rename ``staging`` to ``root``; an existing ``root`` is moved aside first, then deleted."""
    if root.exists():
        retired = _sibling(root, RETIRED)
        os.rename(root, retired)
        os.rename(staging, root)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, root)


# ----------------------------------------------------------------------------- one file of arrays
CACHED_KEY = "__cache_key__"


def cached_arrays(path: str | os.PathLike, compute: Callable[[], dict[str, Any]], key: dict) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path`` when it was written under ``key`` (JSON-able: the
    input's identity and every parameter of ``compute``); otherwise ``compute()``'s arrays, first
    written to ``path`` atomically together with the key. A missing, unreadable or differently keyed
    file is recomputed, never reused. No lock: callers give each file to one process (concurrent
    writers of the same key would write the same content anyway)."""
    path = Path(path)
    stamp = json.dumps(key, sort_keys=True)
    try:
        with np.load(path, allow_pickle=False) as data:
            if CACHED_KEY in data.files and str(data[CACHED_KEY]) == stamp:
                return {name: data[name] for name in data.files if name != CACHED_KEY}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    arrays = {name: np.asarray(value) for name, value in compute().items()}
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays, **{CACHED_KEY: np.array(stamp)}))
    return arrays
