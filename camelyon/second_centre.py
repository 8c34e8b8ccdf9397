"""A second centre for the camelyon demo: its val and test slides re-stained as another lab would.

    shifted = make_second_centre(make_demo())     # built once into $PATHMONO_CACHE/camelyon_demo_shifted
    shifted.test_images, shifted.test_masks, shifted.train_images (the val slides), shifted.root / "validation.csv"

Each slide's RGB is converted to optical density and unmixed into haematoxylin, eosin and DAB
amounts with the standard Ruifrok-Johnston matrix (``common.stain``); the H and E amounts are
scaled (``StainShift.h_scale``, ``e_scale``) and re-mixed with stain vectors rotated in OD space
(``h_degrees``, ``e_degrees``, in the plane of the H and E vectors, about their cross product:
positive turns haematoxylin towards eosin and eosin away from it), DAB with its own vector. With
no rotation and scales 1 this gives back the slide's pixels (up to rounding). The slides are
written in the demo's formats (pyramidal tiled JPEG TIFF, the same µm/px); ground-truth masks,
annotations and the val NCRF lists are copied and ``validation.csv`` is made from them as
``train.py --demo`` makes the demo's, so every demo command runs on the second centre with the
same labels.

The default shift (both stain vectors turned 15° in their plane, H amounts x0.9, E x1.1) is
within the range seen between labs (stain vectors 10-20° apart, intensities x0.7-1.3): the demo's
blue-purple tumour becomes magenta, closer to its pink stroma. It is chosen to matter: the demo
model (trained with the bundle's ColorJitter) keeps its val patch accuracy under the intensity
change alone (x0.7 H: 0.94 on 24 val regions, 0.99 unshifted) and under a 10° turn (0.94), but not
under 15° (0.72) or this shift (0.63: every tumour patch missed).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camelyon.demo import MPP, DemoLayout
from common.cache import build_once, read_manifest
from common.config import default_cache_dir
from common.logging import progress
from common.pyramidal_tiff import write_pyramidal_tiff
from common.stain import RGB_FROM_HED, hed_to_od, od_to_hed, od_to_rgb, rgb_to_od
from common.wsi import open_slide, read_rgb

#: Bumped whenever the re-stained content changes, so stale caches regenerate.
VERSION = 2  # 2: the validation list made from the copied NCRF lists, not copied
#: rows of level 0 converted at a time (bounds the float memory of a 8,192-px wide slide to ~100 MB)
STRIP_ROWS = 512


@dataclass(frozen=True)
class StainShift:
    """How the second centre's stain differs from the demo's (see the module docstring)."""

    h_degrees: float = 15.0  # haematoxylin's OD vector turned towards eosin's, in their plane
    e_degrees: float = 15.0  # eosin's OD vector turned away from haematoxylin's, in their plane
    h_scale: float = 0.9  # haematoxylin amounts multiplied by this
    e_scale: float = 1.1  # eosin amounts multiplied by this

    def stain_matrix(self) -> torch.Tensor:
        """(3, 3) float64 rows: the second centre's OD colours of H, E (unit vectors) and DAB."""
        h, e, d = (row / row.norm() for row in RGB_FROM_HED)
        axis = torch.linalg.cross(h, e)
        axis = axis / axis.norm()
        return torch.stack([_rotate(h, axis, self.h_degrees), _rotate(e, axis, self.e_degrees), d])

    def vector_angles(self) -> tuple[float, float]:
        """Degrees between the demo's and the second centre's H, and E, vectors."""
        old, new = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True), self.stain_matrix()
        return tuple(math.degrees(math.acos(float((old[i] * new[i]).sum().clamp(-1, 1)))) for i in (0, 1))

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB of the demo's stain -> the same tissue in the second centre's stain."""
        x = torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float64)
        hed = od_to_hed(rgb_to_od(x))
        hed = hed * torch.tensor([self.h_scale, self.e_scale, 1.0], dtype=hed.dtype).view(3, 1, 1)
        norms = RGB_FROM_HED.norm(dim=1, keepdim=True)  # amounts keep their OD: unit vectors times the old norms
        out = od_to_rgb(hed_to_od(hed, self.stain_matrix() * norms)).clamp(0, 255).round()
        return out.to(torch.uint8).permute(1, 2, 0).numpy()


def _rotate(v: torch.Tensor, axis: torch.Tensor, degrees: float) -> torch.Tensor:
    """``v`` turned by ``degrees`` about the unit ``axis`` (Rodrigues)."""
    a = math.radians(degrees)
    return (v * math.cos(a) + torch.linalg.cross(axis, v) * math.sin(a)
            + axis * (axis @ v) * (1 - math.cos(a)))


def shifted_cache_root() -> Path:
    """Default folder: ``$PATHMONO_CACHE/camelyon_demo_shifted`` or ``~/.cache/pathmono/camelyon_demo_shifted``."""
    return default_cache_dir("camelyon_demo_shifted")


def second_centre_layout(demo: DemoLayout, root: Path, **extra) -> DemoLayout:
    """The demo's layout moved to ``root``: val and test slides (no train slides), same masks and labels."""
    return dataclasses.replace(
        demo, root=root, train_images=root / "training" / "images", train_annotations=root / "training" / "annotations",
        coords=root / "coords", test_images=root / "testing" / "images", test_masks=root / "testing" / "ground_truths",
        test_annotations=root / "testing" / "annotations", train_slides=(), **extra)


