"""Data preparation for Camelyon16: tissue masks and patch lists.

    python camelyon/prepare.py tissue-masks --slides DIR --output-dir DIR
    python camelyon/prepare.py patch-list --coords tumor_train.txt normal_train.txt \\
        --annotation-dir DIR --image-dir DIR --output training.csv

Tissue mask (bundle rule), on an image at ~64x downsample (level 6 of a Camelyon slide):
with per-image Otsu thresholds, tissue = (R <= t_R or G <= t_G or B <= t_B) and S > t_S, S being
the HSV saturation in [0, 1]; a channel whose threshold comes out 0 is skipped. The grid cell is
64 network pixels: 64 level-0 pixels on a slide at the model's resolution (Camelyon16), 64 * model
µm/px / slide µm/px level-0 pixels on any other (31.2 on a 0.499 µm/px slide for a 0.243 model).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from camelyon.dataset import CAMELYON16_MPP, PatchRecord, read_ncrf_coords, validate_records, write_bundle_csv
from common.io import atomic_write
from common.config import BaseConfig, ConfigError, parse_config
from common.logging import progress
from common.wsi import MPP_TOLERANCE, list_slides, open_slide, read_rgb, resolve_scale, slide_mpp
from common.errors import exit_on_user_error


@dataclass
class TissueMask:
    mask: np.ndarray  # (H, W) bool on the grid
    ratio: float  # level-0 pixels per grid cell
    thumbnail: np.ndarray  # (H, W, 3) uint8 RGB the mask was computed from
    level0_size: tuple[int, int]  # (width, height)


def _otsu(channel: np.ndarray) -> float:
    if channel.min() == channel.max():
        return 0.0
    return float(threshold_otsu(channel))


def tissue_mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """The bundle's rule on an (H, W, 3) uint8 image; returns a bool (H, W) mask."""
    rgb_fg = np.zeros(rgb.shape[:2], dtype=bool)
    for c in range(3):
        t = _otsu(rgb[..., c])
        if t:
            rgb_fg |= rgb[..., c] <= t
    saturation = rgb2hsv(rgb)[..., 1]
    t_s = _otsu(saturation)
    return rgb_fg & (saturation > t_s) if t_s else np.zeros_like(rgb_fg)


