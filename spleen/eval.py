"""Score predicted spleen masks against ground truth on the original voxel grid.

    python spleen/eval.py --predictions outputs/spleen --labels /data/Task09_Spleen/labelsTr [--output m.json]

Every prediction ``<name>_seg.nii.gz`` (or ``<name>.nii.gz``) is paired with ``<labels>/<name>.nii.gz``;
both must lie on the same grid (shape and affine). Foreground is voxel value 1.

Per case (MONAI conventions): Dice = 2|P∩G| / (|P| + |G|) (empty ground truth: NaN, left out
of the mean); HD95 = the larger of the two directed 95th percentiles of surface distances in mm
(``compute_hausdorff_distance(percentile=95)``: surface = mask XOR its 6-connected erosion,
Euclidean distance transform with the voxel spacing); undefined (null) when either mask is empty.
The JSON report holds the cases and the means, and is printed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.io import atomic_write_text
from common.config import parse_config
from common.errors import exit_on_user_error
from spleen.config import EvalConfig
from spleen.dataset import list_nifti
from spleen.transforms import VolumeError, affine_spacing, check_same_grid, nifti_stem, open_nifti, read_volume

SEG_SUFFIX = "_seg"


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|); NaN when the ground truth is empty (MONAI ignore_empty)."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    size = int(gt.sum())
    if size == 0:
        return float("nan")
    return 2.0 * int((pred & gt).sum()) / (int(pred.sum()) + size)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``gt``, and back.

    Work is limited to the bounding box of pred | gt (plus one voxel), which gives the same
    surfaces and distances as the full volume."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = np.argwhere(pred | gt)
    lo = np.maximum(union.min(0) - 1, 0)
    hi = union.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp, sg = _surface(pred[box]), _surface(gt[box])
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return to_gt, to_pred


def hausdorff95(pred: np.ndarray, gt: np.ndarray, spacing) -> float | None:
    """Symmetric 95th-percentile Hausdorff distance in mm; None if either mask is empty."""
    if not pred.any() or not gt.any():
        return None
    a, b = surface_distances(pred, gt, spacing)
    return float(max(np.percentile(a, 95), np.percentile(b, 95)))


def pair_files(predictions: str, labels: str) -> list[tuple[str, Path, Path]]:
    """(name, prediction, label) for every prediction; a prediction without a label is an error."""
    preds = list_nifti(predictions)
    if not preds:
        raise VolumeError(f"{predictions}: no .nii/.nii.gz predictions in this folder")
    label_dir = Path(labels)
    pairs = []
    for pred in preds:
        stem = nifti_stem(pred)
        name = stem[: -len(SEG_SUFFIX)] if stem.endswith(SEG_SUFFIX) else stem
        candidates = [label_dir / f"{name}{suffix}" for suffix in (".nii.gz", ".nii")]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            raise VolumeError(f"{pred}: no ground truth {candidates[0]} for this prediction")
        pairs.append((name, pred, label))
    return pairs


def score_case(name: str, pred_path: Path, label_path: Path) -> dict:
    check_same_grid(open_nifti(label_path), open_nifti(pred_path), label_path, pred_path)
    pred, _, _ = read_volume(pred_path)
    gt, affine, _ = read_volume(label_path)
    pred, gt = pred == 1, gt == 1
    spacing = affine_spacing(affine)
    return {"name": name, "dice": dice(pred, gt), "hd95_mm": hausdorff95(pred, gt, spacing),
            "prediction_voxels": int(pred.sum()), "label_voxels": int(gt.sum()),
            "spacing_mm": [round(float(s), 4) for s in spacing], "prediction": str(pred_path), "label": str(label_path)}


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def evaluate_predictions(cfg: EvalConfig) -> dict:
    """Score every prediction file against its label on the original grid; write and return the report."""
    cases = [score_case(*pair) for pair in pair_files(cfg.predictions, cfg.labels)]
    report = {"mean_dice": _mean(c["dice"] for c in cases), "mean_hd95_mm": _mean(c["hd95_mm"] for c in cases),
              "num_cases": len(cases), "cases": cases}
    for c in cases:  # JSON has no NaN
        c["dice"] = None if math.isnan(c["dice"]) else c["dice"]
    out = Path(cfg.output) if cfg.output else Path(cfg.predictions) / "metrics.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    report["report"] = str(out)
    return report


def print_report(report: dict) -> None:
    for c in report["cases"]:
        d = "n/a" if c["dice"] is None else f"{c['dice']:.4f}"
        h = "n/a" if c["hd95_mm"] is None else f"{c['hd95_mm']:.2f} mm"
        print(f"{c['name']:>24s}  dice {d}  hd95 {h}")
    md = report["mean_dice"]
    mh = report["mean_hd95_mm"]
    print(f"{'mean':>24s}  dice {'n/a' if md is None else f'{md:.4f}'}  hd95 {'n/a' if mh is None else f'{mh:.2f} mm'}"
          f"  ({report['num_cases']} cases) -> {report['report']}")


if __name__ == "__main__":
    with exit_on_user_error():
        print_report(evaluate_predictions(parse_config(EvalConfig)))
