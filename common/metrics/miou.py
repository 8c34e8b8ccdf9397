"""Confusion-matrix segmentation metrics (torchvision references style) and PatchTCGA's variant.

Rows of the matrix are ground truth, columns predictions. In DDP the matrix (integer counts) is
summed across processes *before* anything is derived from it.

Two families, named explicitly because they differ:

- ``*_nan`` (torchvision style): per-class IoU = diag / (row + col - diag); a class with an empty
  denominator (absent from ground truth and prediction) is NaN and excluded from the macro mean.
- ``patchtcga_*`` (PatchTCGA ``DiceJaccardAccuracy``): eps = 1e-5 in every denominator, macro means
  divide by the number of classes, so an absent class contributes ~0.
"""
from __future__ import annotations

import torch

from common.dist import all_reduce_sum

PATCHTCGA_EPS = 1e-5


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: torch.device | str = "cpu"):
        self.n, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target`` are class-index tensors of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        t, p = target.reshape(-1).long(), pred.reshape(-1).long().to(target.device)
        valid = (t >= 0) & (t < self.n)
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        idx = self.n * t[valid] + p[valid]
        self.mat += torch.bincount(idx, minlength=self.n ** 2).reshape(self.n, self.n).to(self.mat.device)

    def reduce(self) -> "ConfusionMatrix":
        all_reduce_sum(self.mat)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    def compute(self) -> dict[str, object]:
        return metrics_from_confusion(self.mat)


def metrics_from_confusion(mat: torch.Tensor) -> dict[str, object]:
    m = mat.double()
    diag, rows, cols = m.diag(), m.sum(1), m.sum(0)
    total = m.sum()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(rows + cols - diag > 0, diag / (rows + cols - diag), nan)
    dice = torch.where(rows + cols > 0, 2 * diag / (rows + cols), nan)
    class_acc = torch.where(rows > 0, diag / rows, nan)
    tp, fp, fn = diag, cols - diag, rows - diag
    eps = PATCHTCGA_EPS
    return {
        "pixel_accuracy": float(diag.sum() / total) if total > 0 else float("nan"),
        "iou_per_class_nan": iou.tolist(),
        "dice_per_class_nan": dice.tolist(),
        "class_accuracy_nan": class_acc.tolist(),
        "miou_macro_nan": float(torch.nanmean(iou)),
        "mdice_macro_nan": float(torch.nanmean(dice)),
        "miou_micro": float(tp.sum() / (tp.sum() + fp.sum() + fn.sum())) if total > 0 else float("nan"),
        "patchtcga_miou_macro": float((tp / (tp + fp + fn + eps)).sum() / len(tp)),
        "patchtcga_mdice_macro": float((2 * tp / (2 * tp + fp + fn + eps)).sum() / len(tp)),
        "patchtcga_miou_micro": float(tp.sum() / (tp.sum() + fp.sum() + fn.sum() + eps)),
        "patchtcga_mdice_micro": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum() + eps)),
        "patchtcga_mpa": float((tp / (tp + fn + eps)).sum() / len(tp)),
    }
