"""Tile features for slide-level MIL: every tissue tile of a slide embedded by a frozen backbone.

    python camelyon/features.py --slides DIR --backbone uni --weights UNI/pytorch_model.bin --output-dir feats/uni
    torchrun --nproc_per_node 2 camelyon/features.py --slides DIR --backbone resnet18 --output-dir feats/r18

Tiles: a grid of ``tile_size`` px at ``tile_mpp`` µm/px (default 224 px at 0.5 µm/px, 20x) from the
slide's top-left; a tile is kept when at least ``min_tissue`` of its 4 x 4 tissue-mask cells are
tissue (the bundle's Otsu rule, on a mask whose cell is a quarter tile). Tiles are read through
the resolution-aware reader (``common.wsi.read_rgb_scaled``: best pyramid level, antialiased
resampling; level-0 reads when the slide is within ``mpp_tolerance`` of ``tile_mpp``), embedded
in batches under autocast, and written as ``<output_dir>/<slide>.h5``:

- ``features``: (N, D) float16, ``coords``: (N, 2) int64 level-0 top-left x, y (CLAM's layout);
- ``thumbnail``: the tissue mask's RGB thumbnail (uint8), for heatmaps without the slide;
- attributes: ``backbone``, ``weights_sha256``, ``embed_dim``, ``tile_size``, ``tile_mpp``,
  ``tile_size_level0``, ``slide_mpp``, ``thumbnail_ratio`` (level-0 px per thumbnail px), ``slide``.

Backbones (``--backbone``; weights only ever from a local file, ``--weights``): ``camelyon`` (this
repo's patch classifier, its ResNet18 trunk average-pooled: 512-d), ``resnet18`` / ``resnet50``
(torchvision; any file ``common/backbones.py`` imports, or random weights), ``resnet50-trunc``
(CLAM's ResNet50 up to layer3, pooled: 1024-d), ``import`` (any backbone file ``common/backbones.py``
recognises, architecture from the shapes) and the pathology foundation models of
``common/foundation.py`` (UNI, Virchow, H-optimus, Prov-GigaPath, Phikon, ...), each with its own
input normalisation and resizing.

Folder runs as ``infer.py``: slides handed out largest first (tissue tiles) to whichever process is
free (``common/work_queue.py``), each file written atomically and recorded in ``.finished/`` under
the backbone's weights hash and the tiling settings, so a killed run skips finished slides when
restarted (``--overwrite`` redoes them). A slide that cannot be read or has no tissue tile is
reported in ``features.jsonl`` and the run goes on; the exit status is the number that failed.
"""
from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import openslide
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from camelyon.config import FeatureConfig
from camelyon.model import build_model, load_detector_weights
from camelyon.prepare import compute_tissue_mask
from common import dist
from common.amp import MixedPrecision
from common.backbones import backbone_dim, build_backbone, import_backbone, load_backbone
from common.cache import cached_arrays
from common.checkpoint import load_file
from common.config import ConfigError, parse_config
from common.errors import USER_ERRORS, DataError, UserError, describe, exit_on_user_error
from common.finished import FinishedWork, InputsFailed, append_summary
from common.foundation import FOUNDATION_MODELS, TileEncoder, load_tile_encoder
from common.io import atomic_write, atomic_write_text, file_sha256
from common.logging import progress
from common.work_queue import WorkQueue
from common.wsi import SlideHandles, list_slides, open_slide, read_rgb_scaled, recorded_mpp, resolve_scale, slide_mpp

FORMAT_VERSION = 1
MASK_CELLS = 4  # mask cells per tile side
SLIDE_ERRORS = USER_ERRORS + (openslide.OpenSlideError,)
SUMMARY = "features.jsonl"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LOCAL_BACKBONES = ("camelyon", "resnet18", "resnet50", "resnet50-trunc", "import")
#: FeatureConfig fields that shape a slide's file (with the backbone's weights hash)
FILE_SETTINGS = ("backbone", "tile_size", "slide_mpp", "mpp_tolerance", "min_tissue", "max_tiles", "precision")


