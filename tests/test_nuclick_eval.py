"""nuclick/eval.py: instance-level scores on hand-made maps and the instance-map readers."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from nuclick.eval import instance_scores, read_instance_map


def test_instance_scores_hand_case():
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, 0:2] = 1  # 4 px, predicted exactly
    gt[5:7, 5:9] = 2  # 8 px, predicted half (4 px) by instance 7
    gt[9, 0] = 3  # 1 px, missed
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 4
    pred[5:7, 5:7] = 7
    pred[0, 9] = 9  # false positive, 1 px
    s = instance_scores(pred, gt)
    per = {1: 1.0, 2: 2 * 4 / (8 + 4), 3: 0.0}
    assert s["per_nucleus"] == pytest.approx(per)
    assert s["instance_dice"] == pytest.approx(np.mean(list(per.values())))
    g_term = (4 * 1.0 + 8 * per[2] + 1 * 0.0) / 13  # ground-truth side, area-weighted
    p_term = (4 * 1.0 + 4 * per[2] + 1 * 0.0) / 9  # prediction side
    assert s["object_dice"] == pytest.approx(0.5 * (g_term + p_term))
    assert s["pixel_dice"] == pytest.approx(2 * 8 / (13 + 9))
    assert (s["n_ground_truth"], s["n_predicted"]) == (3, 3)
    perfect = instance_scores(gt * 10, gt)
    assert perfect["instance_dice"] == perfect["object_dice"] == perfect["pixel_dice"] == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        instance_scores(gt[:5], gt)


def test_read_instance_map_formats(tmp_path):
    inst = np.zeros((6, 5), np.uint16)
    inst[1:3, 1:3], inst[4, 4] = 300, 2
    Image.fromarray(inst).save(tmp_path / "i.png")
    np.savez(tmp_path / "i.npz", nuc_raster=inst.astype(np.int32))
    savemat(str(tmp_path / "i.mat"), {"inst_map": (inst > 0).astype(float) + (inst == 2), "inst_type": np.ones((2, 1)),
                                      "inst_centroid": np.zeros((2, 2))})
    np.testing.assert_array_equal(read_instance_map(tmp_path / "i.png"), inst)
    np.testing.assert_array_equal(read_instance_map(tmp_path / "i.npz"), inst)
    assert sorted(np.unique(read_instance_map(tmp_path / "i.mat"))) == [0, 1, 2]
