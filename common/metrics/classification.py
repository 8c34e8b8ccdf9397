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