def slide_thumbnail(slide, downsample: float = 64.0, block: int = 64,
                    level_match: float = 0.02) -> tuple[np.ndarray, float]:
    """RGB image of the slide on a ~``downsample`` grid, and the exact level-0 pixels per cell.

    If the slide has a level within ``level_match`` (2 %) of ``downsample`` (level 6 on Camelyon)
    that level is read whole, as the bundle does (ratio = its downsample). Otherwise the grid is
    ceil(size / ds) and each block of cells is read from the best finer level and area-averaged:
    memory stays bounded whatever the slide size. ``level_match=0`` always does the latter, so the
    ratio is exactly ``downsample``."""
    for level, ds in enumerate(slide.level_downsamples):
        if abs(ds / downsample - 1) < level_match:
            w, h = slide.level_dimensions[level]
            return _read_level_whole(slide, level, w, h), float(ds)
    width, height = slide.dimensions
    gh, gw = int(np.ceil(height / downsample)), int(np.ceil(width / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    level_ds = slide.level_downsamples[level]
    out = np.empty((gh, gw, 3), dtype=np.uint8)
    for r0 in range(0, gh, block):
        for c0 in range(0, gw, block):
            bh, bw = min(block, gh - r0), min(block, gw - c0)
            src_w, src_h = int(np.ceil(bw * downsample / level_ds)), int(np.ceil(bh * downsample / level_ds))
            rgb = read_rgb(slide, int(c0 * downsample), int(r0 * downsample), src_w, src_h, level)
            out[r0:r0 + bh, c0:c0 + bw] = np.asarray(Image.fromarray(rgb).resize((bw, bh), Image.BOX))
    return out, float(downsample)


def _read_level_whole(slide, level: int, w: int, h: int, strip: int = 2048) -> np.ndarray:
    ds = slide.level_downsamples[level]
    rows = [read_rgb(slide, 0, int(round(y * ds)), w, min(strip, h - y), level) for y in range(0, h, strip)]
    return np.concatenate(rows, axis=0)


def compute_tissue_mask(slide_path, downsample: float = 64.0, level_match: float = 0.02) -> TissueMask:
    """Tissue mask of a slide on a grid of ~``downsample`` level-0 pixels (see ``slide_thumbnail``);
    an empty mask (with a warning) when there is no tissue."""
    with open_slide(slide_path) as slide:
        thumb, ratio = slide_thumbnail(slide, downsample, level_match=level_match)
        size = slide.dimensions
    mask = tissue_mask_from_rgb(thumb)
    if not mask.any():
        warnings.warn(f"{slide_path}: no tissue found; the probability map will be empty")
    return TissueMask(mask, ratio, thumb, size)


def tissue_mask_at(slide_path, cell: float, scale: float) -> TissueMask:
    """Tissue mask whose grid cell is ``cell`` network pixels, for a slide whose level 0 has ``scale``
    pixels per network pixel (``common.wsi.SlideScale``). Scale 1 is the bundle's mask exactly;
    otherwise the grid is exactly ``cell * scale`` level-0 pixels, never snapped to a pyramid level,
    so that it stays ``cell`` network pixels (the dense tiling relies on it)."""
    if scale == 1.0:
        return compute_tissue_mask(slide_path, cell)
    return compute_tissue_mask(slide_path, cell * scale, level_match=0.0)


def save_tissue_mask(tm: TissueMask, out_dir: Path, stem: str) -> Path:
    """``<stem>_tissue.npz`` (mask, ratio, level0_size) and a PNG preview, written atomically."""
    path = out_dir / f"{stem}_tissue.npz"
    atomic_write(path, lambda fh: np.savez_compressed(fh, mask=tm.mask, ratio=tm.ratio,
                                                      level0_size=np.asarray(tm.level0_size)))
    preview = tm.thumbnail.copy()
    preview[~tm.mask] = (preview[~tm.mask] * 0.35 + 255 * 0.65).astype(np.uint8)
    atomic_write(out_dir / f"{stem}_tissue.png", lambda fh: Image.fromarray(preview).save(fh, format="PNG"))
    return path


def load_tissue_mask(path: Path) -> tuple[np.ndarray, float]:
    with np.load(path) as data:
        return data["mask"].astype(bool), float(data["ratio"])


def build_patch_list(coords: list[str], image_dir: str, annotation_dir: str | None,
                     suffix: str = ".tif", validate: bool = True) -> list[PatchRecord]:
    """Records from NCRF coordinate files, grid labels from the annotations (point test on the
    centre of each of the 9 patches)."""
    records: list[PatchRecord] = []
    for path in coords:
        records += read_ncrf_coords(Path(path), Path(image_dir), Path(annotation_dir) if annotation_dir else None, suffix)
    if validate:
        validate_records(records, source=", ".join(coords))
    return records


# ============================================================================= command line
@dataclass
class PrepareConfig(BaseConfig):
    """Tissue masks of slides (tissue-masks) or a bundle patch list from NCRF coordinates (patch-list)."""

    slides: str = ""  # tissue-masks: a slide file or a folder of slides
    output_dir: str = "outputs/camelyon_prepare"
    mask_downsample: float = 64.0  # grid cell in pixels at model_mpp (64 = level 6 of a Camelyon slide)
    model_mpp: float = CAMELYON16_MPP  # µm/px the masks are meant for (infer.py's grid for that model)
    slide_mpp: float = 0.0  # override the slides' header resolution (0: from the header)
    mpp_tolerance: float = MPP_TOLERANCE  # as infer.py: slides this close to model_mpp keep the bundle's grid
    coords: list[str] = field(default_factory=list)  # patch-list: NCRF coordinate files (slide,x,y per line)
    image_dir: str = ""  # patch-list: folder of the slides the coordinates refer to
    annotation_dir: str = ""  # patch-list: tumour annotations that label the 3x3 grid of each region
    slide_suffix: str = ".tif"  # patch-list: file name ending of the slides
    output: str = "training.csv"  # patch-list: the bundle-format CSV written


def run_tissue_masks(cfg: PrepareConfig) -> None:
    out = Path(cfg.output_dir)
    for slide in progress(list_slides(cfg.slides), desc="tissue masks"):
        with open_slide(slide) as handle:
            res = resolve_scale(slide_mpp(handle, str(slide)), cfg.model_mpp, cfg.slide_mpp, cfg.mpp_tolerance,
                                str(slide))
        tm = tissue_mask_at(slide, cfg.mask_downsample, res.scale)
        path = save_tissue_mask(tm, out, slide.stem)
        print(f"{slide.name}: {int(tm.mask.sum())} tissue cells of {tm.mask.size} "
              f"(grid {tm.mask.shape[1]}x{tm.mask.shape[0]}, {tm.ratio:g} level-0 px per cell; {res.describe()}) "
              f"-> {path}")


def run_patch_list(cfg: PrepareConfig) -> None:
    if not cfg.coords or not cfg.image_dir:
        raise ConfigError("--coords, --image-dir: patch-list needs --coords FILE [FILE ...] and --image-dir DIR")
    records = build_patch_list(cfg.coords, cfg.image_dir, cfg.annotation_dir or None, cfg.slide_suffix)
    write_bundle_csv(records, Path(cfg.output))
    positives = sum(any(r.labels) for r in records)
    print(f"{len(records)} regions ({positives} with tumour patches) -> {cfg.output}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"tissue-masks": run_tissue_masks, "patch-list": run_patch_list}
    prog = f"prepare.py {{{','.join(commands)}}}"
    if argv[:1] in (["-h"], ["--help"]):
        parse_config(PrepareConfig, ["--help"], prog=prog)  # prints the flags, exits
    if not argv or argv[0] not in commands:
        got = f"{argv[0]}: unknown command" if argv else "no command given"
        raise ConfigError(f"{got}; expected {' or '.join(commands)} (--help lists the flags)")
    commands[argv[0]](parse_config(PrepareConfig, argv[1:], prog=f"prepare.py {argv[0]}"))


if __name__ == "__main__":
    with exit_on_user_error():
        main()
