"""MSD Task09 data: case lists, the preprocessed-volume cache, crop sampling and the datasets.

Layout (Medical Segmentation Decathlon)::

    <data_root>/imagesTr/spleen_*.nii.gz   labelsTr/spleen_*.nii.gz   imagesTs/*.nii.gz   dataset.json

Cases are the sorted ``imagesTr`` and ``labelsTr`` files paired by position (the bundle); the
first ``n - 9`` train, the last 9 validate. A data-list JSON (``{"training": [{"image", "label"}],
"validation": [...]}``, paths relative to the list's folder) overrides the split.

Preprocessing (``spleen.transforms``) is deterministic, so each case is preprocessed once into
``<cache_dir>/<name>-<key>.{image,label,fg}.npy`` + ``.json`` (written last: the completion
marker), the key hashing the files (path, size, mtime) and the parameters. Workers memory-map the
arrays and read only the crops they cut.

Training crops (``RandCropByPosNegLabel``: 96^3, pos 1, neg 1, 4 samples): each centre is drawn
from the foreground (label > 0) with probability pos / (pos + neg), else from the background
(label == 0 and scaled image > 0, i.e. HU > -57); one voxel uniformly; the centre is clamped to
[roi // 2, size - roi // 2] per axis and the crop is ``[c - roi // 2, c - roi // 2 + roi)``.
If one set is empty the other is used. Background voxels are drawn by rejection (uniform over the
set, like picking from the full index list, without storing it).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common import dist
from common.io import atomic_write, atomic_write_text
from common.logging import progress
from spleen.transforms import (HU_RANGE, PIXDIM, Geometry, VolumeError, check_same_grid, is_nifti, nifti_stem,
                               open_nifti, preprocess_image, preprocess_label, read_volume)

CACHE_VERSION = 1


@dataclass(frozen=True)
class Case:
    name: str
    image: str
    label: str | None = None


# ============================================================================= case lists
def list_nifti(folder: str | os.PathLike) -> list[Path]:
    """Sorted ``*.nii.gz`` / ``*.nii`` files of a folder (hidden ``._*`` files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def msd_cases(data_root: str | os.PathLike) -> list[Case]:
    """Pair ``imagesTr`` and ``labelsTr`` by sorted position; a missing label is an error naming it."""
    root = Path(data_root)
    images, labels = list_nifti(root / "imagesTr"), list_nifti(root / "labelsTr")
    label_names = {p.name for p in labels}
    missing = [p for p in images if p.name not in label_names]
    if missing:
        raise VolumeError(f"{missing[0]}: training case has no label {root / 'labelsTr' / missing[0].name}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if len(labels) != len(images):
        extra = sorted(label_names - {p.name for p in images})
        raise VolumeError(f"{root / 'labelsTr' / extra[0]}: label without an image in {root / 'imagesTr'}")
    return [Case(nifti_stem(i), str(i), str(l)) for i, l in zip(images, labels)]


def _case_from_entry(entry: dict, base: Path, source: str) -> Case:
    if not isinstance(entry, dict) or "image" not in entry:
        raise VolumeError(f"{source}: every entry needs an 'image' (and 'label'), got {entry!r}")
    image = (base / entry["image"]).resolve()
    label = (base / entry["label"]).resolve() if entry.get("label") else None
    return Case(nifti_stem(image), str(image), str(label) if label else None)


def split_cases(data_root: str | os.PathLike, data_list: str = "", val_count: int = 9) -> tuple[list[Case], list[Case]]:
    """(train, validation): the bundle's positional split, or the data list's two keys."""
    if data_list:
        path = Path(data_list)
        if not path.is_file():
            raise VolumeError(f"{path}: data list not found")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise VolumeError(f"{path}: not valid JSON ({err})") from err
        if "training" not in spec or "validation" not in spec:
            raise VolumeError(f"{path}: a data list needs 'training' and 'validation' keys, has {sorted(spec)}")
        split = [[_case_from_entry(e, path.parent, str(path)) for e in spec[k]] for k in ("training", "validation")]
        for case in split[0] + split[1]:
            if case.label is None:
                raise VolumeError(f"{case.image}: training case has no label in {path}")
        return split[0], split[1]
    cases = msd_cases(data_root)
    if len(cases) <= val_count:
        raise VolumeError(f"{data_root}: {len(cases)} labelled cases, need more than the {val_count} validation cases")
    return cases[:-val_count], cases[-val_count:]


def validate_cases(cases: Sequence[Case]) -> None:
    """Fail at start-up, naming the file: readable 3-D NIfTI, label present, same grid."""
    for case in cases:
        image = open_nifti(case.image)
        if case.label is None:
            raise VolumeError(f"{case.image}: training case has no label")
        check_same_grid(image, open_nifti(case.label), case.image, case.label)


# ============================================================================= preprocessing cache
@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case on disk."""

    name: str
    prefix: str  # <cache_dir>/<name>-<key>

    @property
    def image(self) -> str:
        return self.prefix + ".image.npy"

    @property
    def label(self) -> str:
        return self.prefix + ".label.npy"

    @property
    def foreground(self) -> str:
        return self.prefix + ".fg.npy"

    @property
    def meta(self) -> str:
        return self.prefix + ".json"

    def info(self) -> dict:
        return json.loads(Path(self.meta).read_text())

    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.info()["geometry"])


def _file_id(path: str | None) -> list:
    if path is None:
        return [None]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cache_key(case: Case, pixdim: Sequence[float], hu_range: Sequence[float]) -> str:
    spec = json.dumps([CACHE_VERSION, _file_id(case.image), _file_id(case.label), list(map(float, pixdim)),
                       list(map(float, hu_range))])
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


def _save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array))


def preprocess_case(case: Case, prefix: str, pixdim: Sequence[float], hu_range: Sequence[float]) -> None:
    """Preprocess one case into the cache (arrays first, the JSON marker last)."""
    data, affine, _ = read_volume(case.image)
    image, geom = preprocess_image(data, affine, pixdim, hu_range)
    _save_npy(prefix + ".image.npy", image.numpy())
    meta = {"image": case.image, "label": case.label, "geometry": geom.to_dict()}
    if case.label is not None:
        ldata, laffine, _ = read_volume(case.label)
        label, _ = preprocess_label(ldata, laffine, pixdim, path=case.label)
        fg = np.flatnonzero(label.numpy().reshape(-1)).astype(np.int64)
        _save_npy(prefix + ".label.npy", label.numpy())
        _save_npy(prefix + ".fg.npy", fg)
        meta["foreground_voxels"] = int(fg.size)
    atomic_write_text(prefix + ".json", json.dumps(meta) + "\n")


def build_cache(cases: Sequence[Case], cache_dir: str | os.PathLike, pixdim: Sequence[float] = PIXDIM,
                hu_range: Sequence[float] = HU_RANGE) -> list[CachedCase]:
    """Preprocess what is not cached yet, split across processes; every rank gets the full list."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = [CachedCase(c.name, str(cache_dir / f"{c.name}-{cache_key(c, pixdim, hu_range)}")) for c in cases]
    todo = [(c, cc) for c, cc in zip(cases, cached) if not Path(cc.meta).is_file()]
    mine = todo[dist.get_rank()::dist.get_world_size()]
    for case, cc in progress(mine, desc="preprocess", total=len(mine)):
        preprocess_case(case, cc.prefix, pixdim, hu_range)
    dist.barrier()
    return cached


def check_crop_fits(cases: Sequence[CachedCase], roi: Sequence[int]) -> None:
    """Every training volume must hold a whole crop after preprocessing (the bundle does not pad)."""
    for case in cases:
        info = case.info()
        shape = info["geometry"]["shape"]
        if any(s < r for s, r in zip(shape, roi)):
            raise VolumeError(f"{info['image']}: preprocessed to {tuple(shape)} voxels, smaller than the "
                              f"{tuple(roi)} training crop")


# ============================================================================= crop sampling
def crop_centre_bounds(shape: Sequence[int], roi: Sequence[int], source: str = "<volume>"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Valid centres per axis: [roi // 2, size - roi // 2] (MONAI ``correct_crop_centers``)."""
    shape, roi = np.asarray(shape), np.asarray(roi)
    if (shape < roi).any():
        raise VolumeError(f"{source}: preprocessed volume {tuple(shape)} is smaller than the crop {tuple(roi)}")
    lo = roi // 2
    hi = (shape + 1 - roi / 2).astype(np.int64) - 1
    return lo, np.maximum(hi, lo)


def _draw_background(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                     max_tries: int = 20000) -> int | None:
    """A uniformly drawn flat index with label == 0 and image > 0, by rejection; None if none found."""
    flat_image, flat_label = image.reshape(-1), label.reshape(-1)
    n = flat_label.size
    for _ in range(max_tries):
        i = int(rng.integers(n))
        if flat_label[i] == 0 and flat_image[i] > 0:
            return i
    candidates = np.flatnonzero((flat_label == 0) & (flat_image > 0))  # rare: almost no background
    return int(candidates[rng.integers(candidates.size)]) if candidates.size else None


def sample_crop_centres(image: np.ndarray, label: np.ndarray, foreground: np.ndarray, roi: Sequence[int],
                        num_samples: int, pos: float, neg: float, rng: np.random.Generator,
                        source: str = "<volume>") -> list[tuple[int, ...]]:
    """Crop centres (see module docstring); ``foreground`` holds the flat indices with label > 0."""
    lo, hi = crop_centre_bounds(label.shape, roi, source)
    pos_ratio = pos / (pos + neg)
    if foreground.size == 0:
        pos_ratio = 0.0
    centres = []
    for _ in range(num_samples):
        index = None
        if rng.random() >= pos_ratio:
            index = _draw_background(image, label, rng)
        if index is None:
            if foreground.size == 0:
                raise VolumeError(f"{source}: no foreground and no background voxel to centre a crop on")
            index = int(foreground[rng.integers(foreground.size)])
        centre = np.unravel_index(index, label.shape)
        centres.append(tuple(int(min(max(c, a), b)) for c, a, b in zip(centre, lo, hi)))
    return centres


def crop(volume: np.ndarray, centre: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    starts = [c - r // 2 for c, r in zip(centre, roi)]
    return np.asarray(volume[tuple(slice(s, s + r) for s, r in zip(starts, roi))])


# ============================================================================= datasets
class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` so that workers draw crops from a generator seeded by (seed, epoch,
    index): reproducible whatever the worker count, and identical after a mid-epoch resume."""

    def __init__(self, base: dist.ResumableSampler):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch, skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class CropDataset(Dataset):
    """Item ``(epoch, i)`` -> image (n, 1, *roi) float32 and label (n, 1, *roi) uint8 crops of case i."""

    def __init__(self, cases: Sequence[CachedCase], roi: Sequence[int], num_samples: int = 4, pos: float = 1.0,
                 neg: float = 1.0, seed: int = 0):
        self.cases, self.roi = list(cases), tuple(int(r) for r in roi)
        self.num_samples, self.pos, self.neg, self.seed = num_samples, pos, neg, seed

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = item
        case = self.cases[i]
        image = np.load(case.image, mmap_mode="r")
        label = np.load(case.label, mmap_mode="r")
        rng = np.random.default_rng([self.seed, epoch, i])
        centres = sample_crop_centres(image, label, np.load(case.foreground), self.roi, self.num_samples,
                                      self.pos, self.neg, rng, source=case.name)
        images = np.stack([crop(image, c, self.roi) for c in centres])[:, None]
        labels = np.stack([crop(label, c, self.roi) for c in centres])[:, None]
        return torch.from_numpy(images), torch.from_numpy(labels)


class VolumeDataset(Dataset):
    """Whole preprocessed volumes: (1, X', Y', Z') float32 image, uint8 label, case index."""

    def __init__(self, cases: Sequence[CachedCase]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        case = self.cases[i]
        image = torch.from_numpy(np.load(case.image))[None]
        label = torch.from_numpy(np.load(case.label))[None]
        return image, label, i
