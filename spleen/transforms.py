"""NIfTI input/output and the bundle's deterministic preprocessing, forwards and backwards.

Forwards (train, validation and inference; spleen.md §2):

    load float32 + affine -> orient to RAS (flip/permute, closest canonical) -> resample to
    (1.5, 1.5, 2.0) mm (trilinear image / nearest label, border padding, voxel centres, float64)
    -> HU window clip((HU + 57) / 221, 0, 1)

Backwards (inference, §9): probabilities on the resampled grid are resampled (bilinear, border)
to the RAS-oriented original grid, the orientation is undone, and the argmax is taken; the result
lies on the original voxel grid and is saved with the original affine and header.

Resampling follows MONAI ``Spacing`` / ``SpatialResample`` (1.4.0) operation by operation: the
output grid keeps the first voxel's world position and has ``round((n - 1) * old / new + 1)``
voxels per axis (numpy round-half-to-even of the voxel-centre extent); output voxel index j maps
to input index ``solve(src_affine, dst_affine) @ j``, applied through ``affine_grid`` /
``grid_sample`` (align_corners=False) on normalised coordinates in float64. The grid is built in
slabs along the first axis with the same arithmetic as ``affine_grid``, so results are bit-identical
to the one-shot call (which matters for nearest-neighbour ties: 3 mm -> 1.5 mm puts half the
output voxels exactly between two inputs) while memory stays bounded.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio

from common.errors import UserError
from common.io import atomic_write

PIXDIM = (1.5, 1.5, 2.0)
HU_RANGE = (-57.0, 164.0)
AFFINE_TOL = 1e-3  # MONAI's tolerance for "this affine did not change"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class VolumeError(UserError, ValueError):
    """An input volume that cannot be used; the message names the file and the problem."""


# ============================================================================= reading / writing
def nifti_stem(path: str | os.PathLike) -> str:
    """``spleen_10.nii.gz`` -> ``spleen_10``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_nifti(path: str | os.PathLike) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES) and not Path(path).name.startswith(".")


def open_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI header lazily and check it is a 3-D volume (trailing singleton axes allowed)."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: file not found")
    if not is_nifti(path):
        raise VolumeError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for corrupt or foreign files
        raise VolumeError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: not a NIfTI image ({type(img).__name__})")
    spatial_shape(img.shape, path)
    return img


def spatial_shape(shape: Sequence[int], path: str | os.PathLike = "<array>") -> tuple[int, int, int]:
    """The 3-D shape of a volume; 2-D images and real 4-D series are refused."""
    shape = tuple(int(s) for s in shape)
    extra = shape[3:]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(f"{path}: a 2-D image (shape {shape}); expected a 3-D CT volume")
    if any(s != 1 for s in extra):
        raise VolumeError(f"{path}: a {len(shape)}-D image (shape {shape}); expected one 3-D volume")
    return shape[:3]  # type: ignore[return-value]


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """(float32 array (X, Y, Z), float64 affine, the image for its header)."""
    img = open_nifti(path)
    shape = spatial_shape(img.shape, path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as err:
        raise VolumeError(f"{path}: voxel data cannot be read ({type(err).__name__}: {err})") from err
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: the affine is singular or not finite:\n{affine}")
    return data, affine, img


def check_same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, a_path, b_path, atol: float = 1e-3) -> None:
    """Two volumes (image and label, label and prediction) must share shape and affine."""
    ashape, bshape = spatial_shape(a.shape, a_path), spatial_shape(b.shape, b_path)
    if ashape != bshape:
        raise VolumeError(f"{b_path}: shape {bshape} differs from {a_path} shape {ashape}")
    if not np.allclose(a.affine, b.affine, atol=atol):
        raise VolumeError(f"{b_path}: affine differs from {a_path} affine:\n"
                          f"{np.round(b.affine, 4)}\nvs\n{np.round(a.affine, 4)}")


