"""Synthetic CoNSeP-format demo data: H&E-like tiles with textured elliptical nuclei.

Real CoNSeP cannot be downloaded here, so ``python nuclick/train.py --demo`` uses a small set in the
exact CoNSeP layout and label format, then runs the real ``prepare.py``, training and
``infer.py`` on it::

    <root>/CoNSeP/{Train,Test}/Images/{train,test}_<i>.png   RGBA PNG (opaque), like CoNSeP
    <root>/CoNSeP/{Train,Test}/Labels/{train,test}_<i>.mat   inst_map, type_map, inst_type (N, 1),
                                                             inst_centroid (N, 2; x, y)
    <root>/clicks/test_<i>.csv                               the test nuclei's centroids as x,y clicks
    <root>/.complete                                         manifest of the build-once cache (common.cache)
    <root>/prepared/                                         the demo's prepare.py output (its own cache)

Appearance: pink eosin stroma with fibre texture and a few pale lumina; nuclei of the seven CoNSeP
types drawn as hematoxylin-blue ellipses with chromatin texture and a soft 1-px rim:
inflammatory (2) small, round and dark; epithelial (3, 4) large, paler, speckled, in clusters
around lumina; spindle types (5, 6, 7) elongated along the local fibre direction; "other" (1)
medium. Nuclei may touch (overlap is limited to 15 % of a nucleus), so crops contain neighbours
that become negative clicks. Everything is deterministic from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.io import savemat

from common import dist
from common.cache import build_once, read_manifest
from nuclick.config import PrepareConfig, TrainConfig, demo_root
from nuclick.prepare import run as prepare

VERSION = 1
PREPARE_VERSION = 1


@dataclass
class DemoLayout:
    root: Path
    consep: Path  # CoNSeP-format input of prepare.py
    clicks: Path  # one <stem>.csv of x,y clicks per test tile
    generated: bool = False
    seconds: float = 0.0


def demo_layout(root: Path) -> DemoLayout:
    return DemoLayout(root, root / "CoNSeP", root / "clicks")


# ============================================================================= drawing
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eosin-stained stroma (H, W, 3) float in [0, 255] and the fibre direction field (radians)."""
    angle = np.pi * (0.5 + 0.5 * _smooth_noise(rng, (size, size), size / 6))
    fibres = _smooth_noise(rng, (size, size), (1.0, 4.0))
    texture = 0.6 * fibres + 0.4 * _smooth_noise(rng, (size, size), 2.0)
    base = np.array([232.0, 168.0, 200.0]) + rng.normal(0, 6, 3)
    rgb = base[None, None, :] * (1 + 0.05 * texture[..., None])
    # a few pale lumina (glandular spaces)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 3)):
        cy, cx, rad = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(8, 18)
        lumen = np.clip((rad - np.hypot(yy - cy, xx - cx)) / 3.0, 0, 1)[..., None]
        rgb = rgb * (1 - lumen) + np.array([246.0, 236.0, 242.0]) * lumen
    return rgb, angle


# (semi-axes a range, b range, rgb base, texture strength) per CoNSeP type
_STYLE = {
    1: ((6, 9), (5, 7), (110, 70, 150), 0.10),
    2: ((5, 6.5), (4.5, 6), (55, 35, 105), 0.05),
    3: ((8, 11), (6, 8), (135, 95, 175), 0.18),
    4: ((9, 13), (7, 10), (105, 65, 155), 0.22),
    5: ((9, 14), (3.2, 4.5), (85, 50, 130), 0.08),
    6: ((10, 15), (3, 4.5), (95, 55, 140), 0.08),
    7: ((8, 12), (3, 4), (80, 45, 125), 0.08),
}


def _ellipse(size: int, cy: float, cx: float, a: float, b: float, theta: float):
    """(slices, inside mask, soft alpha) of an ellipse within its padded bounding box."""
    r = int(np.ceil(max(a, b))) + 2
    r0, r1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size)
    c0, c1 = max(int(cx) - r, 0), min(int(cx) + r + 1, size)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the outline
    edge = (1 - rho) * min(a, b)  # approx. distance inside the outline, px
    return (slice(r0, r1), slice(c0, c1)), rho <= 1, np.clip(edge + 0.5, 0, 1)


def _centres(rng: np.random.Generator, size: int, n: int) -> list[tuple[float, float, int]]:
    """Candidate (row, col, type): epithelial clusters, spindle/inflammatory/other scattered."""
    out = []
    for _ in range(rng.integers(1, 3)):  # epithelial clusters (rings around a centre)
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        kind = 3 if rng.random() < 0.5 else 4
        rad = rng.uniform(18, 30)
        for t in np.linspace(0, 2 * np.pi, int(rng.integers(7, 11)), endpoint=False):
            out.append((cy + rad * np.sin(t) + rng.normal(0, 2), cx + rad * np.cos(t) + rng.normal(0, 2), kind))
    types = rng.choice([1, 2, 5, 6, 7, 3], size=n, p=[0.12, 0.35, 0.2, 0.1, 0.1, 0.13])
    out += [(rng.uniform(0, size), rng.uniform(0, size), int(t)) for t in types]
    return out


