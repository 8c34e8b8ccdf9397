"""Whole-slide images: open them, read regions (at a pyramid level or at a target µm/px), and report
the slide's resolution. Every task reads slides through this module.

- ``open_slide`` gives an OpenSlide handle or a ``SlideError`` naming the file; ``SlideHandles``
  keeps one handle per slide and data-loader worker.
- ``read_rgb`` reads a region at a pyramid level: (H, W, 3) uint8, pixels outside the slide or
  transparent come back white.
- ``slide_mpp``: µm per level-0 pixel from ``openslide.mpp-x/-y``, else from the TIFF tags
  ``tiff.XResolution/YResolution`` with ``tiff.ResolutionUnit`` centimeter or inch, else None.
- Resolution-aware reading. A model trained at ``target_mpp`` should see every slide at that
  resolution. ``resolve_scale`` turns the slide's µm/px into ``scale`` = level-0 pixels per target
  pixel (target / slide; 2.0 for a 0.125 µm/px slide and a 0.25 µm/px model, 0.487 for a
  0.499 µm/px slide and a 0.243 µm/px model). Within ``tolerance`` of the target the scale is
  exactly 1 and ``read_rgb_scaled`` is exactly the level-0 read (same pixels, no resampling).
  Otherwise it reads from the coarsest level whose pixels are still no larger than a target pixel
  (within 1 %; else level 0) and resamples with PIL's antialiased bicubic filter. Target pixel
  ``u`` covers level-0 ``[u * scale, (u + 1) * scale)``; callers keep their outputs in level-0
  coordinates by multiplying target-pixel positions by ``scale``.
"""
from __future__ import annotations

import math
import os
import statistics
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from common.errors import UserError

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
#: default relative tolerance within which a slide counts as being at the target resolution: it
#: covers both Camelyon16 scanners (0.243 and 0.226 µm/px, which the bundle trained on together at
#: level 0) and stays inside the recipe's ±10 % zoom augmentation
MPP_TOLERANCE = 0.1
LEVEL_TOLERANCE = 0.01  # a level whose pixels are up to 1 % larger than a target pixel still serves
_PLAUSIBLE_MPP = (0.01, 100.0)  # outside: not a microscope's pixel (e.g. a 72-dpi screen default)
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}


class SlideError(UserError, ValueError):
    """A slide that is missing, unreadable, or asked for pixels it does not have."""


# ============================================================================= opening and reading
def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide not found")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as err:
        raise SlideError(f"{path}: OpenSlide cannot read this file ({err})") from err