def save_like(data: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike, dtype=np.uint8) -> Path:
    """Write ``data`` on the reference's grid: its header, qform and sform (with their codes) are
    kept, so viewers (3D Slicer, ITK-SNAP) place it exactly over the reference. Atomic."""
    header = reference.header.copy()
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    qform, qcode = reference.header.get_qform(coded=True)
    sform, scode = reference.header.get_sform(coded=True)
    img.set_qform(qform if qform is not None else reference.affine, code=int(qcode))  # same transforms and codes
    img.set_sform(sform if sform is not None else reference.affine, code=int(scode))
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    payload = img.to_bytes() if suffix == ".nii" else gzip.compress(img.to_bytes(), compresslevel=6)
    return atomic_write(path, lambda fh: fh.write(payload))


# ============================================================================= orientation
def ras_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the volume's axes to RAS (closest canonical)."""
    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))


def reorient(x: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Apply a nibabel orientation transform to the last three axes of ``x`` (flips, then the
    permutation), as ``nibabel.apply_orientation`` / MONAI ``Orientation`` do."""
    lead = x.ndim - 3
    flips = [lead + i for i, flip in enumerate(ornt[:, 1]) if flip == -1]
    if flips:
        x = torch.flip(x, dims=flips)
    order = np.argsort(ornt[:, 0])
    if not np.array_equal(order, np.arange(3)):
        x = x.permute(*range(lead), *(lead + int(i) for i in order))
    return x


def inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt``."""
    inv = np.zeros_like(ornt)
    for i, (axis, flip) in enumerate(ornt):
        inv[int(axis)] = [i, flip]
    return inv


def oriented_affine(affine: np.ndarray, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
    return affine @ nio.inv_ornt_aff(ornt, tuple(shape))


# ============================================================================= spacing
def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size per axis: column norms of the 3x3 part."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


def zoom_affine(affine: np.ndarray, pixdim: Sequence[float]) -> np.ndarray:
    """Same axis directions, new voxel size (MONAI ``zoom_affine``, diagonal=False); no translation."""
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(np.asarray(pixdim, dtype=np.float64)))
    return out


def spacing_target(affine: np.ndarray, shape: Sequence[int], pixdim: Sequence[float] = PIXDIM
                   ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Output affine and shape of the resampling (MONAI ``Spacing`` + ``compute_shape_offset``):
    voxel-centre corners mapped into the new grid give the extent, ``round(ptp + 1)`` voxels per
    axis, and the corner that is smallest in every new axis keeps its world position."""
    in_affine = np.asarray(affine, dtype=np.float64)
    out_affine = zoom_affine(in_affine, pixdim)
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.concatenate([corners, np.ones_like(corners[:1])])
    corners_out = np.linalg.solve(out_affine, in_affine) @ corners
    world = in_affine @ corners
    steps = corners_out[:-1].copy()
    out_shape = np.round(np.ptp(corners_out[:-1] / corners_out[-1], axis=1) + 1.0).astype(int)
    offset = None
    for i in range(world.shape[1]):
        if np.allclose(np.min(steps - steps[:, i:i + 1], 1), 0.0, rtol=AFFINE_TOL):
            offset = world[:-1, i]
            break
    if offset is None:  # oblique grids: centre-align
        offset = (in_affine[:3, :3] @ (np.asarray(shape) / 2.0) + in_affine[:3, 3]
                  - out_affine[:3, :3] @ (out_shape / 2.0))
    out_affine[:3, 3] = offset
    return out_affine, tuple(int(s) for s in out_shape)  # type: ignore[return-value]


def _normalise(shape: Sequence[int]) -> np.ndarray:
    """Voxel index -> [-1, 1] coordinates of ``grid_sample(align_corners=False)`` (voxel centres)."""
    s = np.asarray(shape, dtype=np.float64)
    norm = np.diag(np.concatenate([2.0 / s, [1.0]]))
    norm[:-1, -1] = 1.0 / s - 1.0
    return norm


def _grid_axis(n: int) -> torch.Tensor:
    """``affine_grid``'s base coordinates along one axis (align_corners=False), same arithmetic."""
    if n <= 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(-1, 1, n, dtype=torch.float64) * (n - 1) / n


def resample(data: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, out_shape: Sequence[int],
             mode: str = "bilinear", reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             slab_voxels: int = 1 << 21) -> torch.Tensor:
    """Resample (C, X, Y, Z) from the grid of ``src_affine`` to ``out_shape`` voxels on ``dst_affine``.

    ``mode`` is ``bilinear`` (trilinear) or ``nearest``; border padding; computed in float64 on
    the data's device. ``reduce`` maps each output slab (C, x, Y', Z') to its final form (e.g. an
    argmax), so a full-size multi-channel float64 result is never held. Returns float32 (C, *out)
    or the stacked ``reduce`` outputs.
    """
    src_affine = np.asarray(src_affine, dtype=np.float64)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    in_shape, out_shape = tuple(data.shape[1:]), tuple(int(s) for s in out_shape)
    xform = np.linalg.solve(src_affine, dst_affine)  # output index -> input index
    finish = reduce or (lambda t: t.float())
    if out_shape == in_shape and np.allclose(xform, np.eye(4), atol=AFFINE_TOL):
        return finish(data.to(torch.float64))  # MONAI skips resampling for an unchanged grid
    theta = (torch.as_tensor(_normalise(in_shape)) @ torch.as_tensor(xform)
             @ torch.as_tensor(np.linalg.inv(_normalise(out_shape))))  # MONAI to_norm_affine
    rev = [2, 1, 0]  # grid_sample's last grid axis indexes the input's last dim
    theta_r = theta.clone()
    theta_r[:3, :3] = theta[:3, :3][rev][:, rev]
    theta_r[:3, 3] = theta[:3, 3][rev]
    theta_t = theta_r[:3].T.to(data.device).unsqueeze(0)  # (1, 4, 3)
    src = data.to(torch.float64).unsqueeze(0)  # (1, C, X, Y, Z)
    X, Y, Z = out_shape
    base_x, base_y, base_z = (_grid_axis(n).to(data.device) for n in out_shape)
    step = max(1, slab_voxels // max(Y * Z, 1))
    result: torch.Tensor | None = None
    for x0 in range(0, X, step):
        x1 = min(X, x0 + step)
        base = torch.empty(x1 - x0, Y, Z, 4, dtype=torch.float64, device=data.device)
        base[..., 0] = base_z
        base[..., 1] = base_y[:, None]
        base[..., 2] = base_x[x0:x1, None, None]
        base[..., 3] = 1
        grid = base.view(1, -1, 4).bmm(theta_t).view(1, x1 - x0, Y, Z, 3)
        slab = finish(F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=False)[0])
        if result is None:  # allocated once, in the final dtype
            result = torch.empty((slab.shape[0], X, Y, Z), dtype=slab.dtype, device=slab.device)
        result[:, x0:x1] = slab
    assert result is not None
    return result


# ============================================================================= the pipeline
@dataclass
class Geometry:
    """Original grid, RAS-oriented grid and resampled grid of one volume (all that inversion needs)."""

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    ornt: np.ndarray  # original axes -> RAS
    oriented_shape: tuple[int, int, int]
    oriented_affine: np.ndarray
    shape: tuple[int, int, int]  # resampled
    affine: np.ndarray = field(repr=False)  # resampled

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in affine_spacing(self.affine))

    def to_dict(self) -> dict:
        return {"original_shape": list(self.original_shape), "original_affine": self.original_affine.tolist(),
                "ornt": self.ornt.tolist(), "oriented_shape": list(self.oriented_shape),
                "oriented_affine": self.oriented_affine.tolist(), "shape": list(self.shape),
                "affine": self.affine.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["original_shape"]), np.asarray(d["original_affine"]), np.asarray(d["ornt"]),
                   tuple(d["oriented_shape"]), np.asarray(d["oriented_affine"]), tuple(d["shape"]),
                   np.asarray(d["affine"]))


