"""Whole-slide inference: tissue mask -> probability map on the bundle's grid -> lesion candidates.

    python camelyon/infer.py --slides PATH_OR_DIR --checkpoint FILE --output-dir DIR [--mode dense|patch]
    torchrun --nproc_per_node 4 camelyon/infer.py ...   # slides are split across processes

Grid (bundle): one cell per pixel of the ~64x tissue-mask grid; cell (r, c) is centred at level-0
((r + 0.5) * ratio, (c + 0.5) * ratio) and its 224 patch has top-left
(round((r + 0.5) * ratio - 112), round((c + 0.5) * ratio - 112)). Off-tissue cells stay 0.

Slide resolution: the network sees every slide at the µm/px it was trained at (``model_mpp``: the
checkpoint's config, 0.243 for the bundle's ``model.pt``). With scale = model_mpp / slide_mpp
level-0 pixels per network pixel, the grid cell is ``mask_downsample`` (64) network pixels =
64 * scale level-0 pixels, and patches and dense tiles are given in network pixels and read with
``common.wsi.read_rgb_scaled`` (best pyramid level, antialiased resampling). A slide within
``mpp_tolerance`` of model_mpp has scale exactly 1: the bundle's level-0 reads, bit for bit. The
map stays on the slide's grid and every output is in the slide's own level-0 pixels. A slide
without a resolution is assumed to be at model_mpp (with a warning) unless ``--slide-mpp`` is given.

- ``--mode patch`` reproduces the bundle: one 224 patch read and classified per tissue cell.
- ``--mode dense`` runs the fully convolutional network over large tiles whose origin is the
  top-left of a cell's patch; outputs come at stride 32, so every (ratio / 32)-th output lands
  exactly on a cell centre. Each pixel is read once per tile (tiles overlap by a 160-px halo).
  Values differ slightly from patch mode because a dense window sees real neighbours instead of
  zero padding (camelyon.md §11); ``bench.py`` and the tests measure how much.

Outputs per slide: ``<slide>.npy`` (float64 map), ``<slide>.csv`` (``probability,X,Y`` at level 0
after NMS: threshold 0.5, 48-cell box), ``<slide>_heatmap.png``, optional GeoJSON / ASAP XML.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from camelyon.config import InferConfig
from camelyon.dataset import CAMELYON16_MPP, PATCH
from camelyon.model import STRIDE, build_model, load_detector_weights
from camelyon.prepare import TissueMask, tissue_mask_at
from common import dist
from common.amp import MixedPrecision
from common.augment import scale_intensity
from common.checkpoint import load_file
from common.io import atomic_write, atomic_write_text
from common.config import parse_config
from common.logging import progress
from common.metrics.froc import map_to_level0, nms
from common.wsi import (SlideHandles, best_level, list_slides, open_slide, read_rgb_scaled, recorded_mpp,
                        resolve_scale, slide_mpp)
from common.errors import exit_on_user_error

HALF = PATCH // 2


def cell_top_left(rows: np.ndarray, cols: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) top-left of the 224 patch centred on grid cells (bundle formula), in the pixels
    ``ratio`` is given in: level 0 on the bundle's slides, network pixels in general."""
    return (np.round((rows + 0.5) * ratio - HALF).astype(np.int64),
            np.round((cols + 0.5) * ratio - HALF).astype(np.int64))


# ============================================================================= patch mode
class CellPatches(Dataset):
    """One 224 patch per tissue cell (bundle mode); ``ratio`` and the patches are in network pixels,
    each ``scale`` level-0 pixels."""

    def __init__(self, slide: str, cells: np.ndarray, ratio: float, scale: float = 1.0):
        self.slide, self.cells, self.scale = slide, cells, scale
        self.top, self.left = cell_top_left(cells[:, 0], cells[:, 1], ratio)
        self.handles = SlideHandles()

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int):
        rgb = read_rgb_scaled(self.handles(self.slide), self.left[i], self.top[i], PATCH, PATCH, self.scale)
        return torch.from_numpy(rgb).permute(2, 0, 1), i


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = scale_intensity(x.to(device, non_blocking=True).float())
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _loader(ds: Dataset, batch_size: int | None, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers else None)


