"""Synthetic patches for the pretrain demos and tests, in the real on-disk layouts, built once.

Three sets, each a build-once cache (:mod:`common.cache`: keyed on its parameters, built under a
lock into a sibling folder renamed into place, on rank 0 while the other ranks wait):

- :func:`make_pcam_like`: PCam200's layout ``root/{train,val,test}/{normal,tumor}/<case>/<case>_<i>.png``;
  pink stroma with purple nuclei, "tumor" patches with more, larger, darker and more irregular
  nuclei than "normal" ones, with overlapping distributions so the task is learnable but not
  trivial (``finetune.py --demo``).
- :func:`make_organ_like`: four "organs" that differ in the nuclear features the tumour task also
  needs, in PTCGA200's layout (``demo.py``'s organ pretraining).
- :func:`make_ssl_demo`: six "organs" that differ only by MORPHOLOGY, never by colour
  (``train.py --demo``):

  ==========  ===============================================================================
  lymphnode   dense sheet of small round dark nuclei
  brain       sparse round nuclei, some with a clear halo, on a fine fibrillary background
  ovary       spindle stroma: wavy fibre streaks with elongated nuclei aligned to them
  liver       cords: parallel rows of cells with large round nuclei, thin sinusoids between rows
  colon       glands: clear lumens ringed by crowded, radially elongated nuclei
  thyroid     follicles: packed round colloid-filled spaces rimmed by flat nuclei
  ==========  ===============================================================================

  Each painter draws two stain-density maps (haematoxylin, eosin). Every image is then rendered
  with its own H&E appearance drawn independently of the class (Beer-Lambert with perturbed stain
  vectors and concentrations, hue rotation, saturation, brightness, tint, blur and noise), so
  colour carries no class signal: a randomly initialised CNN's k-NN is weak, while an encoder
  trained with colour jitter and crops can learn the morphology.

The two organ sets are written in PTCGA200's layout with its split pickle (fold 0)::

    root/PTCGA200/<organ>/<organ>_<i>.png          labels from pretrain.dataset.ORGAN2ID
    root/3fold_dict_idx_filenames.pickle           {'0': {'train'|'val'|'test': {'idx', 'imgs'}}}
"""
from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from common import dist
from common.cache import Cache, build_once
from common.io import atomic_write
from pretrain.config import FinetuneConfig, PretrainConfig

VERSION = 1  # of every set below: bump when one changes, so its caches rebuild
SPLITS = {"train": 12, "val": 4, "test": 4}  # PCam-like cases per class; 40 patches per case
PER_CASE = 40
SIZE = 96
SPLIT_FILE = "3fold_dict_idx_filenames.pickle"
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train / val / test per class (SSL set)
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])  # Ruifrok & Johnston stain vectors (optical density)
EOSIN_OD = np.array([0.07, 0.99, 0.11])


# ============================================================================= PCam-like patches
def ellipse_mask(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, semi_u: float, semi_v: float,
                 theta: float) -> np.ndarray:
    """Pixels inside the ellipse centred at (cy, cx) with semi-axes ``semi_u`` along the direction
    ``theta`` and ``semi_v`` across it; ``yy, xx`` from ``np.mgrid``."""
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / semi_u) ** 2 + (v / semi_v) ** 2 <= 1