def plan_geometry(shape: Sequence[int], affine: np.ndarray, pixdim: Sequence[float] = PIXDIM) -> Geometry:
    shape = tuple(int(s) for s in shape)
    ornt = ras_ornt(affine)
    o_shape = tuple(int(shape[int(a)]) for a in np.argsort(ornt[:, 0]))
    o_affine = oriented_affine(affine, shape, ornt)
    r_affine, r_shape = spacing_target(o_affine, o_shape, pixdim)
    return Geometry(shape, np.asarray(affine, dtype=np.float64), ornt, o_shape,  # type: ignore[arg-type]
                    o_affine, r_shape, r_affine)


def to_resampled_grid(volume: np.ndarray | torch.Tensor, geom: Geometry, mode: str) -> torch.Tensor:
    """(X, Y, Z) on the original grid -> float32 (X', Y', Z') oriented to RAS and resampled."""
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32) if isinstance(volume, np.ndarray) else volume)
    x = reorient(x[None], geom.ornt)
    return resample(x, geom.oriented_affine, geom.affine, geom.shape, mode=mode)[0]


def scale_hu(x: torch.Tensor, hu_range: Sequence[float] = HU_RANGE) -> torch.Tensor:
    """MONAI ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)`` in float32."""
    lo, hi = float(hu_range[0]), float(hu_range[1])
    return ((x.float() - lo) / (hi - lo) * 1.0 + 0.0).clamp_(0.0, 1.0)


