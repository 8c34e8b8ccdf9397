"""Slides, patch lists and the training dataset of the Camelyon16 pipeline.

- Slides: anything OpenSlide opens, read through ``common.wsi``. Each data-loader worker opens a
  slide lazily on first use and keeps the handle; pixels outside the slide or transparent come back
  white. Training regions are read at level 0, so the model learns the slides' level-0 resolution;
  ``training_mpp`` finds it in their headers and the checkpoint's config records it.
- Patch lists (region centres at level 0 with the nine labels of the 3x3 grid):
  the bundle's CSV (``slide,x,y,l0..l8``, labels stored column-outer: ``label[r][c]`` = CSV
  column ``3 + r + 3c``), NCRF ``coords/*.txt`` (``Slide_id,x,y``; grid labels from annotations),
  and a MONAI-style JSON data list (``{"training": [{"image", "location": [row, col], "label": [9]}]}``).
- Training items are whole 768-px regions (uint8, read once); the 3x3 split into 224-px patches
  and all augmentation happen on the training device on the batch (see ``split_grid``).
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from camelyon.config import AugmentConfig
from common import augment as aug
from common.errors import DataError
from common.stain import HEDAugment
from common.wsi import SLIDE_SUFFIXES, SlideError, SlideHandles, dataset_mpp, open_slide, read_rgb

REGION = 768
PATCH = 224
GRID = 3
GRID_STEP = (REGION - PATCH) // (GRID - 1)  # 272: patch offsets 0, 272, 544
#: Camelyon16's level-0 µm/px (Radboud scanner); the bundle's ``model.pt`` was trained at it
CAMELYON16_MPP = 0.243


# ============================================================================= patch lists
@dataclass(frozen=True)
class PatchRecord:
    slide: str  # path to the slide file
    x: int  # level-0 column of the region centre
    y: int  # level-0 row of the region centre
    labels: tuple[float, ...]  # 9 labels, row-major over the 3x3 grid: labels[3r + c]


def _resolve_slide(name: str, image_dir: Path | None, suffix: str) -> str:
    path = Path(name)
    if path.suffix.lower() in SLIDE_SUFFIXES and (path.is_absolute() or image_dir is None):
        return str(path)
    base = image_dir / path if image_dir is not None else path
    return str(base if base.suffix.lower() in SLIDE_SUFFIXES else base.with_name(base.name + suffix))


def read_bundle_csv(path: Path, image_dir: Path | None, suffix: str = ".tif") -> list[PatchRecord]:
    """The bundle's ``training.csv``/``validation.csv``: no header, ``slide,x,y`` + 9 labels
    stored column-outer (reorder [3,6,9,4,7,10,5,8,11] gives the row-major grid)."""
    records = []
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row:
                continue
            if len(row) != 12:
                raise DataError(f"{path}:{lineno}: expected 12 columns (slide,x,y,9 labels), got {len(row)}")
            try:
                x, y = int(float(row[1])), int(float(row[2]))
                stored = [float(v) for v in row[3:12]]
            except ValueError as err:
                raise DataError(f"{path}:{lineno}: not a number ({err})") from err
            labels = tuple(stored[r + 3 * c] for r in range(GRID) for c in range(GRID))
            records.append(PatchRecord(_resolve_slide(row[0].strip(), image_dir, suffix), x, y, labels))
    return records


def write_bundle_csv(records: list[PatchRecord], path: Path, slide_names: bool = True) -> None:
    """Inverse of ``read_bundle_csv`` (slide stem, x, y, labels column-outer), written atomically."""
    from common.io import atomic_write

    def write(fh):
        writer = csv.writer(fh)
        for rec in records:
            name = Path(rec.slide).stem if slide_names else rec.slide
            stored = [rec.labels[3 * r + c] for c in range(GRID) for r in range(GRID)]
            writer.writerow([name, rec.x, rec.y, *[int(v) if float(v).is_integer() else v for v in stored]])

    atomic_write(path, write, mode="w")


def read_ncrf_coords(path: Path, image_dir: Path | None, annotation_dir: Path | None,
                     suffix: str = ".tif") -> list[PatchRecord]:
    """NCRF ``coords/*.txt`` (``Tumor_024,25417,127565``). Grid labels come from the slide's
    annotation (``<annotation_dir>/<slide>.xml|.json``, point test on each patch centre); slides
    without one are normal (all 0). Without ``annotation_dir`` the file name decides the label of
    all nine patches (``tumor*`` -> 1), with a warning."""
    from camelyon.annotations import Annotation, grid_labels, read_annotation

    rows = []
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row:
                continue
            if len(row) != 3:
                raise DataError(f"{path}:{lineno}: expected 'slide,x,y', got {row}")
            rows.append((row[0].strip().lower(), int(float(row[1])), int(float(row[2]))))
    records: list[PatchRecord] = []
    by_slide: dict[str, list[tuple[int, int]]] = {}
    for name, x, y in rows:
        by_slide.setdefault(name, []).append((x, y))
    if annotation_dir is None:
        warnings.warn(f"{path}: no annotation folder given; labelling all nine patches of every "
                      f"region by the file name ({'tumour' if Path(path).name.lower().startswith('tumor') else 'normal'})")
    for name, centres in by_slide.items():
        xy = np.asarray(centres, dtype=np.float64)
        if annotation_dir is None:
            grid = np.full((len(xy), 3, 3), float(Path(path).name.lower().startswith("tumor")))
        else:
            ann_path = next((p for p in (annotation_dir / f"{name}{s}" for s in (".xml", ".json", ".geojson"))
                             if p.is_file()), None)
            ann = read_annotation(ann_path, allow_empty=True) if ann_path else Annotation([], [], source=name)
            grid = grid_labels(ann, xy, region=REGION, patch=PATCH)
        slide = _resolve_slide(name, image_dir, suffix)
        records += [PatchRecord(slide, int(x), int(y), tuple(float(v) for v in g.reshape(-1)))
                    for (x, y), g in zip(centres, grid)]
    return records


def read_json_list(path: Path, image_dir: Path | None, key: str = "training", suffix: str = ".tif") -> list[PatchRecord]:
    """MONAI-style data list: items ``{"image", "location": [row, col], "label": [9 row-major]}``."""
    data = json.loads(Path(path).read_text())
    items = data.get(key) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list under {key!r}")
    records = []
    for i, item in enumerate(items):
        try:
            row, col = item["location"]
            labels = tuple(float(v) for v in np.asarray(item["label"], dtype=np.float64).reshape(-1))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: item {i} needs 'image', 'location' [row, col] and 9 labels ({err})") from err
        if len(labels) != 9:
            raise DataError(f"{path}: item {i} has {len(labels)} labels, expected 9")
        records.append(PatchRecord(_resolve_slide(item["image"], image_dir, suffix), int(col), int(row), labels))
    return records


def read_patch_list(path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                    annotation_dir: str | os.PathLike | None = None, json_key: str = "training",
                    suffix: str = ".tif") -> list[PatchRecord]:
    """Read any supported patch list (by suffix: .csv bundle, .txt NCRF, .json data list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: patch list not found")
    image_dir = Path(image_dir) if image_dir else None
    if path.suffix.lower() == ".csv":
        records = read_bundle_csv(path, image_dir, suffix)
    elif path.suffix.lower() == ".txt":
        records = read_ncrf_coords(path, image_dir, Path(annotation_dir) if annotation_dir else None, suffix)
    elif path.suffix.lower() == ".json":
        records = read_json_list(path, image_dir, json_key, suffix)
    else:
        raise DataError(f"{path}: unknown patch-list format (use .csv, .txt or .json)")
    if not records:
        raise DataError(f"{path}: the patch list is empty")
    return records


def validate_records(records: list[PatchRecord], region: int = REGION, source: str = "patch list") -> None:
    """Fail at start-up, not hours later: every slide exists and opens, and every region centre lies
    inside its slide. The message lists what is wrong (first few of each)."""
    problems: list[str] = []
    by_slide: dict[str, list[PatchRecord]] = {}
    for rec in records:
        by_slide.setdefault(rec.slide, []).append(rec)
    missing = [s for s in by_slide if not Path(s).is_file()]
    if missing:
        problems.append(f"{len(missing)} slide(s) not found, e.g. {missing[:3]}")
    for slide_path, recs in by_slide.items():
        if slide_path in missing:
            continue
        try:
            with open_slide(slide_path) as slide:
                width, height = slide.dimensions
        except SlideError as err:
            problems.append(str(err))
            continue
        bad = [(r.x, r.y) for r in recs if not (0 <= r.x < width and 0 <= r.y < height)]
        if bad:
            problems.append(f"{slide_path}: {len(bad)} centre(s) outside the {width}x{height} slide, e.g. {bad[:3]}")
    if problems:
        raise SlideError(f"{source}: " + "; ".join(problems))


def training_mpp(records: list[PatchRecord], declared: float = 0.0) -> tuple[float, str]:
    """The µm/px the model is trained at, and a note for the log: ``declared`` (> 0) as given, else
    the level-0 resolution the slides' headers declare (all agree: that value; they differ: the
    median, with a warning; none declares one: Camelyon16's 0.243)."""
    if declared > 0:
        return declared, "set in the configuration"
    return dataset_mpp((r.slide for r in records), default=CAMELYON16_MPP)


# ============================================================================= datasets
class RegionDataset(Dataset):
    """Items: (uint8 region (3, 768, 768), float32 labels (3, 3)). Reading only; no augmentation."""

    def __init__(self, records: list[PatchRecord], region: int = REGION):
        self.records, self.region = records, region
        self.handles = SlideHandles()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records[index]
        half = self.region // 2
        rgb = read_rgb(self.handles(rec.slide), rec.x - half, rec.y - half, self.region, self.region)
        image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, R, R) uint8
        labels = torch.tensor(rec.labels, dtype=torch.float32).view(GRID, GRID)
        return image, labels


def split_grid(regions: torch.Tensor, labels: torch.Tensor, patch: int = PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, R, R) regions + (B, 3, 3) labels -> (B*9, 3, P, P) patches + (B*9,) labels.

    Patch k = 3r + c of region b is at offsets (r*step, c*step), step = (R - P) // 2, and is paired
    with labels[b, r, c]; MONAI's collate flattens the nine samples of each region in this order."""
    B, C, R, _ = regions.shape
    step = (R - patch) // (GRID - 1)
    tiles = [regions[:, :, r * step:r * step + patch, c * step:c * step + patch]
             for r in range(GRID) for c in range(GRID)]
    patches = torch.stack(tiles, dim=1).reshape(B * GRID * GRID, C, patch, patch)  # (B, 9, C, P, P) -> (B*9, ...)
    return patches, labels.reshape(B * GRID * GRID)


def train_transform(patches: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """uint8/float (N, 3, 224, 224) in [0, 255] -> augmented float32 in [-1, 1], on patches' device.

    [HED jitter with ``--stain-augment hed``] -> ColorJitter (uint8 semantics, random order) ->
    flip both axes (p .5) -> rot90 k in {1,2,3} (p .5) -> float32 -> zoom U[0.9, 1.1] with area
    resize and edge padding / centre crop (p .5) -> x / 127.5 - 1."""
    n = patches.shape[0]
    x = HEDAugment.from_config(cfg)(patches.float(), gen)  # x itself, nothing drawn, without --stain-augment
    x = aug.apply_color_jitter(x, aug.sample_color_jitter(n, cfg.brightness, cfg.contrast, cfg.saturation,
                                                          cfg.hue, gen))
    x = aug.apply_flip(x, aug.sample_flags(n, cfg.flip_prob, gen), dims=(-2, -1))
    x = aug.apply_rot90(x, aug.sample_rot90(n, cfg.rot90_prob, gen))
    x = aug.apply_zoom(x, aug.sample_zoom(n, cfg.zoom_prob, cfg.zoom_min, cfg.zoom_max, gen),
                       mode="area", padding_mode="replicate")
    return aug.scale_intensity(x)


def eval_transform(patches: torch.Tensor) -> torch.Tensor:
    """float32 -> x / 127.5 - 1, no augmentation."""
    return aug.scale_intensity(patches.float())
