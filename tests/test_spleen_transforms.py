"""spleen.transforms: NIfTI reading, RAS orientation, the bundle's spacing rule and resampling
(bit-identical to MONAI's affine_grid/grid_sample path), HU window, inversion, and bad input."""
from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel import orientations as nio

from spleen.transforms import (VolumeError, check_same_grid, invert_to_original, label_to_original, open_nifti,
                               plan_geometry, preprocess_image, preprocess_label, ras_ornt, read_volume, reorient,
                               resample, save_like, scale_hu, spacing_target)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@functools.lru_cache(maxsize=1)
def _ct_pair(fixtures: Path) -> dict:
    root = fixtures / "ct" / "totalsegmentator"
    image, affine, _ = read_volume(root / "example_ct.nii.gz")
    label, laffine, _ = read_volume(root / "example_ct_spleen.nii.gz")
    pre_image, geom = preprocess_image(image, affine)
    pre_label, lgeom = preprocess_label(label, laffine)
    return dict(root=root, image=image, label=label, affine=affine, pre_image=pre_image, pre_label=pre_label,
                geom=geom, lgeom=lgeom)


@pytest.fixture
def ct_pair(fixtures_dir):
    """The real 3 mm CT + spleen mask, preprocessed once per session."""
    return _ct_pair(fixtures_dir)


# ----------------------------------------------------------------------------- the reference's anchors
def test_fixture_preprocessing_shape_spacing_and_label_count(ct_pair):
    assert ct_pair["image"].shape == (122, 101, 112)
    geom = ct_pair["geom"]
    assert geom.shape == (243, 201, 168)  # 111 * 1.5 + 1 = 167.5 -> 168 (half to even)
    assert tuple(ct_pair["pre_image"].shape) == (243, 201, 168)
    assert geom.spacing == pytest.approx((1.5, 1.5, 2.0))
    # the first voxel keeps its world position; axes stay RAS
    np.testing.assert_allclose(geom.affine[:3, 3], ct_pair["affine"][:3, 3])
    np.testing.assert_allclose(geom.affine[:3, :3], np.diag([1.5, 1.5, 2.0]))
    assert int(ct_pair["pre_label"].sum()) == 58686  # MONAI 1.4.0 nearest (grid_sample ties)
    img = ct_pair["pre_image"]
    assert img.dtype == torch.float32 and float(img.min()) == 0.0 and float(img.max()) == 1.0