def synth_patch(rng: np.random.Generator, tumor: bool, size: int = SIZE) -> np.ndarray:
    """uint8 (size, size, 3) H&E-like patch."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.array([226, 160, 196], np.float32) + rng.normal(0, 8, 3)
    img = base + rng.normal(0, 10, (size, size, 1)) * np.array([1.0, 1.2, 0.8], np.float32)
    n = rng.integers(14, 34) if tumor else rng.integers(6, 22)
    for _ in range(n):
        r = rng.uniform(3.5, 7.5) if tumor else rng.uniform(2.5, 5.0)
        ax = r * rng.uniform(0.7, 1.4 if tumor else 1.1)
        cy, cx, th = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        inside = ellipse_mask(yy, xx, cy, cx, ax, r, th)
        colour = np.array([70, 40, 130] if tumor else [95, 60, 150], np.float32) + rng.normal(0, 12, 3)
        img[inside] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


# ============================================================================= organ-like patches
# (stroma RGB, nucleus radius range, count range, elongation): four "organs" that differ in the
# nuclear features the tumour task also needs, in PTCGA200's layout and with its split pickle.
ORGANS = {"liver": ((225, 150, 170), (4.0, 6.5), (10, 25), 1.1), "lung": ((235, 190, 215), (2.5, 4.0), (4, 14), 1.0),
          "skin": ((220, 165, 205), (2.0, 3.5), (20, 40), 2.2), "thyroid": ((215, 140, 190), (5.0, 8.0), (3, 10), 1.3)}


def organ_patch(rng: np.random.Generator, organ: str, size: int = SIZE) -> np.ndarray:
    """uint8 (size, size, 3) patch of ``organ`` (a key of :data:`ORGANS`)."""
    stroma, (r0, r1), (n0, n1), elong = ORGANS[organ]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.array(stroma, np.float32) + rng.normal(0, 8, 3) + rng.normal(0, 10, (size, size, 1))
    for _ in range(rng.integers(n0, n1)):
        r = rng.uniform(r0, r1)
        cy, cx, th = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        img[ellipse_mask(yy, xx, cy, cx, r * elong, r, th)] = np.array([80, 50, 140], np.float32) + rng.normal(0, 15, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


# ============================================================================= SSL organs: primitives
def _filtered_noise(rng: np.random.Generator, size: int, sigma_along: float, sigma_across: float = -1.0,
                    angle: float = 0.0) -> np.ndarray:
    """Zero-mean, unit-std periodic noise low-passed by a Gaussian; anisotropic (streaks along
    ``angle``) when ``sigma_across`` differs from ``sigma_along``. (size, size) float32."""
    sigma_across = sigma_along if sigma_across < 0 else sigma_across
    ky, kx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    k_along = kx * np.cos(angle) + ky * np.sin(angle)  # frequency along the streak direction
    k_across = -kx * np.sin(angle) + ky * np.cos(angle)
    gain = np.exp(-2 * np.pi ** 2 * ((k_along * sigma_along) ** 2 + (k_across * sigma_across) ** 2))
    noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * gain).real
    return ((noise - noise.mean()) / (noise.std() + 1e-8)).astype(np.float32)


def _splat_ellipses(size: int, cy, cx, semi_a, semi_b, angle, density) -> np.ndarray:
    """Anti-aliased filled ellipses (semi-axis ``semi_a`` along ``angle``) combined by maximum and
    cut at the patch border. All arguments are arrays of length N. Returns (size, size) float32."""
    out = np.zeros(size * size, np.float32)
    if len(cy) == 0:
        return out.reshape(size, size)
    half = int(np.ceil(np.max(semi_a))) + 2
    off = np.arange(-half, half + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")  # (W, W)
    iy = np.floor(cy).astype(int)[:, None, None] + oy  # (N, W, W) pixel rows
    ix = np.floor(cx).astype(int)[:, None, None] + ox
    dy, dx = iy + 0.5 - cy[:, None, None], ix + 0.5 - cx[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    radius = np.sqrt((u / semi_a[:, None, None]) ** 2 + (v / semi_b[:, None, None]) ** 2)
    edge = np.clip((1 - radius) * semi_b[:, None, None] + 0.5, 0, 1)  # ~1 px soft rim
    value = (edge * density[:, None, None]).astype(np.float32)
    inside = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)  # parts outside the patch are cut off
    np.maximum.at(out, (iy * size + ix)[inside], value[inside])
    return out.reshape(size, size)


def _nuclei(rng: np.random.Generator, size: int, cy, cx, semi_a, semi_b, angle, dark=(0.8, 1.15)) -> np.ndarray:
    """Haematoxylin map of nuclei with per-nucleus darkness and a mottled chromatin texture."""
    n = len(cy)
    density = rng.uniform(*dark, n)
    chromatin = 1 + 0.18 * _filtered_noise(rng, size, 0.7)
    return _splat_ellipses(size, np.asarray(cy, float), np.asarray(cx, float), np.asarray(semi_a, float),
                           np.asarray(semi_b, float), np.asarray(angle, float), density) * chromatin


def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


# ============================================================================= organ painters
# Each painter: (rng, size, scale = size / 96) -> (haematoxylin, eosin) density maps (size, size).
def paint_lymphnode(rng, size, s):
    n = int(rng.uniform(95, 150) * s * s)
    r = rng.uniform(2.2, 3.1, n) * s
    h = _nuclei(rng, size, rng.uniform(0, size, n), rng.uniform(0, size, n), r * rng.uniform(1, 1.15, n), r,
                rng.uniform(0, np.pi, n), dark=(0.95, 1.3))
    e = 0.22 + 0.05 * _filtered_noise(rng, size, 2 * s)
    return h, e


def paint_brain(rng, size, s):
    n = int(rng.uniform(10, 24) * s * s)
    cy, cx = rng.uniform(0, size, n), rng.uniform(0, size, n)
    r = rng.uniform(2.6, 3.8, n) * s
    h = _nuclei(rng, size, cy, cx, r * rng.uniform(1, 1.2, n), r, rng.uniform(0, np.pi, n))
    halo = rng.random(n) < 0.6  # perinuclear clearing (oligodendroglia-like)
    clear = _splat_ellipses(size, cy[halo], cx[halo], r[halo] + 2.5 * s, r[halo] + 2.5 * s, np.zeros(halo.sum()),
                            np.ones(halo.sum()))
    fibrils = _filtered_noise(rng, size, 0.6 * s)
    e = (0.36 + 0.09 * fibrils) * (1 - 0.85 * clear)
    return h, e


def paint_ovary(rng, size, s):
    theta = rng.uniform(0, np.pi)
    yy, xx = _grid(size)
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    fibres = _filtered_noise(rng, size, 10 * s, 0.8 * s, theta)
    wave = np.sin(across / (rng.uniform(9, 16) * s) + rng.uniform(0, 2 * np.pi))
    e = np.clip(0.38 + 0.2 * fibres + 0.05 * wave, 0.05, None)
    n = int(rng.uniform(22, 40) * s * s)
    semi_b = rng.uniform(1.1, 1.7, n) * s
    h = _nuclei(rng, size, rng.uniform(0, size, n), rng.uniform(0, size, n), semi_b * rng.uniform(3.5, 5.5, n),
                semi_b, theta + rng.normal(0, 0.15, n))
    return h, e


def paint_liver(rng, size, s):
    theta = rng.uniform(0, np.pi)
    spacing = rng.uniform(11, 14) * s  # between cords
    amplitude, period, shift = rng.uniform(1.5, 3.5) * s, rng.uniform(14, 24) * s, rng.uniform(0, 2 * np.pi)

    def bend(along):
        return amplitude * np.sin(along / period + shift)

    yy, xx = _grid(size)
    along, across = xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)
    phase = (across + bend(along)) / spacing  # cords at integer phase
    sinusoid = np.abs(phase - np.round(phase)) > 0.5 - 1.1 * s / spacing  # thin gap midway between cords
    e = np.where(sinusoid, 0.04, 0.5 + 0.08 * _filtered_noise(rng, size, 1.0 * s))
    extent = size * 1.5  # cover the rotated patch
    a, c = np.meshgrid(np.arange(-extent, extent, rng.uniform(9, 12) * s), np.arange(-extent, extent, spacing))
    a = (a + rng.normal(0, 1.2 * s, a.shape)).ravel()  # one cell every ~10 px along each cord
    c = (c + rng.normal(0, 0.6 * s, c.shape)).ravel() - bend(a)
    cx, cy = a * np.cos(theta) - c * np.sin(theta), a * np.sin(theta) + c * np.cos(theta)
    keep = (cx > -4) & (cx < size + 4) & (cy > -4) & (cy < size + 4) & (rng.random(len(cx)) < 0.85)
    r = rng.uniform(2.9, 3.8, keep.sum()) * s
    h = _nuclei(rng, size, cy[keep], cx[keep], r * rng.uniform(1, 1.1, len(r)), r, rng.uniform(0, np.pi, len(r)),
                dark=(0.6, 0.9))
    return h, e


def _place_blobs(rng, size, count, radius_range, min_gap, margin=0.0):
    """Centres and radii of up to ``count`` discs at least ``min_gap`` apart (rejection sampling);
    a centre may lie up to ``margin * radius`` outside the patch (negative: inside)."""
    centres, radii = [], []
    for _ in range(count * 20):
        if len(centres) == count:
            break
        r = rng.uniform(*radius_range)
        cy, cx = rng.uniform(-margin * r, size + margin * r, 2)
        if all(np.hypot(cy - y, cx - x) > r + q + min_gap for (y, x), q in zip(centres, radii)):
            centres.append((cy, cx))
            radii.append(r)
    return np.array(centres).reshape(-1, 2), np.array(radii)


def _ring_nuclei(rng, centres, radii, ring_offset, spacing, semi_a, semi_b, radial: bool, s):
    """Nucleus centres and angles spaced ``spacing`` apart on circles of radius ``r + ring_offset``."""
    cy, cx, ang = [], [], []
    for (y0, x0), r in zip(centres, radii):
        rho = r + ring_offset
        count = max(int(2 * np.pi * rho / spacing), 3)
        phi = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
        phi += rng.normal(0, 0.25 / count * 2 * np.pi, count)
        rr = rho + rng.normal(0, 0.5 * s, count)
        cy.append(y0 + rr * np.sin(phi))
        cx.append(x0 + rr * np.cos(phi))
        ang.append(phi if radial else phi + np.pi / 2)
    cy, cx, ang = (np.concatenate(v) if v else np.zeros(0) for v in (cy, cx, ang))
    n = len(cy)
    return cy, cx, semi_a * rng.uniform(0.85, 1.15, n), semi_b * rng.uniform(0.85, 1.15, n), ang


def _discs(size, centres, radii):
    """Union of discs as a float (size, size) mask."""
    n = len(radii)
    return _splat_ellipses(size, centres[:, 0], centres[:, 1], radii, radii, np.zeros(n), np.ones(n))


def paint_colon(rng, size, s):
    centres, lumen = _place_blobs(rng, size, int(rng.integers(2, 4)), (7 * s, 13 * s), 17 * s, margin=-0.6)
    band = rng.uniform(6, 8) * s
    epithelium, lumen_mask = _discs(size, centres, lumen + band), _discs(size, centres, lumen)
    stroma = 0.3 + 0.07 * _filtered_noise(rng, size, 1.5 * s)
    e = np.where(lumen_mask > 0.5, 0.03, np.where(epithelium > 0.5, 0.45, stroma))
    ring = _ring_nuclei(rng, centres, lumen, 0.62 * band, 3.6 * s, 3.6 * s, 1.5 * s, True, s)
    n = int(rng.uniform(4, 12) * s * s)
    r = rng.uniform(1.8, 2.6, n) * s
    scattered = rng.uniform(0, size, n), rng.uniform(0, size, n)
    outside = _discs(size, centres, lumen + band + 2 * s)[scattered[0].astype(int) % size,
                                                            scattered[1].astype(int) % size] < 0.5
    cy = np.concatenate([ring[0], scattered[0][outside]])
    cx = np.concatenate([ring[1], scattered[1][outside]])
    h = _nuclei(rng, size, cy, cx, np.concatenate([ring[2], r[outside] * 1.3]),
                np.concatenate([ring[3], r[outside]]), np.concatenate([ring[4], rng.uniform(0, np.pi, outside.sum())]),
                dark=(0.9, 1.25))
    return h, e


def paint_thyroid(rng, size, s):
    centres, radii = _place_blobs(rng, size, 12, (8 * s, 14 * s), 2.5 * s, margin=0.5)
    colloid = _discs(size, centres, radii)
    retraction = _discs(size, centres, radii - 1.2 * s) < 0.5  # thin clear gap inside the rim
    inside = np.where(retraction & (rng.random() < 0.5), 0.05, 0.62 + 0.03 * _filtered_noise(rng, size, 3 * s))
    e = np.where(colloid > 0.5, inside, 0.3 + 0.06 * _filtered_noise(rng, size, 1.5 * s))
    ring = _ring_nuclei(rng, centres, radii, 1.3 * s, 7.5 * s, 2.6 * s, 1.2 * s, False, s)
    h = _nuclei(rng, size, *ring, dark=(0.85, 1.2))
    return h, e


PAINTERS: dict[str, Callable] = {"lymphnode": paint_lymphnode, "brain": paint_brain, "ovary": paint_ovary,
                                 "liver": paint_liver, "colon": paint_colon, "thyroid": paint_thyroid}


# ============================================================================= class-independent appearance
def _stain_vector(rng, base: np.ndarray, spread: float) -> np.ndarray:
    v = np.abs(base + rng.normal(0, spread, 3))
    return v / np.linalg.norm(v)


def _rotate_hue(rgb: np.ndarray, turns: float) -> np.ndarray:
    """Rotate hue about the grey axis (YIQ rotation), (H, W, 3) float in [0, 255]."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = np.cos(2 * np.pi * turns), np.sin(2 * np.pi * turns)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return rgb @ (np.linalg.inv(to_yiq) @ rot @ to_yiq).T


