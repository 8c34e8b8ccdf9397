"""Synthetic Camelyon16-like demo data set, written in the real on-disk formats.

The real Camelyon16 slides cannot be downloaded here, so ``--demo`` runs of the
pipeline use a small synthetic set that exercises exactly the same readers:

* slides: tiled pyramidal RGB TIFFs (JPEG tiles, 0.243 µm/px) that OpenSlide
  opens as ``generic-tiff`` with levels at downsample 1, 2, 4, ..., 64;
* lesion annotations: ASAP XML in the original naming (``_0`` tumour,
  ``_2`` exclusion, groups ``_0``/``_1``/``_2``);
* test ground truths: Camelyon16-style single-channel pyramidal mask TIFFs
  (255 = tumour), named ``test_00N.tif`` like the slides (8-character stems,
  as the official FROC script requires);
* NCRF coordinate lists ``coords/{tumor,normal}_{train,valid}.txt`` with
  capitalised slide ids (``Tumor_001,x,y``, level-0 region centres).

Layout under ``root`` (mirrors Camelyon16 + NCRF + the MONAI bundle)::

    training/images/{tumor_001..., normal_001...}.tif   train then val slides
    training/annotations/tumor_XXX.xml
    testing/images/test_00N.tif
    testing/ground_truths/test_00N.tif                 tumour test slides only
    testing/annotations/test_00N.xml                   tumour test slides only
    coords/{tumor_train,normal_train,tumor_valid,normal_valid}.txt
    .complete                                          manifest: generator, parameters, key (common.cache)

Appearance: a near-white background; tissue is a few large irregular blobs of
pink (eosin) stroma with sparse small purple nuclei; lesions are smooth
irregular blobs inside tissue, 1,500-3,000 px across at level 0, with a more
purple background and dense, larger, darker/bluer nuclei, so a CNN tells
tumour, normal tissue and background apart from a single 224-px patch.  One
train slide has a ``_2`` exclusion polygon inside a lesion (rendered as
normal tissue); one tumour test slide has an extra ~400-px lesion, an isolated
tumour cell region (ITC) under the official FROC rule.

Everything is deterministic from the seed (each slide draws from its own
``np.random.default_rng([seed, slide_index])``).  Generation of the default
set (13 slides of 6144 x 8192, ~150 MB) takes ~15-20 s wall on 2 idle CPU
cores (~30 CPU-seconds); see :func:`make_demo`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

from camelyon.annotations import Annotation, points_in_annotation, rasterize, write_asap_xml
from camelyon.config import TrainConfig
from common import dist
from common.cache import build_once
from common.config import ArgumentParser, default_cache_dir
from common.errors import exit_on_user_error
from common.io import atomic_write_text
from common.pyramidal_tiff import write_pyramidal_tiff

__all__ = [
    "DemoLayout",
    "MPP",
    "demo_cache_root",
    "make_demo",
    "prepare_demo",
    "main",
]

#: Level-0 resolution of the demo slides (µm per pixel), as Camelyon16's.
MPP = 0.243
#: Side of the NCRF / bundle training region centred on each coordinate.
REGION = 768
_HALF = REGION // 2
#: This repo's split names -> the split names of NCRF's coordinate files (``coords/tumor_valid.txt``).
NCRF_SPLITS = {"train": "train", "val": "valid"}
#: Bumped whenever the generated content changes, so stale caches regenerate.
DEMO_VERSION = 1

# Colours (RGB) of the synthetic stains.
_BACKGROUND = np.array([241.0, 240.0, 242.0], np.float32)
_STROMA = np.array([236.0, 172.0, 206.0], np.float32)       # eosin pink
_TUMOR_STROMA = np.array([198.0, 132.0, 200.0], np.float32)  # more purple
_NORMAL_NUCLEUS = np.array([118.0, 66.0, 152.0], np.float32)
_TUMOR_NUCLEUS = np.array([62.0, 40.0, 132.0], np.float32)   # darker and bluer

# Geometry (level-0 pixels).
_LESION_DIAMETER = (1500.0, 3000.0)
_ITC_DIAMETER = 400.0
_LESION_GAP = 700.0     # between lesion extents; > 2 x 37.5 µm growth (309 px)
_LESION_MARGIN = 400.0  # between a lesion's extent and the slide border
_LOWRES = 16            # downsample of the tissue layout canvas
_RENDER = 2             # downsample at which stroma colour is rendered


def demo_cache_root() -> Path:
    """Default demo folder: ``$PATHMONO_CACHE/camelyon_demo`` or ``~/.cache/pathmono/camelyon_demo``."""
    return default_cache_dir("camelyon_demo")


# ----------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoLayout:
    """Paths and slide lists of a generated demo set (slide names are lower-case stems)."""

    root: Path
    train_images: Path        #: root/training/images (train and val slides)
    train_annotations: Path   #: root/training/annotations (tumor_XXX.xml)
    coords: Path              #: root/coords (NCRF lists)
    test_images: Path         #: root/testing/images
    test_masks: Path          #: root/testing/ground_truths (tumour test slides only)
    test_annotations: Path    #: root/testing/annotations (tumour test slides only)
    train_slides: tuple[str, ...]
    val_slides: tuple[str, ...]
    test_slides: tuple[str, ...]
    test_tumor_slides: tuple[str, ...]
    size: tuple[int, int]     #: level-0 (height, width) of every slide
    mpp: float = MPP
    generated: bool = False   #: True when this call generated the data (False: cache hit)
    seconds: float = 0.0      #: generation wall time of this call
    timings: dict = field(default_factory=dict, compare=False)  #: per-slide seconds when generated

    @property
    def coord_files(self) -> dict[str, Path]:
        """NCRF coordinate lists keyed ``tumor_train``, ``normal_train``, ``tumor_valid``, ``normal_valid``."""
        return {k: self.coords / f"{k}.txt" for k in ("tumor_train", "normal_train", "tumor_valid", "normal_valid")}

    def slide_path(self, name: str) -> Path:
        """Image path of a slide (``tumor_001``, ``normal_002``, ``test_003``...)."""
        folder = self.test_images if name.startswith("test_") else self.train_images
        return folder / f"{name}.tif"

    def annotation_path(self, name: str) -> Path | None:
        """ASAP XML of a tumour slide, None for normal slides."""
        if name.startswith("test_"):
            return self.test_annotations / f"{name}.xml" if name in self.test_tumor_slides else None
        return self.train_annotations / f"{name}.xml" if name.startswith("tumor_") else None

    def mask_path(self, name: str) -> Path | None:
        """Ground-truth mask TIFF of a tumour test slide, None otherwise."""
        return self.test_masks / f"{name}.tif" if name in self.test_tumor_slides else None

    def describe(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"demo root: {self.root}",
                 f"  slides {self.size[0]}x{self.size[1]} (HxW) at {self.mpp} µm/px",
                 f"  train: {', '.join(self.train_slides)}",
                 f"  val: {', '.join(self.val_slides)}",
                 f"  test:  {', '.join(self.test_slides)} (tumour: {', '.join(self.test_tumor_slides)})"]
        for key, p in self.coord_files.items():
            n = sum(1 for _ in open(p)) if p.exists() else 0
            lines.append(f"  coords/{key}.txt: {n} centres")
        return "\n".join(lines)


@dataclass(frozen=True)
class _SlideSpec:
    """What to generate for one slide (planned up front, generated independently)."""

    name: str
    index: int            # position in the plan; seeds the slide's RNG
    tumor: bool
    split: str            # train | val | test
    n_lesions: int = 0
    itc: bool = False
    exclusion: bool = False
    n_tumor_coords: int = 0
    n_normal_coords: int = 0


def _split_count(n: int, k: int) -> list[int]:
    """``n`` items over ``k`` bins as evenly as possible (first bins get the remainder)."""
    if k == 0:
        return []
    q, r = divmod(n, k)
    return [q + (i < r) for i in range(k)]


def _plan(p: dict) -> list[_SlideSpec]:
    """Deterministic list of slides to generate from the parameters ``p``."""
    rng = np.random.default_rng([p["seed"], 10**6])
    specs: list[_SlideSpec] = []
    n_tt, n_vt = p["n_train_tumor"], p["n_val_tumor"]
    n_tn, n_vn = p["n_train_normal"], p["n_val_normal"]
    for split, tumors, normals, t_off, n_off, n_coords in (
            ("train", n_tt, n_tn, 0, 0, p["n_coords_train"]),
            ("val", n_vt, n_vn, n_tt, n_tn, p["n_coords_val"])):
        t_q = _split_count(n_coords, tumors)
        # normal centres: half from normal slides, half hard negatives from tumour slides
        if tumors and normals:
            from_normals = _split_count(n_coords - n_coords // 2, normals)
            from_tumors = _split_count(n_coords // 2, tumors)
        else:
            from_normals = _split_count(n_coords, normals)
            from_tumors = _split_count(n_coords if not normals else 0, tumors)
        for i in range(tumors):
            specs.append(_SlideSpec(f"tumor_{t_off + i + 1:03d}", len(specs), True, split,
                                    n_lesions=int(rng.integers(1, 3)),
                                    exclusion=(split == "train" and i == 0),
                                    n_tumor_coords=t_q[i], n_normal_coords=from_tumors[i]))
        for i in range(normals):
            specs.append(_SlideSpec(f"normal_{n_off + i + 1:03d}", len(specs), False, split,
                                    n_normal_coords=from_normals[i]))
    n_test = p["n_test_tumor"] + p["n_test_normal"]
    is_tumor = np.zeros(n_test, bool)
    is_tumor[rng.permutation(n_test)[:p["n_test_tumor"]]] = True
    first = True
    for i in range(n_test):
        itc = bool(is_tumor[i] and first)
        first = first and not is_tumor[i]
        specs.append(_SlideSpec(f"test_{i + 1:03d}", len(specs), bool(is_tumor[i]), "test",
                                n_lesions=int(rng.integers(2, 4)) if is_tumor[i] else 0, itc=itc))
    return specs


def _layout(root: Path, p: dict, specs: list[_SlideSpec], **extra) -> DemoLayout:
    """DemoLayout of a plan under ``root``."""
    names = lambda split: tuple(s.name for s in specs if s.split == split)  # noqa: E731
    return DemoLayout(
        root=root,
        train_images=root / "training" / "images",
        train_annotations=root / "training" / "annotations",
        coords=root / "coords",
        test_images=root / "testing" / "images",
        test_masks=root / "testing" / "ground_truths",
        test_annotations=root / "testing" / "annotations",
        train_slides=names("train"), val_slides=names("val"), test_slides=names("test"),
        test_tumor_slides=tuple(s.name for s in specs if s.split == "test" and s.tumor),
        size=tuple(p["size"]), mpp=MPP, **extra)


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------

def _radial_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float,
                    roughness: float, n_vertices: int = 96, harmonics: int = 6,
                    round_to: int | None = 2) -> np.ndarray:
    """Smooth irregular star-shaped polygon (N, 2) of level-0 (x, y).

    r(θ) = radius · (1 + Σ_k a_k cos(kθ + φ_k)), k = 2..harmonics, with
    Σ a_k = roughness, so r stays within radius · (1 ± roughness).
    """
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    k = np.arange(2, harmonics + 1)
    amp = rng.uniform(0.2, 1.0, len(k)) / (k - 1.0)
    amp *= roughness / amp.sum()
    phase = rng.uniform(0.0, 2 * np.pi, len(k))
    r = radius * (1.0 + (amp[:, None] * np.cos(k[:, None] * theta + phase[:, None])).sum(0))
    poly = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], 1)
    return poly if round_to is None else np.round(poly, round_to)


def _feret_diameter(poly: np.ndarray) -> float:
    """Largest distance between two vertices of a polygon."""
    d = poly[:, None, :] - poly[None, :, :]
    return float(np.sqrt((d ** 2).sum(-1)).max())


def _place_lesions(rng: np.random.Generator, shape: tuple[int, int], n: int,
                   itc: bool) -> list[tuple[float, float, float, np.ndarray]]:
    """Non-overlapping lesions ``(cx, cy, extent, polygon)``; the ITC (if any) last.

    Lesions are 1,500-3,000 px across (largest vertex-to-vertex distance),
    the ITC 400 px; on small slides the range is capped.  ``extent`` is the
    largest vertex distance from the centre, used for spacing.  The size range
    shrinks with failed attempts so crowded slides still get lesions; a
    lesion that cannot be placed is dropped.
    """
    h, w = shape
    d_hi = min(_LESION_DIAMETER[1], (min(h, w) - 2 * _LESION_MARGIN) * 0.8)
    d_lo = min(_LESION_DIAMETER[0], d_hi)
    out: list[tuple[float, float, float, np.ndarray]] = []
    wanted = [(d_lo, d_hi, (0.14, 0.28))] * n
    if itc:
        wanted.append((_ITC_DIAMETER, _ITC_DIAMETER, (0.05, 0.10)))
    tries = 400
    for lo, hi, (rough_lo, rough_hi) in wanted:
        for t in range(tries):
            diameter = rng.uniform(lo, lo + (hi - lo) * (1 - t / tries))
            unit = _radial_polygon(rng, 0.0, 0.0, 1.0, rng.uniform(rough_lo, rough_hi), round_to=None)
            unit *= diameter / _feret_diameter(unit)
            ext = float(np.hypot(unit[:, 0], unit[:, 1]).max())
            m = _LESION_MARGIN + ext
            if w - 2 * m <= 0 or h - 2 * m <= 0:
                continue
            cx, cy = rng.uniform(m, w - m), rng.uniform(m, h - m)
            if all(math.hypot(cx - ox, cy - oy) >= ext + oe + _LESION_GAP for ox, oy, oe, _ in out):
                out.append((cx, cy, ext, np.round(unit + (cx, cy), 2)))
                break
    return out


def _tissue_field(rng: np.random.Generator, shape: tuple[int, int],
                  lesions: list[tuple[float, float, float, np.ndarray]]) -> np.ndarray:
    """Soft tissue field at downsample ``_LOWRES``; tissue is where it exceeds 0.5.

    Union of large irregular blobs (one around each lesion, then random ones
    until ~30-50 % of the slide is covered), blurred and perturbed by smooth
    noise for ragged edges; lesions (dilated by ~130 px) are forced inside.
    """
    h, w = shape
    ds = _LOWRES
    hl, wl = -(-h // ds), -(-w // ds)
    canvas = np.zeros((hl, wl), np.float32)

    def blob(poly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return draw_polygon(poly[:, 1] / ds - 0.5, poly[:, 0] / ds - 0.5, shape=(hl, wl))

    for cx, cy, ext, _ in lesions:
        pad = rng.uniform(300, 700)
        off = rng.uniform(-0.4, 0.4, 2) * pad
        canvas[blob(_radial_polygon(rng, cx + off[0], cy + off[1], ext + pad + np.hypot(*off),
                                    rng.uniform(0.1, 0.2)))] = 1.0
    target = rng.uniform(0.30, 0.42)
    side = min(h, w)
    for _ in range(60):
        if canvas.mean() >= target:
            break
        radius = rng.uniform(0.12, 0.26) * side
        cx, cy = rng.uniform(0.12, 0.88) * w, rng.uniform(0.12, 0.88) * h
        rr, cc = blob(_radial_polygon(rng, cx, cy, radius, rng.uniform(0.2, 0.4)))
        if canvas.mean() + (1.0 - canvas[rr, cc]).sum() / canvas.size <= target + 0.06:  # no overshoot
            canvas[rr, cc] = 1.0
    noise = ndi.gaussian_filter(rng.standard_normal((hl, wl)).astype(np.float32), 3.0)
    noise /= noise.std() + 1e-6
    soft = ndi.gaussian_filter(canvas, 2.0) + 0.1 * noise
    if lesions:
        les = rasterize(Annotation(positive=[p for *_, p in lesions]), (hl, wl), ds)
        les = ndi.binary_dilation(les, iterations=8)
        soft[les] = np.maximum(soft[les], 1.0)
    return soft


def _upsample(field_: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling by an integer factor, pixel-area aligned, cropped to ``shape``."""
    up = ndi.zoom(field_, factor, order=1, mode="nearest", grid_mode=True, prefilter=False)
    return up[:shape[0], :shape[1]]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma, factor: int,
                  out_shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance Gaussian-smoothed noise drawn at ``shape``, repeated by ``factor``."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    n /= n.std() + 1e-6
    if factor > 1:
        n = np.repeat(np.repeat(n, factor, axis=0), factor, axis=1)
    return n[:out_shape[0], :out_shape[1]]


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def _nucleus_bank(radii: tuple[float, ...], aspects: tuple[float, ...],
                  n_angles: int = 4) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Ellipse stamps ``(dy, dx, shade)``: pixel offsets and a radial darkening factor."""
    bank = []
    for a in radii:
        for asp in aspects:
            for ang in np.arange(n_angles) * np.pi / n_angles:
                rmax = int(math.ceil(a))
                yy, xx = np.mgrid[-rmax:rmax + 1, -rmax:rmax + 1].astype(np.float32)
                u = xx * math.cos(ang) + yy * math.sin(ang)
                v = -xx * math.sin(ang) + yy * math.cos(ang)
                d = np.sqrt((u / a) ** 2 + (v * asp / a) ** 2)
                m = d <= 1.0
                bank.append((yy[m].astype(np.intp), xx[m].astype(np.intp),
                             (0.88 + 0.17 * d[m]).astype(np.float32)))  # darker chromatin centre
                if asp == 1.0:
                    break  # circles need one orientation only
    return bank


_NORMAL_BANK = _nucleus_bank((3.0, 3.8, 4.6, 5.4), (1.0, 1.5, 2.2))
_TUMOR_BANK = _nucleus_bank((5.5, 6.5, 7.5, 8.5), (1.0, 1.25, 1.6))


def _stamp_nuclei(img: np.ndarray, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray,
                  bank: list, color: np.ndarray, jitter: float) -> None:
    """Paint nuclei centred at (ys, xs) into ``img`` in place (vectorised per stamp shape)."""
    h, w = img.shape[:2]
    n = len(ys)
    colors = color + rng.normal(0.0, jitter, (n, 3)) + rng.normal(0.0, jitter, (n, 1))
    kind = rng.integers(0, len(bank), n)
    for k, (dy, dx, shade) in enumerate(bank):
        sel = np.flatnonzero(kind == k)
        if not len(sel):
            continue
        yy = np.clip(ys[sel, None] + dy[None], 0, h - 1)
        xx = np.clip(xs[sel, None] + dx[None], 0, w - 1)
        img[yy, xx] = np.clip(colors[sel, None, :] * shade[None, :, None], 0, 255).astype(np.uint8)


def _upsample_nearest(a: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Pixel replication of (h, w) or (h, w, C) by ``factor``, cropped to ``shape``."""
    h, w = a.shape[:2]
    out = np.empty((h, factor, w, factor) + a.shape[2:], a.dtype)
    out[...] = a[:, None, :, None]
    out = out.reshape((h * factor, w * factor) + a.shape[2:])
    if out.shape[:2] != tuple(shape):
        out = np.ascontiguousarray(out[:shape[0], :shape[1]])
    return out


