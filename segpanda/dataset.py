"""segPANDA200 tiles and masks: discovery, start-up validation, worker-side decoding and the joint
augmentation that runs on the device.

Layout (PatchTCGA ``dataset_utils``)::

    <root>/{train,val,test}/<ISUP grade 0-5>/<slide>/<name>.jpg
                                                   /<name>_mask.png   labels in channel 0 (0-5)

Workers only decode: an image is a uint8 (3, H, W) tensor, its mask uint8 (H, W). On the device,
in PatchTCGA's order, each whole tile gets colour jitter and Gaussian blur (image only), then one
random crop and horizontal/vertical flips replayed exactly on the mask (pure indexing, i.e. nearest
sampling), then mean/std normalisation.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.augment import (apply_blur, apply_color_jitter, apply_crop, apply_flip, blur_kernel_size,
                            sample_color_jitter, sample_crop, sample_flags)
from common.errors import UserError
from common.stain import HEDAugment, HEDParams
from segpanda.config import AugmentConfig

CLASS_NAMES = ("background", "stroma", "benign", "gleason3", "gleason4", "gleason5")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_mask.png"


class DatasetError(UserError, ValueError):
    """A segPANDA folder or file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path
    grade: str  # ISUP folder name
    slide: str


# ============================================================================= discovery / validation
def find_samples(root: str | Path, split: str) -> list[Sample]:
    """Every ``<name>.jpg`` with its ``<name>_mask.png`` under ``root/split`` (sorted paths).

    Raises naming the folder when it is missing or empty and the image when its mask is absent."""
    base = Path(root) / split
    if not base.is_dir():
        raise DatasetError(f"{base}: split folder not found (expected <root>/{{train,val,test}}/<grade>/<slide>/)")
    samples, orphans = [], []
    for image in sorted(p for p in base.glob("*/*/*") if p.is_file()):
        name = image.name.lower()
        if name.endswith(MASK_SUFFIX) or not name.endswith(IMAGE_SUFFIXES):
            continue
        mask = image.with_name(image.stem + MASK_SUFFIX)
        if not mask.is_file():
            orphans.append(image)
            continue
        samples.append(Sample(image, mask, image.parent.parent.name, image.parent.name))
    if orphans:
        raise DatasetError(f"{len(orphans)} image(s) without a {MASK_SUFFIX} mask, e.g. {orphans[0]}"
                           + (f", {orphans[1]}" if len(orphans) > 1 else ""))
    if not samples:
        raise DatasetError(f"{base}: no <grade>/<slide>/<name>.jpg tiles with masks")
    return samples


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path: Path, num_classes: int = 6) -> np.ndarray:
    """(H, W) uint8 labels from channel 0 (PatchTCGA: PIL -> RGB -> [..., 0]); raises on values >= num_classes."""
    with Image.open(path) as im:
        mask = np.asarray(im.convert("RGB"))[..., 0]
    top = int(mask.max()) if mask.size else 0
    if top >= num_classes:
        bad = sorted(int(v) for v in np.unique(mask) if v >= num_classes)
        raise DatasetError(f"{path}: label value(s) {bad} outside 0-{num_classes - 1}")
    return np.ascontiguousarray(mask)


def _check_sample(sample: Sample, num_classes: int, check_values: bool) -> tuple[int, int]:
    with Image.open(sample.image) as im:
        size = im.size
    with Image.open(sample.mask) as m:
        if m.size != size:
            raise DatasetError(f"{sample.mask}: mask size {m.size[0]}x{m.size[1]} differs from its image "
                               f"{sample.image.name} {size[0]}x{size[1]}")
    if check_values:
        read_mask(sample.mask, num_classes)
    return size[1], size[0]


def validate_samples(samples: list[Sample], num_classes: int = 6, min_size: int = 0, uniform: bool = False,
                     check_values: bool = True, workers: int = 4) -> tuple[int, int]:
    """Check every pair before training: mask size = image size, label values (decoding every mask
    when ``check_values``), tiles at least ``min_size`` (the crop) and, for batched random crops,
    all of one size. Returns the (H, W) of the first tile."""
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        sizes = list(pool.map(lambda s: _check_sample(s, num_classes, check_values), samples))
    for sample, (h, w) in zip(samples, sizes):
        if min(h, w) < min_size:
            raise DatasetError(f"{sample.image}: tile {w}x{h} is smaller than the crop {min_size}")
        if uniform and (h, w) != sizes[0]:
            raise DatasetError(f"{sample.image}: tile {w}x{h} differs from {samples[0].image.name} "
                               f"{sizes[0][1]}x{sizes[0][0]}; batched random crops need tiles of one size")
    return sizes[0]


