"""common.metrics.dice (MONAI DiceMetric conventions) and common.metrics.miou (confusion matrix,
torchvision style and PatchTCGA variants), against hand-computed cases and over 2 processes."""
from __future__ import annotations

import math

import pytest
import torch

from common.metrics.dice import DiceAccumulator, dice_per_sample, reduce_mean
from common.metrics.miou import PATCHTCGA_EPS, ConfusionMatrix, metrics_from_confusion
from common_testutils import run_workers

nan = float("nan")


def _same(a, b, tol=1e-12):
    """Element-wise equality that treats NaN == NaN."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=tol), (a, b)


# ============================================================================= Dice
def _two_sample_batch():
    """(B=2, C=2, 2, 2) one-hot-like binarised tensors, flattened spatial order shown in comments.

    sample 0: ch0 P=1100 G=1000 -> 2*1/(2+1) = 2/3 ; ch1 P=0011 G=0111 -> 2*2/(2+3) = 4/5
    sample 1: ch0 P=1111 G=1111 -> 1          ; ch1 P=0000 G=0000 -> empty GT
    """
    pred = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]]).view(2, 2, 2, 2)
    gt = torch.tensor([[[1, 0, 0, 0], [0, 1, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]]).view(2, 2, 2, 2)
    return pred, gt


def test_dice_hand_computed_with_nan_for_empty_ground_truth():
    pred, gt = _two_sample_batch()
    d = dice_per_sample(pred, gt)
    assert d.dtype == torch.float64 and d.shape == (2, 2)
    _same(d.flatten().tolist(), [2 / 3, 4 / 5, 1.0, nan])
    # mean: sample 0 -> (2/3 + 4/5)/2 = 11/15; sample 1 -> its only valid channel: 1
    assert reduce_mean(d) == pytest.approx((11 / 15 + 1) / 2, abs=1e-12)


def test_dice_ignore_empty_false():
    pred, gt = _two_sample_batch()
    _same(dice_per_sample(pred, gt, ignore_empty=False).flatten().tolist(), [2 / 3, 4 / 5, 1.0, 1.0])
    pred2 = pred.clone()
    pred2[1, 1, 0, 0] = 1  # a false positive where the ground truth is empty -> 0
    _same(dice_per_sample(pred2, gt, ignore_empty=False)[1].tolist(), [1.0, 0.0])
    _same(dice_per_sample(pred2, gt, ignore_empty=True)[1].tolist(), [1.0, nan])


def test_dice_include_background_false_drops_channel_0_and_nan_sample_is_excluded():
    pred, gt = _two_sample_batch()
    d = dice_per_sample(pred, gt, include_background=False)
    assert d.shape == (2, 1)
    _same(d.flatten().tolist(), [4 / 5, nan])
    assert reduce_mean(d) == pytest.approx(4 / 5)  # the all-NaN sample does not count
    d2 = dice_per_sample(pred, gt, include_background=False, ignore_empty=False)
    assert reduce_mean(d2) == pytest.approx((4 / 5 + 1) / 2)


def test_dice_all_nan_reduces_to_zero():
    z = torch.zeros(3, 1, 4, 4)
    p = z.clone()
    p[0, 0, 0, 0] = 1
    d = dice_per_sample(p, z)
    assert torch.isnan(d).all()
    assert reduce_mean(d) == 0.0


def test_dice_single_channel_is_an_index_map_compared_as_class_1():
    # pred 0 1 1 2 / gt 1 1 2 2 -> P = (x==1) = 0110, G = 1100 -> 2*1/(2+2) = 0.5; class 2 ignored
    pred = torch.tensor([0, 1, 1, 2]).view(1, 1, 2, 2)
    gt = torch.tensor([1, 1, 2, 2]).view(1, 1, 2, 2)
    assert dice_per_sample(pred, gt).item() == pytest.approx(0.5)
    assert dice_per_sample(pred, gt, include_background=False).item() == pytest.approx(0.5)
    # label 2 only: G empty for class 1 -> NaN
    assert math.isnan(dice_per_sample(pred, torch.full_like(gt, 2)).item())


def test_dice_3d_and_no_smoothing():
    pred = torch.zeros(1, 2, 3, 3, 3)
    gt = torch.zeros(1, 2, 3, 3, 3)
    pred[0, 1, 0, 0, :] = 1   # 3 voxels
    gt[0, 1, 0, :, 0] = 1     # 3 voxels, 1 shared
    pred[0, 0] = 1 - pred[0, 1]
    gt[0, 0] = 1 - gt[0, 1]
    d = dice_per_sample(pred, gt)
    # background: |P| = |G| = 24, overlap = 27 - |fg_P u fg_G| = 27 - 5 = 22 -> 44/48
    assert d[0].tolist() == pytest.approx([44 / 48, 2 / 6], abs=1e-15)


def test_dice_shape_errors():
    with pytest.raises(ValueError, match="differ"):
        dice_per_sample(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="expected"):
        dice_per_sample(torch.zeros(2, 4), torch.zeros(2, 4))


def test_dice_accumulator_collects_per_sample_values_and_reduces_once():
    pred, gt = _two_sample_batch()
    acc = DiceAccumulator()
    acc.update(pred, gt)
    acc.update(pred[:1], gt[:1])
    table = acc.values()
    assert table.shape == (3, 2)
    # once over all samples: (11/15 + 1 + 11/15) / 3 -- not the mean of batch means
    assert acc.compute() == pytest.approx((11 / 15 + 1 + 11 / 15) / 3)
    acc.reset()
    assert acc.compute() == 0.0


# ============================================================================= confusion matrix / mIoU
# target 0 0 1 1 2 2 255 1 / pred 0 1 1 1 2 0 2 2 -> valid pairs (t, p):
# (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,2); the 255 pixel is ignored.
TARGET = torch.tensor([0, 0, 1, 1, 2, 2, 255, 1])
PRED = torch.tensor([0, 1, 1, 1, 2, 0, 2, 2])
MATRIX = [[1, 1, 0], [0, 2, 1], [1, 0, 1]]  # rows: ground truth, columns: prediction


def test_confusion_matrix_hand_computed_with_ignore_index():
    cm = ConfusionMatrix(3)
    cm.update(PRED.view(2, 4), TARGET.view(2, 4))
    assert cm.mat.tolist() == MATRIX
    m = cm.compute()
    assert m["pixel_accuracy"] == pytest.approx(4 / 7)
    _same(m["iou_per_class_nan"], [1 / 3, 1 / 2, 1 / 3])
    _same(m["dice_per_class_nan"], [1 / 2, 2 / 3, 1 / 2])
    _same(m["class_accuracy_nan"], [1 / 2, 2 / 3, 1 / 2])
    assert m["miou_macro_nan"] == pytest.approx(7 / 18)
    assert m["mdice_macro_nan"] == pytest.approx(5 / 9)
    assert m["miou_micro"] == pytest.approx(4 / 10)


def test_patchtcga_variants_hand_computed():
    m = metrics_from_confusion(torch.tensor(MATRIX))
    e = PATCHTCGA_EPS
    assert e == 1e-5
    # per class TP/FP/FN: (1,1,1) (2,1,1) (1,1,1)
    assert m["patchtcga_miou_macro"] == pytest.approx((1 / (3 + e) + 2 / (4 + e) + 1 / (3 + e)) / 3, rel=1e-12)
    assert m["patchtcga_mdice_macro"] == pytest.approx((2 / (4 + e) + 4 / (6 + e) + 2 / (4 + e)) / 3, rel=1e-12)
    assert m["patchtcga_miou_micro"] == pytest.approx(4 / (10 + e), rel=1e-12)
    assert m["patchtcga_mdice_micro"] == pytest.approx(8 / (14 + e), rel=1e-12)
    assert m["patchtcga_mpa"] == pytest.approx((1 / (2 + e) + 2 / (3 + e) + 1 / (2 + e)) / 3, rel=1e-12)


def test_single_label_identities():
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 5, (1000,), generator=gen)
    p = torch.where(torch.rand(1000, generator=gen) < 0.7, t, torch.randint(0, 5, (1000,), generator=gen))
    cm = ConfusionMatrix(5)
    cm.update(p, t)
    m = cm.compute()
    acc = m["pixel_accuracy"]
    assert acc == pytest.approx((p == t).double().mean().item())
    assert m["miou_micro"] == pytest.approx(acc / (2 - acc), rel=1e-12)
    assert m["patchtcga_miou_micro"] == pytest.approx(acc / (2 - acc), rel=1e-7)
    assert m["patchtcga_mdice_micro"] == pytest.approx(acc, rel=1e-7)


def test_absent_class_is_nan_in_the_nan_family_and_about_zero_in_patchtcga():
    cm = ConfusionMatrix(4)  # class 3 in neither prediction nor ground truth
    cm.update(PRED, TARGET)
    m = cm.compute()
    assert math.isnan(m["iou_per_class_nan"][3]) and math.isnan(m["dice_per_class_nan"][3])
    assert m["miou_macro_nan"] == pytest.approx(7 / 18)  # NaN excluded from the mean
    assert m["patchtcga_miou_macro"] == pytest.approx(7 / 24, rel=1e-4)  # divides by 4 classes
    # a class only predicted (never in ground truth): IoU 0, accuracy undefined
    cm2 = ConfusionMatrix(4)
    cm2.update(torch.tensor([3, 0]), torch.tensor([0, 0]))
    m2 = cm2.compute()
    assert m2["iou_per_class_nan"][3] == 0.0 and math.isnan(m2["class_accuracy_nan"][3])
    _same(m2["iou_per_class_nan"], [0.5, nan, nan, 0.0])
    assert m2["miou_macro_nan"] == pytest.approx(0.25)


def test_ignore_index_inside_the_class_range_and_none():
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(PRED, TARGET)
    assert cm.mat.tolist() == [[0, 0, 0], [0, 2, 1], [1, 0, 1]]
    cm = ConfusionMatrix(3, ignore_index=None)  # out-of-range targets (255) are still dropped
    cm.update(PRED, TARGET)
    assert cm.mat.tolist() == MATRIX
    cm.reset()
    assert cm.mat.sum().item() == 0
    with pytest.raises(ValueError, match="differ"):
        cm.update(PRED[:3], TARGET)


def test_accumulates_over_batches():
    cm = ConfusionMatrix(3)
    cm.update(PRED[:4], TARGET[:4])
    cm.update(PRED[4:], TARGET[4:])
    assert cm.mat.tolist() == MATRIX
    assert cm.reduce() is cm and cm.mat.tolist() == MATRIX  # no process group: unchanged


# ============================================================================= 2 processes
def _segmentation_data():
    gen = torch.Generator().manual_seed(11)
    target = torch.randint(0, 4, (6, 8, 8), generator=gen)
    target[0, :2] = 255
    pred = torch.randint(0, 4, (6, 8, 8), generator=gen)
    onehot_p = torch.nn.functional.one_hot(pred.clamp(max=3), 4).permute(0, 3, 1, 2)
    onehot_t = torch.nn.functional.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2)
    onehot_t[2, 3] = 0  # an empty ground-truth channel -> NaN entry
    onehot_t[4, 1:] = 0  # a sample with no foreground at all
    return pred, target, onehot_p, onehot_t


def _metrics_worker(ctx, out_dir):
    pred, target, op, ot = _segmentation_data()
    rows = [0, 1, 2] if ctx.rank == 0 else [3, 4, 5]
    cm = ConfusionMatrix(4)
    cm.update(pred[rows], target[rows])
    local = cm.mat.clone()
    cm.reduce()
    acc = DiceAccumulator(include_background=False)
    acc.update(op[rows[:1]], ot[rows[:1]])
    acc.update(op[rows[1:]], ot[rows[1:]])
    empty = DiceAccumulator(include_background=False)  # a rank that saw nothing
    if ctx.rank == 1:
        empty.update(op, ot)
    torch.save({"local": local, "mat": cm.mat, "metrics": cm.compute(), "dice_values": acc.values(),
                "dice": acc.compute(), "dice_one_rank": empty.compute()}, f"{out_dir}/rank{ctx.rank}.pt")


def test_two_process_reduction_equals_one_process(tmp_path):
    run_workers(_metrics_worker, 2, str(tmp_path))
    pred, target, op, ot = _segmentation_data()
    single = ConfusionMatrix(4)
    single.update(pred, target)
    acc = DiceAccumulator(include_background=False)
    acc.update(op, ot)
    expected_table = acc.values()
    assert torch.isnan(expected_table).any()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert not torch.equal(results[0]["local"], single.mat)  # each rank saw only half
    for res in results:
        assert torch.equal(res["mat"], single.mat)
        expected = single.compute()
        assert res["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            _same(value if isinstance(value, list) else [value], res["metrics"][key] if isinstance(value, list)
                  else [res["metrics"][key]], tol=0)
        assert torch.equal(torch.isnan(res["dice_values"]), torch.isnan(expected_table))
        assert torch.allclose(res["dice_values"], expected_table, equal_nan=True, rtol=0, atol=0)
        assert res["dice"] == pytest.approx(acc.compute(), rel=1e-14)
        assert res["dice_one_rank"] == pytest.approx(acc.compute(), rel=1e-14)
