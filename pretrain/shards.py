"""Read a pack written by pretrain/pack.py lazily, and sample it shard by shard.

A pack is ``DIR/shard-00000.h5, ...`` (datasets ``images``: one encoded file per item, ``labels``,
``names``) and ``DIR/index.json`` (format, count, shards; written last, so its presence marks a
complete pack); pretrain/pack.py documents the format in full.

Reading (:class:`ShardedImages`) keeps only metadata in the dataset object and opens the HDF5
files lazily in each DataLoader worker; decoding happens in ``__getitem__`` (in the workers).

Sampling (:class:`ShardAwareSampler`) deals whole shards to ranks each epoch, so every rank
(and node) reads only its own files, and all ranks yield the same number of indices.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common.augment import make_generator
from common.dist import get_rank, get_world_size
from common.image import decode_image

FORMAT = "pathmono-shards-v1"
INDEX_NAME = "index.json"


# ============================================================================= reading
def read_index(pack_dir: str | Path) -> dict:
    """index.json of a complete pack, checked for format and fields."""
    path = Path(pack_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{pack_dir}: no {INDEX_NAME}: not a pack, or packing did not finish")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} index (format {index.get('format') if isinstance(index, dict) else None!r})")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "count"} <= s.keys() for s in shards):
        raise ValueError(f"{path}: 'shards' must be a list of {{'file', 'count'}}")
    if sum(s["count"] for s in shards) != index.get("count"):
        raise ValueError(f"{path}: count {index.get('count')} != sum of shard counts {sum(s['count'] for s in shards)}")
    return index


def _shard_labels(path: Path, expected: int) -> np.ndarray:
    """Check one shard file against the index and return its labels (int64 (n,))."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in {INDEX_NAME} is missing")
    try:
        with h5py.File(path, "r", locking=False) as fh:
            lengths = {key: len(fh[key]) for key in ("images", "labels", "names") if key in fh}
            if len(lengths) < 3:
                raise ValueError(f"{path}: shard lacks datasets {sorted({'images', 'labels', 'names'} - lengths.keys())}")
            if set(lengths.values()) != {expected}:
                raise ValueError(f"{path}: shard holds {lengths} items, {INDEX_NAME} says {expected}")
            return fh["labels"][:].astype(np.int64)
    except OSError as err:
        raise OSError(f"{path}: cannot read shard ({err})") from err


