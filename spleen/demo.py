"""Synthetic abdominal CT in the MSD Task09 layout, for the demo and the tests.

A phantom is defined in world (RAS, mm) coordinates: air outside an elliptic body with a fat
rim, soft tissue (40 HU), liver (right, ~60 HU), stomach (~20 HU, with a gas pocket) next to
the spleen (left, posterior, ~115 HU: the label), plus Gaussian noise. The spleen is the only
structure in its intensity band (no bone, kidneys or vessels), so that a CPU demo learns the
task in minutes; real CT needs the full recipe. Each case samples it on its own voxel grid: random spacing
(about 2 x 2 x 3 mm), random organ sizes and positions, and an affine that is LPS (as most
DICOM conversions), RAS, or a permuted-axis orientation, so the orientation and inversion paths
run for real. Files are written as ``.nii.gz`` with nibabel::

    <root>/imagesTr/spleen_<i>.nii.gz  labelsTr/spleen_<i>.nii.gz  imagesTs/...  labelsTs/...  dataset.json

``labelsTs`` is not part of MSD: it lets the demo score ``infer.py`` output with ``eval.py``.
Generation happens once per parameter set (:mod:`common.cache`: keyed, locked, atomic).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common import dist
from common.cache import Cache, build_once
from common.io import atomic_write_text
from spleen.config import TrainConfig

DEMO_VERSION = 3
FOV_MM = (200.0, 200.0, 132.0)  # x, y, z extent of every case
ORIENTATIONS = ("LPS", "RAS", "PERMUTED")


@dataclass
class Organ:
    centre: np.ndarray  # mm, RAS
    radii: np.ndarray  # mm
    hu: float
    angle: float = 0.0  # rotation about z (radians)

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        d = xyz - self.centre[:, None]
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = c * d[0] + s * d[1]
        v = -s * d[0] + c * d[1]
        return (u / self.radii[0]) ** 2 + (v / self.radii[1]) ** 2 + (d[2] / self.radii[2]) ** 2 <= 1.0


def _organs(rng: np.random.Generator) -> tuple[list[Organ], Organ]:
    """Background organs and the spleen, with per-case jitter."""
    j = lambda scale: rng.uniform(-scale, scale)  # noqa: E731
    spleen = Organ(np.array([-45 + j(6), -22 + j(6), j(10)]),
                   np.array([rng.uniform(18, 28), rng.uniform(13, 20), rng.uniform(24, 38)]), 115 + j(8), j(0.5))
    others = [
        Organ(np.array([40 + j(5), 5 + j(5), 5 + j(8)]), np.array([38, 45, 50]) * rng.uniform(0.85, 1.1), 60 + j(6),
              j(0.3)),  # liver
        Organ(np.array([-20 + j(4), 10 + j(4), 10 + j(6)]), np.array([22, 16, 25]) * rng.uniform(0.8, 1.1), 20 + j(5)),
        Organ(np.array([-20 + j(3), 22 + j(3), 18 + j(4)]), np.array([9, 5, 8]), -800.0),  # stomach gas
    ]
    return others, spleen


def case_affine(spacing: np.ndarray, shape: np.ndarray, orientation: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """An affine whose voxel centres span ``FOV_MM`` around the origin, in the requested axis order."""
    lo = -np.asarray(FOV_MM) / 2
    if orientation == "RAS":
        aff = np.diag([*spacing, 1.0])
        aff[:3, 3] = lo
        return aff, tuple(shape)
    if orientation == "LPS":  # x and y run towards -R and -A: start at the far corner
        aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        aff[:3, 3] = [-lo[0], -lo[1], lo[2]]
        return aff, tuple(shape)
    # PERMUTED: array axes are (S, L, P): i -> +z, j -> -x, k -> -y
    aff = np.zeros((4, 4))
    aff[2, 0], aff[0, 1], aff[1, 2], aff[3, 3] = spacing[2], -spacing[0], -spacing[1], 1.0
    aff[:3, 3] = [-lo[0], -lo[1], lo[2]]
    return aff, (int(shape[2]), int(shape[0]), int(shape[1]))


def make_case(rng: np.random.Generator, orientation: str, noise_hu: float = 15.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 HU volume, uint8 spleen label, affine) of one synthetic case."""
    spacing = np.array([rng.uniform(1.8, 2.2), rng.uniform(1.8, 2.2), rng.uniform(2.6, 3.4)])
    ras_shape = np.floor(np.asarray(FOV_MM) / spacing).astype(int) + 1
    affine, shape = case_affine(spacing, ras_shape, orientation)
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    xyz = affine[:3, :3] @ idx + affine[:3, 3:]  # world mm of every voxel centre
    body_r = np.array([rng.uniform(88, 96), rng.uniform(70, 78)])
    radial = (xyz[0] / body_r[0]) ** 2 + (xyz[1] / body_r[1]) ** 2
    hu = np.where(radial <= 1.0, -95.0, -1000.0)
    hu = np.where(radial <= 0.8, 40.0, hu)
    others, spleen = _organs(rng)
    for organ in others:
        hu = np.where(organ.inside(xyz), organ.hu, hu)
    in_spleen = spleen.inside(xyz) & (radial <= 0.8)
    hu = np.where(in_spleen, spleen.hu, hu)
    hu = hu + rng.normal(0.0, noise_hu, hu.shape) * (radial <= 1.0)
    return (hu.reshape(shape).round().astype(np.int16), in_spleen.reshape(shape).astype(np.uint8), affine)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def make_demo(root: str | os.PathLike, num_train: int = 10, num_test: int = 2, seed: int = 0) -> Cache:
    """The dataset in ``root``, generated once per parameter set (a build-once cache, :mod:`common.cache`)."""
    params = {"num_train": num_train, "num_test": num_test, "seed": seed}
    return build_once(root, lambda folder: _write_set(folder, **params), params, generator="spleen.demo",
                      version=DEMO_VERSION)


def prepare_demo(cfg: TrainConfig) -> None:
    """``train.py --demo``: the dataset in ``cfg.data_root``, built once by rank 0 while the other ranks wait."""
    dist.run_on_main(_prepare_on_main, cfg)


def _prepare_on_main(cfg: TrainConfig) -> None:
    cache = make_demo(cfg.data_root, num_train=cfg.demo_cases)
    print(f"demo data in {cfg.data_root} ({cache.status})", flush=True)


def _write_set(root: Path, num_train: int, num_test: int, seed: int) -> None:
    """Every case (images and labels, train then test) and ``dataset.json``."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = {"training": [], "test": []}
    for i in range(num_train + num_test):
        split = "Tr" if i < num_train else "Ts"
        name = f"spleen_{i + 1}.nii.gz"
        orientation = ORIENTATIONS[i % 3] if split == "Tr" else ("LPS", "PERMUTED")[(i - num_train) % 2]
        image, label, affine = make_case(rng, orientation)
        _save(image, affine, root / f"images{split}" / name)
        _save(label, affine, root / f"labels{split}" / name)
        if split == "Tr":
            entries["training"].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            entries["test"].append(f"./imagesTs/{name}")
    dataset = {"name": "Spleen (synthetic demo)", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
               "numTraining": num_train, "numTest": num_test, **entries}
    atomic_write_text(root / "dataset.json", json.dumps(dataset, indent=2) + "\n")
