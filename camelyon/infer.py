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
  exactly on a cell centre. Each tile is read with 224 px of slide around its own windows
  (``HALO``), so every output sees its whole receptive field and the map does not depend on
  the tile plan. ``--dense-engine`` (:class:`TileProbability`): ``sparse`` computes each layer
  only where the tiles' tissue cells need it (:mod:`camelyon.sparse`), on large tiles cut only at a
  memory cap (``--sparse-tile-tissue``, :func:`camelyon.tiling.plan_sparse_tiles`); ``tile`` runs
  the network over whole tiles that hug the tissue (``--tile-cells``); ``auto``: sparse on the
  CPU, tile on a GPU. The two agree up to float rounding.
  Values differ slightly from patch mode because a dense window sees real neighbours instead of
  zero padding (camelyon.md §11); ``bench.py`` and the tests measure how much.

Stain normalisation (``--stain-normalize macenko|reinhard``, off by default): each uint8 batch is
normalised on the device to the target (``--stain-target FILE...``, else the one the checkpoint
stores) before the scaling to [-1, 1]; ``--stain-fit tile`` fits every forward-pass input (a patch,
or a dense tile with its halo), ``slide`` fits each slide once on patches spread over its tissue.

Outputs per slide: ``<slide>.npy`` (float64 map), ``<slide>.csv`` (``probability,X,Y`` at level 0
after NMS: threshold 0.5, 48-cell box), ``<slide>_heatmap.png``, optional GeoJSON / ASAP XML.

Restartable, crash-safe folder runs: every output is written atomically, then a record
``.finished/<slide>.json`` (:mod:`common.finished`) keyed on the checkpoint's sha256 and the
output-shaping settings (``OUTPUT_SETTINGS``, model µm/px resolved); the same command run again
skips those slides (``--overwrite`` redoes them). The slide in progress saves its map so far every
``--flush-every`` forward passes (dense: tiles, patch: batches of the fixed batch plan) to
``.partial/<slide>.npz``; a restart under the same key continues from it, with outputs bit-identical
to an uninterrupted run. ``inference.jsonl`` gets one line per slide as it ends (status ok, failed or
skipped). A slide that cannot be read is reported and the run goes on; the exit status is then the
number of failed slides (at most 100). A run over one slide reports its error as a user error.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import astuple
from pathlib import Path

import numpy as np
import openslide
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Subset

from camelyon.config import InferConfig
from camelyon.dataset import CAMELYON16_MPP, PATCH
from camelyon.model import STRIDE, TumorDetectionNet, build_model, lean_dense_model, load_detector_weights
from camelyon.prepare import TissueMask, tissue_mask_at
from camelyon.sparse import SparseResNet
from camelyon.tiling import HALO, SPARSE_MAX_SIDE, Tile, plan_sparse_tiles, plan_tiles
from common import dist
from common.amp import MixedPrecision
from common.augment import scale_intensity_
from common.cache import cached_arrays
from common.checkpoint import load_file
from common.errors import USER_ERRORS, DataError, UserError, describe, exit_on_user_error
from common.finished import FinishedWork, InputsFailed, append_summary, failure_line
from common.io import atomic_write, atomic_write_text, file_sha256
from common.config import parse_config
from common.logging import progress
from common.memory import keep_freed_memory
from common.metrics.froc import map_to_level0, nms
from common.stain import StainNormalizer, inference_stain, target_from_files
from common.tta import dihedral, parse_tta, undo_dihedral
from common.work_queue import WorkQueue
from common.wsi import (SlideHandles, best_level, list_slides, open_slide, read_rgb_regions, read_rgb_scaled,
                        recorded_mpp, resolve_scale, slide_mpp)

HALF = PATCH // 2
#: InferConfig fields that shape the written outputs (with the mode's own: tile_cells or batch_size):
#: a finished slide is redone when one of them, the checkpoint, the resolved model µm/px or the
#: resolved stain target's statistics change
OUTPUT_SETTINGS = ("mode", "mask_downsample", "slide_mpp", "mpp_tolerance", "precision", "nms_threshold", "nms_box",
                   "nms_sigma", "export", "contours", "tta", "stain_normalize", "stain_fit")
