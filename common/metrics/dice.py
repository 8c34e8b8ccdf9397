"""Dice with MONAI ``DiceMetric`` conventions (used by the spleen and NuClick bundles).

Inputs are binarised tensors (B, C, *spatial). Multi-channel input is one-hot and channel c is
compared directly; single-channel input is a class-index map compared as (x == 1).
Per sample and channel: 2|P∩G| / (|P| + |G|) with no smoothing; empty ground truth gives NaN
(``ignore_empty=True``) or 1/0 depending on whether the prediction is empty too.
Reduction "mean": average each sample over its non-NaN channels, then over samples having at least
one, 0 when everything is NaN. Over an epoch, collect per-sample values and reduce once.
"""
from __future__ import annotations

import torch

from common.dist import all_gather_object


def dice_per_sample(pred: torch.Tensor, target: torch.Tensor, include_background: bool = True,
                    ignore_empty: bool = True) -> torch.Tensor:
    """(B, C, ...) binarised prediction and ground truth -> (B, C') Dice values (NaN = undefined)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ")
    if pred.ndim < 3:
        raise ValueError(f"expected (B, C, spatial...), got {tuple(pred.shape)}")
    if pred.shape[1] == 1:
        pred, target = pred == 1, target == 1
    elif not include_background:
        pred, target = pred[:, 1:], target[:, 1:]
    p = pred.bool().flatten(2)
    g = target.bool().flatten(2)
    inter = (p & g).sum(-1).double()
    size_p, size_g = p.sum(-1).double(), g.sum(-1).double()
    dice = 2 * inter / (size_p + size_g).clamp_min(1e-300)
    empty = size_g == 0
    if ignore_empty:
        return torch.where(empty, torch.full_like(dice, float("nan")), dice)
    return torch.where(empty, (size_p == 0).double(), dice)


def reduce_mean(values: torch.Tensor) -> float:
    """MONAI "mean" reduction over a (N, C) table that may contain NaN."""
    valid = ~torch.isnan(values)
    per_sample_n = valid.sum(1)
    per_sample = torch.where(valid, values, torch.zeros_like(values)).sum(1) / per_sample_n.clamp_min(1)
    keep = per_sample_n > 0
    return float(per_sample[keep].mean()) if keep.any() else 0.0


class DiceAccumulator:
    """Collect per-sample Dice over an epoch on each process; ``compute`` gathers and reduces once."""

    def __init__(self, include_background: bool = True, ignore_empty: bool = True):
        self.include_background, self.ignore_empty = include_background, ignore_empty
        self.rows: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values = dice_per_sample(pred, target, self.include_background, self.ignore_empty).cpu()
        self.rows.append(values)
        return values

    def values(self) -> torch.Tensor:
        """All per-sample values from all processes, (N, C)."""
        local = torch.cat(self.rows) if self.rows else torch.empty(0, 0, dtype=torch.float64)
        parts = [t for t in all_gather_object(local) if t.numel()]
        return torch.cat(parts) if parts else local

    def compute(self) -> float:
        table = self.values()
        return reduce_mean(table) if table.numel() else 0.0

    def reset(self) -> None:
        self.rows.clear()