def synth_tile(rng: np.random.Generator, size: int = 256, density: float = 6e-4):
    """(RGBA uint8 image, inst_map int32, type_map int32, inst_type (N,), inst_centroid (N, 2) x,y)."""
    rgb, angle = _background(rng, size)
    inst = np.zeros((size, size), dtype=np.int32)
    types: list[int] = []
    for cy, cx, kind in _centres(rng, size, int(density * size * size)):
        if not (0 <= cy < size and 0 <= cx < size):
            continue
        ar, br, colour, tex = _STYLE[kind]
        a, b = rng.uniform(*ar), rng.uniform(*br)
        theta = angle[int(cy), int(cx)] + rng.normal(0, 0.2) if kind >= 5 else rng.uniform(0, np.pi)
        sl, inside, alpha = _ellipse(size, cy, cx, a, b, theta)
        if inside.sum() < 12 or (inst[sl][inside] > 0).mean() > 0.15:
            continue
        k = len(types) + 1
        inst[sl][inside] = k
        types.append(kind)
        shade = np.array(colour, float) * rng.uniform(0.85, 1.15)
        chroma = 1 + tex * _smooth_noise(rng, inside.shape, 0.8)[..., None]
        if kind in (3, 4):  # nucleoli
            for _ in range(rng.integers(1, 3)):
                py, px = rng.integers(0, inside.shape[0]), rng.integers(0, inside.shape[1])
                chroma[max(py - 1, 0):py + 1, max(px - 1, 0):px + 1] *= 0.6
        region = rgb[sl]
        region[:] = region * (1 - alpha[..., None]) + np.clip(shade * chroma, 0, 255) * alpha[..., None]
    rgb = ndi.gaussian_filter(rgb, (0.6, 0.6, 0)) + rng.normal(0, 3.0, rgb.shape)
    image = np.concatenate([np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
                            np.full((size, size, 1), 255, np.uint8)], axis=-1)
    # drop ids that lost every pixel to later nuclei (CoNSeP ids are contiguous)
    present = np.unique(inst[inst > 0])
    remap = np.zeros(len(types) + 1, dtype=np.int32)
    remap[present] = np.arange(1, len(present) + 1)
    inst = remap[inst]
    inst_type = np.array([types[k - 1] for k in present], dtype=np.int64)
    centroids = np.array([[c.mean(), r.mean()] for r, c in (np.nonzero(inst == k) for k in range(1, len(present) + 1))]
                         ).reshape(-1, 2)
    type_map = np.concatenate([[0], inst_type])[inst].astype(np.int32)
    return image, inst, type_map, inst_type, centroids


# ============================================================================= writing
def _write_tile(layout: DemoLayout, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    image, inst, type_map, inst_type, centroids = synth_tile(rng, size)
    Image.fromarray(image, mode="RGBA").save(layout.consep / split / "Images" / f"{stem}.png")
    savemat(str(layout.consep / split / "Labels" / f"{stem}.mat"),
            {"inst_map": inst.astype(np.float64), "type_map": type_map, "inst_type": inst_type[:, None].astype(np.float64),
             "inst_centroid": centroids.astype(np.float64)})
    if split == "Test":
        rows = "".join(f"{x:.1f},{y:.1f}\n" for x, y in centroids)
        (layout.clicks / f"{stem}.csv").write_text(rows)


def make_demo(root: Path, n_train: int = 12, n_test: int | None = None, size: int = 256, seed: int = 0) -> DemoLayout:
    """The demo set under ``root``, generated once per parameter set (a build-once cache, :mod:`common.cache`)."""
    params = {"n_train": n_train, "n_test": n_test or max(n_train // 3, 1), "size": size, "seed": seed}
    cache = build_once(root, lambda folder: _write_set(demo_layout(folder), **params), params,
                       generator="nuclick.demo", version=VERSION)
    return DemoLayout(Path(root), Path(root) / "CoNSeP", Path(root) / "clicks", cache.built, cache.seconds)


def _write_set(layout: DemoLayout, n_train: int, n_test: int, size: int, seed: int) -> None:
    for split in ("Train", "Test"):
        for sub in ("Images", "Labels"):
            (layout.consep / split / sub).mkdir(parents=True, exist_ok=True)
    layout.clicks.mkdir(parents=True, exist_ok=True)
    for split, prefix, count in (("Train", "train", n_train), ("Test", "test", n_test)):
        for i in range(1, count + 1):
            _write_tile(layout, split, f"{prefix}_{i}", np.random.default_rng([seed, split == "Test", i]), size)


def prepare_demo(cfg: TrainConfig) -> None:
    """``train.py --demo``: the synthetic CoNSeP tiles (once), then their per-nucleus crops in
    ``cfg.data_root`` by ``prepare.py``'s code path (once per tile set and crop size). Rank 0 builds
    both while the other ranks wait."""
    dist.run_on_main(_prepare_on_main, cfg)


def _prepare_on_main(cfg: TrainConfig) -> None:
    layout = make_demo(Path(demo_root()), n_train=cfg.demo_images, size=cfg.demo_size, seed=0)
    print(f"demo data in {layout.consep} ({'generated in %.0fs' % layout.seconds if layout.generated else 'cached'})")
    params = {"crop_size": cfg.demo_crop, "tiles": read_manifest(layout.root)["key"]}
    build_once(cfg.data_root, lambda folder: prepare(PrepareConfig(input=str(layout.consep), output=str(folder),
                                                                   crop_size=cfg.demo_crop)),
               params, generator="nuclick.prepare", version=PREPARE_VERSION)