MODE_SETTINGS = {"dense": ("tile_cells", "dense_engine", "sparse_tile_tissue"), "patch": ("batch_size",)}
#: what makes one slide fail without stopping a folder run: the user errors (a missing or corrupt
#: file, no tissue, ...) and the errors OpenSlide raises when a tile of a truncated file is read
SLIDE_ERRORS = USER_ERRORS + (openslide.OpenSlideError,)
PARTIAL = ".partial"  # the slide in progress: <output_dir>/.partial/<slide>.npz
MASKS = ".tissue"  # <output_dir>/.tissue/<slide>.npz: each slide's tissue mask, computed once
SUMMARY = "inference.jsonl"
#: --stain-fit slide: the slide's stain statistics are fitted on the patches of this many tissue cells
STAIN_FIT_CELLS = 32


def cell_top_left(rows: np.ndarray, cols: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) top-left of the 224 patch centred on grid cells (bundle formula), in the pixels
    ``ratio`` is given in: level 0 on the bundle's slides, network pixels in general."""
    return (np.round((rows + 0.5) * ratio - HALF).astype(np.int64),
            np.round((cols + 0.5) * ratio - HALF).astype(np.int64))


class SlideProgress:
    """The map of the slide in progress and which units of work (dense tiles, patch batches) are
    done, saved atomically to ``path`` after every ``every`` units, so that a killed run continues
    from the last save. The file holds the tissue cells' values, the done units, the tissue mask and
    the ``key`` they were computed under; a file with another key, mask or number of units is
    ignored (and replaced at the next save). ``SlideProgress()`` keeps everything in memory only."""

    def __init__(self, path: Path | None = None, key: str = "", every: int = 0, resume: bool = True):
        self.path, self.key, self.every, self.resume = path, key, every, resume
        self.resumed = 0  # units taken from the file
        self.saves = 0
        self._unsaved = 0

    def start(self, mask: np.ndarray, n_units: int, plan: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(map, done units): zeros, or what the file holds for this key, mask and plan (``plan``
        identifies the units: a file made under another tile plan is not resumed)."""
        self.mask, self.plan = mask, plan
        self.prob = np.zeros(mask.shape, dtype=np.float64)
        self.done = np.zeros(n_units, dtype=bool)
        saved = self._load() if self.resume else None
        if saved is not None and self._fits(saved):
            self.prob[mask] = saved["values"]
            self.done[:] = saved["done"]
        self.resumed = int(self.done.sum())
        return self.prob, self.done

    def _load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            with np.load(self.path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError):  # unreadable: start the slide again
            return None

    def _fits(self, saved: dict) -> bool:
        return (str(saved.get("key")) == self.key and tuple(saved.get("shape", ())) == self.mask.shape
                and np.array_equal(saved.get("mask"), np.packbits(self.mask)) and saved.get("done") is not None
                and saved["done"].shape == self.done.shape and str(saved.get("plan", "")) == self.plan)

    def unit_done(self, unit: int) -> None:
        """Call after the map holds unit ``unit``'s values."""
        self.done[unit] = True
        self._unsaved += 1
        if self.every and self._unsaved >= self.every:
            self.save()

    def save(self) -> None:
        if self.path is None or not self._unsaved:
            return
        arrays = dict(key=np.array(self.key), shape=np.array(self.mask.shape), mask=np.packbits(self.mask),
                      values=self.prob[self.mask], done=self.done, plan=np.array(self.plan))
        atomic_write(self.path, lambda fh: np.savez(fh, **arrays))
        self._unsaved = 0
        self.saves += 1

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


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


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool,
               stain: StainNormalizer = StainNormalizer()) -> torch.Tensor:
    """uint8 tiles -> the network's input on ``device``: float, stain normalised (when ``stain`` has a
    target; batched), scaled to [-1, 1]."""
    x = stain(x.to(device, non_blocking=True).to(torch.float32, copy=True))  # a copy of its own: scaled in place
    x = scale_intensity_(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _loader(ds: Dataset, workers: int, device: torch.device, batches: list[list[int]] | None = None) -> DataLoader:
    """Items one by one, or the given ``batches`` of item indices, in order; two items in flight per
    worker (a dense tile is up to 40 MB of uint8: more would only hold memory, the forward pass is
    the slow side)."""
    batching = dict(batch_sampler=batches) if batches is not None else dict(batch_size=None, shuffle=False)
    return DataLoader(ds, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=2 if workers else None, **batching)


def averaged_probability(net, x: torch.Tensor, amp: MixedPrecision, tta: list[str] = ("id",)) -> torch.Tensor:
    """sigmoid(net(x)) averaged over the test-time transforms ``tta`` (:mod:`common.tta`), each undone
    on the output grid; (B, 1, h, w) float32. With ``("id",)`` exactly sigmoid(net(x))."""
    total = None
    for name in tta:
        xt = dihedral(x, name)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            xt = xt.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = net(xt)
        p = undo_dihedral(torch.sigmoid(logits.float()), name)
        total = p if total is None else total + p
    return total / len(tta) if len(tta) > 1 else total


@torch.no_grad()
def patch_mode_map(model, slide: str, tm: TissueMask, device, amp: MixedPrecision, batch_size: int = 400,
                   workers: int = 4, channels_last: bool = False, desc: str = "", scale: float = 1.0,
                   partial: SlideProgress | None = None, tta: list[str] = ("id",),
                   stain: StainNormalizer = StainNormalizer()) -> np.ndarray:
    """The map on the tissue-mask grid; ``scale`` = level-0 pixels per network pixel. Batch b is
    always the tissue cells [b * batch_size, (b + 1) * batch_size) in row-major order, so a resumed
    run (``partial``) computes every remaining batch exactly as an uninterrupted one. ``tta``: each
    patch's probability averaged over these transforms of it."""
    cells = np.argwhere(tm.mask)
    n_batches = math.ceil(len(cells) / batch_size)
    prob, done = (partial or SlideProgress()).start(tm.mask, n_batches)
    todo = [list(range(b * batch_size, min((b + 1) * batch_size, len(cells)))) for b in np.flatnonzero(~done)]
    if not todo:
        return prob
    loader = _loader(CellPatches(slide, cells, tm.ratio / scale, scale), workers, device, batches=todo)
    for patches, idx in progress(loader, desc=desc or "patches"):
        x = _to_device(patches, device, channels_last, stain)
        p = averaged_probability(model, x, amp, tta).flatten().cpu().numpy()
        rc = cells[idx.numpy()]
        prob[rc[:, 0], rc[:, 1]] = p
        if partial is not None:
            partial.unit_done(int(idx[0]) // batch_size)
    return prob


# ============================================================================= dense mode
def cell_step(ratio: float) -> int:
    """Network outputs (stride 32) per grid cell; exact when ratio is a multiple of 32."""
    step = max(int(round(ratio / STRIDE)), 1)
    if abs(step * STRIDE - ratio) > 1e-6:
        warnings.warn(f"grid ratio {ratio:g} is not a multiple of {STRIDE}: dense outputs are up to "
                      f"{abs(step * STRIDE - ratio) / 2:.1f} px away from the cell centres; use --mode patch for exactness")
    return step


class DenseTiles(Dataset):
    """Tile t covers cells [r0, r0 + rows) x [c0, c0 + cols): its own part has origin the patch
    top-left of cell (r0, c0) and side 224 + 32 * step * (n - 1), so own output (i * step, j * step)
    is the 224 window centred on cell (r0 + i, c0 + j). With ``halo`` the read adds HALO strides of
    slide on every side, and own output (0, 0) is output (HALO, HALO).
    All in network pixels (``ratio`` too), each ``scale`` level-0 pixels.

    With ``plans`` (the sparse engine) an item also carries its tile's plan, made here, in the
    reader worker, and with ``partial_reads`` only the input regions the plan reads come from the
    slide (the rest of the tile is zero: background inside a large sparse tile is never decoded).
    Items are (uint8 tile (3, H, W), index, plan or {})."""

    def __init__(self, slide: str, tiles: list[Tile], ratio: float, step: int, scale: float = 1.0,
                 halo: bool = True, plans: "SparsePlans | None" = None, partial_reads: bool = False):
        self.slide, self.tiles, self.ratio, self.step, self.scale = slide, tiles, ratio, step, scale
        self.margin = HALO * STRIDE if halo else 0
        self.plans, self.partial_reads = plans, partial_reads and plans is not None and scale == 1.0
        self.handles = SlideHandles()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        t = self.tiles[i]
        top, left = cell_top_left(np.array([t.r0]), np.array([t.c0]), self.ratio)
        h = PATCH + STRIDE * self.step * (t.rows - 1) + 2 * self.margin
        w = PATCH + STRIDE * self.step * (t.cols - 1) + 2 * self.margin
        x0, y0 = int(left[0]) - self.margin, int(top[0]) - self.margin
        plan = self.plans(i, h, w) if self.plans is not None else {}
        if self.partial_reads:
            rgb = read_rgb_regions(self.handles(self.slide), x0, y0, w, h, self.plans.sparse.input_regions(plan, h, w))
        else:
            rgb = read_rgb_scaled(self.handles(self.slide), x0, y0, w, h, self.scale)
        return torch.from_numpy(rgb).permute(2, 0, 1), i, plan


class SparsePlans:
    """Tile i's :meth:`camelyon.sparse.SparseResNet.plan` for its tissue cells' outputs (made by
    :class:`DenseTiles` in the reader workers, beside the read, not between forward passes)."""

    def __init__(self, sparse: SparseResNet, tiles: list[Tile], mask: np.ndarray, step: int):
        self.sparse, self.tiles, self.mask, self.step = sparse, tiles, mask, step

    def __call__(self, i: int, height: int, width: int) -> dict:
        t = self.tiles[i]
        need = tile_outputs(t, self.mask[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols], self.step, HALO)
        return self.sparse.plan(need, height, width)


def tile_outputs(tile: Tile, block: np.ndarray, step: int, first: int) -> np.ndarray:
    """The outputs a tile needs, on its network output grid (stride 32): its tissue cells' own outputs
    (first + i * step, first + j * step); ``block`` is the tile's part of the tissue mask."""
    side = lambda cells: first * 2 + step * (cells - 1) + 1  # outputs per side of the halo'd tile
    need = np.zeros((side(tile.rows), side(tile.cols)), dtype=bool)
    need[first::step, first::step][:tile.rows, :tile.cols] = block
    return need


def dense_engine_for(engine: str, device: torch.device, model) -> str:
    """The engine ``engine`` means for ``model`` on ``device``: ``sparse`` or ``tile``. ``auto`` is
    sparse on the CPU and tile elsewhere: the sparse plan is made on the CPU (scipy, ~1 s for a
    large tile), nothing next to a CPU forward pass but a stall for a GPU, and the sparse engine was
    not measured on CUDA (``--dense-engine sparse`` forces it there). Networks other than the
    detector's ResNet18 (test stand-ins) run whole tiles."""
    if not isinstance(model, TumorDetectionNet):
        return "tile"
    return ("sparse" if device.type == "cpu" else "tile") if engine == "auto" else engine


def plan_dense_tiles(mask: np.ndarray, engine: str, tile_cells: int, sparse_tile_tissue: int,
                     step: int) -> list[Tile]:
    """The tiles a resolved engine computes: large ones cut only at a memory cap for ``sparse``
    (background inside a tile costs it nothing), tissue-hugging ones for ``tile``."""
    if engine == "sparse":
        return plan_sparse_tiles(mask, SPARSE_MAX_SIDE, sparse_tile_tissue)
    return plan_tiles(mask, tile_cells, step)


class TileProbability:
    """A dense tile's probability grid (stride 32), averaged over the test-time transforms, by one of
    two engines (same values up to float rounding; ``engine`` as :func:`dense_engine_for` resolves it):

    - ``tile``: the network over the whole tile (its stem in row strips, ``lean_dense_model``);
    - ``sparse``: :class:`camelyon.sparse.SparseResNet`, each layer only where the tile's tissue
      cells need it (the tile and its needed outputs transformed alike, the grid transformed back)."""

    def __init__(self, model, amp: MixedPrecision, tta: list[str], engine: str = "auto"):
        engine = dense_engine_for(engine, amp.device, model)  # amp.device: where the tiles are computed
        self.net = lean_dense_model(model) if isinstance(model, TumorDetectionNet) else model
        self.sparse = SparseResNet(model) if engine == "sparse" else None
        self.amp, self.tta, self.engine = amp, tta, engine

    def __call__(self, x: torch.Tensor, need: np.ndarray, plan: dict | None = None) -> torch.Tensor:
        """x (1, 3, H, W) -> (h, w); ``plan``: the sparse plan of ``need``, if made already."""
        if self.sparse is None:
            return averaged_probability(self.net, x, self.amp, self.tta)[0, 0]
        total = None
        for name in self.tta:
            need_t = dihedral(torch.from_numpy(need), name).numpy()
            with self.amp.autocast():
                logits = self.sparse(dihedral(x[0], name), need_t, plan if name == "id" else None)
            p = undo_dihedral(torch.sigmoid(logits.float()), name)
            total = p if total is None else total + p
        return total / len(self.tta) if len(self.tta) > 1 else total


@torch.no_grad()
def dense_mode_map(model, slide: str, tm: TissueMask, device, amp: MixedPrecision, tile_cells: int = 32,
                   workers: int = 4, channels_last: bool = False, desc: str = "", scale: float = 1.0,
                   partial: SlideProgress | None = None, halo: bool = True, tta: list[str] = ("id",),
                   stain: StainNormalizer = StainNormalizer(), engine: str = "auto",
                   sparse_tile_tissue: int = 3072) -> np.ndarray:
    """The map on the tissue-mask grid; ``scale`` = level-0 pixels per network pixel. With
    ``partial`` the tiles it holds as done are not computed again. ``halo=False`` reads only each
    tile's own windows (zero padding around it: a 1-cell tile is then exactly patch mode). ``tta``:
    each tile transformed, its output grid transformed back (tile sides are 224 + 32k, so every
    transformed window is on the grid again): each cell gets the average over the transforms of its
    window with its context, as patch mode averages over transformed patches.

    ``engine``: how each tile is computed and the slide cut into tiles (:func:`dense_engine_for`,
    :func:`plan_dense_tiles`; without the halo always whole tiles). Same values up to float rounding."""
    ratio = tm.ratio / scale  # grid cell in network pixels (64)
    step = cell_step(ratio)
    engine = dense_engine_for(engine, device, model) if halo else "tile"
    tiles = plan_dense_tiles(tm.mask, engine, tile_cells, sparse_tile_tissue, step)
    plan_id = hashlib.sha256(f"{engine} {[astuple(t) for t in tiles]}".encode()).hexdigest()
    prob, done = (partial or SlideProgress()).start(tm.mask, len(tiles), plan_id)
    if done.all():
        return prob
    todo = sorted(np.flatnonzero(~done).tolist(), key=lambda i: -tiles[i].rows * tiles[i].cols)
    # largest first: later, smaller tiles reuse the memory the first ones freed (no heap growth)
    first = HALO if halo else 0  # output of the tile's first cell
    tile_probability = TileProbability(model, amp, tta, engine)
    plans = SparsePlans(tile_probability.sparse, tiles, tm.mask, step) if tile_probability.sparse else None
    # sparse tiles read only what their stem reads, unless a per-tile stain fit needs the whole tile
    # or test-time transforms need their own plans' regions (the receptive field is not symmetric)
    partial_reads = not (stain.enabled and stain.source is None) and list(tta) == ["id"]
    ds = Subset(DenseTiles(slide, tiles, ratio, step, scale, halo, plans, partial_reads), todo)
    for tile_img, i, plan in progress(_loader(ds, workers, device), desc=desc or "tiles", total=len(ds)):
        t = tiles[int(i)]
        block = tm.mask[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols]
        x = _to_device(tile_img[None], device, channels_last, stain)
        prob_grid = tile_probability(x, tile_outputs(t, block, step, first), plan or None)  # (h, w) at stride 32
        p = prob_grid[first::step, first::step].cpu().numpy()  # -> (rows, cols)
        target = prob[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols]
        target[block] = p[:t.rows, :t.cols][block]
        if partial is not None:
            partial.unit_done(int(i))
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
def load_model(checkpoint: str | dict, device: torch.device, channels_last: bool = False, name: str | None = None):
    """The detector with the weights of ``checkpoint`` (a file, or a loaded one named ``name``), on ``device``."""
    model = build_model(channels_last=False)
    info = load_detector_weights(model, checkpoint, name)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def use_channels_last(cfg: InferConfig, device: torch.device) -> bool:
    """Channels-last pays on CUDA, and on CPU for dense tiles (1.25x on 3,680-px tiles, 2 cores);
    CPU patch batches stay in the bundle's layout."""
    return cfg.channels_last and (device.type == "cuda" or cfg.mode == "dense")


def model_resolution(checkpoint: dict, override: float = 0.0) -> tuple[float, str]:
    """(µm/px the network was trained at, where that comes from): ``override`` (> 0), else the
    config of ``checkpoint`` (loaded), else Camelyon16's 0.243 (the bundle's ``model.pt`` carries no config)."""
    if override > 0:
        return override, "--model-mpp"
    recorded = recorded_mpp(checkpoint)
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


def slide_stain(stain: StainNormalizer, slide: Path, tm: TissueMask, scale: float, fit: str) -> StainNormalizer:
    """``stain`` as it applies to this slide: with ``fit`` "slide" the source statistics are fitted
    once, on the 224 patches of up to STAIN_FIT_CELLS tissue cells spread evenly over the slide
    (row-major order); with "tile" (or no target, or no tissue) each forward-pass input is fitted alone.
    A slide whose patches hold too little stain to fit (Macenko counts a pixel when its optical
    density is >= beta in every channel: pale pink stroma is not counted) falls back to per-tile
    fits, with a warning, as a tile without enough stain does."""
    if not stain.enabled or fit != "slide" or not tm.mask.any():
        return stain
    cells = np.argwhere(tm.mask)
    pick = np.unique(np.linspace(0, len(cells) - 1, min(STAIN_FIT_CELLS, len(cells))).round().astype(np.int64))
    patches = CellPatches(str(slide), cells[pick], tm.ratio / scale, scale)
    tiles = [patches[i][0] for i in range(len(patches))]
    try:
        source = stain.target.fit_source(tiles, source=f"{slide}: the {len(tiles)} tissue patches of its stain fit")
    except DataError as err:
        warnings.warn(f"{describe(err)}; each forward-pass input is fitted alone instead", RuntimeWarning)
        return stain
    return stain.with_source(source)


def infer_slide(model, slide: Path, cfg: InferConfig, device, amp: MixedPrecision,
                model_mpp: float = CAMELYON16_MPP, partial: SlideProgress | None = None,
                stain: StainNormalizer = StainNormalizer()) -> dict:
    t0 = time.time()
    res = slide_resolution(slide, model_mpp, cfg)
    print(f"{slide.name}: {res['slide_mpp']:g} µm/px ({res['mpp_source']}), model {model_mpp:g} µm/px -> "
          f"level {res['level']}, resampling x{res['resampling']:.4g}", flush=True)
    scale = res["scale"]
    tm = cached_tissue_mask(slide, cfg, scale)
    kwargs = dict(workers=cfg.num_workers, channels_last=use_channels_last(cfg, device), desc=slide.name, scale=scale,
                  partial=partial, tta=parse_tta(cfg.tta), stain=slide_stain(stain, slide, tm, scale, cfg.stain_fit))
    if cfg.mode == "patch":
        prob = patch_mode_map(model, str(slide), tm, device, amp, batch_size=cfg.batch_size, **kwargs)
    else:
        prob = dense_mode_map(model, str(slide), tm, device, amp, tile_cells=cfg.tile_cells, engine=cfg.dense_engine,
                              sparse_tile_tissue=cfg.sparse_tile_tissue,
                              **kwargs)
    dets = write_outputs(Path(cfg.output_dir), slide.stem, prob, tm, cfg, scale)
    return {"slide": slide.name, "tissue_cells": int(tm.mask.sum()), "grid": list(tm.mask.shape),
            "ratio": tm.ratio, **res, "detections": len(dets), "max_probability": float(prob.max(initial=0.0)),
            "resumed_units": partial.resumed if partial else 0, "seconds": round(time.time() - t0, 2)}


def output_paths(out: Path, stem: str, cfg: InferConfig) -> list[Path]:
    """The files one slide leaves in ``out``."""
    names = [f"{stem}.npy", f"{stem}.csv", f"{stem}_heatmap.png"]
    names += [f"{stem}.geojson"] * ("geojson" in cfg.export) + [f"{stem}.xml"] * ("asap" in cfg.export)
    return [out / n for n in names]


def finished_work(cfg: InferConfig, model_mpp: float, stain: StainNormalizer = StainNormalizer()) -> FinishedWork:
    """The records of this output folder under this checkpoint and these output-shaping settings."""
    settings = {k: getattr(cfg, k) for k in OUTPUT_SETTINGS + MODE_SETTINGS[cfg.mode]}
    settings["model_mpp"] = model_mpp  # resolved: --model-mpp, else the checkpoint's
    settings["stain_target"] = stain.target.to_json(with_source=False) if stain.enabled else ""  # files or checkpoint
    return FinishedWork(cfg.output_dir, {"checkpoint_sha256": file_sha256(cfg.checkpoint), "settings": settings})


def error_text(err: BaseException, slide: Path) -> str:
    """One line naming the slide: a data-loader worker's error keeps only its last line."""
    text = describe(err)
    if "Original Traceback" in str(err):  # re-raised from a data-loader worker: the error is its last line
        text = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
    return text if text.startswith(str(slide)) else f"{slide}: {text}"


def append_summary_line(out: Path, summary: dict) -> None:
    """The slide's line in ``inference.jsonl``."""
    keys = ("slide", "status", "tissue_cells", "seconds", "detections", "resumed_units", "error", "warning")
    append_summary(out / SUMMARY, {k: summary[k] for k in keys if k in summary})


def process_slide(model, slide: Path, cfg: InferConfig, device, amp: MixedPrecision, model_mpp: float,
                  finished: FinishedWork, stain: StainNormalizer = StainNormalizer()) -> dict:
    """One slide from start to end (see ``finish_slide``); a slide that cannot be read comes back as
    a failed summary. Either way its line is appended to ``inference.jsonl``."""
    t0 = time.time()
    try:
        summary = finish_slide(model, slide, cfg, device, amp, model_mpp, finished, stain)
    except SLIDE_ERRORS as err:
        summary = {"slide": slide.name, "status": "failed", "error": error_text(err, slide),
                   "seconds": round(time.time() - t0, 2)}
        print(f"{slide.name}: failed: {summary['error']}", flush=True)
    append_summary_line(Path(cfg.output_dir), summary)
    return summary


def finish_slide(model, slide: Path, cfg: InferConfig, device, amp: MixedPrecision, model_mpp: float,
                 finished: FinishedWork, stain: StainNormalizer = StainNormalizer()) -> dict:
    """Skip the slide when it was finished before under the same key; else infer it (continuing
    from its partial map), write its outputs, record it and drop the partial map."""
    out, t0 = Path(cfg.output_dir), time.time()
    partial = SlideProgress(out / PARTIAL / f"{slide.stem}.npz", finished.work_key(slide), cfg.flush_every,
                            resume=not cfg.overwrite)
    done = None if cfg.overwrite else finished.lookup(slide.stem, slide, output_paths(out, slide.stem, cfg))
    if done is not None:
        print(f"{slide.name}: finished before with this checkpoint and settings, skipped", flush=True)
        partial.remove()  # left over when a run was killed between the record and the removal
        return {**done, "status": "skipped", "seconds": round(time.time() - t0, 2)}
    finished.forget(slide.stem)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = {**infer_slide(model, slide, cfg, device, amp, model_mpp, partial, stain), "status": "ok"}
    _rewarn(caught, summary)
    finished.record(slide.stem, slide, summary)
    partial.remove()
    return summary


def _rewarn(caught: list, summary: dict) -> None:
    """Issue the warnings caught during a slide again, and note them in its summary."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if caught:
        summary["warning"] = "; ".join(str(w.message) for w in caught)


def cached_tissue_mask(slide: Path, cfg: InferConfig, scale: float) -> TissueMask:
    """The slide's tissue mask, computed once per output folder (keyed on the slide file and the grid);
    an empty mask read back from the cache warns as a computed one does."""
    stat, computed = slide.stat(), []
    key = {"slide": str(slide.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "cell": cfg.mask_downsample, "scale": scale}

    def compute() -> dict:
        computed.append(True)
        tm = tissue_mask_at(slide, cfg.mask_downsample, scale)
        return {"mask": tm.mask, "ratio": tm.ratio, "thumbnail": tm.thumbnail, "level0_size": tm.level0_size}

    a = cached_arrays(Path(cfg.output_dir) / MASKS / f"{slide.stem}.npz", compute, key)
    if not computed and not a["mask"].any():
        warnings.warn(f"{slide}: no tissue found; the probability map will be empty")
    return TissueMask(a["mask"], float(a["ratio"]), a["thumbnail"], tuple(int(v) for v in a["level0_size"]))


def tissue_cells_to_do(slide: Path, cfg: InferConfig, model_mpp: float, finished: FinishedWork) -> int:
    """The slide's tissue cells (its mask cached on the way); 0 when finished before or unreadable
    (its error and warnings are reported when the slide itself is processed)."""
    out = Path(cfg.output_dir)
    if not cfg.overwrite and finished.lookup(slide.stem, slide, output_paths(out, slide.stem, cfg)) is not None:
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(cached_tissue_mask(slide, cfg, slide_resolution(slide, model_mpp, cfg)["scale"]).mask.sum())
    except SLIDE_ERRORS:
        return 0


def slide_sizes(slides: list[Path], cfg: InferConfig, model_mpp: float, finished: FinishedWork) -> list[int]:
    """Tissue cells still to infer per slide; the masks are shared out like the slides (largest file first)."""
    queue = WorkQueue([s.name for s in slides], [s.stat().st_size for s in slides], name="tissue-masks")
    mine = {i: tissue_cells_to_do(slides[i], cfg, model_mpp, finished) for i in queue}
    cells = {i: n for part in dist.all_gather_object(mine) for i, n in part.items()}
    return [cells[i] for i in range(len(slides))]


def infer_slides(slides: list[Path], sizes: list[int], out: Path, infer_one) -> list[dict]:
    """This process's share of the slides: handed out largest first (tissue cells) to whichever process
    is free (common/work_queue.py, through the process group's store); each process's share is
    printed and written to ``work_shares.json``."""
    queue = WorkQueue([s.name for s in slides], sizes, name="slides")
    mine = [infer_one(slides[i]) for i in queue]
    shares = queue.shares()
    if dist.is_main_process():
        atomic_write_text(out / "work_shares.json", json.dumps(shares, indent=1) + "\n")
        if len(shares) > 1:
            for share in shares:
                print(f"process {share['rank']}: {share['items']} slide(s), {share['size']:.0f} tissue cells, "
                      f"{share['seconds']:.1f}s busy")
    return mine


def run(cfg: InferConfig) -> list[dict]:
    """Infer every slide not finished before (split across processes); returns per-slide summaries
    with ``status`` ok, skipped or failed. A run over one slide raises that slide's error."""
    ctx = dist.setup(cfg.device)
    if cfg.keep_freed_memory and ctx.device.type == "cpu":
        keep_freed_memory()  # reuse activation memory across tiles and slides (common/memory.py)
    if not cfg.slides or not cfg.checkpoint:
        raise SystemExit("infer.py needs --slides PATH_OR_DIR and --checkpoint FILE")
    target = target_from_files(cfg)  # a bad --stain-target stops the run before any slide is read
    slides = list_slides(cfg.slides)
    checkpoint = load_file(cfg.checkpoint)  # read once: the weights, the recorded µm/px, the stored stain target
    model, info = load_model(checkpoint, ctx.device, use_channels_last(cfg, ctx.device), name=cfg.checkpoint)
    model_mpp, mpp_from = model_resolution(checkpoint, cfg.model_mpp)
    stain = inference_stain(cfg, target, checkpoint, cfg.checkpoint)
    del checkpoint  # the model holds its own copy of the weights
    dist.print0(f"loaded {info['kind']} {info['path']} (trained at {model_mpp:g} µm/px, {mpp_from}); "
                f"{len(slides)} slide(s), mode {cfg.mode}" + stain_line(cfg, stain, target is None))
    amp = MixedPrecision(ctx.device, cfg.precision)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    finished = finished_work(cfg, model_mpp, stain)
    sizes = slide_sizes(slides, cfg, model_mpp, finished)
    mine = infer_slides(slides, sizes, Path(cfg.output_dir),
                        lambda s: process_slide(model, s, cfg, ctx.device, amp, model_mpp, finished, stain))
    summaries = sorted((s for part in dist.all_gather_object(mine) for s in part), key=lambda s: s["slide"])
    failed = [s for s in summaries if s["status"] == "failed"]
    if len(slides) == 1 and failed:
        raise UserError(failed[0]["error"])
    if ctx.is_main:
        print_summaries(summaries)
    return summaries


def stain_line(cfg: InferConfig, stain: StainNormalizer, from_checkpoint: bool) -> str:
    """The log's note on stain normalisation (empty when off)."""
    if not stain.enabled:
        return ""
    where = "the checkpoint's stored target" if from_checkpoint else stain.target.source
    return f"; {cfg.stain_normalize} stain normalisation to {where}, fitted per {cfg.stain_fit}"


def print_summaries(summaries: list[dict]) -> None:
    for s in summaries:
        if s["status"] != "failed":
            print(f"{s['slide']}: {s['tissue_cells']} tissue cells, {s['detections']} lesion candidates, "
                  f"max p {s['max_probability']:.3f}" + (" (finished before)" if s["status"] == "skipped" else ""))
    if any(s["status"] == "failed" for s in summaries):
        print(failure_line(summaries), flush=True)


def main(cfg: InferConfig) -> None:
    summaries = run(cfg)
    dist.cleanup()
    if any(s["status"] == "failed" for s in summaries):
        raise InputsFailed(summaries)


if __name__ == "__main__":
    with exit_on_user_error():
        try:
            dist.launch(main, parse_config(InferConfig))
        except InputsFailed as err:  # already reported; under --hosts it arrives as a one-line UserError
            raise SystemExit(err.status) from None
