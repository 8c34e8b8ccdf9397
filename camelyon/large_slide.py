"""A benchmark slide at Camelyon scale, written without ever holding the image.

    python camelyon/large_slide.py [--root DIR] [--force]     # build (once) and print the two slides

``make_benchmark_slides`` writes, once, into ``$PATHMONO_CACHE/camelyon_large`` (or
``~/.cache/pathmono/camelyon_large``; :func:`common.cache.build_once`, keyed on the parameters):

- ``large.tif``: 204,800 x 98,304 px (height x width) at level 0, 0.243 µm/px, JPEG tiles of
  256 px, levels halved down to 800 x 384 px (nine levels, as a Camelyon16 slide has ten);
- ``small.tif``: 8,192 x 8,192 px with the same three tissue islands (same shapes, same area),
  packed closer together;

a benchmark fixture for ``camelyon/bench.py --large``, not a test fixture.

The slide is an analytic description (:class:`SlideSpec`): a near-white background and a few
irregular elliptical islands of H&E-like tissue (pink stroma, fibres, purple nuclei), each pixel a
function of its level-0 coordinates. :func:`render` evaluates it on any block of any level, at the
pixel centres (the edge of an island antialiased over one pixel of that level), and
:func:`write_slide` streams the pyramid level by level, tile by tile, through
:func:`common.pyramidal_tiff.write_streamed_pyramid`: tiles that miss every island are one JPEG
stream encoded once and written again and again, tiles near tissue are rendered and encoded one
at a time. Memory stays at a few tiles whatever the slide size: the 20-gigapixel slide (409,607
tiles, 771 of them rendered, 268 MB) is written in ~17 s with a peak RSS of 66 MB.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.config import ArgumentParser, default_cache_dir
from common.errors import exit_on_user_error
from common.memory import peak_rss_mb
from common.pyramidal_tiff import DEFAULT_MPP, encode_jpeg_tile, halving_shapes, write_streamed_pyramid

#: Bumped whenever the rendered content changes, so cached slides regenerate.
VERSION = 1

BACKGROUND = (241, 240, 242)  # near-white glass
STROMA = (236, 172, 206)  # eosin pink
NUCLEUS = (118, 66, 152)  # haematoxylin purple
_CHANNEL_WEIGHT = (0.7, 1.0, 0.75)  # how much each channel follows the stroma texture
_NUCLEUS_PITCH = 32  # level-0 px: one candidate nucleus per 32 x 32 cell
_NUCLEUS_DENSITY = 0.45  # fraction of cells that hold a nucleus


@dataclass(frozen=True)
class Island:
    """An irregular ellipse of tissue in level-0 pixels: centre (cy, cx), semi-axes a (along
    ``angle``, radians from the x axis) and b, and a boundary radius scaled by
    1 + sum(amplitude * cos(k * theta + phase)) over ``harmonics`` (k, amplitude, phase)."""

    cy: float
    cx: float
    a: float
    b: float
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def moved(self, cy: float, cx: float) -> "Island":
        return Island(cy, cx, self.a, self.b, self.angle, self.harmonics)

    @property
    def reach(self) -> float:
        """No tissue lies farther than this from the centre."""
        return max(self.a, self.b) * (1 + sum(abs(amp) for _, amp, _ in self.harmonics))

    def near(self, y: np.ndarray, x: np.ndarray, margin: float) -> bool:
        """Whether the box spanned by the points comes within reach + margin of the centre."""
        r = self.reach + margin
        return bool(y.min() <= self.cy + r and y.max() >= self.cy - r and x.min() <= self.cx + r and x.max() >= self.cx - r)

    def signed_distance(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Approximately the distance (level-0 px) inside the boundary: > 0 inside, < 0 outside."""
        dy, dx = y - self.cy, x - self.cx
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (dx * c + dy * s) / self.a, (dy * c - dx * s) / self.b
        rho = np.hypot(u, v)
        boundary = np.ones_like(rho)
        if self.harmonics:
            theta = np.arctan2(v, u)
            for k, amp, phase in self.harmonics:
                boundary += amp * np.cos(k * theta + phase)
        return (boundary - rho) * math.sqrt(self.a * self.b)


