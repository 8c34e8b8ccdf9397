"""spleen.eval: Dice and HD95 against hand-computed cases and a brute-force surface distance, the
JSON report, and pairing errors."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from spleen.config import EvalConfig
from spleen.eval import dice, evaluate_predictions, hausdorff95
from spleen.transforms import VolumeError


def test_dice_hand_computed_and_empty_ground_truth():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, :3] = True  # 3 voxels
    b[0, 0, 1:] = True  # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert math.isnan(dice(a, np.zeros_like(b)))
    assert dice(np.zeros_like(a), b) == 0.0


def test_hd95_of_two_points_uses_the_spacing():
    a = np.zeros((10, 5, 5), bool)
    b = np.zeros((10, 5, 5), bool)
    a[1, 2, 2] = True
    b[4, 2, 2] = True
    assert hausdorff95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hausdorff95(a, a, (2.0, 1.0, 1.0)) == 0.0
    assert hausdorff95(a, np.zeros_like(a), (1, 1, 1)) is None


def brute_force_hd95(a, b, spacing):
    """Surfaces (mask minus its 6-connected erosion) and all pairwise distances."""
    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)
    d = cdist(surface(a), surface(b))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a = ndimage.binary_dilation(rng.random((16, 14, 12)) > 0.97, iterations=2)
    b = ndimage.binary_dilation(rng.random((16, 14, 12)) > 0.97, iterations=1)
    a[0, 0, 0] = True  # touches the border: border voxels are surface
    spacing = (0.8, 1.3, 2.5)
    assert hausdorff95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing), rel=1e-9)


def _write(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), str(path))


def test_evaluate_writes_the_json_report(tmp_path):
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    gt = np.zeros((20, 20, 6), np.uint8)
    gt[5:10, 5:10, 2:4] = 1
    pred = np.zeros_like(gt)
    pred[5:10, 6:11, 2:4] = 1  # shifted by one voxel along y
    _write(tmp_path / "labels" / "case_a.nii.gz", gt, affine)
    _write(tmp_path / "pred" / "case_a_seg.nii.gz", pred, affine)
    _write(tmp_path / "labels" / "case_b.nii.gz", gt, affine)
    _write(tmp_path / "pred" / "case_b_seg.nii.gz", gt, affine)
    report = evaluate_predictions(EvalConfig(predictions=str(tmp_path / "pred"), labels=str(tmp_path / "labels")))
    saved = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert saved["num_cases"] == 2 and [c["name"] for c in saved["cases"]] == ["case_a", "case_b"]
    assert saved["cases"][0]["dice"] == pytest.approx(2 * 40 / 100)
    assert saved["cases"][0]["hd95_mm"] == pytest.approx(0.8)
    assert saved["cases"][1]["dice"] == 1.0 and saved["cases"][1]["hd95_mm"] == 0.0
    assert saved["mean_dice"] == pytest.approx((0.8 + 1.0) / 2) == report["mean_dice"]
    assert saved["cases"][0]["spacing_mm"] == [0.8, 0.8, 5.0]


def test_pairing_and_grid_errors_name_the_files(tmp_path):
    affine = np.eye(4)
    _write(tmp_path / "pred" / "x_seg.nii.gz", np.zeros((4, 4, 4)), affine)
    with pytest.raises(VolumeError, match="no ground truth") as err:
        evaluate_predictions(EvalConfig(predictions=str(tmp_path / "pred"), labels=str(tmp_path / "labels")))
    assert "x_seg.nii.gz" in str(err.value)
    _write(tmp_path / "labels" / "x.nii.gz", np.zeros((4, 4, 5)), affine)
    with pytest.raises(VolumeError, match="shape") as err:
        evaluate_predictions(EvalConfig(predictions=str(tmp_path / "pred"), labels=str(tmp_path / "labels")))
    assert "x_seg.nii.gz" in str(err.value)