# ============================================================================= backbones
class PooledTrunk(nn.Module):
    """A convolutional trunk followed by global average pooling: (B, 3, S, S) -> (B, C)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))


def _weights_hash(path: str) -> str:
    return file_sha256(path)[:16] if path and Path(path).is_file() else "random"


def _camelyon_encoder(weights: str, tile_size: int) -> TileEncoder:
    """This repo's patch classifier: ResNet18 trunk of a camelyon checkpoint (or the bundle's
    model.pt), average-pooled to 512-d; input scaled to [-1, 1] as in training."""
    if not weights:
        raise ConfigError("--backbone camelyon: needs --weights CHECKPOINT (camelyon/train.py's best.pt or model.pt)")
    model = build_model()
    load_detector_weights(model, weights)
    mpp = recorded_mpp(load_file(weights)) or 0.243
    return TileEncoder(name="camelyon", model=PooledTrunk(model.features), embed_dim=512, input_size=tile_size,
                       resize=None, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mpp=mpp,
                       precision=torch.float16, weights_path=weights, weights_sha256=_weights_hash(weights))


def _resnet_encoder(arch: str, weights: str, tile_size: int, seed: int = 0) -> TileEncoder:
    """torchvision ResNets (``resnet50-trunc``: up to layer3, CLAM's ResNet50-trunc) with weights
    from any file ``common/backbones.py`` reads; random weights (a warning) when none is given."""
    truncate = arch == "resnet50-trunc"
    base = "resnet50" if truncate else arch
    if arch == "import":
        if not weights:
            raise ConfigError("--backbone import: needs --weights FILE (a backbone checkpoint)")
        imported = import_backbone(weights)
        if not imported.arch.startswith("resnet"):
            raise ConfigError(f"{weights}: --backbone import reads ResNet backbones; this is {imported.arch} "
                              "(use the foundation-model names for ViTs)")
        base = imported.arch
    with torch.random.fork_rng(devices=[]):  # random weights fixed by the seed, the global stream untouched
        torch.manual_seed(seed)
        net = build_backbone(base)
    if weights:
        load_backbone(net, weights, base)
    else:
        warnings.warn(f"--backbone {arch}: no --weights, features from random weights (seed {seed})")
    layers = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"] + ([] if truncate else ["layer4"])
    trunk = nn.Sequential(*(getattr(net, name) for name in layers))
    dim = 1024 if truncate else backbone_dim(net)
    return TileEncoder(name=arch if arch != "import" else base, model=PooledTrunk(trunk), embed_dim=dim,
                       input_size=tile_size, resize=None, interpolation="bilinear", mean=IMAGENET[0], std=IMAGENET[1],
                       mpp=0.5, precision=torch.float16, weights_path=weights,
                       weights_sha256=_weights_hash(weights) if weights else f"random-seed{seed}")


def build_encoder(backbone: str, weights: str = "", seed: int = 0, tile_size: int = 224) -> TileEncoder:
    """The frozen tile encoder named by ``--backbone`` (see the module docstring), in eval mode;
    ``tile_size`` is the convolutional backbones' input (the foundation models have their own)."""
    if weights and not Path(weights).exists():
        raise ConfigError(f"--weights {weights}: no such file or folder")
    if backbone in FOUNDATION_MODELS:
        if not weights:
            raise ConfigError(f"--backbone {backbone}: needs --weights (the model's local weights file; "
                              "nothing is downloaded)")
        return load_tile_encoder(backbone, weights)
    if backbone == "camelyon":
        encoder = _camelyon_encoder(weights, tile_size)
    elif backbone in LOCAL_BACKBONES[1:]:
        encoder = _resnet_encoder(backbone, weights, tile_size, seed)
    else:
        raise ConfigError(f"--backbone {backbone}: unknown; one of {', '.join(LOCAL_BACKBONES)}, "
                          f"{', '.join(FOUNDATION_MODELS)}")
    encoder.model.eval().requires_grad_(False)
    return encoder


def encoder_precision(requested: str, encoder: TileEncoder, device: torch.device) -> str:
    """``--precision auto`` on CUDA: the dtype the encoder's authors infer in (fp16; bf16 for UNI2-h);
    fp32 on CPU; an explicit choice as given."""
    if requested != "auto" or device.type != "cuda":
        return requested
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(encoder.precision, "fp32")


# ============================================================================= tiles
def tile_grid(slide: Path, tile_size: int, scale: float, min_tissue: float) -> dict[str, np.ndarray]:
    """Level-0 top-left corners (N, 2: x, y) of the tiles with enough tissue, the tile side in level-0
    px, the mask's thumbnail and its level-0 px per pixel. The mask cell is a quarter tile, exactly."""
    side = tile_size * scale  # level-0 px per tile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tissue" is reported per slide below
        tm = compute_tissue_mask(slide, side / MASK_CELLS, level_match=0.0)
    width, height = tm.level0_size
    rows, cols = int(height // side), int(width // side)
    cells = tm.mask[:rows * MASK_CELLS, :cols * MASK_CELLS].reshape(rows, MASK_CELLS, cols, MASK_CELLS)
    keep = cells.mean(axis=(1, 3)) >= min_tissue  # (rows, cols)
    r, c = np.nonzero(keep)
    coords = np.stack([np.round(c * side), np.round(r * side)], axis=1).astype(np.int64)  # (N, 2) x, y
    return {"coords": coords.reshape(-1, 2), "side": np.float64(side), "thumbnail": tm.thumbnail,
            "ratio": np.float64(tm.ratio)}


def subsample(coords: np.ndarray, max_tiles: int, seed: int, name: str) -> np.ndarray:
    """At most ``max_tiles`` rows, a random subset fixed by (seed, slide name), kept in grid order."""
    if not max_tiles or len(coords) <= max_tiles:
        return coords
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return coords[np.sort(rng.choice(len(coords), max_tiles, replace=False))]


class SlideTiles(Dataset):
    """uint8 (3, S, S) tiles of one slide at the given level-0 top-left corners."""

    def __init__(self, slide: Path, coords: np.ndarray, size: int, scale: float):
        self.slide, self.coords, self.size, self.scale = slide, coords, size, scale
        self.handles = SlideHandles()

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        x, y = self.coords[i]
        rgb = read_rgb_scaled(self.handles(self.slide), int(x), int(y), self.size, self.size, self.scale)
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


@torch.no_grad()
def embed_tiles(encoder: TileEncoder, tiles: Dataset, device: torch.device, amp: MixedPrecision,
                batch_size: int, workers: int, desc: str = "tiles") -> np.ndarray:
    """(N, D) float16 embeddings of a tile dataset, in its order."""
    loader = DataLoader(tiles, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    out = []
    for batch in progress(loader, desc=desc):
        x = encoder.preprocess(batch.to(device, non_blocking=True))
        with amp.autocast():
            out.append(encoder.model(x).float().cpu())
    return torch.cat(out).numpy().astype(np.float16) if out else np.zeros((0, encoder.embed_dim), np.float16)


# ============================================================================= files
def write_features(path: Path, features: np.ndarray, coords: np.ndarray, thumbnail: np.ndarray,
                   attrs: dict) -> None:
    """``<slide>.h5`` written atomically (a temporary sibling renamed in)."""
    def write(fh) -> None:
        with h5py.File(fh, "w") as f:
            f.create_dataset("features", data=features, chunks=(min(len(features), 256) or 1, features.shape[1]))
            f.create_dataset("coords", data=coords)
            f.create_dataset("thumbnail", data=thumbnail, compression="gzip")
            f.attrs.update(attrs)
    atomic_write(path, write)


def read_features(path: str | os.PathLike) -> dict:
    """A features file: ``features`` (N, D) float32, ``coords`` (N, 2), ``attrs`` and the thumbnail."""
    try:
        with h5py.File(path, "r") as f:
            return {"features": f["features"][()].astype(np.float32), "coords": f["coords"][()],
                    "thumbnail": f["thumbnail"][()] if "thumbnail" in f else None, "attrs": dict(f.attrs)}
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: not a features file of camelyon/features.py ({err})") from None


# ============================================================================= one slide
class FeatureRun:
    """Everything one process needs to extract its share of the slides."""

    def __init__(self, cfg: FeatureConfig, encoder: TileEncoder, ctx: dist.DistContext):
        self.cfg, self.encoder, self.device = cfg, encoder, ctx.device
        self.out = Path(cfg.output_dir)
        self.tile_mpp = cfg.tile_mpp or encoder.mpp
        if not self.tile_mpp:
            raise ConfigError(f"--tile-mpp: {encoder.name}'s authors publish no resolution; choose one (e.g. 0.5)")
        self.tile_size = cfg.tile_size or encoder.tile_size  # 224; 256 for prov-gigapath (resized, cropped)
        self.amp = MixedPrecision(ctx.device, encoder_precision(cfg.precision, encoder, ctx.device))
        settings = {k: getattr(cfg, k) for k in FILE_SETTINGS}
        settings.update(tile_mpp=self.tile_mpp, tile_size=self.tile_size)
        settings["seed"] = cfg.seed if cfg.max_tiles else 0
        self.finished = FinishedWork(self.out, {"weights_sha256": encoder.weights_sha256, "settings": settings})

    def scale(self, slide: Path) -> tuple[float, float]:
        """(level-0 px per tile px, the slide's µm/px)."""
        with open_slide(slide) as handle:
            res = resolve_scale(slide_mpp(handle, str(slide)), self.tile_mpp, self.cfg.slide_mpp,
                                self.cfg.mpp_tolerance, str(slide))
        return res.scale, res.slide_mpp

    def grid(self, slide: Path) -> dict[str, np.ndarray]:
        """The slide's tile grid, computed once per output folder (``.tissue/<slide>.npz``)."""
        scale, _ = self.scale(slide)
        stat = slide.stat()
        key = {"slide": str(slide.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
               "tile": self.tile_size, "scale": scale, "min_tissue": self.cfg.min_tissue}
        return cached_arrays(self.out / ".tissue" / f"{slide.stem}.npz",
                             lambda: tile_grid(slide, self.tile_size, scale, self.cfg.min_tissue), key)

    def tiles_to_do(self, slide: Path) -> int:
        """Tiles still to embed (0 when finished before or unreadable: reported when processed)."""
        if not self.cfg.overwrite and self.finished.lookup(slide.stem, slide, [self.out / f"{slide.stem}.h5"]):
            return 0
        try:
            return len(subsample(self.grid(slide)["coords"], self.cfg.max_tiles, self.cfg.seed, slide.stem))
        except SLIDE_ERRORS:
            return 0

    def extract(self, slide: Path) -> dict:
        """Embed one slide's tiles and write its file; returns its summary."""
        scale, mpp = self.scale(slide)
        grid = self.grid(slide)
        coords = subsample(grid["coords"], self.cfg.max_tiles, self.cfg.seed, slide.stem)
        if not len(coords):
            raise DataError(f"{slide}: no tissue tile (none of its {self.tile_size}-px tiles at "
                            f"{self.tile_mpp:g} µm/px has {self.cfg.min_tissue:.0%} tissue)")
        tiles = SlideTiles(slide, coords, self.tile_size, scale)
        feats = embed_tiles(self.encoder, tiles, self.device, self.amp, self.cfg.batch_size, self.cfg.num_workers,
                            desc=slide.stem)
        attrs = {"format_version": FORMAT_VERSION, "slide": slide.name, "backbone": self.encoder.name,
                 "weights_sha256": self.encoder.weights_sha256, "embed_dim": int(feats.shape[1]),
                 "tile_size": self.tile_size, "tile_mpp": self.tile_mpp, "slide_mpp": mpp,
                 "tile_size_level0": float(grid["side"]), "thumbnail_ratio": float(grid["ratio"]),
                 "min_tissue": self.cfg.min_tissue}
        write_features(self.out / f"{slide.stem}.h5", feats, coords, grid["thumbnail"], attrs)
        return {"slide": slide.name, "tiles": int(len(coords)), "embed_dim": int(feats.shape[1])}

    def process(self, slide: Path) -> dict:
        """One slide: skipped when finished before under the same key, else extracted and recorded;
        a slide that fails is reported and the run goes on. Appends its ``features.jsonl`` line."""
        t0, target = time.time(), self.out / f"{slide.stem}.h5"
        try:
            done = None if self.cfg.overwrite else self.finished.lookup(slide.stem, slide, [target])
            if done is not None:
                summary = {**done, "status": "skipped"}
            else:
                self.finished.forget(slide.stem)
                summary = {**self.extract(slide), "status": "ok", "seconds": round(time.time() - t0, 2)}
                self.finished.record(slide.stem, slide, summary)
        except SLIDE_ERRORS as err:
            text = describe(err)
            summary = {"slide": slide.name, "status": "failed",
                       "error": text if text.startswith(str(slide)) else f"{slide}: {text}"}
            print(f"{slide.name}: failed: {summary['error']}", flush=True)
        append_summary(self.out / SUMMARY, summary)
        return summary


def run(cfg: FeatureConfig) -> list[dict]:
    """Extract every slide not finished before, split across processes; per-slide summaries."""
    ctx = dist.setup(cfg.device)
    encoder = build_encoder(cfg.backbone, cfg.weights, cfg.seed, cfg.tile_size or 224)  # a bad weights file stops here
    if not cfg.slides:
        raise ConfigError("--slides: give a slide file or a folder of slides")
    encoder.model.to(ctx.device)
    slides = list_slides(cfg.slides)
    job = FeatureRun(cfg, encoder, ctx)
    job.out.mkdir(parents=True, exist_ok=True)
    dist.print0(f"{encoder.name} ({encoder.embed_dim}-d, weights {encoder.weights_sha256}): {len(slides)} slide(s), "
                f"{job.tile_size}-px tiles at {job.tile_mpp:g} µm/px -> {job.out}")
    masks = WorkQueue([s.name for s in slides], [s.stat().st_size for s in slides], name="feature-grids")
    todo = {i: job.tiles_to_do(slides[i]) for i in masks}
    sizes = {i: n for part in dist.all_gather_object(todo) for i, n in part.items()}
    queue = WorkQueue([s.name for s in slides], [sizes[i] for i in range(len(slides))], name="feature-slides")
    mine = [job.process(slides[i]) for i in queue]
    shares = queue.shares()  # collective: every process gathers the records
    if ctx.is_main:
        atomic_write_text(job.out / "work_shares.json", json.dumps(shares, indent=1) + "\n")
    summaries = sorted((s for part in dist.all_gather_object(mine) for s in part), key=lambda s: s["slide"])
    failed = [s for s in summaries if s["status"] == "failed"]
    if len(slides) == 1 and failed:
        raise UserError(failed[0]["error"])
    tiles = sum(s.get("tiles", 0) for s in summaries if s["status"] == "ok")
    dist.print0(f"{len(summaries) - len(failed)} slide(s) done ({tiles} tiles embedded now), {len(failed)} failed"
                + "".join(f"\n  {s['error']}" for s in failed))
    return summaries


def main(cfg: FeatureConfig) -> None:
    summaries = run(cfg)
    dist.cleanup()
    if any(s["status"] == "failed" for s in summaries):
        raise InputsFailed(summaries)


if __name__ == "__main__":
    with exit_on_user_error():
        try:
            dist.launch(main, parse_config(FeatureConfig))
        except InputsFailed as err:  # already reported
            raise SystemExit(err.status) from None
