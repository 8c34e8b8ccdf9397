"""Tests for common.metrics.froc: hand-computed cases plus parity with a direct transcription of the
official Camelyon16 ``Evaluation_FROC.py`` functions (written from shared/reference/camelyon.md §8)."""
import numpy as np
import pytest
from scipy import ndimage as nd
from skimage import measure

from common.metrics.froc import (SlideResult, compute_froc, detections_to_level0, evaluation_mask,
                                 froc_curve, froc_score, itc_labels, map_to_level0, nms, slide_fp_tp)

RATES = [0.25, 0.5, 1, 2, 4, 8]


# ----------------------------------------------------------------------------------------------
# Reference transcriptions (kept deliberately literal, loops and Python lists included)
# ----------------------------------------------------------------------------------------------

def naive_nms(prob, threshold, box):
    """MONAI ProbNMS / NCRF loop: rescan with argmax, zero a clipped box, strict threshold."""
    prob = prob.copy()
    lo, hi = box // 2, box - box // 2
    out = []
    while np.max(prob) > threshold:
        r, c = np.unravel_index(np.argmax(prob), prob.shape)
        out.append((float(prob[r, c]), int(r), int(c)))
        prob[max(r - lo, 0):r + hi, max(c - lo, 0):c + hi] = 0
    return out


def official_evaluation_mask(mask255, resolution, level):
    """computeEvaluationMask on channel 0 of the level-`level` mask (tumour = 255)."""
    distance = nd.distance_transform_edt(255 - mask255)
    threshold = 75 / (resolution * pow(2, level) * 2)
    binary = distance < threshold
    filled_image = nd.binary_fill_holes(binary)
    return measure.label(filled_image, connectivity=2)


def official_itc_list(evaluation_mask_, resolution, level):
    """computeITCList (skimage >= 0.26 spells major_axis_length as axis_major_length)."""
    max_label = np.amax(evaluation_mask_)
    properties = measure.regionprops(evaluation_mask_)
    isolated_tumor_cells = []
    threshold = 275 / (resolution * pow(2, level))
    for i in range(0, max_label):
        if properties[i].axis_major_length < threshold:
            isolated_tumor_cells.append(i + 1)
    return isolated_tumor_cells


def official_fp_tp(ycorr, xcorr, probs, is_tumor, evaluation_mask_, isolated_tumor_cells, level):
    """compute_FP_TP_Probs without the summaries."""
    max_label = np.amax(evaluation_mask_)
    fp_probs = []
    tp_probs = np.zeros((max_label,), dtype=np.float32)
    if is_tumor:
        for i in range(0, len(xcorr)):
            hitted = evaluation_mask_[int(ycorr[i] / pow(2, level)), int(xcorr[i] / pow(2, level))]
            if hitted == 0:
                fp_probs.append(probs[i])
            elif hitted not in isolated_tumor_cells:
                if probs[i] > tp_probs[hitted - 1]:
                    tp_probs[hitted - 1] = probs[i]
    else:
        for i in range(0, len(xcorr)):
            fp_probs.append(probs[i])
    num_of_tumors = max_label - len(isolated_tumor_cells)
    return fp_probs, tp_probs, num_of_tumors


def official_froc(froc_data):
    """computeFROC; froc_data = [names, per-slide FP lists, per-slide TP arrays, per-slide counts]."""
    unlisted_fps = [item for sublist in froc_data[1] for item in sublist]
    unlisted_tps = [item for sublist in froc_data[2] for item in sublist]
    total_fps, total_tps = [], []
    all_probs = sorted(set(unlisted_fps + unlisted_tps))
    for thresh in all_probs[1:]:
        total_fps.append((np.asarray(unlisted_fps) >= thresh).sum())
        total_tps.append((np.asarray(unlisted_tps) >= thresh).sum())
    total_fps.append(0)
    total_tps.append(0)
    total_fps = np.asarray(total_fps) / float(len(froc_data[0]))
    total_sensitivity = np.asarray(total_tps) / float(sum(froc_data[3]))
    return total_fps, total_sensitivity


def official_score(total_fps, total_sensitivity):
    return np.mean(np.interp(RATES, total_fps[::-1], total_sensitivity[::-1]))


