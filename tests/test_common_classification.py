"""ROC AUC and curve against hand-computed cases."""
import math

import numpy as np
import pytest

from common.metrics.classification import classification_metrics, roc_auc, roc_curve


def test_auc_hand_computed_with_a_tie():
    # positives 0.9, 0.4; negatives 0.4, 0.1 -> pairs: (0.9>0.4) 1, (0.9>0.1) 1, (0.4=0.4) 0.5, (0.4>0.1) 1
    assert roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)


def test_auc_perfect_inverted_and_undefined():
    assert roc_auc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0
    assert roc_auc([1, 0, 0], [0.1, 0.2, 0.3]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_curve_area_equals_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 2)  # many ties
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(thr[1:]) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))


def test_classification_metrics_hand_computed():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(probs, labels)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]] and m["n"] == 5
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["balanced_acc"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(5 / 6)  # positives 0.4, 0.7, 0.8 vs negatives 0.1, 0.55: 5 of 6 pairs


def test_classification_metrics_multiclass_skips_absent_classes():
    # class 2 never occurs: its recall is left out of the balanced accuracy, its AUC is undefined
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics(probs, labels)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert m["balanced_acc"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["auc"] == pytest.approx(np.mean([roc_auc(labels == 0, probs[:, 0]), roc_auc(labels == 1, probs[:, 1])]))
