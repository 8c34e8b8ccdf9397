"""camelyon/eval.py --protocol official vs --protocol bundle (MONAI LesionFROC, the bundle's 0.72).

Hand-built slides where the two protocols differ: 0/1 vs 0/255 masks, a normal slide with false
positives, lesions whose growth / ITC decision differs between level 5 and level 6, and the
``.npy`` -> NMS -> level-0 -> mask-index round trip. Every expected score is worked out by hand in
the comments (shared/reference/camelyon.md §7-§9).

Geometry: the probability map and the bundle's mask are on the level-6 grid (1 cell = 64 level-0
px); the official protocol reads level 5 (32 px). Detection (r, c) on the map is at level 0
``x = int((c + 0.5) * 64)``, ``y = int((r + 0.5) * 64)``. Masks are pyramidal TIFFs whose levels are
2x2 majority-downsampled (>= 2 of 4 pixels set -> set).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from camelyon.config import EvalConfig
from camelyon.eval import bundle_detections, evaluate_froc
from common.metrics.froc import (SlideResult, compute_froc, growth_threshold_px, itc_threshold_px,
                                 monai_tumour_pixels)
from common.pyramidal_tiff import write_pyramidal_tiff

RATES = (0.25, 0.5, 1, 2, 4, 8)


def write_mask(path: Path, shape_cells: tuple[int, int], boxes, value: int = 1) -> None:
    """Mask TIFF of ``shape_cells`` level-6 cells; boxes ``(r0, r1, c0, c1)`` in level-0 pixels."""
    mask = np.zeros((shape_cells[0] * 64, shape_cells[1] * 64), np.uint8)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = value
    write_pyramidal_tiff(path, mask)


def write_map(path: Path, shape: tuple[int, int], peaks: dict) -> None:
    """float64 probability map (as infer.py saves it) with ``{(row, col): p}``."""
    prob = np.zeros(shape)
    for (r, c), p in peaks.items():
        prob[r, c] = p
    np.save(path, prob)


def run(protocol: str, det: Path, gt: Path, out: Path) -> dict:
    return evaluate_froc(EvalConfig(protocol=protocol, detections=str(det), ground_truth=str(gt),
                                    output_dir=str(out)))


def by_slide(result: dict) -> dict:
    return {s["slide"]: s for s in result["slides"]}


# ----------------------------------------------------------------------------- (a), (b): one layout
# 64 x 64 cells. Lesion A: cells 4..19 squared (level 0 [256, 1280)); lesion B: cells 40..55
# ([2560, 3584)), never detected. Both are far above the ITC bound at both levels (16 cells grow to
# ~20 -> major axis ~23 > 17.683; level 5: 32 -> 40 px, ~46 > 35.37).
# Test_001 detections: 0.9 on A at cell (12, 12) -> level 0 (800, 800); FP 0.8 at cell (12, 50) ->
# (3232, 800). NMS box 48 at (12, 12) zeroes columns [0, 36), so (12, 50) survives.
# Test_002 (no mask: a normal slide): FP 0.95 at cell (30, 30) -> (1952, 1952).
LESIONS_AB = [(256, 1280, 256, 1280), (2560, 3584, 2560, 3584)]


@pytest.fixture(scope="module")
def layout_ab(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    det, gt01, gt255 = root / "det", root / "gt01", root / "gt255"
    for d in (det, gt01, gt255):
        d.mkdir()
    write_mask(gt01 / "Test_001.tif", (64, 64), LESIONS_AB, value=1)
    write_mask(gt255 / "Test_001.tif", (64, 64), LESIONS_AB, value=255)
    write_map(det / "Test_001.npy", (64, 64), {(12, 12): 0.9, (12, 50): 0.8})
    (det / "Test_001.csv").write_text("0.9,800,800\n0.8,3232,800\n")
    write_map(det / "Test_002.npy", (64, 64), {(30, 30): 0.95})
    (det / "Test_002.csv").write_text("0.95,1952,1952\n")
    return root


def test_mask_values_as_monai_reads_them():
    # MONAI: neg = 255 - mask * 255 in uint8; tumour where neg == 0. By hand, v * 255 mod 256 and
    # 255 minus that: 0 -> 255, 1 -> 0, 2 -> 255 - 254 = 1, 127 -> 255 - 129 = 126,
    # 254 -> 255 - 2 = 253, 255 -> 255 - 1 = 254. Only v == 1 is tumour.
    values = np.array([0, 1, 2, 127, 254, 255], np.uint8)
    np.testing.assert_array_equal(255 - values * 255, [255, 0, 1, 126, 253, 254])
    np.testing.assert_array_equal(monai_tumour_pixels(values), [False, True, False, False, False, False])


def test_a_same_mask_as_0_1_and_0_255(layout_ab, tmp_path):
    """Official counts A with either encoding; the bundle (MONAI) only with 0/1.

    0/1 mask, both protocols (only Test_001: its own folder): FP {0.8}, TP slots {f32(0.9), 0 (B)},
    1 slide, 2 lesions. thresholds sorted{0, 0.8, 0.9f}[1:] = [0.8, 0.9f] -> (#FP, #TP) = (1, 1),
    (0, 1), then (0, 0): fps [1, 0, 0], sens [.5, .5, 0]; reversed fps [0, 0, 1], sens [0, .5, .5]
    -> 0.5 at every rate: FROC 0.5.
    0/255 mask, official: our reader takes channel 0 > 0, so also 0.5 (the original script wants 255;
    a 0/1 mask there would vanish instead: 255 - 1 = 254 everywhere).
    0/255 mask, bundle: 255 -> 254, no tumour at all. SciPy's EDT of an all-background image
    measures from a point above the top-left pixel, so one small label appears in that corner: an
    ITC (1 label, 1 ITC, 0 targets). Both detections are FPs; sensitivity 0/0 -> NaN, as in MONAI.
    """
    det = tmp_path / "det"
    det.mkdir()
    for suffix in (".npy", ".csv"):
        (det / f"Test_001{suffix}").write_bytes((layout_ab / "det" / f"Test_001{suffix}").read_bytes())
    official01 = run("official", det, layout_ab / "gt01", tmp_path / "o01")
    official255 = run("official", det, layout_ab / "gt255", tmp_path / "o255")
    bundle01 = run("bundle", det, layout_ab / "gt01", tmp_path / "b01")
    assert official01["froc"] == pytest.approx(0.5)
    assert official255["froc"] == pytest.approx(0.5)
    assert bundle01["froc"] == pytest.approx(0.5)
    assert bundle01["num_targets"] == official01["num_targets"] == 2

    with pytest.warns(UserWarning) as caught:
        bundle255 = run("bundle", det, layout_ab / "gt255", tmp_path / "b255")
    messages = [str(w.message) for w in caught]
    assert any("Test_001.tif" in m and "values go up to 255" in m and "mask // 255" in m for m in messages)
    assert any("0/0" in m for m in messages)
    assert math.isnan(bundle255["froc"]) and bundle255["num_targets"] == 0
    slide = by_slide(bundle255)["Test_001"]
    assert (slide["lesions"], slide["itc"], slide["tumour_pixels"], slide["false_positives"]) == (1, 1, 0, 2)
    saved = json.loads((tmp_path / "b255" / "froc.json").read_text())
    assert saved["froc"] is None and saved["protocol"]["name"] == "bundle"


def test_b_normal_slide_false_positives(layout_ab, tmp_path):
    """Test_002 has no mask: a normal slide officially, not evaluated by the bundle.

    Official: FP {0.8, 0.95}, TP {0.9f, 0}, 2 slides, 2 lesions. thresholds [0.8, 0.9f, 0.95]:
    (2, 1), (1, 1), (1, 0), then (0, 0) -> fps [1, .5, .5, 0], sens [.5, .5, 0, 0]. Reversed
    fps [0, .5, .5, 1], sens [0, 0, .5, .5]: 0.25 -> 0; 0.5 -> .5 (last of the repeated x);
    1, 2, 4, 8 -> .5. FROC = 2.5 / 6 = 5/12.
    Bundle: Test_002 skipped (no FPs, not in the denominator) -> Test_001 alone = 0.5 (test a).
    """
    gt = layout_ab / "gt01"
    official = run("official", layout_ab / "det", gt, tmp_path / "o")
    bundle = run("bundle", layout_ab / "det", gt, tmp_path / "b")
    assert official["froc"] == pytest.approx(5 / 12)
    assert official["sensitivities"] == pytest.approx(dict(zip(RATES, [0, .5, .5, .5, .5, .5])))
    assert official["num_images"] == 2 and by_slide(official)["Test_002"]["false_positives"] == 1
    assert bundle["froc"] == pytest.approx(0.5)
    assert bundle["num_images"] == 1 and bundle["skipped_without_mask"] == ["Test_002"]
    assert list(by_slide(bundle)) == ["Test_001"]


# ----------------------------------------------------------------------------- (c) level 5 vs 6
# 80 x 80 cells (level 0 5120 x 5120).
# P1 rows [1024, 2560) x cols [512, 1056) and P2 same rows x cols [1344, 1920): at level 5 P1 ends
#   at column 32 and P2 starts at 42, a 9-px gap; each grows 4 px (distance < 4.82), column 37 stays
#   at distance 5 -> two lesions. At level 6 the majority rule turns P1's half column 16 (level-5
#   columns 32 yes, 33 no: 2 of 4) into tumour, P2 starts at 21: a 4-px gap, each grows 2 px
#   (distance < 2.411) -> one lesion.
# Q rows = cols = [3168, 3872) (704 px, starting 32 px before cell 50):
#   level 5: a 22-px square grown to 30 x 30 minus 3 pixels per corner (offsets (4,4), (4,3),
#   (3,4) have d^2 >= 23.2). Row variance = (30 * 30 * 899 / 12 - 4 * (14.5^2 * 2 + 13.5^2)) / 888
#   = (67425 - 2411) / 888 = 73.214; major axis 4 * sqrt(73.214) = 34.23 < 35.37 -> ITC.
#   level 6: cells 49..60 (half cells at both ends become tumour by majority, the 4 corners do
#   not: 1 of 4), grown to 16 x 16 minus 3 pixels per corner. Variance = (16 * 16 * 255 / 12 -
#   4 * (7.5^2 * 2 + 6.5^2)) / 244 = (5440 - 619) / 244 = 19.758; major 4 * sqrt(19.758) = 17.78
#   > 17.683 -> a lesion.
# M rows [4224, 4992) x cols [2560, 3840): a lesion at both levels, never detected (the miss).
# Detections: 0.9 on P1 at cell (28, 12) -> (800, 1824); 0.8 on Q at (55, 55) -> (3552, 3552);
# FP 0.7 at (70, 10) -> (672, 4512). NMS keeps all three (each is >= 24 cells from the previous
# picks in rows or columns).
LESIONS_PQM = [(1024, 2560, 512, 1056), (1024, 2560, 1344, 1920), (3168, 3872, 3168, 3872),
               (4224, 4992, 2560, 3840)]


def test_c_level6_growth_and_itc_thresholds(tmp_path):
    """Official (level 5): P1, P2, Q (ITC), M -> 3 targets; TP {0.9f, 0 (P2), 0 (Q ITC), 0 (M)},
    FP {0.7}; the Q hit is ignored. thresholds [0.7, 0.9f]: (1, 1), (0, 1), (0, 0) -> fps [1, 0, 0],
    sens [1/3, 1/3, 0]; reversed fps [0, 0, 1], sens [0, 1/3, 1/3] -> FROC 1/3.
    Bundle (level 6): P (merged), Q, M -> 3 targets; TP {0.9f, 0.8f, 0}, FP {0.7}. thresholds
    sorted{0, 0.7, 0.8f, 0.9f}[1:]: (1, 2), (0, 2), (0, 1), (0, 0) -> fps [1, 0, 0, 0], sens
    [2/3, 2/3, 1/3, 0]; reversed fps [0, 0, 0, 1], sens [0, 1/3, 2/3, 2/3] -> 2/3 at every rate.
    """
    assert growth_threshold_px(6) == pytest.approx(2.411, abs=5e-4)
    assert itc_threshold_px(6) == pytest.approx(17.683, abs=5e-4)
    assert growth_threshold_px(5) == pytest.approx(4.823, abs=5e-4)
    assert itc_threshold_px(5) == pytest.approx(35.365, abs=5e-4)
    det, gt = tmp_path / "det", tmp_path / "gt"
    det.mkdir()
    gt.mkdir()
    write_mask(gt / "Test_001.tif", (80, 80), LESIONS_PQM)
    write_map(det / "Test_001.npy", (80, 80), {(28, 12): 0.9, (55, 55): 0.8, (70, 10): 0.7})
    (det / "Test_001.csv").write_text("0.9,800,1824\n0.8,3552,3552\n0.7,672,4512\n")
    official = run("official", det, gt, tmp_path / "o")
    bundle = run("bundle", det, gt, tmp_path / "b")
    o, b = by_slide(official)["Test_001"], by_slide(bundle)["Test_001"]
    assert (o["lesions"], o["itc"], o["targets"], o["true_positives"], o["false_positives"]) == (4, 1, 3, 1, 1)
    assert (b["lesions"], b["itc"], b["targets"], b["true_positives"], b["false_positives"]) == (3, 0, 3, 2, 1)
    assert official["froc"] == pytest.approx(1 / 3)
    assert bundle["froc"] == pytest.approx(2 / 3)
    saved = json.loads((tmp_path / "b" / "froc.json").read_text())
    assert saved["level"] == 6 and saved["protocol"]["nms"] == {"box": 48, "threshold": 0.5, "sigma": 0.0}
    assert saved["protocol"]["growth_px"] == pytest.approx(2.411, abs=5e-4)
    assert saved["protocol"]["itc_px"] == pytest.approx(17.683, abs=5e-4)
    assert json.loads((tmp_path / "o" / "froc.json").read_text())["protocol"]["level"] == 5


# ----------------------------------------------------------------------------- (d) round trip
# Non-square map, 40 x 70 cells (level 0 2560 x 4480), so a row/column swap cannot pass.
# Peaks: 0.95 (3, 65); 0.9 (10, 60) inside its box; 0.75 (39, 0) in the bottom-left corner;
# 0.6 (21, 40); 0.5 (5, 5) is not > 0.5. NMS (box 48 = [i - 24, i + 24) clipped):
# (3, 65) zeroes rows [0, 27) x cols [41, 70) -> (10, 60) gone; (39, 0) zeroes rows [15, 40) x
# cols [0, 24); (21, 40) survives (column 40 < 41). Level 0: x = int((c + .5) * 64), y likewise:
# (3, 65) -> (4192, 224); (39, 0) -> (32, 2528); (21, 40) -> (2592, 1376).
ROUND_TRIP_PEAKS = {(3, 65): 0.95, (10, 60): 0.9, (39, 0): 0.75, (21, 40): 0.6, (5, 5): 0.5}
# L1 rows [0, 1280) x cols [3584, 4480) holds (3, 65); L2 rows [1408, 2560) x cols [0, 1152)
# holds (39, 0); L3 rows [0, 1024) x cols [1280, 2304) is missed; (21, 40) is background.
LESIONS_L = [(0, 1280, 3584, 4480), (1408, 2560, 0, 1152), (0, 1024, 1280, 2304)]


def test_d_npy_nms_coordinates_round_trip(tmp_path):
    write_map(tmp_path / "Test_001.npy", (40, 70), ROUND_TRIP_PEAKS)
    probs, xs, ys = bundle_detections(tmp_path / "Test_001.npy", level=6)
    np.testing.assert_array_equal(probs, [0.95, 0.75, 0.6])
    np.testing.assert_array_equal(xs, [4192, 32, 2592])
    np.testing.assert_array_equal(ys, [224, 2528, 1376])
    # back to the level-6 mask: int(v / 64) gives the map cell again
    np.testing.assert_array_equal(np.trunc(ys / 64), [3, 39, 21])
    np.testing.assert_array_equal(np.trunc(xs / 64), [65, 0, 40])


def test_d_round_trip_scores_border_hits(tmp_path):
    """TP {0.95f (L1), 0.75 (L2), 0 (L3)}, FP {0.6}, 3 targets, 1 slide. thresholds
    [0.6, 0.75, 0.95f]: (1, 2), (0, 2), (0, 1), (0, 0) -> reversed fps [0, 0, 0, 1],
    sens [0, 1/3, 2/3, 2/3] -> FROC 2/3 (the same with MONAI's ``Test_001.tif.npy`` name)."""
    det, gt = tmp_path / "det", tmp_path / "gt"
    det.mkdir()
    gt.mkdir()
    write_mask(gt / "Test_001.tif", (40, 70), LESIONS_L)
    write_map(det / "Test_001.tif.npy", (40, 70), ROUND_TRIP_PEAKS)
    result = run("bundle", det, gt, tmp_path / "out")
    slide = by_slide(result)["Test_001"]
    assert (slide["lesions"], slide["itc"], slide["true_positives"], slide["false_positives"]) == (3, 0, 2, 1)
    assert result["froc"] == pytest.approx(2 / 3)

    # only the CSV infer.py writes next to the map: same detections, with a warning
    (det / "Test_001.tif.npy").unlink()
    (det / "Test_001.csv").write_text("0.950000,4192,224\n0.750000,32,2528\n0.600000,2592,1376\n")
    with pytest.warns(UserWarning, match="no <slide>.npy map for Test_001"):
        from_csv = run("bundle", det, gt, tmp_path / "csv")
    assert from_csv["froc"] == pytest.approx(2 / 3)


def test_map_larger_than_mask_names_the_file(tmp_path):
    det, gt = tmp_path / "det", tmp_path / "gt"
    det.mkdir()
    gt.mkdir()
    write_mask(gt / "Test_001.tif", (40, 70), LESIONS_L)
    write_map(det / "Test_001.npy", (41, 70), {(40, 3): 0.9})   # row 40: one past the mask
    with pytest.raises(ValueError, match=r"Test_001\.npy: a detection lies outside the level-6 mask"):
        run("bundle", det, gt, tmp_path / "out")


# ----------------------------------------------------------------------------- curve and config
def test_bundle_compares_tp_slots_like_monai():
    """FP 0.7 (float64) and a TP slot float32(0.7) = 0.69999998..., plus a miss.

    thresholds [0.7f, 0.7]. Official (float32 comparison): at 0.7 the TP still counts ->
    reversed fps [0, 1, 1], sens [0, .5, .5] -> 0.125, 0.25, .5 x 4 = 2.375 / 6.
    MONAI compares the float32 slots with a NumPy float64 scalar: in float64 on NumPy >= 2, so at
    0.7 the TP does not count -> reversed sens [0, 0, .5] -> 0, 0, .5 x 4 = 2 / 6.
    """
    from common.metrics.froc import MONAI_TP_THRESHOLD_DTYPE

    slides = [SlideResult("Test_001", np.array([0.7]), np.float32([0.7, 0.0]), 2)]
    assert compute_froc(slides)["froc"] == pytest.approx(2.375 / 6)
    bundle = compute_froc(slides, tp_threshold_dtype=MONAI_TP_THRESHOLD_DTYPE)
    numpy2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
    assert bundle["froc"] == pytest.approx(2 / 6 if numpy2 else 2.375 / 6)


def test_protocol_config():
    assert EvalConfig().mask_level() == 5
    assert EvalConfig(protocol="bundle").mask_level() == 6
    assert EvalConfig(protocol="bundle", level=5).mask_level() == 5
    with pytest.raises(ValueError, match="--protocol must be official or bundle"):
        EvalConfig(protocol="monai").validate()
    with pytest.raises(ValueError, match="stem-chars"):
        EvalConfig(protocol="bundle", stem_chars=8).validate()