def test_small_fixture_output_size_rounds_half_to_even(fixtures_dir):
    img = open_nifti(fixtures_dir / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz")
    assert plan_geometry(img.shape, img.affine).shape == (243, 201, 44)  # 29 * 1.5 + 1 = 44.5 -> 44


@pytest.mark.parametrize("n, old, new, expected", [(112, 3.0, 2.0, 168), (30, 3.0, 2.0, 44), (101, 3.0, 1.5, 201),
                                                    (10, 1.0, 4.0, 3), (11, 0.8, 1.5, 6)])
def test_output_size_rule(n, old, new, expected):
    affine = np.diag([old, old, old, 1.0])
    _, shape = spacing_target(affine, (n, n, n), (new, new, new))
    assert shape == (expected,) * 3
    assert expected == int(np.round((n - 1) * old / new + 1))


def test_label_there_and_back_keeps_dice(ct_pair):
    label = ct_pair["label"] > 0
    back_nearest = label_to_original(ct_pair["pre_label"], ct_pair["lgeom"]).numpy()
    probs = torch.stack([1 - ct_pair["pre_label"].float(), ct_pair["pre_label"].float()])
    back_bilinear = invert_to_original(probs, ct_pair["lgeom"]).numpy()
    assert back_nearest.shape == back_bilinear.shape == label.shape
    assert _dice(back_nearest, label) >= 0.95
    assert _dice(back_bilinear, label) >= 0.95


# ----------------------------------------------------------------------------- resampling parity
def monai_style_resample(data: torch.Tensor, src_affine, dst_affine, out_shape, mode):
    """One-shot AffineTransform(normalized=False, reverse_indexing=True) as MONAI 1.4 runs it."""
    def norm(shape):
        s = torch.tensor(shape, dtype=torch.float64)
        n = torch.diag(torch.cat([2.0 / s, torch.ones(1, dtype=torch.float64)]))
        n[:-1, -1] = 1.0 / s - 1.0
        return n
    xform = torch.as_tensor(np.linalg.solve(src_affine, dst_affine))
    theta = norm(data.shape[1:]) @ xform @ torch.as_tensor(np.linalg.inv(norm(out_shape).numpy()))
    theta = theta[None].clone()
    rev = torch.tensor([2, 1, 0])
    theta[:, :3] = theta[:, rev]
    theta[:, :, :3] = theta[:, :, rev]
    grid = F.affine_grid(theta[:, :3], [1, data.shape[0], *out_shape], align_corners=False)
    return F.grid_sample(data[None].double(), grid, mode=mode, padding_mode="border", align_corners=False)[0].float()


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_slab_resampling_is_bit_identical_to_one_shot_grid_sample(mode):
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, 3, (2, 17, 13, 11)).astype(np.float32))
    src = np.array([[0.0, 2.9, 0, 5], [-3.1, 0, 0, 2], [0, 0, 2.5, -7], [0, 0, 0, 1]])  # permuted, flipped
    dst, shape = spacing_target(src, data.shape[1:], (1.5, 1.3, 2.0))
    expected = monai_style_resample(data, src, dst, shape, mode)
    got = resample(data, src, dst, shape, mode=mode, slab_voxels=50)  # many slabs
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_identity_grid_is_not_resampled():
    data = torch.rand(1, 6, 5, 4)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    assert torch.equal(resample(data, affine, affine, (6, 5, 4)), data)


def test_trilinear_values_on_a_linear_ramp():
    """Trilinear interpolation reproduces a linear function exactly inside the volume."""
    x = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 6, 5), dtype=np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    out = resample(torch.from_numpy(x)[None], affine, np.diag([1.5, 3.0, 3.0, 1.0]), (15, 6, 5))[0]
    np.testing.assert_allclose(out[:, 0, 0].numpy(), np.arange(15) * 0.5, atol=1e-6)


# ----------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("codes", [("L", "P", "S"), ("S", "L", "P"), ("A", "I", "R"), ("R", "A", "S")])
def test_reorient_matches_nibabel_closest_canonical(codes):
    rng = np.random.default_rng(1)
    data = rng.random((4, 5, 6)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = [10.0, -20.0, 30.0]
    for axis, (code, spacing) in enumerate(zip(codes, (2.0, 3.0, 4.0))):
        world = "LRPAIS".index(code) // 2
        affine[world, axis] = spacing if code in "RAS" else -spacing
    assert nib.aff2axcodes(affine) == codes
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    geom = plan_geometry(data.shape, affine)
    got = reorient(torch.from_numpy(data), ras_ornt(affine)).numpy()
    np.testing.assert_array_equal(got, canonical.get_fdata().astype(np.float32))
    np.testing.assert_allclose(geom.oriented_affine, canonical.affine)
    assert geom.oriented_shape == canonical.shape


def test_non_ras_copy_preprocesses_identically_and_inverts_to_its_own_grid(fixtures_dir):
    """The LPS/permuted copy of a RAS volume gives the same preprocessed array, and inversion
    returns each to its own grid."""
    root = fixtures_dir / "ct" / "totalsegmentator"
    image, affine, _ = read_volume(root / "example_ct_sm.nii.gz")
    image = image[:, :, 10:26]  # keep it small
    flip_perm = nio.axcodes2ornt(("P", "S", "L"))  # RAS -> P, S, L axes
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), flip_perm)
    moved = nio.apply_orientation(image, ornt)
    moved_affine = affine @ nio.inv_ornt_aff(ornt, image.shape)
    assert nib.aff2axcodes(moved_affine) == ("P", "S", "L")
    a, ga = preprocess_image(image, affine)
    b, gb = preprocess_image(np.ascontiguousarray(moved), moved_affine)
    assert torch.equal(a, b)
    np.testing.assert_allclose(ga.affine, gb.affine)
    probs = torch.stack([1 - a, a])  # any per-voxel "probability"
    back_a, back_b = invert_to_original(probs, ga).numpy(), invert_to_original(probs, gb).numpy()
    assert back_a.shape == image.shape and back_b.shape == moved.shape
    np.testing.assert_array_equal(nio.apply_orientation(back_a, ornt), back_b)