def read_rgb(slide: openslide.OpenSlide, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 RGB at ``level`` with top-left (x, y) in level-0 pixels; outside or
    transparent pixels are composited onto white."""
    rgba = np.asarray(slide.read_region((int(x), int(y)), level, (int(width), int(height))))
    alpha = rgba[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def read_rgb_regions(slide: openslide.OpenSlide, x: int, y: int, width: int, height: int,
                     regions: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(height, width, 3) uint8 of the level-0 region at (x, y) where only the ``regions`` (y0, y1,
    x0, x1 in the region's pixels) are read, each exactly as :func:`read_rgb` reads it; the rest is
    zero. For a consumer that reads nothing else: the slide's other tiles are never decoded."""
    out = np.zeros((height, width, 3), np.uint8)
    for y0, y1, x0, x1 in regions:
        out[y0:y1, x0:x1] = read_rgb(slide, x + x0, y + y0, x1 - x0, y1 - y0, 0)
    return out


def list_slides(path: str | os.PathLike) -> list[Path]:
    """A slide file, or the slide files of a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SlideError(f"{path}: no slide or folder there")
    slides = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
    if not slides:
        raise SlideError(f"{path}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return slides


class SlideHandles:
    """Lazily opened slide handles; each data-loader worker gets its own copy of this object
    (created empty in the parent), so handles are opened once per worker and reused."""

    def __init__(self) -> None:
        self._open: dict[str, openslide.OpenSlide] = {}
        self._pid = os.getpid()

    def __call__(self, path: str | os.PathLike) -> openslide.OpenSlide:
        if os.getpid() != self._pid:  # forked after opening: never share handles across processes
            self._open, self._pid = {}, os.getpid()
        key = str(path)
        if key not in self._open:
            self._open[key] = open_slide(key)
        return self._open[key]

    def __getstate__(self):
        return {"_open": {}, "_pid": -1}


# ============================================================================= resolution
def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def mpp_from_tiff_resolution(x_resolution, y_resolution, unit) -> tuple[float, float] | None:
    """(µm/px x, y) from TIFF XResolution/YResolution (pixels per unit) and ResolutionUnit
    ("centimeter" | "inch", as OpenSlide spells them, or the TIFF codes 3 | 2); None otherwise."""
    unit = {2: "inch", 3: "centimeter"}.get(unit, unit) if isinstance(unit, int) else str(unit or "").lower()
    xr, yr = _positive(x_resolution), _positive(y_resolution)
    if unit not in _UM_PER_UNIT or xr is None:
        return None
    return _UM_PER_UNIT[unit] / xr, _UM_PER_UNIT[unit] / (yr or xr)


def slide_mpp(slide: openslide.OpenSlide, source: str = "slide") -> float | None:
    """µm per level-0 pixel: ``openslide.mpp-x/-y``, else the TIFF resolution tags, else None (also
    for values no microscope produces). Anisotropic pixels give the mean of x and y, with a warning."""
    props: Mapping[str, str] = slide.properties
    mx, my = _positive(props.get("openslide.mpp-x")), _positive(props.get("openslide.mpp-y"))
    pair = (mx, my or mx) if mx else ((my, my) if my else None)
    if pair is None:
        pair = mpp_from_tiff_resolution(props.get("tiff.XResolution"), props.get("tiff.YResolution"),
                                        props.get("tiff.ResolutionUnit"))
    if pair is None:
        return None
    mx, my = pair
    if not all(_PLAUSIBLE_MPP[0] < v < _PLAUSIBLE_MPP[1] for v in pair):
        warnings.warn(f"{source}: ignoring an implausible resolution of {mx:g} x {my:g} µm/px")
        return None
    if abs(mx / my - 1) > 0.01:
        warnings.warn(f"{source}: anisotropic pixels ({mx:g} x {my:g} µm); using their mean")
    return (mx + my) / 2


def recorded_mpp(checkpoint: object) -> float | None:
    """The training µm/px a checkpoint records in its config (``config["mpp"]`` > 0), else None."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    return _positive(config.get("mpp")) if isinstance(config, Mapping) else None


def dataset_mpp(paths: Iterable[str | os.PathLike], default: float, tolerance: float = 0.01) -> tuple[float, str]:
    """The one µm/px of a set of slides, and a note for the log: all slides that declare one agree
    (within ``tolerance``) -> that value; none declares one -> ``default`` (say so); they differ ->
    the median, with a warning listing the values (slides without a resolution are left out)."""
    found: dict[str, float] = {}
    for path in sorted({str(p) for p in paths}):
        with open_slide(path) as slide:
            mpp = slide_mpp(slide, path)
        if mpp is not None:
            found[path] = mpp
    if not found:
        return default, f"no slide declares its resolution; assuming {default:g} µm/px"
    values = sorted(found.values())
    median = statistics.median(values)
    note = f"{len(found)} slide(s) at {median:g} µm/px"
    if values[-1] / values[0] - 1 > tolerance:
        distinct = sorted({round(v, 4) for v in values})
        warnings.warn(f"the slides differ in resolution ({', '.join(f'{v:g}' for v in distinct)} µm/px); "
                      f"recording the median {median:g} µm/px as the training resolution")
        note = f"{len(found)} slides from {values[0]:g} to {values[-1]:g} µm/px, median {median:g}"
    return median, note


@dataclass(frozen=True)
class SlideScale:
    """How a slide's level 0 relates to a target resolution (the model's training µm/px)."""

    slide_mpp: float  # µm per level-0 pixel as used (header, override, or the target when unknown)
    target_mpp: float
    source: str  # "header" | "override" | "assumed"
    scale: float  # level-0 pixels per target pixel; exactly 1.0 within the tolerance

    @property
    def identity(self) -> bool:
        return self.scale == 1.0

    def describe(self) -> str:
        return (f"{self.slide_mpp:g} µm/px ({self.source}), model {self.target_mpp:g} µm/px"
                + ("" if self.identity else f", {self.scale:.4g} level-0 px per network px"))


def resolve_scale(header_mpp: float | None, target_mpp: float, override: float = 0.0,
                  tolerance: float = MPP_TOLERANCE, source: str = "slide") -> SlideScale:
    """``override`` (> 0) beats the header; a slide without either is assumed to be at the target
    resolution, with a warning."""
    if target_mpp <= 0:
        raise ValueError(f"target µm/px must be positive, got {target_mpp}")
    if override > 0:
        mpp, how = float(override), "override"
    elif header_mpp:
        mpp, how = float(header_mpp), "header"
    else:
        warnings.warn(f"{source}: no resolution in the slide's header; assuming the model's {target_mpp:g} µm/px "
                      "(set the slide's µm/px with --slide-mpp)")
        mpp, how = float(target_mpp), "assumed"
    scale = 1.0 if abs(mpp / target_mpp - 1) <= tolerance else target_mpp / mpp
    return SlideScale(mpp, float(target_mpp), how, scale)


def best_level(slide: openslide.OpenSlide, scale: float, tolerance: float = LEVEL_TOLERANCE) -> int:
    """The coarsest level whose downsample is at most ``scale`` (within ``tolerance``); else 0."""
    fits = [i for i, ds in enumerate(slide.level_downsamples) if ds <= scale * (1 + tolerance)]
    return max(fits, default=0)


def read_rgb_scaled(slide: openslide.OpenSlide, x: float, y: float, width: int, height: int, scale: float,
                    level: int | None = None) -> np.ndarray:
    """(height, width, 3) uint8 RGB of the region with top-left (x, y) and size in target pixels,
    where one target pixel is ``scale`` level-0 pixels.

    ``scale == 1`` is exactly ``read_rgb(slide, x, y, width, height, 0)``. Otherwise the region is
    read from ``level`` (default ``best_level``) with a margin for the filter and resampled with
    PIL's bicubic filter (antialiased when shrinking) onto the exact sub-pixel box."""
    if scale == 1.0:
        return read_rgb(slide, x, y, width, height, 0)
    level = best_level(slide, scale) if level is None else level
    ds = slide.level_downsamples[level]
    f = scale / ds  # level pixels per target pixel
    lx, ly, lw, lh = x * f, y * f, width * f, height * f  # the region in level pixels
    margin = 2.0 * max(f, 1.0) + 1.0  # bicubic support: 2 pixels of the coarser grid, plus one
    x0, y0 = math.floor(lx - margin), math.floor(ly - margin)
    x1, y1 = math.ceil(lx + lw + margin), math.ceil(ly + lh + margin)
    src = read_rgb(slide, round(x0 * ds), round(y0 * ds), x1 - x0, y1 - y0, level)
    box = (lx - x0, ly - y0, lx - x0 + lw, ly - y0 + lh)
    return np.array(Image.fromarray(src).resize((int(width), int(height)), Image.Resampling.BICUBIC, box=box))