@torch.no_grad()
def patch_mode_map(model, slide: str, tm: TissueMask, device, amp: MixedPrecision, batch_size: int = 400,
                   workers: int = 4, channels_last: bool = False, desc: str = "", scale: float = 1.0) -> np.ndarray:
    """The map on the tissue-mask grid; ``scale`` = level-0 pixels per network pixel."""
    prob = np.zeros(tm.mask.shape, dtype=np.float64)
    cells = np.argwhere(tm.mask)
    if not len(cells):
        return prob
    loader = _loader(CellPatches(slide, cells, tm.ratio / scale, scale), batch_size, workers, device)
    for patches, idx in progress(loader, desc=desc or "patches"):
        with amp.autocast():
            logits = model(_to_device(patches, device, channels_last))
        p = torch.sigmoid(logits.float()).flatten().cpu().numpy()
        rc = cells[idx.numpy()]
        prob[rc[:, 0], rc[:, 1]] = p
    return prob


# ============================================================================= dense mode
@dataclass(frozen=True)
class Tile:
    r0: int  # first cell row
    c0: int  # first cell column
    rows: int  # cells in this tile
    cols: int


def plan_tiles(mask: np.ndarray, tile_cells: int) -> list[Tile]:
    """Blocks of up to tile_cells x tile_cells cells that contain tissue, laid from the top-left
    corner of the tissue's bounding box (fewer, fuller tiles than a grid anchored at 0)."""
    H, W = mask.shape
    tiles: list[Tile] = []
    if not mask.any():
        return tiles
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    for r0 in range(int(rows[0]), int(rows[-1]) + 1, tile_cells):
        for c0 in range(int(cols[0]), int(cols[-1]) + 1, tile_cells):
            block = mask[r0:r0 + tile_cells, c0:c0 + tile_cells]
            if block.any():
                tiles.append(Tile(r0, c0, block.shape[0], block.shape[1]))
    return tiles


def cell_step(ratio: float) -> int:
    """Network outputs (stride 32) per grid cell; exact when ratio is a multiple of 32."""
    step = max(int(round(ratio / STRIDE)), 1)
    if abs(step * STRIDE - ratio) > 1e-6:
        warnings.warn(f"grid ratio {ratio:g} is not a multiple of {STRIDE}: dense outputs are up to "
                      f"{abs(step * STRIDE - ratio) / 2:.1f} px away from the cell centres; use --mode patch for exactness")
    return step


class DenseTiles(Dataset):
    """Tile t covers cells [r0, r0 + rows) x [c0, c0 + cols): its origin is the patch top-left of
    cell (r0, c0) and its side 224 + 32 * step * (n - 1), so output (i * step, j * step) is the
    224 window centred on cell (r0 + i, c0 + j). All in network pixels (``ratio`` too), each
    ``scale`` level-0 pixels."""

    def __init__(self, slide: str, tiles: list[Tile], ratio: float, step: int, scale: float = 1.0):
        self.slide, self.tiles, self.ratio, self.step, self.scale = slide, tiles, ratio, step, scale
        self.handles = SlideHandles()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        t = self.tiles[i]
        top, left = cell_top_left(np.array([t.r0]), np.array([t.c0]), self.ratio)
        h = PATCH + STRIDE * self.step * (t.rows - 1)
        w = PATCH + STRIDE * self.step * (t.cols - 1)
        rgb = read_rgb_scaled(self.handles(self.slide), int(left[0]), int(top[0]), w, h, self.scale)
        return torch.from_numpy(rgb).permute(2, 0, 1), i


@torch.no_grad()
def dense_mode_map(model, slide: str, tm: TissueMask, device, amp: MixedPrecision, tile_cells: int = 32,
                   workers: int = 4, channels_last: bool = False, desc: str = "", scale: float = 1.0) -> np.ndarray:
    """The map on the tissue-mask grid; ``scale`` = level-0 pixels per network pixel."""
    prob = np.zeros(tm.mask.shape, dtype=np.float64)
    tiles = plan_tiles(tm.mask, tile_cells)
    if not tiles:
        return prob
    ratio = tm.ratio / scale  # grid cell in network pixels (64)
    step = cell_step(ratio)
    ds = DenseTiles(slide, tiles, ratio, step, scale)
    for tile_img, i in progress(_loader(ds, None, workers, device), desc=desc or "tiles", total=len(ds)):
        t = tiles[int(i)]
        with amp.autocast():
            logits = model(_to_device(tile_img[None], device, channels_last))  # (1, 1, h, w) at stride 32
        p = torch.sigmoid(logits.float())[0, 0, ::step, ::step].cpu().numpy()  # (rows, cols)
        block = tm.mask[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols]
        target = prob[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols]
        target[block] = p[:t.rows, :t.cols][block]
    return prob


