"""PCam200 / PCam HDF5 / PTCGA200 readers and the PatchTCGA transforms, run on the device.

Workers only read and decode: every item is ``(uint8 (3, H, W), label)``. On the device
``train_transform`` does RandomResizedCrop(scale 0.8-1, antialiased bilinear as PIL's resize)
-> ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 -> Gaussian blur p 0.5 -> H/V flips -> normalise, with
per-sample parameters from an explicit generator; ``eval_transform`` does CentreCrop(287) ->
Resize(224) -> normalise (PatchTCGA eval).
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.augment import (apply_color_jitter, apply_flip, apply_resized_crop, sample_color_jitter, sample_flags,
                            sample_resized_crop)
from common.errors import DataError
from common.image import read_image
from common.stain import HEDAugment

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
PCAM_CLASSES = ("normal", "tumor")  # label 0, 1
PCAM_H5_SPLITS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
ORGAN2ID = {"adrenal_gland": 0, "bile_liver": 1, "liver": 1, "bladder": 2, "brain": 3, "breast": 4,
            "cervix_uteri": 5, "colon": 6, "rectosigmoid": 6, "rectum": 6, "small_intestine": 6,
            "corpus_uteri": 7, "esophagus": 8, "kidney": 9, "lung": 10, "lymphnode": 11, "ovary": 12,
            "pancreas": 13, "prostate": 14, "skin": 15, "stomach": 16, "testis": 17, "thymus": 18,
            "thyroid": 19}


# ============================================================================= item lists
def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (any depth), sorted; the suffix is the *last* one (upstream
    used everything after the first dot and skipped names with extra dots)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pcam_folder_items(root: str | Path, split: str) -> list[tuple[str, int]]:
    """``root/<split>/{normal,tumor}/<case>/<img>`` -> [(path, 0|1)]."""
    base = Path(root) / split
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: PCam200 split folder not found (expected {root}/{{train,val,test}}/"
                                "{normal,tumor}/<case>/<image>)")
    items = [(str(p), label) for label, name in enumerate(PCAM_CLASSES) for p in _images_under(base / name)]
    if not items:
        raise FileNotFoundError(f"{base}: no images in {'/'.join(PCAM_CLASSES)} sub-folders")
    return items


def image_items(folder: str | Path) -> list[tuple[str, int]]:
    """Unlabelled images (label -1) for inference, e.g. Kaggle PCam .tif patches."""
    items = [(str(p), -1) for p in _images_under(Path(folder))]
    if not items:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


class _NoObjectsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # plain dicts/lists/ints/strings need no classes
        raise pickle.UnpicklingError(f"split file may only hold plain containers, found {module}.{name}")


def _check_plain(obj, path, where: str = "root") -> None:
    """The split file may hold only dicts (string keys), lists, strings and ints."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"{path}: non-string key {k!r} at {where}")
            _check_plain(v, path, f"{where}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_plain(v, path, f"{where}[{i}]")
    elif not isinstance(obj, (str, int)) or isinstance(obj, bool):
        raise pickle.UnpicklingError(f"{path}: {type(obj).__name__} at {where}; the split file may only hold "
                                     "dicts, lists, strings and ints")


def load_split_file(path) -> dict:
    """The released ``3fold_dict_idx_filenames.pickle`` through a restricted unpickler: no class
    is ever imported (so no code can run) and the result must be plain dicts/lists/str/int."""
    with open(path, "rb") as fh:
        splits = _NoObjectsUnpickler(fh).load()
    _check_plain(splits, path)
    return splits


def ptcga_items(root: str | Path, split: str, split_file: str | Path, fold: str = "0") -> list[tuple[str, int]]:
    """PTCGA200 ``root/<organ>/<image>`` restricted to a split of the released 3-fold pickle,
    matched on image basenames (not on indices)."""
    root = Path(root)
    splits = load_split_file(split_file)
    try:
        names = set(splits[str(fold)][split]["imgs"])
    except (KeyError, TypeError) as err:
        raise DataError(f"{split_file}: no fold {fold!r} / split {split!r} with 'imgs' ({err})") from err
    items = []
    for organ in sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "thumbnail_position_map"):
        if organ not in ORGAN2ID:
            raise DataError(f"{root / organ}: unknown organ folder (known: {sorted(ORGAN2ID)})")
        items += [(str(p), ORGAN2ID[organ]) for p in _images_under(root / organ) if p.name in names]
    if len(items) != len(names):
        raise DataError(f"{split_file}: {len(names) - len(items)} of {len(names)} {split} images not found under {root}")
    return items


# ============================================================================= datasets
def read_rgb(path: str) -> torch.Tensor:
    """uint8 (3, H, W) of an image file (``common.image.read_image``: an unreadable file raises an
    OSError naming it)."""
    return torch.from_numpy(read_image(path)).permute(2, 0, 1)