# ----------------------------------------------------------------------------------------------
# NMS
# ----------------------------------------------------------------------------------------------

def test_nms_strict_threshold():
    prob = np.array([[0.5, 0.0, 0.0, 0.0, 0.6]])
    # 0.5 is not > 0.5; box 1 leaves the other pixel untouched.
    assert nms(prob, threshold=0.5, box_size=1) == [(0.6, 0, 4)]
    assert nms(prob, threshold=0.6, box_size=1) == []
    assert nms(prob, threshold=0.4, box_size=1) == [(0.6, 0, 4), (0.5, 0, 0)]


def test_nms_tie_break_and_odd_box():
    row = np.array([[0.6, 0.7, 0.8, 0.9, 0.8, 0.7, 0.6, 0.55]])
    # box (1, 3) zeroes cols [i-1, i+2): pick 3 -> zero 2..4; remaining max 0.7 at cols 1 and 5,
    # first in C order is 1 -> zero 0..2; then col 5 -> zero 4..6; then col 7.
    assert nms(row, 0.5, (1, 3)) == [(0.9, 0, 3), (0.7, 0, 1), (0.7, 0, 5), (0.55, 0, 7)]


def test_nms_even_box_is_asymmetric():
    row = np.array([[0.6, 0.7, 0.8, 0.9, 0.8, 0.7, 0.6, 0.55]])
    # box (1, 4) zeroes cols [i-2, i+2): pick 3 -> zero 1..4; col 5 (0.7) -> zero 3..6;
    # col 0 (0.6) -> zero 0..1; col 7 (0.55).
    assert nms(row, 0.5, (1, 4)) == [(0.9, 0, 3), (0.7, 0, 5), (0.6, 0, 0), (0.55, 0, 7)]


def test_nms_tie_break_first_in_c_order_2d():
    prob = np.zeros((5, 5))
    prob[3, 1] = prob[1, 3] = 0.9
    # Equal maxima: (1, 3) comes first in C order; a 5x5 box around it covers rows -1..3 and
    # cols 1..5, so (3, 1) is suppressed too.
    assert nms(prob, 0.5, 5) == [(0.9, 1, 3)]
    assert nms(prob, 0.5, 2) == [(0.9, 1, 3), (0.9, 3, 1)]


def test_nms_box_clipped_at_border():
    row = np.array([[0.0, 0.9, 0.0, 0.0, 0.8, 0.7]])
    # box 6 at col 1 -> [-2, 4) clipped to [0, 4) (an unclipped slice -2:4 would be empty);
    # col 4 -> [1, 7) clipped to [1, 6) removes col 5.
    assert nms(row, 0.5, (1, 6)) == [(0.9, 0, 1), (0.8, 0, 4)]
    prob = np.zeros((4, 4))
    prob[0, 0], prob[3, 3], prob[0, 3] = 0.9, 0.8, 0.7
    # box 4: (0,0) zeroes rows/cols [0,2); (3,3) zeroes rows/cols [1,4); (0,3) survives.
    assert nms(prob, 0.5, 4) == [(0.9, 0, 0), (0.8, 3, 3), (0.7, 0, 3)]
    assert nms(prob, 0.5, 8) == [(0.9, 0, 0)]


def test_nms_does_not_mutate_input():
    rng = np.random.default_rng(0)
    prob = rng.random((30, 20))
    keep = prob.copy()
    assert len(nms(prob, 0.5, 4)) > 0
    assert len(nms(prob, 0.5, 4, sigma=1.5)) > 0
    np.testing.assert_array_equal(prob, keep)


def test_nms_sigma_smooths_first():
    rng = np.random.default_rng(1)
    prob = rng.random((40, 30))
    smoothed = nd.gaussian_filter(prob, sigma=2.0)
    got = nms(prob, 0.5, 6, sigma=2.0)
    assert got == naive_nms(smoothed, 0.5, 6)
    assert got != nms(prob, 0.5, 6)


@pytest.mark.parametrize("seed", range(40))
def test_nms_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 40, size=2))
    prob = np.round(rng.uniform(-0.2, 1.0, size=shape) * 20) / 20  # many ties
    box = int(rng.integers(1, 13))
    threshold = float(rng.choice([0.0, 0.3, 0.5, 0.85]))
    assert nms(prob, threshold, box) == naive_nms(prob, threshold, box)


