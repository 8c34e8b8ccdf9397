"""spleen.dataset: MSD pairing and split, data lists, the preprocessing cache and the pos/neg crop
sampler (candidate sets, 1:1 ratio, centre clamping, errors)."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen.dataset import (CropDataset, build_cache, cache_key, check_crop_fits, crop, crop_centre_bounds, msd_cases,
                            sample_crop_centres, split_cases, validate_cases)
from spleen.transforms import VolumeError


def _write(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.5, 1.0]) if affine is None else affine), str(path))
    return path


def _msd(root, n=12, shape=(12, 10, 9)):
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        image = rng.integers(-200, 200, shape).astype(np.int16)
        label = np.zeros(shape, np.uint8)
        label[3:6, 3:6, 2:5] = 1
        _write(root / "imagesTr" / f"spleen_{i}.nii.gz", image)
        _write(root / "labelsTr" / f"spleen_{i}.nii.gz", label)
    (root / "imagesTr" / "._spleen_1.nii.gz").write_bytes(b"resource fork")  # macOS junk in the MSD tar
    return root


def test_msd_pairing_sorted_and_split_last_nine(tmp_path):
    root = _msd(tmp_path)
    cases = msd_cases(root)
    names = [c.name for c in cases]
    assert names == sorted(names) and names[:3] == ["spleen_1", "spleen_10", "spleen_11"]
    assert all(os.path.basename(c.image) == os.path.basename(c.label) for c in cases)
    train, val = split_cases(root, val_count=9)
    assert [c.name for c in train] == names[:3] and [c.name for c in val] == names[3:]


def test_data_list_overrides_the_split(tmp_path):
    root = _msd(tmp_path, n=3)
    spec = {"training": [{"image": "imagesTr/spleen_2.nii.gz", "label": "labelsTr/spleen_2.nii.gz"}],
            "validation": [{"image": "imagesTr/spleen_1.nii.gz", "label": "labelsTr/spleen_1.nii.gz"}]}
    (root / "list.json").write_text(json.dumps(spec))
    train, val = split_cases(root, str(root / "list.json"))
    assert [c.name for c in train] == ["spleen_2"] and [c.name for c in val] == ["spleen_1"]
    assert train[0].label == str((root / "labelsTr" / "spleen_2.nii.gz").resolve())
    (root / "bad.json").write_text(json.dumps({"training": []}))
    with pytest.raises(VolumeError, match="validation"):
        split_cases(root, str(root / "bad.json"))


def test_missing_label_is_an_error_naming_the_case(tmp_path):
    root = _msd(tmp_path, n=3)
    (root / "labelsTr" / "spleen_2.nii.gz").unlink()
    with pytest.raises(VolumeError, match="has no label") as err:
        msd_cases(root)
    assert "spleen_2.nii.gz" in str(err.value)


def test_validate_cases_names_the_bad_file(tmp_path):
    root = _msd(tmp_path, n=2)
    bad = _write(root / "labelsTr" / "spleen_2.nii.gz", np.zeros((12, 10, 8), np.uint8))
    with pytest.raises(VolumeError, match="shape") as err:
        validate_cases(msd_cases(root))
    assert str(bad) in str(err.value)


def test_cache_is_built_once_and_keyed_by_parameters(tmp_path):
    root = _msd(tmp_path, n=2, shape=(20, 16, 12))
    cases = msd_cases(root)
    cached = build_cache(cases, tmp_path / "cache", pixdim=(3.0, 3.0, 3.0))
    image = np.load(cached[0].image)
    label = np.load(cached[0].label)
    assert image.shape == label.shape == cached[0].geometry().shape == (14, 11, 10)  # round((n - 1) * old / 3 + 1)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and 0 <= image.min() and image.max() <= 1
    np.testing.assert_array_equal(np.load(cached[0].foreground), np.flatnonzero(label))
    stamp = os.stat(cached[0].image).st_mtime_ns
    again = build_cache(cases, tmp_path / "cache", pixdim=(3.0, 3.0, 3.0))
    assert again == cached and os.stat(cached[0].image).st_mtime_ns == stamp
    assert cache_key(cases[0], (3.0, 3.0, 3.0), (-57, 164)) != cache_key(cases[0], (1.5, 1.5, 2.0), (-57, 164))
    check_crop_fits(cached, (14, 11, 10))
    with pytest.raises(VolumeError, match="smaller than the") as err:
        check_crop_fits(cached, (8, 8, 16))
    assert cases[0].image in str(err.value)


# ----------------------------------------------------------------------------- crops
def test_centre_bounds_follow_monai_correct_crop_centers():
    lo, hi = crop_centre_bounds((100, 96, 130), (96, 96, 96))
    assert lo.tolist() == [48, 48, 48] and hi.tolist() == [52, 48, 82]
    lo, hi = crop_centre_bounds((10, 10, 10), (5, 5, 5))  # odd roi: [2, 7]
    assert lo.tolist() == [2, 2, 2] and hi.tolist() == [7, 7, 7]
    with pytest.raises(VolumeError, match="smaller than the crop") as err:
        crop_centre_bounds((100, 95, 130), (96, 96, 96), source="spleen_7")
    assert "spleen_7" in str(err.value)


def _volume():
    image = np.zeros((40, 30, 20), np.float32)
    image[5:35, 5:25, :] = 0.4  # body (HU > -57)
    label = np.zeros_like(image, dtype=np.uint8)
    label[20:24, 10:13, 8:11] = 1
    return image, label, np.flatnonzero(label)


def test_crop_centres_come_from_the_right_sets_in_a_1_to_1_ratio():
    image, label, fg = _volume()
    roi = (8, 8, 8)
    rng = np.random.default_rng(0)
    centres = [c for _ in range(500) for c in sample_crop_centres(image, label, fg, roi, 4, 1.0, 1.0, rng)]
    in_fg = np.array([label[c] == 1 for c in centres])  # fg voxels are far from the borders: never clamped
    assert abs(in_fg.mean() - 0.5) < 0.04
    bg = [c for c, f in zip(centres, in_fg) if not f]
    lo, hi = crop_centre_bounds(label.shape, roi)
    assert all((lo <= np.array(c)).all() and (np.array(c) <= hi).all() for c in centres)
    # background centres lie in the body (image > 0) before clamping: the clamp only moves them inwards
    assert all(image[c] > 0 or any(v in (lo[i], hi[i]) for i, v in enumerate(c)) for c in bg)
    only_fg = sample_crop_centres(image, label, fg, roi, 50, 1.0, 0.0, rng)
    assert all(label[c] == 1 for c in only_fg)


def test_empty_foreground_uses_background_and_nothing_at_all_is_an_error():
    image, label, _ = _volume()
    empty = np.zeros_like(label)
    centres = sample_crop_centres(image, empty, np.zeros(0, np.int64), (8, 8, 8), 20, 1.0, 1.0,
                                  np.random.default_rng(1))
    assert all(image[c] > 0 for c in centres)
    with pytest.raises(VolumeError, match="no foreground and no background"):
        sample_crop_centres(np.zeros_like(image), empty, np.zeros(0, np.int64), (8, 8, 8), 1, 1, 1,
                            np.random.default_rng(0), source="case_x")


def test_centre_is_clamped_so_the_crop_stays_inside():
    label = np.zeros((20, 20, 20), np.uint8)
    label[0, 19, 10] = 1
    centres = sample_crop_centres(np.zeros_like(label, dtype=np.float32), label, np.flatnonzero(label), (8, 8, 8), 3,
                                  1.0, 0.0, np.random.default_rng(0))
    assert centres == [(4, 16, 10)] * 3
    patch = crop(np.arange(8000).reshape(20, 20, 20), centres[0], (8, 8, 8))
    assert patch.shape == (8, 8, 8) and patch[0, 0, 0] == 0 * 400 + 12 * 20 + 6


def test_crop_dataset_items_are_reproducible_per_epoch(tmp_path):
    root = _msd(tmp_path, n=2, shape=(24, 20, 16))
    cached = build_cache(msd_cases(root), tmp_path / "cache", pixdim=(2.0, 2.0, 2.5))
    ds = CropDataset(cached, (8, 8, 8), num_samples=4, seed=5)
    img, lab = ds[(0, 1)]
    assert img.shape == (4, 1, 8, 8, 8) and lab.shape == (4, 1, 8, 8, 8)
    assert img.dtype == torch.float32 and lab.dtype == torch.uint8
    img2, _ = ds[(0, 1)]
    assert torch.equal(img, img2)
    assert any(not torch.equal(ds[(e, 1)][0], img) for e in range(1, 4))
    volume = np.load(cached[1].image)
    # every crop is a real window of the cached volume
    windows = {crop(volume, (x, y, z), (8, 8, 8)).tobytes()
               for x in range(4, 21) for y in range(4, 17) for z in range(4, 13)}
    assert all(img[k, 0].numpy().tobytes() in windows for k in range(4))