@dataclass(frozen=True)
class SlideSpec:
    """A slide as a function of position: level-0 size, islands, tiling, texture strength
    (0: flat stroma colour, what the tests use to check pixels by hand)."""

    height: int
    width: int
    islands: tuple[Island, ...]
    tile: int = 256
    quality: int = 85
    mpp: float = DEFAULT_MPP
    below: int = 1000  # levels are halved until both sides are below this...
    min_levels: int = 7  # ...and down to level 6 at least (64x, where tissue masks are computed)
    texture: float = 1.0
    holes: tuple[Island, ...] = ()  # glass cut out of the islands

    def shapes(self) -> list[tuple[int, int]]:
        return halving_shapes(self.height, self.width, self.below, self.min_levels)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "SlideSpec":
        d = json.loads(text)
        def islands(key: str) -> tuple[Island, ...]:
            return tuple(Island(**{**i, "harmonics": tuple(tuple(h) for h in i["harmonics"])}) for i in d.pop(key, ()))

        return SlideSpec(islands=islands("islands"), holes=islands("holes"), **d)


# ============================================================================= the benchmark's tissue
#: Three islands of about 5.0, 4.1 and 3.4 million px^2 (~3,000 grid cells of 64 x 64 px in all),
#: centred on the origin; ``large_spec`` and ``small_spec`` place them.
ISLAND_SHAPES = (
    Island(0, 0, 1500, 1050, 0.4, ((3, 0.10, 0.3), (5, 0.05, 1.9), (9, 0.025, 4.0))),
    Island(0, 0, 1300, 1000, -0.9, ((2, 0.08, 2.2), (4, 0.06, 0.7), (7, 0.03, 5.1))),
    Island(0, 0, 1200, 900, 1.6, ((3, 0.09, 4.4), (6, 0.05, 2.6), (11, 0.02, 0.5))),
)
LARGE_SIZE = (204_800, 98_304)  # (height, width) level 0: 800 x 384 tiles of 256 px
SMALL_SIZE = (8192, 8192)
LARGE_CENTRES = ((30_000, 22_000), (104_000, 70_000), (172_000, 38_000))  # (y, x)
SMALL_CENTRES = ((2000, 2300), (2600, 5900), (6000, 3600))


#: 8,192^2 px slides of different tissue shapes for ``camelyon/bench.py --shapes`` (tiles that
#: hug the tissue are measured on these, not on a block that is all tissue).
def shape_specs() -> dict[str, SlideSpec]:
    strips = tuple(Island(cy, cx, 3000, 170, angle, ((3, 0.04, 1.0),))
                   for cy, cx, angle in ((2200, 4100, 0.25), (4300, 3000, 1.05), (5400, 5600, 2.2), (6900, 3900, 2.9)))
    return {
        "islands": small_spec(),
        "ellipse": SlideSpec(*SMALL_SIZE, (Island(4096, 4096, 3300, 2300, 0.35, ((3, 0.06, 0.4), (7, 0.02, 2.0))),)),
        "strips": SlideSpec(*SMALL_SIZE, strips),
        "ring": SlideSpec(*SMALL_SIZE, (Island(4096, 4096, 3300, 2800, 0.2, ((4, 0.04, 1.1),)),),
                          holes=(Island(4150, 4000, 2100, 1600, -0.3, ((3, 0.05, 2.5),)),)),
    }