def test_hu_window():
    hu = torch.tensor([-1000.0, -57.0, 53.5, 164.0, 3000.0])
    np.testing.assert_allclose(scale_hu(hu).numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


# ----------------------------------------------------------------------------- writing and bad input
def _write(path, data, affine=None, **kw):
    img = nib.Nifti1Image(np.asarray(data), np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    nib.save(img, str(path))
    return path


def test_save_like_keeps_grid_header_and_codes(tmp_path):
    affine = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 50], [0, 0, 5, -200], [0, 0, 0, 1]])
    ref = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine)
    ref.set_qform(affine, code=1)
    ref.set_sform(affine, code=1)
    ref.header.set_slope_inter(2.0, -1024.0)
    nib.save(ref, str(tmp_path / "ref.nii.gz"))
    ref = nib.load(str(tmp_path / "ref.nii.gz"))
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:3, 2:4, 1] = 1
    out = nib.load(str(save_like(mask, ref, tmp_path / "m_seg.nii.gz")))
    assert out.shape == ref.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, ref.affine)
    for kind in ("qform", "sform"):
        a, ca = getattr(out.header, f"get_{kind}")(coded=True)
        b, cb = getattr(ref.header, f"get_{kind}")(coded=True)
        np.testing.assert_allclose(a, b)
        assert int(ca) == int(cb)
    np.testing.assert_array_equal(np.asarray(out.dataobj), mask)  # no intensity scaling carried over


@pytest.mark.parametrize("shape, message", [((8, 9), "2-D"), ((8, 9, 1), "2-D"), ((8, 9, 7, 2), "4-D")])
def test_2d_and_4d_images_are_refused_naming_the_file(tmp_path, shape, message):
    path = _write(tmp_path / "bad.nii.gz", np.zeros(shape, np.int16))
    with pytest.raises(VolumeError, match=message) as err:
        read_volume(path)
    assert str(path) in str(err.value)


def test_trailing_singleton_axis_is_accepted(tmp_path):
    data, _, _ = read_volume(_write(tmp_path / "ok.nii.gz", np.ones((4, 5, 6, 1), np.int16)))
    assert data.shape == (4, 5, 6)


def test_non_nifti_files_are_refused_naming_the_file(tmp_path):
    garbage = tmp_path / "scan.nii.gz"
    garbage.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(VolumeError, match="cannot be read as NIfTI") as err:
        read_volume(garbage)
    assert str(garbage) in str(err.value)
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(VolumeError, match="not a NIfTI file"):
        open_nifti(png)
    with pytest.raises(VolumeError, match="not found"):
        open_nifti(tmp_path / "missing.nii.gz")


def test_grid_mismatch_between_image_and_label_is_refused(tmp_path):
    image = _write(tmp_path / "img.nii.gz", np.zeros((6, 5, 4), np.int16))
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[0, 3] = 5.0
    label_shape = _write(tmp_path / "lab_shape.nii.gz", np.zeros((6, 5, 3), np.uint8))
    label_affine = _write(tmp_path / "lab_affine.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    with pytest.raises(VolumeError, match="shape") as err:
        check_same_grid(open_nifti(image), open_nifti(label_shape), image, label_shape)
    assert str(label_shape) in str(err.value)
    with pytest.raises(VolumeError, match="affine") as err:
        check_same_grid(open_nifti(image), open_nifti(label_affine), image, label_affine)
    assert str(label_affine) in str(err.value)


def test_label_values_must_be_binary():
    with pytest.raises(VolumeError, match="only 0 and 1"):
        preprocess_label(np.array([[[0, 2], [1, 0]]] * 2, dtype=np.float32), np.eye(4), path="lab.nii.gz")
