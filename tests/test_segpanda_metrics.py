"""segPANDA evaluation: mIoU / Dice / pixel accuracy against hand-computed confusion matrices,
2 processes equal to 1, sliding-window prediction, the report names PatchTCGA's variant, overlays."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from common import dist
from common.amp import MixedPrecision
from common.metrics.miou import ConfusionMatrix
from segpanda.eval import PALETTE, evaluate, format_metrics, make_eval_loader, overlay_panel, predict
from common_testutils import run_workers

# target / prediction of a 3-class 2x4 image, hand-counted
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
# rows = truth, cols = prediction
HAND = [[1, 1, 1],
        [0, 2, 0],
        [1, 0, 2]]


def test_hand_computed_confusion_matrix_and_metrics():
    cm = ConfusionMatrix(3, ignore_index=None)
    cm.update(PRED, TARGET)
    assert cm.mat.tolist() == HAND
    m = cm.compute()
    # IoU_c = tp / (row + col - tp): class 0: 1/(3+2-1), class 1: 2/(2+3-2), class 2: 2/(3+3-2)
    assert m["iou_per_class_nan"] == pytest.approx([1 / 4, 2 / 3, 2 / 4])
    assert m["dice_per_class_nan"] == pytest.approx([2 / 5, 4 / 5, 4 / 6])
    assert m["pixel_accuracy"] == pytest.approx(5 / 8)
    assert m["miou_macro_nan"] == pytest.approx((1 / 4 + 2 / 3 + 2 / 4) / 3)
    assert m["miou_micro"] == pytest.approx(5 / (5 + 3 + 3))  # = acc / (2 - acc)
    assert m["patchtcga_miou_macro"] == pytest.approx((1 / 4 + 2 / 3 + 2 / 4) / 3, abs=1e-5)


def test_absent_class_nan_versus_patchtcga_zero():
    cm = ConfusionMatrix(6, ignore_index=None)
    cm.update(PRED, TARGET)  # classes 3-5 absent everywhere
    m = cm.compute()
    assert all(math.isnan(v) for v in m["iou_per_class_nan"][3:])
    assert m["miou_macro_nan"] == pytest.approx((1 / 4 + 2 / 3 + 2 / 4) / 3)
    assert m["patchtcga_miou_macro"] == pytest.approx((1 / 4 + 2 / 3 + 2 / 4) / 6, abs=1e-5)  # divided by 6
    text = format_metrics(m)
    assert "patchtcga_miou_macro" in text and "PatchTCGA" in text and "gleason5" in text
    assert f"{(1 / 4 + 2 / 3 + 2 / 4) / 6:.4f}" in text


class ColourClassifier(nn.Module):
    """Deterministic 'model': class = round(red channel / 40) (one-hot logits)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        red = ((x * self.std + self.mean) * 255)[:, 0]
        cls = (red / 40).round().clamp(0, 5).long()
        return {"out": nn.functional.one_hot(cls, 6).permute(0, 3, 1, 2).float()}


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_tiles(root, n=5, size=40):
    """Tiles whose red channel encodes a 'prediction' that is right in most pixels."""
    rng = np.random.default_rng(1)
    for i in range(n):
        labels = rng.integers(0, 6, (size, size)).astype(np.uint8)
        pred = np.where(rng.random((size, size)) < 0.7, labels, rng.integers(0, 6, (size, size))).astype(np.uint8)
        image = np.stack([pred * 40, np.full_like(pred, 100), np.full_like(pred, 100)], -1).astype(np.uint8)
        folder = root / "test" / str(i % 3) / f"slide{i}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"t{i}.png")  # lossless, so the 'prediction' is exact
        Image.fromarray(np.repeat(labels[..., None], 3, 2)).save(folder / f"t{i}_mask.png")


def _evaluate(ctx, root, result_path):
    """Centre crops (batched) and whole tiles (sliding window) in one process group."""
    out = {}
    for crop in (24, 0):
        loader = make_eval_loader(str(root), "test", 6, crop, 2, 0, ctx)
        out[crop] = evaluate(ColourClassifier(MEAN, STD), loader, MixedPrecision(ctx.device, "fp32"), ctx, 6, 16,
                             MEAN, STD, sw_batch_size=3)
    if ctx.is_main:
        result_path.write_text(json.dumps(out))


def _expected(root, crop):
    from segpanda.dataset import center_crop, find_samples, read_image, read_mask
    cm = torch.zeros(6, 6, dtype=torch.int64)
    for s in find_samples(root, "test"):
        img, lab = read_image(s.image), read_mask(s.mask)
        if crop:
            img, lab = center_crop(img, crop), center_crop(lab, crop)
        pred = np.clip(np.round(img[..., 0] / 40), 0, 5).astype(np.int64)
        np.add.at(cm.numpy(), (lab.astype(np.int64), pred), 1)
    return cm


def test_two_processes_equal_one_and_hand_count(tmp_path):
    make_tiles(tmp_path)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _evaluate(dist.setup("cpu"), tmp_path, one)
    run_workers(_evaluate, 2, tmp_path, two)
    for crop in ("24", "0"):
        check_equal(json.loads(one.read_text())[crop], json.loads(two.read_text())[crop],
                    _expected(tmp_path, int(crop)))


def check_equal(m1, m2, expected):
    assert m1["confusion_matrix"] == expected.tolist()
    assert m2["confusion_matrix"] == m1["confusion_matrix"]
    for key in ("patchtcga_miou_macro", "miou_macro_nan", "pixel_accuracy", "mdice_macro_nan", "miou_micro"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-12)
    e = expected.double()
    assert m1["pixel_accuracy"] == pytest.approx(float(e.trace() / e.sum()))


def test_sliding_window_prediction_equals_whole_image_for_a_pointwise_model():
    model = ColourClassifier(MEAN, STD)
    x = torch.rand(2, 3, 50, 37)
    amp = MixedPrecision(torch.device("cpu"), "fp32")
    whole = predict(model, x, amp, crop_size=64)
    windows = predict(model, x, amp, crop_size=16, sw_batch_size=5)
    assert torch.equal(whole.argmax(1), windows.argmax(1))


def test_overlay_panel_layout_and_colours():
    image = np.full((8, 10, 3), 100, np.uint8)
    target = np.zeros((8, 10), np.int64)
    pred = np.full((8, 10), 5, np.int64)
    panel = overlay_panel(image, target, pred, alpha=1.0)
    assert panel.shape == (8, 3 * 10 + 8, 3)
    assert (panel[:, :10] == 100).all() and (panel[:, 10:14] == 255).all()
    assert (panel[:, 14:24] == PALETTE[0]).all() and (panel[:, 28:] == PALETTE[5]).all()