# ============================================================================= outputs
def detections_from_map(prob: np.ndarray, ratio: float, threshold: float = 0.5, box: int = 48,
                        sigma: float = 0.0) -> list[tuple[float, int, int]]:
    """NMS on the map, then (probability, X, Y) at level 0 with X = column (official format)."""
    found = nms(prob, threshold=threshold, box_size=box, sigma=sigma)
    if not found:
        return []
    p, rows, cols = zip(*found)
    xs, ys = map_to_level0(np.asarray(rows), np.asarray(cols), ratio)
    return [(float(pi), int(x), int(y)) for pi, x, y in zip(p, xs, ys)]


def write_detections_csv(path: Path, detections: list[tuple[float, int, int]]) -> None:
    atomic_write_text(path, "".join(f"{p:.6f},{x},{y}\n" for p, x, y in detections))


def heatmap_image(thumbnail: np.ndarray, prob: np.ndarray, detections=(), ratio: float = 64.0,
                  min_side: int = 768) -> Image.Image:
    """Jet heatmap over the thumbnail (transparent where the map is 0), detections as circles."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](prob)[..., :3] * 255).astype(np.float64)
    alpha = np.where(prob > 0, 0.25 + 0.5 * prob, 0.0)[..., None]
    blend = (thumbnail * (1 - alpha) + colours * alpha).astype(np.uint8)
    scale = max(1, math.ceil(min_side / max(prob.shape)))
    img = Image.fromarray(blend).resize((prob.shape[1] * scale, prob.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for _, x, y in detections:
        cx, cy, rad = x / ratio * scale, y / ratio * scale, 3 * scale
        draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=(255, 255, 255), width=max(1, scale // 2))
    return img


def contour_polygons(prob: np.ndarray, ratio: float, level: float = 0.5) -> list[np.ndarray]:
    """Closed iso-contours of the map at ``level`` as level-0 (x, y) polygons."""
    from skimage.measure import find_contours

    padded = np.pad(prob, 1)
    polys = []
    for contour in find_contours(padded, level):
        rc = contour - 1  # undo padding; (row, col) in cell units
        if len(rc) >= 3:
            polys.append(np.stack([(rc[:, 1] + 0.5) * ratio, (rc[:, 0] + 0.5) * ratio], axis=1))
    return polys


def write_outputs(out_dir: Path, stem: str, prob: np.ndarray, tm: TissueMask, cfg: InferConfig,
                  scale: float = 1.0) -> list:
    """Map, detections, heatmap and exports of one slide, all in its level-0 pixels (the ASAP
    squares are 256 network pixels = 256 * scale level-0 pixels wide)."""
    from camelyon.annotations import Annotation, write_asap_xml, write_geojson

    atomic_write(out_dir / f"{stem}.npy", lambda fh: np.save(fh, prob))
    dets = detections_from_map(prob, tm.ratio, cfg.nms_threshold, cfg.nms_box, cfg.nms_sigma)
    write_detections_csv(out_dir / f"{stem}.csv", dets)
    img = heatmap_image(tm.thumbnail, prob, dets, tm.ratio)
    atomic_write(out_dir / f"{stem}_heatmap.png", lambda fh: img.save(fh, format="PNG"))
    polygons = contour_polygons(prob, tm.ratio, cfg.nms_threshold) if cfg.contours else []
    if "geojson" in cfg.export:
        write_geojson(out_dir / f"{stem}.geojson", points=[(x, y) for _, x, y in dets] or None,
                      probabilities=[p for p, _, _ in dets] or None, polygons=polygons or None)
    if "asap" in cfg.export:
        r = 128 * scale
        squares = [np.array([[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r]], float) for _, x, y in dets]
        write_asap_xml(Annotation(positive=squares + polygons, negative=[], source=stem), out_dir / f"{stem}.xml")
    return dets


# ============================================================================= driver
def load_model(checkpoint: str, device: torch.device, channels_last: bool = False):
    model = build_model(channels_last=False)
    info = load_detector_weights(model, checkpoint)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def model_resolution(checkpoint: str, override: float = 0.0) -> tuple[float, str]:
    """(µm/px the network was trained at, where that comes from): ``override`` (> 0), else the
    checkpoint's config, else Camelyon16's 0.243 (the bundle's ``model.pt`` carries no config)."""
    if override > 0:
        return override, "--model-mpp"
    recorded = recorded_mpp(load_file(checkpoint))
    if recorded:
        return recorded, "checkpoint config"
    return CAMELYON16_MPP, "not recorded; Camelyon16's"


def slide_resolution(slide: Path, model_mpp: float, cfg: InferConfig) -> dict:
    """The slide's µm/px, the scale (level-0 px per network px), the level read and the resampling
    factor (network px per pixel of that level; 1 = the bundle's level-0 reads)."""
    with open_slide(slide) as handle:
        res = resolve_scale(slide_mpp(handle, str(slide)), model_mpp, cfg.slide_mpp, cfg.mpp_tolerance, str(slide))
        level = 0 if res.identity else best_level(handle, res.scale)
        level_ds = float(handle.level_downsamples[level])
    return {"slide_mpp": res.slide_mpp, "mpp_source": res.source, "model_mpp": model_mpp, "scale": res.scale,
            "level": level, "resampling": level_ds / res.scale}


def infer_slide(model, slide: Path, cfg: InferConfig, device, amp: MixedPrecision,
                model_mpp: float = CAMELYON16_MPP) -> dict:
    res = slide_resolution(slide, model_mpp, cfg)
    print(f"{slide.name}: {res['slide_mpp']:g} µm/px ({res['mpp_source']}), model {model_mpp:g} µm/px -> "
          f"level {res['level']}, resampling x{res['resampling']:.4g}", flush=True)
    scale = res["scale"]
    tm = tissue_mask_at(slide, cfg.mask_downsample, scale)
    kwargs = dict(workers=cfg.num_workers, channels_last=cfg.channels_last, desc=slide.name, scale=scale)
    if cfg.mode == "patch":
        prob = patch_mode_map(model, str(slide), tm, device, amp, batch_size=cfg.batch_size, **kwargs)
    else:
        prob = dense_mode_map(model, str(slide), tm, device, amp, tile_cells=cfg.tile_cells, **kwargs)
    dets = write_outputs(Path(cfg.output_dir), slide.stem, prob, tm, cfg, scale)
    return {"slide": slide.name, "tissue_cells": int(tm.mask.sum()), "grid": list(tm.mask.shape),
            "ratio": tm.ratio, **res, "detections": len(dets), "max_probability": float(prob.max(initial=0.0))}


def run(cfg: InferConfig) -> list[dict]:
    """Infer every slide (split across processes when distributed); returns per-slide summaries."""
    ctx = dist.setup(cfg.device)
    if not cfg.slides or not cfg.checkpoint:
        raise SystemExit("infer.py needs --slides PATH_OR_DIR and --checkpoint FILE")
    slides = list_slides(cfg.slides)
    model, info = load_model(cfg.checkpoint, ctx.device, cfg.channels_last and ctx.device.type == "cuda")
    model_mpp, mpp_from = model_resolution(cfg.checkpoint, cfg.model_mpp)
    dist.print0(f"loaded {info['kind']} {info['path']} (trained at {model_mpp:g} µm/px, {mpp_from}); "
                f"{len(slides)} slide(s), mode {cfg.mode}")
    amp = MixedPrecision(ctx.device, cfg.precision)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    mine = [infer_slide(model, s, cfg, ctx.device, amp, model_mpp) for s in slides[ctx.rank::ctx.world_size]]
    summaries = [s for part in dist.all_gather_object(mine) for s in part]
    if ctx.is_main:
        for s in sorted(summaries, key=lambda s: s["slide"]):
            print(f"{s['slide']}: {s['tissue_cells']} tissue cells, {s['detections']} lesion candidates, "
                  f"max p {s['max_probability']:.3f}")
    return summaries


def main(cfg: InferConfig) -> None:
    run(cfg)
    dist.cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(InferConfig))