# ============================================================================= dataset
class SegPandaDataset(Dataset):
    """Decoded pairs: (uint8 image (3, H, W), uint8 mask (H, W)); ``center_crop`` crops in the worker
    (evaluation at PatchTCGA's ``CenterCrop(val_image_size)``)."""

    def __init__(self, samples: list[Sample], num_classes: int = 6, center_crop: int = 0):
        self.samples, self.num_classes, self.center_crop = samples, num_classes, center_crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image, mask = read_image(sample.image), read_mask(sample.mask, self.num_classes)
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"{sample.mask}: mask {mask.shape} does not match image {image.shape[:2]}")
        if self.center_crop:
            image, mask = center_crop(image, self.center_crop, sample.image), center_crop(mask, self.center_crop, sample.image)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(mask)


def center_crop(array: np.ndarray, size: int, source: Path | str = "") -> np.ndarray:
    """torchvision ``CenterCrop`` offsets (round((H - size) / 2)) on an (H, W, ...) array."""
    h, w = array.shape[:2]
    if size > h or size > w:
        raise DatasetError(f"{source}: crop {size} is larger than the tile {w}x{h}")
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return array[top:top + size, left:left + size]


# ============================================================================= device augmentation
@dataclass
class AugmentParams:
    corners: torch.Tensor  # (B, 2) crop top-left
    hflip: torch.Tensor  # (B,) bool
    vflip: torch.Tensor
    jitter: torch.Tensor  # (B,) bool: colour jitter applied
    jitter_params: object  # common.augment.ColorJitterParams
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) float64
    hed: HEDParams | None = None  # --stain-augment hed; None: no stain step


def sample_augment(n: int, image_size: tuple[int, int], cfg: AugmentConfig, gen: torch.Generator) -> AugmentParams:
    """All random parameters of a batch, drawn from ``gen`` (CPU) in a fixed order; the HED
    parameters last (none drawn without ``--stain-augment``), so the others do not depend on it."""
    corners = sample_crop(n, image_size, (cfg.crop_size, cfg.crop_size), gen)
    hflip, vflip = sample_flags(n, cfg.flip_prob, gen), sample_flags(n, cfg.flip_prob, gen)
    jitter = sample_flags(n, cfg.jitter_prob, gen)
    jitter_params = sample_color_jitter(n, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, gen)
    blur = sample_flags(n, cfg.blur_prob, gen)
    lo, hi = cfg.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    hed = HEDAugment.from_config(cfg).sample(n, gen)
    return AugmentParams(corners, hflip, vflip, jitter, jitter_params, blur, sigma, hed)


def apply_geometry(x: torch.Tensor, params: AugmentParams, crop_size: int) -> torch.Tensor:
    """Crop + flips on (B, C, H, W) of any dtype: indexing only, so a mask stays exact (nearest)."""
    x = apply_crop(x, params.corners, (crop_size, crop_size))
    x = apply_flip(x, params.hflip, dims=(-1,))
    return apply_flip(x, params.vflip, dims=(-2,))


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """float [0, 255] (B, 3, H, W) -> (x / 255 - mean) / std."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def train_transform(images: torch.Tensor, masks: torch.Tensor, params: AugmentParams, cfg: AugmentConfig,
                    mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) and masks (B, H, W) on the device -> normalised float crops
    (B, 3, S, S) and int64 targets (B, S, S).

    PatchTCGA's order ([HED jitter of the whole tile with ``--stain-augment hed``]): colour jitter
    and blur of the whole tile (its PIL transforms), then the
    random crop and flips (its kornia ops, replayed on the mask). So the contrast/saturation means
    are the tile's and the blur reaches across the crop border. The blur kernel is fixed by the
    sigma range (not by the batch's largest sigma), so a sample's blur does not depend on its batch."""
    x = HEDAugment.from_config(cfg).apply(images.float(), params.hed)
    jit = params.jitter.nonzero().flatten()
    if jit.numel():
        sub = type(params.jitter_params)(*(getattr(params.jitter_params, f)[jit] for f in
                                           ("brightness", "contrast", "saturation", "hue", "order")))
        x[jit.to(x.device)] = apply_color_jitter(x[jit.to(x.device)], sub, bound=255.0)
    x = apply_blur(x, params.blur, params.sigma, kernel_size=blur_kernel_size(cfg.blur_sigma[1])).clamp_(0, 255)
    x = apply_geometry(x, params, cfg.crop_size)
    y = apply_geometry(masks.unsqueeze(1), params, cfg.crop_size)[:, 0].long()
    return normalize(x, mean, std), y


def eval_transform(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return normalize(images.float(), mean, std)