# Ranges of the per-image appearance, drawn uniformly and independently of the class.
APPEARANCE = {
    "stain_vector_spread": 0.12,  # std of the perturbation of each stain's OD vector (before renormalising)
    "haematoxylin_amount": (0.9, 1.5),
    "eosin_amount": (0.7, 1.5),
    "tint_od": (0.02, 0.1),  # slide-wide optical density added per channel
    "blur_sigma": (0.45, 0.95),
    "hue_turns": (-0.05, 0.05),  # hue rotation about the grey axis, in turns
    "saturation": (0.7, 1.3),
    "brightness": (0.86, 1.06),
    "noise_std": (3.0, 5.0),
}


def render(rng: np.random.Generator, haematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Stain-density maps -> uint8 (H, W, 3) with a random, class-independent H&E appearance
    (Beer-Lambert: intensity = 255 exp(-OD), OD = H h_vec + E e_vec + tint)."""
    a = APPEARANCE
    h_vec, e_vec = _stain_vector(rng, HAEMATOXYLIN_OD, a["stain_vector_spread"]), \
        _stain_vector(rng, EOSIN_OD, a["stain_vector_spread"])
    h_amount, e_amount = rng.uniform(*a["haematoxylin_amount"]), rng.uniform(*a["eosin_amount"])
    optical_density = (haematoxylin[..., None] * h_amount * h_vec + np.clip(eosin, 0, None)[..., None] * e_amount * e_vec
                       + rng.uniform(*a["tint_od"], 3))  # (H, W, 3)
    sigma = rng.uniform(*a["blur_sigma"])
    optical_density = ndimage.gaussian_filter(optical_density, (sigma, sigma, 0), mode="nearest")
    rgb = _rotate_hue(255 * np.exp(-optical_density), rng.uniform(*a["hue_turns"]))
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    rgb = grey[..., None] + rng.uniform(*a["saturation"]) * (rgb - grey[..., None])
    rgb = rgb * rng.uniform(*a["brightness"]) + rng.normal(0, rng.uniform(*a["noise_std"]), rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def ssl_patch(rng: np.random.Generator, organ: str, size: int = 96) -> np.ndarray:
    """One uint8 (size, size, 3) patch of ``organ`` (a key of :data:`PAINTERS`)."""
    if organ not in PAINTERS:
        raise ValueError(f"unknown synthetic organ {organ!r} (known: {sorted(PAINTERS)})")
    haematoxylin, eosin = PAINTERS[organ](rng, size, size / 96)
    return render(rng, haematoxylin, eosin)


# ============================================================================= the sets, built once
def make_pcam_like(root: str | Path, seed: int = 0, splits: dict | None = None) -> Cache:
    """The PCam-like set in ``root`` (``splits``: cases per class and split), built once."""
    params = {"splits": list((splits or SPLITS).items()), "per_case": PER_CASE, "size": SIZE, "seed": seed}
    return build_once(root, lambda folder: _write_pcam_like(folder, **params), params,
                      generator="pretrain.synthetic.pcam_like", version=VERSION)


def make_organ_like(root: str | Path, per_organ: int = 200, seed: int = 1) -> Cache:
    """The organ-like set in ``root`` (``PTCGA200/`` and the split pickle; fold 0: 70 % train,
    15 % val, 15 % test by basename), built once."""
    params = {"organs": list(ORGANS), "per_organ": per_organ, "size": SIZE, "seed": seed}
    return build_once(root, lambda folder: _write_organ_like(folder, per_organ, seed), params,
                      generator="pretrain.synthetic.organ_like", version=VERSION)


def make_ssl_demo(root: str | Path, per_class: int = 250, size: int = 96, seed: int = 0) -> Cache:
    """The SSL set in ``root`` (``PTCGA200/`` and the split pickle), built once."""
    if per_class < 3 or size < 32:
        raise ValueError(f"make_ssl_demo: per_class must be >= 3 and size >= 32; got {per_class}, {size}")
    params = {"organs": list(PAINTERS), "per_class": per_class, "size": size, "seed": seed}
    return build_once(root, lambda folder: _write_ssl_set(folder, per_class, size, seed), params,
                      generator="pretrain.synthetic.ssl", version=VERSION)


def prepare_pretrain_demo(cfg: PretrainConfig) -> None:
    """``train.py --demo``: the SSL set (``cfg.demo_per_class`` images per organ) in the parent of
    ``cfg.data_root`` (its PTCGA200 folder), built once by rank 0 while the other ranks wait."""
    make = partial(make_ssl_demo, per_class=cfg.demo_per_class)
    dist.run_on_main(_build_and_report, make, Path(cfg.data_root).parent)


def prepare_finetune_demo(cfg: FinetuneConfig) -> None:
    """``finetune.py --demo``: the organ-like set in the parent of ``cfg.data_root`` (its PTCGA200
    folder) for ``--dataset ptcga200``, else the PCam-like set in ``cfg.data_root``; built once by
    rank 0 while the other ranks wait."""
    if cfg.dataset == "ptcga200":
        dist.run_on_main(_build_and_report, make_organ_like, Path(cfg.data_root).parent)
    else:
        dist.run_on_main(_build_and_report, make_pcam_like, cfg.data_root)


def _build_and_report(make: Callable[[Path], Cache], root: Path) -> None:
    cache = make(root)
    print(f"demo data in {cache.root} ({cache.status})", flush=True)


def _write_pcam_like(root: Path, splits: list[tuple[str, int]], per_case: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, cases in splits:
        for label, name in enumerate(("normal", "tumor")):
            for c in range(cases):
                case = root / split / name / f"{split}_{name}_{c:03d}"
                case.mkdir(parents=True, exist_ok=True)
                for i in range(per_case):
                    Image.fromarray(synth_patch(rng, bool(label), size)).save(case / f"{case.name}_{i:03d}.png")


def _write_organ_like(root: Path, per_organ: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    split: dict = {s: {"idx": [], "imgs": []} for s in ("train", "val", "test")}
    for organ in ORGANS:
        (root / "PTCGA200" / organ).mkdir(parents=True)
        for i in range(per_organ):
            name = f"{organ}_{i:04d}.png"
            Image.fromarray(organ_patch(rng, organ)).save(root / "PTCGA200" / organ / name)
            part = "train" if i < 0.7 * per_organ else "val" if i < 0.85 * per_organ else "test"
            split[part]["imgs"].append(name)
    (root / SPLIT_FILE).write_bytes(pickle.dumps({"0": split}))


def _split_of(i: int, per_class: int) -> str:
    train, val = SPLIT_FRACTIONS[0] * per_class, (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * per_class
    return "train" if i < train else "val" if i < val else "test"


def _save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, compress_level=1)


def _write_ssl_set(root: Path, per_class: int, size: int, seed: int) -> None:
    split: dict = {name: {"idx": [], "imgs": []} for name in ("train", "val", "test")}
    index = 0
    for label, organ in enumerate(PAINTERS):
        folder = root / "PTCGA200" / organ
        folder.mkdir(parents=True)
        rng = np.random.default_rng([seed, label])  # each organ its own stream
        for i in range(per_class):
            name = f"{organ}_{i}.png"
            _save_png(folder / name, ssl_patch(rng, organ, size))
            part = split[_split_of(i, per_class)]
            part["idx"].append(index)
            part["imgs"].append(name)
            index += 1
    atomic_write(root / SPLIT_FILE, lambda fh: pickle.dump({"0": split}, fh))