def _render(rng: np.random.Generator, shape: tuple[int, int], soft: np.ndarray,
            tumor: np.ndarray) -> np.ndarray:
    """Level-0 RGB uint8 slide from the tissue field and the tumour map.

    ``soft``: tissue field at downsample 4 (tissue where > 0.5); ``tumor``:
    tumour map at downsample ``_RENDER`` (2).  Stroma colour (stain drift,
    fibrous texture, grain, soft tissue edges) is computed channel by channel
    at downsample 2 and pixel-replicated to level 0; nuclei are then stamped
    at level 0.
    """
    h, w = shape
    f = _RENDER
    h2, w2 = tumor.shape
    h4, w4 = soft.shape
    alpha = np.clip((soft - 0.5) * 5.0 + 0.5, 0.0, 1.0)  # tissue opacity, 0.5 on the mask edge
    lo = (-(-h // _LOWRES), -(-w // _LOWRES))
    stain = _upsample(_smooth_noise(rng, lo, 4.0, 1, lo), _LOWRES // 4, (h4, w4))  # slow stain-intensity drift
    fibres = _smooth_noise(rng, (h4, w4), (0.7, 2.5), 1, (h4, w4))  # fibrous texture
    mod = _upsample_nearest(stain * 9.0 + fibres * 15.0, 4 // f, (h2, w2))
    alpha = _upsample_nearest(alpha, 4 // f, (h2, w2))
    t = tumor.astype(np.float32)
    grain = rng.integers(-4, 5, (h2, w2), dtype=np.int8)
    small = np.empty((h2, w2, 3), np.uint8)
    for c, k in enumerate((0.7, 1.0, 0.75)):
        col = t * (_TUMOR_STROMA[c] - _STROMA[c])
        col += _STROMA[c] - _BACKGROUND[c]
        col += mod * k
        col *= alpha
        col += grain
        col += _BACKGROUND[c]
        np.clip(col, 0, 255, out=col)
        small[..., c] = col
    img = _upsample_nearest(small, f, (h, w))

    # nuclei: Poisson-scattered candidates kept where the class at their centre matches
    for bank, color, density, is_tumor in ((_NORMAL_BANK, _NORMAL_NUCLEUS, 1.0 / 1100, False),
                                           (_TUMOR_BANK, _TUMOR_NUCLEUS, 1.0 / 260, True)):
        n = rng.poisson(h * w * density)
        ys = rng.integers(0, h, n)
        xs = rng.integers(0, w, n)
        keep = soft[ys // 4, xs // 4] > 0.55
        in_tumor = tumor[ys // f, xs // f]
        keep &= in_tumor if is_tumor else ~in_tumor
        _stamp_nuclei(img, rng, ys[keep], xs[keep], bank, color, jitter=10.0)
    return img


def _sample_points(rng: np.random.Generator, mask: np.ndarray, ds: int, n: int,
                   shape: tuple[int, int], accept) -> np.ndarray:
    """``n`` integer level-0 (x, y) centres drawn uniformly within ``mask`` (at ``ds``).

    Points also lie at least 384 px from every border (the 768 region is inside
    the slide) and satisfy ``accept(xy) -> bool array``.  Returns fewer points
    only if the mask has (almost) no room.
    """
    h, w = shape
    if n <= 0:
        return np.zeros((0, 2), np.int64)
    idx = np.flatnonzero(mask)
    out: list[np.ndarray] = []
    got = 0
    for _ in range(50):
        if got >= n or not len(idx):
            break
        pick = rng.choice(idx, size=2 * (n - got) + 16)
        r, c = np.divmod(pick, mask.shape[1])
        xy = np.stack([(c + rng.random(len(c))) * ds, (r + rng.random(len(r))) * ds], 1).astype(np.int64)
        ok = (xy[:, 0] >= _HALF) & (xy[:, 0] <= w - _HALF) & (xy[:, 1] >= _HALF) & (xy[:, 1] <= h - _HALF)
        xy = xy[ok]
        xy = xy[accept(xy)] if len(xy) else xy
        out.append(xy[:n - got])
        got += len(out[-1])
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _make_slide(spec: _SlideSpec, layout: DemoLayout, seed: int, quality: int) -> dict:
    """Generate, write and sample coordinates for one slide; returns coords and timing."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, spec.index])
    h, w = layout.size
    lesions = _place_lesions(rng, (h, w), spec.n_lesions, spec.itc) if spec.tumor else []
    ann = Annotation(positive=[p for *_, p in lesions],
                     positive_names=[f"Annotation {i}" for i in range(len(lesions))])
    if spec.exclusion and lesions:
        cx, cy, _, poly = lesions[0]
        inner = np.hypot(poly[:, 0] - cx, poly[:, 1] - cy).min()  # the lesion contains this disc
        ann.negative.append(_radial_polygon(rng, cx, cy, rng.uniform(0.22, 0.3) * inner, 0.08, 48))
        ann.negative_names.append(f"Annotation {len(lesions)}")
    soft_lo = _tissue_field(rng, (h, w), lesions)
    f = _RENDER
    h2, w2 = -(-h // f), -(-w // f)
    soft = _upsample(soft_lo, _LOWRES // 4, (-(-h // 4), -(-w // 4)))  # tissue field at ds 4
    tumor = rasterize(ann, (h2, w2), f) if lesions else np.zeros((h2, w2), bool)
    img = _render(rng, (h, w), soft, tumor)
    t1 = time.perf_counter()

    image_path = layout.slide_path(spec.name)
    write_pyramidal_tiff(image_path, img, mpp=MPP, quality=quality, maxworkers=2)
    del img
    if lesions:
        xml_dir = layout.test_annotations if spec.split == "test" else layout.train_annotations
        write_asap_xml(ann, xml_dir / f"{spec.name}.xml")
    if spec.split == "test" and lesions:
        gt = rasterize(ann, (h, w), 1.0).view(np.uint8) * np.uint8(255)
        write_pyramidal_tiff(layout.test_masks / f"{spec.name}.tif", gt, mpp=MPP, compression="deflate",
                             resample="majority", maxworkers=2)
        del gt
    t2 = time.perf_counter()

    lesions_only = Annotation(positive=ann.positive)
    tumor_xy = _sample_points(rng, tumor, f, spec.n_tumor_coords, (h, w),
                              lambda xy: points_in_annotation(ann, xy))
    normal_xy = _sample_points(rng, soft > 0.5, 4, spec.n_normal_coords, (h, w),
                               lambda xy: ~points_in_annotation(lesions_only, xy))
    return {"name": spec.name, "tumor_xy": tumor_xy, "normal_xy": normal_xy,
            "render_s": t1 - t0, "write_s": t2 - t1, "total_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------
# make_demo
# ----------------------------------------------------------------------------

def make_demo(root: str | os.PathLike | None = None, seed: int = 0, n_train_tumor: int = 4,
              n_train_normal: int = 2, n_val_tumor: int = 2, n_val_normal: int = 1,
              n_test_tumor: int = 3, n_test_normal: int = 1, size: tuple[int, int] = (6144, 8192),
              n_coords_train: int = 160, n_coords_val: int = 40, quality: int = 85,
              workers: int | None = None, force: bool = False) -> DemoLayout:
    """Generate (once) the synthetic Camelyon16-like demo set under ``root``; return its layout.

    ``root`` defaults to :func:`demo_cache_root`.  ``size`` is the level-0
    (height, width) of every slide.  ``n_coords_train``/``n_coords_val`` are
    the numbers of tumour and of normal NCRF centres per split (each); normal
    centres come half from normal slides and half (hard negatives) from tumour
    slides.  ``workers`` slides are generated concurrently (threads; default
    min(2, CPUs)).

    Lesions are placed at random, at least 700 px apart and 400 px from the
    slide border; on slides much smaller than the default fewer lesions than
    requested may fit (a lesion is never shrunk below 1,500 px across, unless
    the slide itself is too small for that).

    A build-once cache (:mod:`common.cache`): when ``root`` holds the set of
    the same parameters the call returns at once (``layout.generated``
    False); otherwise the set is generated beside it and swapped in.
    Concurrent callers serialise on a file lock.  ``force`` regenerates.
    """
    root = Path(root) if root is not None else demo_cache_root()
    size = (int(size[0]), int(size[1]))
    if min(size) < REGION + 2 * 64:
        raise ValueError(f"size {size} too small (each side must be >= {REGION + 128})")
    params = dict(seed=int(seed), n_train_tumor=n_train_tumor, n_train_normal=n_train_normal,
                  n_val_tumor=n_val_tumor, n_val_normal=n_val_normal, n_test_tumor=n_test_tumor,
                  n_test_normal=n_test_normal, size=list(size), n_coords_train=n_coords_train,
                  n_coords_val=n_coords_val, quality=quality)
    specs = _plan(params)
    workers = workers or min(2, os.cpu_count() or 1)
    cache = build_once(root, lambda folder: _write_set(_layout(folder, params, specs), specs, params, workers),
                       params, generator="camelyon.demo", version=DEMO_VERSION, force=force)
    timings = cache.manifest.get("info", {}).get("slides", {}) if cache.built else {}
    return _layout(root, params, specs, generated=cache.built, seconds=cache.seconds, timings=timings)


def _write_set(layout: DemoLayout, specs: list[_SlideSpec], params: dict, workers: int) -> dict:
    """Every slide (``workers`` at a time), then the NCRF coordinate lists; returns per-slide seconds."""
    for d in (layout.train_images, layout.train_annotations, layout.coords, layout.test_images,
              layout.test_masks, layout.test_annotations):
        d.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda s: _make_slide(s, layout, params["seed"], params["quality"]), specs))
    by_name = {r["name"]: r for r in results}
    for s in specs:
        r = by_name[s.name]
        if len(r["tumor_xy"]) < s.n_tumor_coords or len(r["normal_xy"]) < s.n_normal_coords:
            warnings.warn(f"{s.name}: only {len(r['tumor_xy'])}/{s.n_tumor_coords} tumour and "
                          f"{len(r['normal_xy'])}/{s.n_normal_coords} normal centres fit", stacklevel=2)
    for split, ncrf_split in NCRF_SPLITS.items():
        for kind, key in (("tumor", "tumor_xy"), ("normal", "normal_xy")):
            rows = [f"{s.name.capitalize()},{x},{y}"
                    for s in specs if s.split == split for x, y in by_name[s.name][key]]
            atomic_write_text(layout.coords / f"{kind}_{ncrf_split}.txt", "".join(r + "\n" for r in rows))
    return {"slides": {r["name"]: round(r["total_s"], 2) for r in results}}


def prepare_demo(cfg: TrainConfig) -> DemoLayout | None:
    """``train.py --demo``: the synthetic slides in ``cfg.data_root`` (built once, by rank 0 while
    the other ranks wait), then the bundle CSVs made from their NCRF coordinates and XML
    annotations by ``prepare.py``'s code path. Returns the layout on rank 0, None elsewhere."""
    return dist.run_on_main(_prepare_on_main, cfg)


def _prepare_on_main(cfg: TrainConfig) -> DemoLayout:
    from camelyon.dataset import write_bundle_csv
    from camelyon.prepare import build_patch_list

    layout = make_demo(cfg.data_root, size=tuple(cfg.demo_slide_size))
    print(f"demo data in {layout.root} ({'generated in %.0fs' % layout.seconds if layout.generated else 'cached'})")
    for split, ncrf_split in NCRF_SPLITS.items():
        target = Path(cfg.train_list if split == "train" else cfg.val_list)
        if layout.generated or not target.is_file():
            coords = [str(layout.coords / f"{kind}_{ncrf_split}.txt") for kind in ("tumor", "normal")]
            write_bundle_csv(build_patch_list(coords, str(layout.train_images), str(layout.train_annotations)), target)
    return layout


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m camelyon.demo [--out DIR] [--seed N] [--size H W] [--force]``."""
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (none: {demo_cache_root()})")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the synthetic slides")
    ap.add_argument("--size", type=int, nargs=2, default=(6144, 8192), metavar=("H", "W"),
                    help="level-0 size of each slide in pixels")
    ap.add_argument("--workers", type=int, default=None, help="slides written in parallel (none: up to 2)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the cache is complete")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else demo_cache_root()
    t0 = time.perf_counter()
    layout = make_demo(out, seed=args.seed, size=tuple(args.size), workers=args.workers, force=args.force)
    print(layout.describe())
    if layout.generated:
        print(f"generated in {layout.seconds:.1f} s; per slide (s): "
              + ", ".join(f"{k} {v}" for k, v in layout.timings.items()))
    else:
        print(f"cache hit ({time.perf_counter() - t0:.3f} s)")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
