"""ROC AUC and curve against hand-computed cases."""
import math

import numpy as np
import pytest

from common.metrics.classification import roc_auc, roc_curve


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