def test_nms_matches_naive_on_smooth_map():
    rng = np.random.default_rng(7)
    prob = nd.gaussian_filter(rng.random((300, 200)), 3)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    expected = naive_nms(prob, 0.5, 48)
    assert len(expected) > 3
    assert nms(prob, 0.5, 48) == expected


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError):
        nms(np.array([[np.nan, 0.9]]))
    with pytest.raises(ValueError):
        nms(np.zeros((3, 3)), threshold=-0.1)
    with pytest.raises(ValueError):
        nms(np.zeros((3, 3, 3)))


# ----------------------------------------------------------------------------------------------
# Coordinates
# ----------------------------------------------------------------------------------------------

def test_map_to_level0():
    assert map_to_level0(0, 0, 64) == (32, 32)
    assert map_to_level0(2, 5, 64) == (int(5.5 * 64), int(2.5 * 64)) == (352, 160)
    # non-integer downsample: int(3.5 * 2.0005) = int(7.00175) = 7, int(10.5 * 2.0005) = 21
    assert map_to_level0(10, 3, 2.0005) == (7, 21)
    xs, ys = map_to_level0(np.array([0, 1, 7]), np.array([4, 0, 9]), 32)
    np.testing.assert_array_equal(xs, [144, 16, 304])
    np.testing.assert_array_equal(ys, [16, 48, 240])


def test_level0_round_trip_is_exact():
    rows, cols = np.arange(0, 500), np.arange(500, 0, -1)
    xs, ys = map_to_level0(rows, cols, 64)
    np.testing.assert_array_equal(np.trunc(ys / 64).astype(int), rows)
    np.testing.assert_array_equal(np.trunc(xs / 64).astype(int), cols)


def test_detections_to_level0():
    probs, xs, ys = detections_to_level0([(0.9, 1, 2), (0.6, 0, 0)], 32)
    np.testing.assert_array_equal(probs, [0.9, 0.6])
    np.testing.assert_array_equal(xs, [80, 16])
    np.testing.assert_array_equal(ys, [48, 16])
    probs, xs, ys = detections_to_level0([], 32)
    assert len(probs) == len(xs) == len(ys) == 0


# ----------------------------------------------------------------------------------------------
# Curve and score: quirks and edge cases
# ----------------------------------------------------------------------------------------------

def test_froc_quirk_no_miss_scores_zero():
    # thresholds = sorted{0.5, 0.9}[1:] = [0.9]: (1 FP, 0 TP), then (0, 0) -> flat zero curve.
    fps, sens = froc_curve([0.9], [0.5], num_targets=1, num_images=1)
    np.testing.assert_array_equal(fps, [1.0, 0.0])
    np.testing.assert_array_equal(sens, [0.0, 0.0])
    assert froc_score(fps, sens)[0] == 0.0