class ShardedImages(Dataset):
    """A pack written by :func:`pretrain.pack.pack_folder` -> (uint8 (3, H, W), int label).

    The object holds metadata only (offsets, labels) and pickles into DataLoader workers; each
    process opens the shard files it touches on first access (one handle per shard per process,
    reopened after a fork)."""

    def __init__(self, pack_dir: str | Path):
        self.pack_dir = Path(pack_dir)
        self.index = read_index(self.pack_dir)
        self.files = [self.pack_dir / s["file"] for s in self.index["shards"]]
        per_shard = [_shard_labels(p, s["count"]) for p, s in zip(self.files, self.index["shards"])]
        self.labels = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
        self.offsets = [0] + np.cumsum([len(x) for x in per_shard]).tolist()  # (num_shards + 1,)
        self._handles: dict[int, h5py.File] = {}
        self._pid: int | None = None

    # ------------------------------------------------------------------ metadata
    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def shard_ranges(self) -> list[tuple[int, int]]:
        """Global index range [start, stop) of each shard."""
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None  # open files never travel to another process
        return state

    # ------------------------------------------------------------------ access
    def _locate(self, i: int) -> tuple[int, int]:
        """Global index -> (shard, index inside the shard)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images in {self.pack_dir}")
        i = int(i) % n
        shard = bisect.bisect_right(self.offsets, i) - 1
        return shard, i - self.offsets[shard]

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # first access in this process (or inherited through fork)
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.files[shard], "r", locking=False)
        return self._handles[shard]

    def raw_bytes(self, i: int) -> bytes:
        """The encoded file of item ``i`` as packed (the original file; PNG for pcam_h5)."""
        shard, j = self._locate(i)
        return self._file(shard)["images"][j].tobytes()

    def name(self, i: int) -> str:
        """Path of item ``i`` relative to the packed source folder (pcam_h5: ``"{split}_x.h5:{row}"``)."""
        shard, j = self._locate(i)
        return self._file(shard)["names"].asstr()[j]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        blob = self.raw_bytes(i)
        try:
            rgb = decode_image(blob)  # (H, W, 3)
        except Exception as err:  # noqa: BLE001
            shard, j = self._locate(i)
            raise OSError(f"{self.files[shard]}: item {j} ({self.name(i)}) cannot be decoded ({err})") from err
        return torch.from_numpy(rgb).permute(2, 0, 1), int(self.labels[i])

    def close(self) -> None:
        if self._pid == os.getpid():
            for fh in self._handles.values():
                fh.close()
        self._handles, self._pid = {}, None


# ============================================================================= sampling
def assign_shards(counts: list[int], order: list[int], num_replicas: int) -> list[list[int]]:
    """Deal shards to ranks, balancing sample counts: largest first (ties in ``order``), each to
    the rank with the fewest samples so far (lowest rank on ties). Returns sorted shard ids per rank."""
    owned: list[list[int]] = [[] for _ in range(num_replicas)]
    loads = [0] * num_replicas
    for shard in sorted(order, key=lambda s: -counts[s]):  # stable: equal counts keep ``order``
        rank = min(range(num_replicas), key=lambda r: (loads[r], r))
        owned[rank].append(shard)
        loads[rank] += counts[shard]
    return [sorted(s) for s in owned]


def _fit_length(indices: np.ndarray, n: int) -> np.ndarray:
    """Truncate to ``n`` or repeat from the start (wrap around) up to ``n``."""
    if len(indices) >= n or len(indices) == 0:
        return indices[:n]
    return np.resize(indices, n)


class ShardAwareSampler(Sampler):
    """Each epoch, every rank reads only its own whole shards (disjoint across ranks).

    The shard order is permuted with a generator seeded ``seed + epoch`` (the same on every rank)
    and shards are dealt greedily by count (:func:`assign_shards`); a rank's indices are shuffled
    with ``make_generator(seed, epoch, rank)``. Every rank yields exactly ``num_samples`` =
    ceil(total / num_replicas) indices (floor with ``drop_last``) so DDP steps stay in lockstep: a
    rank short of it repeats its own indices, a rank whose shards hold more yields only the first
    ``num_samples`` of its shuffled sequence (whole shards cannot be split without sharing files,
    so up to about one shard per rank goes unseen in that epoch — a different random part each
    epoch). With fewer non-empty shards than replicas it falls back to an index-level split like
    DistributedSampler (with a warning). ``set_epoch(epoch, skip)`` resumes mid-epoch."""

    def __init__(self, dataset: ShardedImages, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} not in [0, {self.num_replicas})")
        self.ranges = list(dataset.shard_ranges)
        self.total = len(dataset)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.epoch, self.skip = 0, 0
        self.num_samples = self.total // self.num_replicas if drop_last else math.ceil(self.total / self.num_replicas)
        self.index_level = sum(stop > start for start, stop in self.ranges) < self.num_replicas
        if self.index_level:
            warnings.warn(f"{getattr(dataset, 'pack_dir', 'dataset')}: {len(self.ranges)} shards for "
                          f"{self.num_replicas} replicas; splitting by index instead of by shard "
                          "(ranks share files)", stacklevel=2)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; skip the first ``skip`` indices of this rank's sequence (resume)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def plan(self, epoch: int | None = None) -> list[list[int]] | None:
        """Shard ids per rank in ``epoch`` (default: the current one); None in index-level mode."""
        if self.index_level:
            return None
        epoch = self.epoch if epoch is None else epoch
        order = list(range(len(self.ranges)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return assign_shards([stop - start for start, stop in self.ranges], order, self.num_replicas)

    def _shard_level_indices(self) -> np.ndarray:
        own = self.plan()[self.rank]
        indices = np.concatenate([np.arange(*self.ranges[s]) for s in own])
        if self.shuffle:
            perm = torch.randperm(len(indices), generator=make_generator(self.seed, self.epoch, self.rank))
            indices = indices[perm.numpy()]
        return _fit_length(indices, self.num_samples)

    def _index_level_indices(self) -> np.ndarray:
        if self.shuffle:
            indices = torch.randperm(self.total, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
        else:
            indices = np.arange(self.total)
        indices = _fit_length(indices, self.num_samples * self.num_replicas)
        return indices[self.rank::self.num_replicas]

    def indices(self) -> list[int]:
        """This rank's whole sequence for the current epoch (before ``skip``)."""
        seq = self._index_level_indices() if self.index_level else self._shard_level_indices()
        return seq.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)
