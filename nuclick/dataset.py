"""Per-nucleus crops, label splitting, the bundle's augmentations, and the network's batches
(the click-guidance maps are built by nuclick/guidance.py).

Data flow (nuclick.md §3-5)::

    dataset.json item -> worker: read crop (uint8 RGB) + label PNG {0, class, 255}
                      -> split_label: mask (target nucleus, binary), others (4-connected instances)
    batch on device   -> augment (colour jitter, 180-degree flip, rot90; same geometry for all three)
                      -> x / 127.5 - 1, positive click ~ exp(chessboard distance) - 1 inside the mask,
                         negative clicks at the other nuclei's centroids with the drop rates
                      -> (B, 5, H, W) network input, (B, 1, H, W) binary target

Random numbers come from explicit CPU generators (``common.augment.make_generator``), never from
the global RNG, so a run resumed mid-epoch draws exactly what an uninterrupted run would.
Images are stored and passed in (row, col) order; the MONAI transposition of the released weights
is handled inside the model (``nuclick/model.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.measure import label as label_components
from torch.utils.data import Dataset

from common import augment as aug
from common.image import read_image
from common.logging import progress
from common.stain import HEDAugment, StainNormalizer
from nuclick.config import AugmentConfig, GuidanceConfig
from nuclick.guidance import guidance_inputs

OTHERS_VALUE = 255
ITEM_KEYS = ("image", "label")


# ============================================================================= reading
def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Single-channel uint8 label crop {0, class, 255}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label not found")
    with Image.open(path) as im:
        array = np.asarray(im)
    if array.ndim != 2:
        raise ValueError(f"{path}: a label crop must be single-channel, got shape {array.shape}")
    return array.astype(np.uint8)


def read_datalist(path: str | os.PathLike, key: str) -> list[dict]:
    """Items of ``dataset.json[key]`` with image/label paths resolved (relative paths are relative
    to the JSON file's folder). Every item needs ``image`` and ``label``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data list not found (run nuclick/prepare.py first)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a list under {key!r}")
    items = []
    for i, item in enumerate(data[key]):
        missing = [k for k in ITEM_KEYS if k not in item]
        if missing:
            raise ValueError(f"{path}: {key}[{i}] lacks {missing}")
        resolved = dict(item)
        for k in ITEM_KEYS:
            p = Path(item[k])
            resolved[k] = str(p if p.is_absolute() else path.parent / p)
        items.append(resolved)
    if not items:
        raise ValueError(f"{path}: the {key!r} list is empty")
    return items


def split_label(label: np.ndarray, others_value: int = OTHERS_VALUE) -> tuple[np.ndarray, np.ndarray, int]:
    """MONAI ``SplitLabeld`` (nuclick.md §3): label {0, class, 255} -> (binary mask of the target,
    others relabelled into 4-connected instances 1..K, class id)."""
    mask = np.where(label >= others_value, 0, label)
    class_id = int(mask.max(initial=0))
    others = np.where(label == class_id, 0, label) if class_id else label.copy()
    others = (others > 0).astype(np.uint8)
    if others.any():
        others = label_components(others, connectivity=1)
    return (mask > 0).astype(np.uint8), others.astype(np.int16), class_id


class NucleiDataset(Dataset):
    """Items: (uint8 image (3, H, W), uint8 mask (1, H, W), int16 others (1, H, W), index).

    Reading and label splitting only (the deterministic part the bundle caches); augmentation and
    guidance run on the device. ``cache=True`` decodes everything once at construction, which also
    validates every file up front (errors name the file)."""

    def __init__(self, items: list[dict], cache: bool = True, desc: str = "load crops"):
        self.items = items
        self.size: tuple[int, int] | None = None
        self._cache: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        if cache:
            self._cache = [self._read(i) for i in progress(range(len(items)), desc=desc)]

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        item = self.items[index]
        image = read_image(item["image"])
        label = read_label_png(item["label"])
        if image.shape[:2] != label.shape:
            raise ValueError(f"{item['image']}: image {image.shape[:2]} and label {label.shape} "
                             f"({item['label']}) differ in size")
        if self.size is None:
            self.size = image.shape[:2]
        elif image.shape[:2] != self.size:
            raise ValueError(f"{item['image']}: crop size {image.shape[:2]} differs from the others' {self.size}")
        mask, others, _ = split_label(label)
        return np.ascontiguousarray(image.transpose(2, 0, 1)), mask[None], others[None]

    def __getitem__(self, index: int):
        image, mask, others = self._cache[index] if self._cache is not None else self._read(index)
        return torch.from_numpy(image), torch.from_numpy(mask), torch.from_numpy(others), index


# ============================================================================= augmentation
def augment(image: torch.Tensor, mask: torch.Tensor, others: torch.Tensor, gen: torch.Generator,
            cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float image (B, 3, H, W) in [0, 255], mask and others (B, 1, H, W) -> augmented copies.

    [HED jitter with ``--stain-augment hed``] -> ColorJitter (uint8 semantics, every sample) -> flip
    of both axes (p) -> rot90 k in {1,2,3} (p), the geometry shared by image, mask and others."""
    n = image.shape[0]
    image = HEDAugment.from_config(cfg)(image, gen)  # the image itself, nothing drawn, without --stain-augment
    image = aug.apply_color_jitter(image, aug.sample_color_jitter(n, cfg.brightness, cfg.contrast,
                                                                  cfg.saturation, cfg.hue, gen))
    flip = aug.sample_flags(n, cfg.flip_prob, gen)
    k = aug.sample_rot90(n, cfg.rot90_prob, gen)
    image, mask, others = (aug.apply_rot90(aug.apply_flip(t, flip), k) for t in (image, mask, others))
    return image, mask, others


# ============================================================================= batches
def _to_device(batch, device: torch.device, stain: StainNormalizer):
    """The batch on ``device``: float image, stain normalised when ``stain`` has a target."""
    image, mask, others = (t.to(device, non_blocking=True) for t in batch[:3])
    return stain(image.float()), mask, others


def train_batch(batch, gen: torch.Generator, aug_cfg: AugmentConfig, guide_cfg: GuidanceConfig,
                device: torch.device, stain: StainNormalizer = StainNormalizer()) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader batch -> (network input (B, 5, H, W), float target (B, 1, H, W)) on ``device``."""
    image, mask, others = _to_device(batch, device, stain)
    image, mask, others = augment(image, mask, others, gen, aug_cfg)
    u = torch.rand(image.shape[0], generator=gen, dtype=torch.float64)
    x = guidance_inputs(aug.scale_intensity(image), mask, others, u, gen, guide_cfg)
    return x, mask.float()


def val_batch(batch, seed: int, epoch: int, guide_cfg: GuidanceConfig,
                device: torch.device, stain: StainNormalizer = StainNormalizer()) -> tuple[torch.Tensor, torch.Tensor]:
    """No augmentation; the positive click is drawn per sample from (seed, epoch, dataset index),
    so the validation score does not depend on the number of processes or the batch size."""
    image, mask, others = _to_device(batch, device, stain)
    u = torch.stack([torch.rand(1, generator=aug.make_generator(seed, epoch, int(i)), dtype=torch.float64)[0]
                     for i in batch[3]])
    gen = aug.make_generator(seed, epoch, -1)
    x = guidance_inputs(aug.scale_intensity(image), mask, others, u, gen, guide_cfg)
    return x, mask.float()