def test_froc_quirk_with_miss_scores_one_third():
    # thresholds = sorted{0, 0.5, 0.9}[1:] = [0.5, 0.9]: (1, 1), (1, 0), (0, 0);
    # fps [1, 1, 0], sens [0.5, 0, 0]; interp at 0.25, 0.5 -> 0; at >= 1 -> 0.5 => 2/6.
    fps, sens = froc_curve([0.9], [0.5, 0.0], num_targets=2, num_images=1)
    np.testing.assert_array_equal(fps, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(sens, [0.5, 0.0, 0.0])
    score, at = froc_score(fps, sens)
    np.testing.assert_allclose(at, [0, 0, 0.5, 0.5, 0.5, 0.5])
    assert score == pytest.approx(1 / 3)
    assert official_score(*official_froc([["a"], [[0.9]], [np.float32([0.5, 0])], [2]])) == \
        pytest.approx(1 / 3)


def test_froc_float32_tp_threshold_quirk():
    # FP 0.7 (float64) and TP slot float32(0.7) = 0.69999998... are two thresholds; at t = 0.7 the
    # official float32_array >= python_float comparison still counts the TP (done in float32).
    fps, sens = froc_curve([0.7], np.float32([0.7, 0.0]), num_targets=2, num_images=1)
    np.testing.assert_array_equal(fps, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(sens, [0.5, 0.5, 0.0])
    ofps, osens = official_froc([["a"], [[0.7]], [np.float32([0.7, 0.0])], [2]])
    np.testing.assert_array_equal(fps, ofps)
    np.testing.assert_array_equal(sens, osens)
    # reversed: fps [0, 1, 1], sens [0, .5, .5]: 0.125, 0.25, then 0.5 x4 -> 2.375 / 6
    assert froc_score(fps, sens)[0] == pytest.approx(2.375 / 6)


def test_froc_edge_cases():
    # no detections at all, one missed lesion: no thresholds left, curve is the single (0, 0)
    fps, sens = froc_curve([], np.zeros(1, np.float32), num_targets=1, num_images=3)
    np.testing.assert_array_equal(fps, [0.0])
    np.testing.assert_array_equal(sens, [0.0])
    assert froc_score(fps, sens)[0] == 0.0
    # no targets at all: sensitivity defined as 0 (the official script would give NaN)
    fps, sens = froc_curve([0.9, 0.6, 0.7], [], num_targets=0, num_images=2)
    np.testing.assert_array_equal(fps, [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(sens, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        froc_curve([0.9], [], num_targets=0, num_images=0)
    with pytest.raises(ValueError):
        compute_froc([])


def test_froc_score_clamps_and_custom_rates():
    fps, sens = np.array([3.0, 1.0, 0.0]), np.array([0.9, 0.6, 0.0])
    # reversed: (0, 0), (1, .6), (3, .9): 0.5 -> .3, 2 -> .75, 10 -> .9 (clamped)
    score, at = froc_score(fps, sens, rates=(0.5, 2, 10))
    np.testing.assert_allclose(at, [0.3, 0.75, 0.9])
    assert score == pytest.approx(0.65)


# ----------------------------------------------------------------------------------------------
# Evaluation mask and ITC
# ----------------------------------------------------------------------------------------------

def _two_bars(gap, shape=(30, 60)):
    m = np.zeros(shape, bool)
    m[10:20, 10:20] = True
    m[10:20, 20 + gap:30 + gap] = True
    return m


@pytest.mark.parametrize("gap, n_labels", [(8, 1), (9, 2), (12, 2)])
def test_evaluation_mask_growth_level5(gap, n_labels):
    # radius 75 / (0.243 * 32 * 2) = 4.82 px: each side grows by 4 px (distance 5 is not < 4.82),
    # so gaps of up to 8 empty columns close and 9 or more stay open.
    labels = evaluation_mask(_two_bars(gap), level=5)
    assert labels.max() == n_labels
    assert labels[15, 15] == 1 and labels[15, 25 + gap] == n_labels


@pytest.mark.parametrize("gap, n_labels", [(4, 1), (5, 2)])
def test_evaluation_mask_growth_level6_and_pixel_override(gap, n_labels):
    # MONAI level-6 variant: 75 / (15.552 * 2) = 2.411 px -> 2 px per side.
    m = _two_bars(gap)
    labels = evaluation_mask(m, level=6)
    assert labels.max() == n_labels
    np.testing.assert_array_equal(evaluation_mask(m, level=0, pixel_um=0.243 * 64), labels)


def test_evaluation_mask_exact_extent():
    m = np.zeros((40, 60), bool)
    m[10:30, 10:50] = True
    labels = evaluation_mask(m, level=5)
    assert labels[6, 30] == 1 and labels[5, 30] == 0      # distance 4 kept, 5 dropped
    assert labels[7, 7] == 1 and labels[6, 7] == 0        # sqrt(18)=4.24 kept, 5 dropped
    assert labels[33, 30] == 1 and labels[34, 30] == 0
    # strict "<": radius exactly 3 px (grow 3 µm / (0.5 µm * 2)) excludes distance 3
    exact = evaluation_mask(m, level=0, grow_um=3.0, pixel_um=0.5)
    assert exact[8, 30] == 1 and exact[7, 30] == 0


def test_evaluation_mask_fills_holes():
    m = np.zeros((60, 60), bool)
    m[10:50, 10:50] = True
    m[13:47, 13:47] = False          # hole 34 px wide; growth leaves 26 px open, fill closes it
    labels = evaluation_mask(m, level=5)
    assert labels.max() == 1
    assert labels[30, 30] == 1
    assert labels[17, 17] == 1 and labels[6, 30] == 1 and labels[5, 30] == 0
    grown_only = nd.distance_transform_edt(~m) < 75 / (0.243 * 32 * 2)
    assert not grown_only[30, 30]    # without filling the centre would be background


def test_evaluation_mask_8_connectivity_and_empty():
    m = np.zeros((5, 5), bool)
    m[1, 1] = m[2, 2] = True
    # radius 0.5 px: no growth; the diagonal pair is one 8-connected component
    labels = evaluation_mask(m, level=5, grow_um=0.243 * 32 * 2 * 0.5)
    assert labels.max() == 1 and labels[1, 1] == labels[2, 2] == 1 and labels[1, 2] == 0
    empty = evaluation_mask(np.zeros((8, 9), bool), level=5)
    assert empty.shape == (8, 9) and empty.max() == 0
    assert itc_labels(empty) == set()


def test_itc_threshold_boundary():
    # 1-px line of length L: major axis = 4 sqrt((L^2 - 1) / 12).
    # level 5 threshold 275 / 7.776 = 35.37: L=30 -> 34.62 (ITC), L=31 -> 35.78 (not).
    # level 6 threshold 17.683: L=15 -> 17.28 (ITC), L=16 -> 18.44 (not).
    lab = np.zeros((9, 40), np.int32)
    lab[1, 0:30] = 1
    lab[3, 0:31] = 2
    lab[5, 0:15] = 3
    lab[7, 0:16] = 4
    assert itc_labels(lab, level=5) == {1, 3, 4}
    assert itc_labels(lab, level=6) == {3}
    assert itc_labels(lab, level=0, pixel_um=0.243 * 64) == {3}


# ----------------------------------------------------------------------------------------------
# Hand-built slide
# ----------------------------------------------------------------------------------------------

def _disc(shape, centre, radius):
    r, c = np.ogrid[:shape[0], :shape[1]]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2


def _hand_slide():
    shape = (120, 160)
    m = np.zeros(shape, bool)
    m[10:30, 10:60] = True                 # lesion A, grows to ~28 x 58 -> major axis ~67
    m |= _disc(shape, (30, 120), 3)        # C: grows to radius ~7.8 -> major axis ~16 < 35.37: ITC
    m |= _disc(shape, (80, 40), 20)        # lesion B, grown radius ~24.8 -> major axis ~50
    m[80:100, 100:150] = True              # lesion D, never detected (missed)
    return m


def _level0(row, col, dy=0, dx=0):
    return col * 32 + dx, row * 32 + dy    # (X, Y) inside map pixel (row, col) at level 5


# (p, X, Y) with the expected outcome
HAND_DETECTIONS = [
    (0.9, *_level0(20, 30, 31, 5)),    # A -> TP slot 1 = 0.9
    (0.6, *_level0(33, 30, 31, 0)),    # Y/32 = 33.97 truncates to row 33: inside grown A, lower p
    (0.7, *_level0(80, 40)),           # B -> 0.7
    (0.75, *_level0(85, 45, 3, 3)),    # B again, higher -> slot 3 = 0.75
    (0.95, *_level0(30, 120)),         # ITC C -> ignored entirely
    (0.8, *_level0(60, 100)),          # background -> FP
    (0.55, *_level0(110, 10)),         # background -> FP
    (0.65, *_level0(5, 30, 16, 16)),   # 5 px above A (distance 5 >= 4.82) -> FP
]


def test_hand_built_slide():
    labels = evaluation_mask(_hand_slide(), level=5)
    # raster order of first pixels: A (row 6), C (row 23), B (row 56), D (row 76)
    assert labels.max() == 4
    assert (labels[20, 30], labels[30, 120], labels[80, 40], labels[90, 125]) == (1, 2, 3, 4)
    itc = itc_labels(labels, level=5)
    assert itc == {2}
    probs, xs, ys = (np.array(v) for v in zip(*HAND_DETECTIONS))
    fp, tp, n = slide_fp_tp(probs, xs, ys, labels, itc, level=5)
    np.testing.assert_array_equal(fp, [0.8, 0.55, 0.65])
    assert tp.dtype == np.float32
    np.testing.assert_array_equal(tp, np.float32([0.9, 0.0, 0.75, 0.0]))
    assert n == 3

    normal_fp, normal_tp, normal_n = slide_fp_tp([0.85, 0.3], [10**6, -5], [3, 7])  # any coords
    np.testing.assert_array_equal(normal_fp, [0.85, 0.3])
    assert normal_tp.dtype == np.float32 and len(normal_tp) == 0 and normal_n == 0

    # FP: .8 .55 .65 .85 .3 ; TP: .9f 0 .75 0 ; 3 targets ; 2 images
    # thresholds [.3 .55 .65 .75 .8 .85 .9f]  (0 dropped)
    # #FP >= t:  5  4  3  2  2  1  0 , then 0 -> /2
    # #TP >= t:  2  2  2  2  1  1  1 , then 0 -> /3
    res = compute_froc([SlideResult("Test_001", fp, tp, n),
                        SlideResult("Test_002", normal_fp, normal_tp, normal_n)])
    np.testing.assert_allclose(res["fps"], [2.5, 2, 1.5, 1, 1, 0.5, 0, 0])
    np.testing.assert_allclose(res["sensitivity"], np.array([2, 2, 2, 2, 1, 1, 1, 0]) / 3)
    # reversed fps [0 0 .5 1 1 1.5 2 2.5], sens [0 1/3 1/3 1/3 2/3 2/3 2/3 2/3]:
    # 0.25 -> 1/3, 0.5 -> 1/3, 1 -> 2/3 (last of the duplicated x), 2, 4, 8 -> 2/3 => (10/3) / 6
    assert res["froc"] == pytest.approx(5 / 9)
    assert res["sensitivities"] == pytest.approx(dict(zip(RATES, [1 / 3, 1 / 3] + [2 / 3] * 4)))
    assert res["num_images"] == 2 and res["num_targets"] == 3

    # same answer from the transcription of the official script
    mask255 = _hand_slide().astype(np.uint8) * 255
    olabels = official_evaluation_mask(mask255, 0.243, 5)
    np.testing.assert_array_equal(olabels, labels)
    oitc = official_itc_list(olabels, 0.243, 5)
    ofp, otp, on = official_fp_tp(ys.tolist(), xs.tolist(), probs.tolist(), True, olabels, oitc, 5)
    ofps, osens = official_froc([["a", "b"], [ofp, [0.85, 0.3]], [otp, []], [on, 0]])
    np.testing.assert_array_equal(res["fps"], ofps)
    np.testing.assert_array_equal(res["sensitivity"], osens)


def test_slide_fp_tp_errors_and_truncation():
    labels = np.zeros((4, 5), np.int32)
    labels[0, 0] = 1
    # X in (-32, 0) truncates to column 0 as in the official int() division
    fp, tp, n = slide_fp_tp([0.7], [-31], [0], labels, (), level=5)
    assert len(fp) == 0 and tp.tolist() == [pytest.approx(0.7)] and n == 1
    with pytest.raises(IndexError, match="X=160"):
        slide_fp_tp([0.7, 0.8], [0, 160], [0, 0], labels, (), level=5)
    with pytest.raises(IndexError, match="Y=-40"):
        slide_fp_tp([0.7], [0], [-40], labels, (), level=5)
    with pytest.raises(ValueError):
        slide_fp_tp([0.7], [0], [0], labels, {2}, level=5)
    with pytest.raises(ValueError):
        slide_fp_tp([0.7, 0.1], [0], [0], labels, (), level=5)
    # tumour slide whose mask is empty: everything is an FP, no targets
    fp, tp, n = slide_fp_tp([0.7], [0], [0], np.zeros((4, 5), np.int32), (), level=5)
    assert fp.tolist() == [0.7] and len(tp) == 0 and n == 0


def test_nms_to_froc_pipeline_round_trip():
    # level-5 probability map aligned with the evaluation mask: NMS -> level 0 -> back is exact
    labels = evaluation_mask(_hand_slide(), level=5)
    prob = np.zeros(labels.shape)
    prob[20, 30], prob[85, 45], prob[60, 100] = 0.9, 0.75, 0.8
    probs, xs, ys = detections_to_level0(nms(prob, 0.5, 8), 32)
    fp, tp, n = slide_fp_tp(probs, xs, ys, labels, itc_labels(labels), level=5)
    np.testing.assert_array_equal(fp, [0.8])
    np.testing.assert_array_equal(tp, np.float32([0.9, 0, 0.75, 0]))


# ----------------------------------------------------------------------------------------------
# Random multi-slide parity with the official transcription
# ----------------------------------------------------------------------------------------------

def _random_mask(rng, shape):
    m = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 6)):
        if rng.random() < 0.5:
            centre = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            m |= _disc(shape, centre, int(rng.integers(0, 16)))
        else:
            r0, c0 = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
            m[r0:r0 + rng.integers(1, 40), c0:c0 + rng.integers(1, 40)] = True
    return m


def _random_detections(rng, mask, level, pool):
    n = int(rng.integers(0, 16))
    rows, cols = np.nonzero(mask)
    scale = 2 ** level
    xs, ys = [], []
    for _ in range(n):
        if rng.random() < 0.5:            # aim at a tumour pixel (may be an ITC)
            k = rng.integers(len(rows))
            r, c = rows[k], cols[k]
        else:                             # anywhere, including grown margins and background
            r, c = rng.integers(mask.shape[0]), rng.integers(mask.shape[1])
        xs.append(int(c * scale + rng.integers(scale)))
        ys.append(int(r * scale + rng.integers(scale)))
    probs = [float(rng.choice(pool)) for _ in range(n)]   # Python floats, as parsed from CSV
    return probs, xs, ys


def _random_case(seed):
    rng = np.random.default_rng(1000 + seed)
    level = 5 if seed % 3 else 6
    # a small pool so values repeat across FPs and TPs; float32-rounded twins hit the f32 quirk
    base = rng.uniform(0.5, 1.0, size=6)
    pool = np.concatenate([base, np.float32(base[:2]).astype(np.float64), [0.5, 1.0]])
    slides = []
    for i in range(int(rng.integers(2, 7))):
        shape = (int(rng.integers(40, 100)), int(rng.integers(40, 100)))
        mask = _random_mask(rng, shape)
        is_tumour = i == 0 or rng.random() < 0.6
        slides.append((f"Test_{i:03d}", is_tumour, mask, *_random_detections(rng, mask, level, pool)))
    return level, slides


@pytest.mark.parametrize("seed", range(24))
def test_compute_froc_matches_official_transcription(seed):
    level, slides = _random_case(seed)
    ours, official = [], [[], [], [], []]
    for name, is_tumour, mask, probs, xs, ys in slides:
        if is_tumour:
            olabels = official_evaluation_mask(mask.astype(np.uint8) * 255, 0.243, level)
            oitc = official_itc_list(olabels, 0.243, level)
        else:                              # the official main passes evaluation_mask = 0, ITC []
            olabels, oitc = 0, []
        ofp, otp, on = official_fp_tp(ys, xs, probs, is_tumour, olabels, oitc, level)
        for slot, value in zip(official, (name, ofp, otp, on)):
            slot.append(value)
        if is_tumour:
            labels = evaluation_mask(mask, level)
            np.testing.assert_array_equal(labels, olabels)
            itc = itc_labels(labels, level)
            assert itc == set(oitc)
            fp, tp, n = slide_fp_tp(probs, xs, ys, labels, itc, level)
        else:
            fp, tp, n = slide_fp_tp(probs, xs, ys)
        np.testing.assert_array_equal(fp, np.asarray(ofp, dtype=np.float64))
        assert tp.dtype == otp.dtype == np.float32
        np.testing.assert_array_equal(tp, otp)
        assert n == on
        ours.append(SlideResult(name, fp, tp, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        ofps, osens = official_froc(official)
    if sum(official[3]) == 0:               # every lesion was an ITC: official NaN, ours 0
        assert np.isnan(osens).all()
        osens = np.zeros_like(osens)
    res = compute_froc(ours)
    np.testing.assert_array_equal(res["fps"], ofps)
    np.testing.assert_array_equal(res["sensitivity"], osens)
    assert res["froc"] == official_score(ofps, osens)
    assert res["num_targets"] == sum(official[3]) and res["num_images"] == len(slides)