def preprocess_image(data: np.ndarray, affine: np.ndarray, pixdim: Sequence[float] = PIXDIM,
                     hu_range: Sequence[float] = HU_RANGE) -> tuple[torch.Tensor, Geometry]:
    """HU volume on its original grid -> (scaled float32 (X', Y', Z'), geometry)."""
    geom = plan_geometry(data.shape, affine, pixdim)
    return scale_hu(to_resampled_grid(data, geom, "bilinear"), hu_range), geom


def preprocess_label(data: np.ndarray, affine: np.ndarray, pixdim: Sequence[float] = PIXDIM,
                     path: str | os.PathLike = "<label>") -> tuple[torch.Tensor, Geometry]:
    """Binary label on its original grid -> (uint8 (X', Y', Z') resampled with nearest, geometry)."""
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        raise VolumeError(f"{path}: a spleen label must hold only 0 and 1, found values {values[:10].tolist()}")
    geom = plan_geometry(data.shape, affine, pixdim)
    return to_resampled_grid(data, geom, "nearest").to(torch.uint8), geom


def invert_to_original(probs: torch.Tensor, geom: Geometry, mode: str = "bilinear") -> torch.Tensor:
    """Class probabilities (C, X', Y', Z') on the resampled grid -> uint8 argmax (X, Y, Z) on the
    original grid: resample to the RAS-oriented original grid (``mode``, border), argmax per slab,
    then undo the orientation."""
    if tuple(probs.shape[1:]) != tuple(geom.shape):
        raise ValueError(f"probabilities {tuple(probs.shape)} do not match the resampled grid {geom.shape}")
    labels = resample(probs, geom.affine, geom.oriented_affine, geom.oriented_shape, mode=mode,
                      reduce=lambda slab: slab.argmax(0, keepdim=True).to(torch.uint8))
    return reorient(labels, inverse_ornt(geom.ornt))[0]


def label_to_original(label: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """A resampled label map (X', Y', Z') back to the original grid with nearest (evaluate.json)."""
    out = resample(label[None].float(), geom.affine, geom.oriented_affine, geom.oriented_shape, mode="nearest")
    return reorient(out, inverse_ornt(geom.ornt))[0].round().to(torch.uint8)