def make_shape_slides(root: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """The :func:`shape_specs` slides as ``<name>.tif`` under ``root`` (default: the cache), written once."""
    from common.cache import build_once

    root = Path(root) if root is not None else default_cache_dir("camelyon_shapes")
    specs = shape_specs()

    def build(folder: Path) -> dict:
        return {name: write_slide(spec, folder / f"{name}.tif") for name, spec in specs.items()}

    build_once(root, build, {k: asdict(v) for k, v in specs.items()}, generator="camelyon.large_slide.shapes",
               version=VERSION, force=force)
    return {name: root / f"{name}.tif" for name in specs}


def large_spec() -> SlideSpec:
    return SlideSpec(*LARGE_SIZE, tuple(s.moved(*c) for s, c in zip(ISLAND_SHAPES, LARGE_CENTRES)))


def small_spec() -> SlideSpec:
    return SlideSpec(*SMALL_SIZE, tuple(s.moved(*c) for s, c in zip(ISLAND_SHAPES, SMALL_CENTRES)))


# ============================================================================= rendering
def _hash2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 per (a, b) integer pair (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _nuclei(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """1 inside a nucleus, else 0: at most one disc of radius 4-6 px per 32 x 32 cell, placed and
    kept by a hash of the cell."""
    p = _NUCLEUS_PITCH
    cy, cx = np.floor(y / p), np.floor(x / p)
    h = _hash2(cy.astype(np.int64), cx.astype(np.int64))
    byte = lambda shift: ((h >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.float32) / 255.0  # noqa: E731
    present = byte(0) < _NUCLEUS_DENSITY
    oy, ox = cy * p + 8 + 16 * byte(8), cx * p + 8 + 16 * byte(16)
    radius = 4.0 + 2.0 * byte(24)
    return (present & ((y - oy) ** 2 + (x - ox) ** 2 < radius ** 2)).astype(np.float32)


def _stroma_texture(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Slow stain drift plus wavy fibres, in grey levels around 0."""
    drift = 8.0 * np.sin(x / 1300.0 + 0.7) * np.sin(y / 1700.0 + 1.3)
    fibres = 10.0 * np.sin((0.8 * x + 0.6 * y) / 9.0 + 3.0 * np.sin(y / 150.0))
    return (drift + fibres).astype(np.float32)


def tissue_opacity(spec: SlideSpec, y: np.ndarray, x: np.ndarray, pixel: float) -> np.ndarray:
    """Tissue opacity in [0, 1] at level-0 points, the island edges ramped over ``pixel`` level-0 px."""
    alpha = np.zeros(np.broadcast_shapes(y.shape, x.shape), np.float32)
    for island in spec.islands:
        if not island.near(y, x, pixel):
            continue
        np.maximum(alpha, np.clip(0.5 + island.signed_distance(y, x) / pixel, 0.0, 1.0), out=alpha)
    for hole in spec.holes:
        if hole.near(y, x, pixel):
            alpha *= np.clip(0.5 - hole.signed_distance(y, x) / pixel, 0.0, 1.0)
    return alpha


def render(spec: SlideSpec, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB of level ``level`` from its pixel (top, left): the description
    evaluated at each pixel's centre ((i + 0.5) * 2^level in level-0 px)."""
    ds = float(2 ** level)
    y = ((np.arange(top, top + height, dtype=np.float64) + 0.5) * ds)[:, None]
    x = ((np.arange(left, left + width, dtype=np.float64) + 0.5) * ds)[None, :]
    alpha = tissue_opacity(spec, y, x, ds)
    out = np.empty((height, width, 3), np.uint8)
    if not alpha.any():
        out[:] = BACKGROUND
        return out
    yy, xx = np.broadcast_arrays(y, x)
    texture = spec.texture * _stroma_texture(yy, xx)
    nucleus = spec.texture * _nuclei(yy, xx)
    for c in range(3):
        tissue = STROMA[c] + _CHANNEL_WEIGHT[c] * texture
        tissue += nucleus * (NUCLEUS[c] - tissue)
        out[..., c] = np.clip(BACKGROUND[c] + alpha * (tissue - BACKGROUND[c]) + 0.5, 0, 255)
    return out


def tiles_near_tissue(spec: SlideSpec, level: int) -> set[tuple[int, int]]:
    """(row, col) of the level's tiles that come within one pixel of an island's reach."""
    ds, t = 2 ** level, spec.tile
    near = set()
    for island in spec.islands:
        r = island.reach + ds
        rows = range(max(int((island.cy - r) // (t * ds)), 0), int((island.cy + r) // (t * ds)) + 1)
        cols = range(max(int((island.cx - r) // (t * ds)), 0), int((island.cx + r) // (t * ds)) + 1)
        near.update((i, j) for i in rows for j in cols)
    return near


def level_tiles(spec: SlideSpec, level: int, blank: bytes, counts: dict):
    """The JPEG tiles of one level, row by row; ``blank`` wherever no tissue is near."""
    h, w = spec.shapes()[level]
    t = spec.tile
    near = tiles_near_tissue(spec, level)
    for i in range(-(-h // t)):
        for j in range(-(-w // t)):
            if (i, j) in near:
                counts["rendered"] += 1
                yield encode_jpeg_tile(render(spec, level, i * t, j * t, t, t), spec.quality)
            else:
                counts["blank"] += 1
                yield blank


def write_slide(spec: SlideSpec, path: str | os.PathLike) -> dict:
    """Stream the slide's pyramid into ``path`` (atomically); returns what was written."""
    t0 = time.perf_counter()
    blank = encode_jpeg_tile(np.full((spec.tile, spec.tile, 3), BACKGROUND, np.uint8), spec.quality)
    counts = {"rendered": 0, "blank": 0}
    size = write_streamed_pyramid(path, spec.shapes(), lambda k: level_tiles(spec, k, blank, counts),
                                  tile=spec.tile, mpp=spec.mpp)
    return {"seconds": round(time.perf_counter() - t0, 2), "bytes": size, "levels": len(spec.shapes()),
            "tiles_rendered": counts["rendered"], "tiles_blank": counts["blank"]}


def _write_and_report(spec_json: str, path: str) -> None:
    """Child side of :func:`write_slide_in_fresh_process`: write, then print the facts as JSON."""
    info = write_slide(SlideSpec.from_json(spec_json), path)
    info["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(info))


def write_slide_in_fresh_process(spec: SlideSpec, path: str | os.PathLike) -> dict:
    """:func:`write_slide` in a new interpreter, so ``peak_rss_mb`` (:func:`common.memory.peak_rss_mb`)
    is the writer's own: Python, NumPy and the codecs included, nothing of the caller's."""
    code = "import sys; from camelyon.large_slide import _write_and_report; _write_and_report(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, spec.to_json(), str(path)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"writing {path} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ============================================================================= the cached pair
def large_cache_root() -> Path:
    return default_cache_dir("camelyon_large")


@dataclass(frozen=True)
class BenchmarkSlides:
    large: Path
    small: Path
    specs: dict[str, SlideSpec]  # "large", "small"
    generated: bool = False  # this call wrote them (False: cache hit)
    info: dict = field(default_factory=dict)  # per slide: seconds, bytes, peak_rss_mb, tiles


def make_benchmark_slides(root: str | os.PathLike | None = None, force: bool = False) -> BenchmarkSlides:
    """``large.tif`` and ``small.tif`` under ``root`` (default :func:`large_cache_root`), written once,
    each by a fresh process (its generation time and peak memory are recorded in the manifest)."""
    from common.cache import build_once  # imports torch (through common.io): not at the writer's import

    root = Path(root) if root is not None else large_cache_root()
    specs = {"large": large_spec(), "small": small_spec()}
    params = {name: asdict(spec) for name, spec in specs.items()}

    def build(folder: Path) -> dict:
        return {name: write_slide_in_fresh_process(spec, folder / f"{name}.tif") for name, spec in specs.items()}

    cache = build_once(root, build, params, generator="camelyon.large_slide", version=VERSION, force=force)
    return BenchmarkSlides(root / "large.tif", root / "small.tif", specs, cache.built, cache.manifest.get("info", {}))


def describe(slides: BenchmarkSlides) -> str:
    lines = []
    for name in ("large", "small"):
        spec, info = slides.specs[name], slides.info.get(name, {})
        lines.append(f"{name}: {getattr(slides, name)} ({spec.height:,} x {spec.width:,} px, {len(spec.shapes())} "
                     f"levels, {info.get('bytes', 0) / 2**20:,.0f} MB; written in {info.get('seconds', 0):.0f} s "
                     f"with a peak RSS of {info.get('peak_rss_mb', 0):.0f} MB"
                     f"{'' if slides.generated else ', cached'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=None, help=f"output folder (none: {large_cache_root()})")
    ap.add_argument("--force", action="store_true", help="regenerate even if the cache is complete")
    args = ap.parse_args(argv)
    print(describe(make_benchmark_slides(args.root, args.force)))


if __name__ == "__main__":
    with exit_on_user_error():
        main()