def make_second_centre(demo: DemoLayout, root: str | os.PathLike | None = None, shift: StainShift = StainShift(),
                       quality: int = 85, force: bool = False) -> DemoLayout:
    """The demo's val and test slides re-stained by ``shift`` under ``root`` (default
    :func:`shifted_cache_root`), built once (:mod:`common.cache`: keyed on the demo set and the
    shift); returns its layout."""
    root = Path(root) if root is not None else shifted_cache_root()
    demo_manifest = read_manifest(demo.root)
    if demo_manifest is None:
        raise FileNotFoundError(f"{demo.root}: not a generated camelyon demo set (no manifest)")
    params = {"demo_root": str(demo.root), "demo_key": demo_manifest.get("key", ""), "shift": dataclasses.asdict(shift),
              "quality": quality, "slides": list(demo.val_slides + demo.test_slides)}
    cache = build_once(root, lambda folder: _write_set(demo, second_centre_layout(demo, folder), shift, quality),
                       params, generator="camelyon.second_centre", version=VERSION, force=force)
    return second_centre_layout(demo, root, generated=cache.built, seconds=cache.seconds)


def _write_set(demo: DemoLayout, out: DemoLayout, shift: StainShift, quality: int) -> dict:
    """Every val and test slide re-stained; masks and annotations copied; the validation list."""
    seconds = {}
    for name in progress(demo.val_slides + demo.test_slides, desc="second centre"):
        t0 = time.perf_counter()
        restain_slide(demo.slide_path(name), out.slide_path(name), shift, quality)
        for source, target in ((demo.annotation_path(name), out.annotation_path(name)),
                               (demo.mask_path(name), out.mask_path(name))):
            if source is not None and source.is_file():
                _copy(source, target)
        seconds[name] = round(time.perf_counter() - t0, 2)
    write_validation_list(demo, out)
    h_angle, e_angle = shift.vector_angles()
    return {"slides": seconds, "h_vector_degrees": round(h_angle, 2), "e_vector_degrees": round(e_angle, 2)}


def write_validation_list(demo: DemoLayout, out: DemoLayout) -> Path:
    """``out.root/validation.csv``: the demo's val centres (its NCRF lists, copied to ``out.coords``)
    as a bundle patch list, made as ``train.py --demo`` makes the demo's (labels from the copied XML)."""
    from camelyon.dataset import write_bundle_csv
    from camelyon.prepare import build_patch_list

    lists = [out.coords / demo.coord_files[key].name for key in ("tumor_valid", "normal_valid")]
    for target in lists:
        _copy(demo.coords / target.name, target)
    records = build_patch_list([str(p) for p in lists], str(out.train_images), str(out.train_annotations))
    write_bundle_csv(records, out.root / "validation.csv")
    return out.root / "validation.csv"


def restain_slide(source: Path, target: Path, shift: StainShift, quality: int = 85) -> None:
    """One slide's level 0 re-stained strip by strip, written as a pyramidal TIFF at the demo's µm/px."""
    with open_slide(source) as slide:
        width, height = slide.dimensions
        image = np.empty((height, width, 3), np.uint8)
        for top in range(0, height, STRIP_ROWS):
            rows = min(STRIP_ROWS, height - top)
            image[top:top + rows] = shift.apply(read_rgb(slide, 0, top, width, rows))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(target, image, mpp=MPP, quality=quality, maxworkers=2)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
