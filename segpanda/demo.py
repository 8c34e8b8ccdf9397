"""Synthetic segPANDA200-like tiles in the real on-disk layout, for the demo and tests.

Each tile is a Voronoi partition into regions of the six classes; every class has its own colour
and texture (background: pale and flat; stroma: pink fibres; benign: purple glands with lumens;
Gleason 3/4/5: increasingly small, dense, dark nuclei), with noise and JPEG compression. Masks are
RGB PNGs with the label in channel 0, as in the released data::

    <root>/{train,val,test}/<ISUP>/<slide>/<slide>_level0_x<X>_y<Y>.jpg + ..._mask.png

Generated once per parameter set (:mod:`common.cache`: keyed, locked, atomic).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common import dist
from common.cache import build_once
from common.io import atomic_write
from segpanda.config import TrainConfig

VERSION = 1
DEFAULT_COUNTS = {"train": 192, "val": 8, "test": 16}  # tiles per split
# base RGB per class and (texture period px, texture strength, nuclear density)
_BASE = np.array([[236, 232, 236], [232, 150, 190], [200, 150, 215], [170, 90, 170], [140, 60, 150], [100, 35, 120]],
                 np.float32)
_TEXTURE = [(0, 0.0, 0.0), (6, 25.0, 0.01), (14, 30.0, 0.03), (9, 35.0, 0.08), (6, 40.0, 0.14), (4, 45.0, 0.22)]


def synthetic_tile(rng: np.random.Generator, size: int, classes: list[int], cells: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 labels drawn from ``classes``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    seeds = rng.uniform(0, size, (cells, 2)).astype(np.float32)
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    region = dist.argmin(0)
    labels = np.asarray(rng.choice(classes, cells), np.uint8)[region]
    image = _BASE[labels].copy()
    for c in np.unique(labels):
        period, strength, density = _TEXTURE[c]
        where = labels == c
        if period:
            angle = rng.uniform(0, np.pi)
            wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period + rng.uniform(0, 6.3))
            image[where] += strength * wave[where, None] * np.array([0.6, 1.0, 0.5], np.float32)
        if density:
            dots = rng.random((size, size)) < density
            image[where & dots] *= 0.45
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), labels


@dataclass
class DemoLayout:
    root: Path
    generated: bool
    seconds: float


def _write(path: Path, array: np.ndarray, fmt: str) -> None:
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})))


def make_demo(root: str | Path, counts: dict[str, int] | None = None, size: int = 256, seed: int = 0) -> DemoLayout:
    """The tiles in ``root``, generated once per parameter set (a build-once cache, :mod:`common.cache`)."""
    params = {"counts": list((counts or DEFAULT_COUNTS).items()), "size": size, "seed": seed}  # pairs: order matters
    cache = build_once(root, lambda folder: _write_set(folder, **params), params, generator="segpanda.demo",
                       version=VERSION)
    return DemoLayout(Path(root), cache.built, cache.seconds)


def prepare_demo(cfg: TrainConfig) -> None:
    """``train.py --demo``: the tiles in ``cfg.data_root``, built once by rank 0 while the other ranks wait."""
    dist.run_on_main(_prepare_on_main, cfg)


def _prepare_on_main(cfg: TrainConfig) -> None:
    layout = make_demo(cfg.data_root)
    print(f"demo data in {layout.root} ({'generated in %.0fs' % layout.seconds if layout.generated else 'cached'})")


def _write_set(root: Path, counts: list[tuple[str, int]], size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, n in counts:
        for i in range(n):
            grade = int(rng.integers(0, 6))
            # ISUP 0 slides hold no cancer; higher grades add Gleason patterns
            classes = [0, 1, 2] + ([] if grade == 0 else [3, 4, 5][: 1 + min(grade, 5) // 2])
            slide = f"{split}{i // 4:03d}"
            name = f"{slide}_level0_x{1024 * (i % 4)}_y{512 * grade}"
            image, labels = synthetic_tile(rng, size, classes)
            folder = root / split / str(grade) / slide
            folder.mkdir(parents=True, exist_ok=True)
            _write(folder / f"{name}.jpg", image, "JPEG")
            _write(folder / f"{name}_mask.png", np.repeat(labels[..., None], 3, 2), "PNG")
