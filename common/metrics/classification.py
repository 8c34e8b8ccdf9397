"""Classification metrics: ROC curve and AUC (ties handled as average ranks), and the summary of a
classifier's predictions (accuracy, balanced accuracy, AUC, confusion matrix)."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from common.metrics.miou import ConfusionMatrix


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U).
    NaN when only one class is present."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, thresholds), thresholds descending, from (0, 0)."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[last_of_group]]


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present), AUC (binary: of the
    positive class's probability; multi-class: mean one-vs-rest over the defined ones) and the
    confusion matrix (rows = truth, columns = prediction) of (N, C) probabilities and (N,) labels."""
    c = probs.shape[1]
    pred = probs.argmax(1)
    counts = ConfusionMatrix(c, ignore_index=None)
    counts.update(torch.as_tensor(pred), torch.as_tensor(labels))
    cm = counts.mat.numpy()
    support = cm.sum(1)
    recall = np.diag(cm)[support > 0] / support[support > 0]
    aucs = [roc_auc(labels == k, probs[:, k]) for k in (range(c) if c > 2 else [1])]
    return {"acc": float((pred == labels).mean()) if len(labels) else float("nan"),
            "balanced_acc": float(recall.mean()) if len(recall) else float("nan"),
            "auc": float(np.nanmean(aucs)) if not all(np.isnan(aucs)) else float("nan"),
            "n": int(len(labels)), "confusion_matrix": cm.tolist()}


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict[str, float]:
    """Slide-level summary of binary scores: AUC, and at ``threshold`` the accuracy, balanced
    accuracy, sensitivity (recall of positives) and specificity (recall of negatives)."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pred = s >= threshold
    sens = float(pred[y].mean()) if y.any() else float("nan")
    spec = float((~pred[~y]).mean()) if (~y).any() else float("nan")
    return {"auc": roc_auc(y, s), "acc": float((pred == y).mean()) if len(y) else float("nan"),
            "balanced_acc": float(np.nanmean([sens, spec])) if len(y) else float("nan"),
            "sensitivity": sens, "specificity": spec, "n": int(len(y)), "positives": int(y.sum())}


def bootstrap_ci(labels, scores, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 threshold: float = 0.5) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of every :func:`binary_metrics` value.

    Stratified: each resample draws the positives and the negatives with replacement from their own
    class (so every resample has both classes and a defined AUC, and the class balance of the test
    set is kept). ``{metric: (low, high)}``; NaN bounds when a class is absent or ``resamples`` is 0."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    names = ("auc", "acc", "balanced_acc", "sensitivity", "specificity")
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if resamples <= 0 or not len(pos) or not len(neg):
        return {k: (float("nan"), float("nan")) for k in names}
    rng = np.random.default_rng(seed)
    values = {k: np.empty(resamples) for k in names}
    for b in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        m = binary_metrics(y[idx], s[idx], threshold)
        for k in names:
            values[k][b] = m[k]
    tail = 100 * (1 - level) / 2
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in values.items()}