class PatchDataset(Dataset):
    """[(path, label)] -> (uint8 (3, H, W), label)."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return read_rgb(path), label


class PCamH5(Dataset):
    """The original PCam files ``{split}_x.h5`` (key ``x``: N x 96 x 96 x 3 uint8) and
    ``{split}_y.h5`` (key ``y``: N x 1 x 1 x 1). Files are opened lazily in each worker."""

    def __init__(self, root: str | Path, split: str):
        import h5py
        name = PCAM_H5_SPLITS.get(split, split)
        self.x_path, self.y_path = Path(root) / f"{name}_x.h5", Path(root) / f"{name}_y.h5"
        for p, key in ((self.x_path, "x"), (self.y_path, "y")):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: PCam HDF5 file not found")
            with h5py.File(p, "r") as fh:
                if key not in fh:
                    raise DataError(f"{p}: no dataset {key!r} (keys {list(fh)})")
                n = len(fh[key])
            if key == "x":
                self.n = n
            elif n != self.n:
                raise DataError(f"{self.y_path}: {n} labels for {self.n} images in {self.x_path}")
        self._x = self._y = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self._x is None:
            import h5py
            self._x, self._y = h5py.File(self.x_path, "r")["x"], h5py.File(self.y_path, "r")["y"]
        return torch.from_numpy(np.ascontiguousarray(self._x[i])).permute(2, 0, 1), int(np.ravel(self._y[i])[0])


def build_dataset(kind: str, root: str, split: str, split_file: str = "", fold: str = "0") -> Dataset:
    if kind == "pcam200":
        return PatchDataset(pcam_folder_items(root, split))
    if kind == "pcam_h5":
        return PCamH5(root, split)
    if kind == "ptcga200":
        return PatchDataset(ptcga_items(root, split, split_file or Path(root).parent / "3fold_dict_idx_filenames.pickle", fold))
    if kind == "images":
        return PatchDataset(image_items(root))
    raise ValueError(f"unknown dataset kind {kind!r}")


def validate_dataset(ds: Dataset, name: str) -> tuple[int, ...]:
    """Read the first item: fail at start-up (not mid-epoch) on unreadable files; returns its shape."""
    if len(ds) == 0:
        raise DataError(f"{name}: empty dataset")
    x, _ = ds[0]
    return tuple(x.shape)


# ============================================================================= transforms
def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def eval_transform(x: torch.Tensor, size: int = 224, crop: int = 287, mean=None, std=None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size): centre ``crop`` (skipped when 0 or larger
    than the patch), bilinear resize to ``size`` (antialiased), normalise."""
    x = x.float() / 255
    h, w = x.shape[-2:]
    if crop and crop <= min(h, w):
        top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
        x = x[..., top:top + crop, left:left + crop]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _normalise(x, mean or [0.485, 0.456, 0.406], std or [0.229, 0.224, 0.225])


def train_transform(x: torch.Tensor, gen: torch.Generator, cfg, hed: HEDAugment = HEDAugment()) -> torch.Tensor:
    """PatchTCGA training augmentation on the device; ``cfg`` has image_size, crop_scale, jitter,
    blur_sigma, mean, std. uint8 (B, 3, H, W) -> float (B, 3, S, S). ``hed``
    (``HEDAugment.from_config(cfg)`` for ``--stain-augment``) jitters the stains first; off by default."""
    x = hed(x, gen)  # x itself, nothing drawn, when off
    b, _, h, w = x.shape
    s = cfg.image_size
    boxes = sample_resized_crop(b, h, w, cfg.crop_scale, gen)  # (B, 4)
    # torchvision RandomResizedCrop on PIL images: a PIL bilinear resize, antialiased when it shrinks
    # (as eval_transform's resize), not point-sampled
    x = apply_resized_crop(x, boxes, s, "bilinear")
    jitter_on = sample_flags(b, 0.8, gen)
    params = sample_color_jitter(b, *cfg.jitter, gen)
    x = torch.where(jitter_on.to(x.device).view(-1, 1, 1, 1), apply_color_jitter(x, params, 255.0, False), x)
    x = x / 255
    blur_on = sample_flags(b, 0.5, gen)
    sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * torch.rand(b, generator=gen, dtype=torch.float64)
    k = 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1
    blurred = kornia.filters.gaussian_blur2d(x, (k, k), sigma.float().to(x.device).view(-1, 1).repeat(1, 2))
    x = torch.where(blur_on.to(x.device).view(-1, 1, 1, 1), blurred, x)
    x = apply_flip(x, sample_flags(b, 0.5, gen), dims=(-1,))
    x = apply_flip(x, sample_flags(b, 0.5, gen), dims=(-2,))
    return _normalise(x, cfg.mean, cfg.std)
