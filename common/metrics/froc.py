"""Lesion-level FROC for Camelyon16, with parity to the official challenge script and MONAI LesionFROC.

Pure numpy/scipy/skimage; no WSI reader. The functions follow ``Evaluation_FROC.py`` of the
Camelyon16 challenge (see ``shared/reference/camelyon.md`` §7–9 and ``common.md`` §2):

====================  ============================  ==============================================
official              MONAI (monai/apps/pathology)  here
====================  ============================  ==============================================
(participant's NMS)   PathologyProbNMS (ProbNMS)    :func:`nms`, :func:`detections_to_level0`
computeEvaluationMask compute_multi_instance_mask   :func:`evaluation_mask` (+ :func:`monai_tumour_pixels`)
computeITCList        compute_isolated_tumor_cells  :func:`itc_labels`
compute_FP_TP_Probs   compute_fp_tp_probs           :func:`slide_fp_tp`
computeFROC           compute_froc_curve_data       :func:`froc_curve`
``np.interp`` in main compute_froc_score            :func:`froc_score`
====================  ============================  ==============================================

Quirks kept on purpose (parity): the NMS threshold is strict; the smallest threshold of the curve is
dropped (so a 0 sentinel — a missed lesion or an ITC slot — is assumed); TP slots are float32, and
TP slots are compared with thresholds in float32 (what NumPy does for ``float32_array >= python_float``
in the official script); coordinates are divided by ``2**level`` and truncated; 8-connectivity;
hole filling; ITC by regionprops major axis length.

Configurations: the official protocol evaluates masks at level 5 (``evaluation_mask(m, 5)``, growth
threshold 4.82 px, ITC 35.37 px) and counts normal slides' detections as FPs; MONAI ``LesionFROC``
(the bundle's evaluator) uses level 6 (2.411 px / 17.683 px) and only tumour slides. What MONAI does
differently is here too: :func:`monai_tumour_pixels` (tumour = mask value 1), ``phantom_if_empty``
in :func:`evaluation_mask`, and :data:`MONAI_TP_THRESHOLD_DTYPE` for :func:`froc_curve`.

Distributed use: each rank builds :class:`SlideResult` objects, rank 0 gathers them and calls
:func:`compute_froc` once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from skimage import measure

OFFICIAL_LEVEL = 5
SPACING_UM = 0.243
GROW_UM = 75.0
ITC_UM = 275.0
FP_RATES = (0.25, 0.5, 1, 2, 4, 8)

# MONAI LesionFROC as the bundle runs it (scripts/evaluate_froc.sh: LEVEL=6 SPACING=0.243; ProbNMS
# defaults of LesionFROC: box 48, threshold 0.5, sigma 0).
MONAI_LEVEL = 6
MONAI_NMS_BOX = 48
MONAI_NMS_THRESHOLD = 0.5
MONAI_NMS_SIGMA = 0.0
# MONAI's curve evaluates ``tp_probs >= thresh`` with a float32 array and a NumPy float64 scalar
# taken from the FP probabilities. NumPy >= 2 compares in float64 (NEP 50); NumPy 1.x compared in
# float32 (value-based casting). This is whatever the running NumPy does, so MONAI is matched on it.
MONAI_TP_THRESHOLD_DTYPE = np.result_type(np.zeros(1, np.float32), np.float64(0.5))


# ----------------------------------------------------------------------------------------------
# Probability map -> detections
# ----------------------------------------------------------------------------------------------

def _box_bounds(idx: int, box: int, size: int) -> tuple[int, int]:
    """Half-open ``[idx - box//2, idx + (box - box//2))`` clipped to ``[0, size)``."""
    lo = box // 2
    return max(idx - lo, 0), min(idx + (box - lo), size)


def nms(prob: np.ndarray, threshold: float = 0.5, box_size: int | Sequence[int] = 48,
        sigma: float = 0.0) -> list[tuple[float, int, int]]:
    """Greedy box NMS on a 2-D probability map (MONAI ``ProbNMS`` / NCRF ``nms.py`` semantics).

    Reference loop: while ``max(prob) > threshold`` (strict) take the first argmax in C order
    ``(r, c)``, record ``(prob[r, c], r, c)`` and zero ``[r - box//2, r + (box - box//2))`` x
    ``[c - box//2, c + (box - box//2))`` clipped to the map. MONAI bundle: box 48, threshold 0.5;
    NCRF radius r is box ``2r``. With ``sigma > 0`` the map is first smoothed with
    ``scipy.ndimage.gaussian_filter`` (NCRF) and the smoothed values are reported.

    Implementation: candidates ``> threshold`` are visited once in (descending value, ascending C
    index) order and kept unless an earlier kept box covers them. Because suppression only grows,
    this picks exactly the same sequence as the rescanning loop, in O(K log K) for K candidates.

    Args:
        prob: 2-D array (not modified).
        threshold: strict lower bound on reported probabilities; must be >= 0 (zeroed pixels must
            never qualify, otherwise the reference loop does not terminate).
        box_size: int or one int per axis, >= 1.
        sigma: Gaussian pre-smoothing sigma in pixels; 0 disables it.

    Returns:
        ``[(p, row, col), ...]`` in map pixels, in detection order (non-increasing p).
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"nms expects a 2-D map, got shape {prob.shape}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    boxes = (box_size, box_size) if np.isscalar(box_size) else tuple(box_size)
    if len(boxes) != 2 or min(boxes) < 1:
        raise ValueError(f"box_size must be a positive int or two positive ints, got {box_size}")
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float64)
    if np.isnan(prob).any():
        raise ValueError("probability map contains NaN")
    if sigma > 0:
        prob = ndimage.gaussian_filter(prob, sigma=sigma)  # new array, in the map's float dtype
    flat = prob.reshape(-1)
    cand = np.flatnonzero(flat > threshold)
    order = cand[np.argsort(-flat[cand], kind="stable")]  # ties: smaller C index first
    return _greedy_suppress(flat, order, prob.shape, boxes)


def _greedy_suppress(flat: np.ndarray, order: np.ndarray, shape: tuple[int, int],
                     boxes: tuple[int, int]) -> list[tuple[float, int, int]]:
    """Keep candidates (flat indices, already in pick order) not covered by an earlier kept box."""
    covered = np.zeros(shape, dtype=bool)
    covered_flat = covered.reshape(-1)
    ncols = shape[1]
    dets = []
    for i in order.tolist():
        if covered_flat[i]:
            continue
        r, c = divmod(i, ncols)
        dets.append((float(flat[i]), r, c))
        r0, r1 = _box_bounds(r, boxes[0], shape[0])
        c0, c1 = _box_bounds(c, boxes[1], shape[1])
        covered[r0:r1, c0:c1] = True
    return dets


def map_to_level0(rows, cols, ratio: float):
    """Map-pixel indices -> level-0 ``(x, y)``: ``x = int((col + 0.5) * ratio)``, same for y.

    ``ratio`` is the map downsample (``2**level``, e.g. 64, or a measured float). Scalars give Python
    ints, array-likes give int64 arrays. Truncation equals flooring for non-negative indices.
    """
    xs = np.trunc((np.asarray(cols, dtype=np.float64) + 0.5) * ratio).astype(np.int64)
    ys = np.trunc((np.asarray(rows, dtype=np.float64) + 0.5) * ratio).astype(np.int64)
    if xs.ndim == 0 and ys.ndim == 0:
        return int(xs), int(ys)
    return xs, ys


def detections_to_level0(dets: Sequence[tuple[float, int, int]], ratio: float):
    """``nms`` output -> ``(probs float64, xs int64, ys int64)`` at level 0 (the CSV columns)."""
    arr = np.asarray(dets, dtype=np.float64).reshape(-1, 3)
    xs, ys = map_to_level0(arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64), ratio)
    return arr[:, 0], xs, ys


# ----------------------------------------------------------------------------------------------
# Ground truth: evaluation mask and ITC labels
# ----------------------------------------------------------------------------------------------

def _pixel_um(level: int, spacing_um: float, pixel_um: float | None) -> float:
    """Mask pixel size in µm: ``pixel_um`` if given, else ``spacing_um * 2**level``."""
    return float(pixel_um) if pixel_um is not None else spacing_um * 2 ** level


def growth_threshold_px(level: int = OFFICIAL_LEVEL, spacing_um: float = SPACING_UM,
                        grow_um: float = GROW_UM, pixel_um: float | None = None) -> float:
    """EDT threshold in mask pixels: ``grow_um / (pixel_um * 2)`` (4.82 at level 5, 2.411 at level 6)."""
    return grow_um / (_pixel_um(level, spacing_um, pixel_um) * 2)


def itc_threshold_px(level: int = OFFICIAL_LEVEL, spacing_um: float = SPACING_UM,
                     itc_um: float = ITC_UM, pixel_um: float | None = None) -> float:
    """ITC major-axis bound in mask pixels: ``itc_um / pixel_um`` (35.37 at level 5, 17.683 at level 6)."""
    return itc_um / _pixel_um(level, spacing_um, pixel_um)


def monai_tumour_pixels(mask_values: np.ndarray) -> np.ndarray:
    """Tumour pixels as MONAI ``compute_multi_instance_mask`` sees a mask: where ``255 - mask * 255`` is 0.

    On the uint8 values the reader returns, ``v * 255`` wraps to ``256 - v`` for v >= 1, so
    ``255 - v * 255`` is ``v - 1``: zero only for v == 1. A 0/255 mask therefore has no tumour
    (255 gives 254, background). Wider integer, float and bool inputs give the same set, so this is
    ``mask == 1``.
    """
    return np.asarray(mask_values) == 1


def evaluation_mask(tumour_mask: np.ndarray, level: int = OFFICIAL_LEVEL, spacing_um: float = SPACING_UM,
                    grow_um: float = GROW_UM, pixel_um: float | None = None,
                    phantom_if_empty: bool = False) -> np.ndarray:
    """Official ``computeEvaluationMask`` (= MONAI ``compute_multi_instance_mask``) on a boolean mask.

    Steps: Euclidean distance to the nearest tumour pixel (EDT of ``~mask``), keep
    ``distance <`` :func:`growth_threshold_px` (75 µm -> 4.82 px at level 5, 2.411 px at level 6),
    ``binary_fill_holes``, then ``skimage.measure.label(connectivity=2)`` (8-connectivity).

    The mask pixel size is ``pixel_um`` if given, else ``spacing_um * 2**level`` (the official and
    MONAI configurations are ``level=5`` and ``level=6`` with the default spacing).
    The caller converts its mask to bool (official: channel 0 == 255; MONAI:
    :func:`monai_tumour_pixels`).

    Mask without tumour: by default all zeros (no lesions). With ``phantom_if_empty`` it goes through
    the EDT like the reference scripts do: SciPy's EDT of an all-nonzero array measures from a
    virtual point just above the top-left pixel, so a small label appears in that corner (an ITC at
    levels 5 and 6: detections on it are ignored instead of counted as FPs, and its 0 TP slot is a
    threshold sentinel). The bundle protocol sets it for parity with MONAI.

    Returns:
        int32 label image, labels contiguous 1..max.
    """
    mask = np.asarray(tumour_mask, dtype=bool)
    if not mask.any() and not phantom_if_empty:
        return np.zeros(mask.shape, dtype=np.int32)
    radius_px = growth_threshold_px(level, spacing_um, grow_um, pixel_um)
    grown = ndimage.distance_transform_edt(~mask) < radius_px
    filled = ndimage.binary_fill_holes(grown)
    return measure.label(filled, connectivity=2).astype(np.int32)


def _major_axis_length(region) -> float:
    """regionprops major axis length (``axis_major_length`` since skimage 0.19/0.26)."""
    if hasattr(region, "axis_major_length"):
        return float(region.axis_major_length)
    return float(region.major_axis_length)


def itc_labels(labels: np.ndarray, level: int = OFFICIAL_LEVEL, spacing_um: float = SPACING_UM,
               itc_um: float = ITC_UM, pixel_um: float | None = None) -> set[int]:
    """Official ``computeITCList``: labels whose major axis length < ``itc_um / pixel_um``.

    ``itc_um`` = 200 µm ITC diameter + 75 µm growth = 275 (35.37 px at level 5, 17.683 px at
    level 6); ``pixel_um`` defaults to ``spacing_um * 2**level`` as in :func:`evaluation_mask`.
    """
    threshold_px = itc_threshold_px(level, spacing_um, itc_um, pixel_um)
    regions = measure.regionprops(np.asarray(labels))
    return {int(r.label) for r in regions if _major_axis_length(r) < threshold_px}


# ----------------------------------------------------------------------------------------------
# Per-slide TP/FP assignment
# ----------------------------------------------------------------------------------------------

def _mask_indices(coords: np.ndarray, level: int, size: int, axis_name: str) -> np.ndarray:
    """Level-0 coordinates -> mask indices ``int(coord / 2**level)``; raises if out of range."""
    idx = np.trunc(coords / 2 ** level).astype(np.int64)
    bad = np.flatnonzero((idx < 0) | (idx >= size))
    if bad.size:
        k = int(bad[0])
        raise IndexError(f"detection {k}: level-0 {axis_name}={coords[k]} maps to mask index "
                         f"{idx[k]} at level {level}, outside [0, {size})")
    return idx


def slide_fp_tp(probs, xs, ys, eval_labels: np.ndarray | None = None, itc: Iterable[int] = (),
                level: int = OFFICIAL_LEVEL) -> tuple[np.ndarray, np.ndarray, int]:
    """Official ``compute_FP_TP_Probs`` for one slide.

    Args:
        probs, xs, ys: detections; ``X`` = column and ``Y`` = row in level-0 pixels (CSV order).
        eval_labels: label image from :func:`evaluation_mask` at ``level``; ``None`` = normal slide.
        itc: labels to exclude (from :func:`itc_labels`).
        level: mask level; coordinates are divided by ``2**level`` and truncated (``int()``).

    Tumour slide: ``hit = labels[int(Y / 2**level), int(X / 2**level)]``; hit 0 -> FP; a non-ITC
    label -> its float32 TP slot keeps the max probability; ITC hit -> ignored (neither TP nor FP).
    ``num_targets = max_label - len(itc)``. Normal slide: every detection is an FP, no slots/targets.
    Truncation toward zero means X in (-2**level, 0) still maps to column 0 as in the official
    script; any other out-of-range index raises IndexError (the official script would wrap negative
    indices silently).

    Returns:
        ``(fp_probs float64, tp_probs float32 of length max_label, num_targets)``.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    xs = np.asarray(xs, dtype=np.float64).reshape(-1)
    ys = np.asarray(ys, dtype=np.float64).reshape(-1)
    if not len(probs) == len(xs) == len(ys):
        raise ValueError(f"probs/xs/ys lengths differ: {len(probs)}, {len(xs)}, {len(ys)}")
    if np.isnan(probs).any():
        raise ValueError("detection probabilities contain NaN")
    if eval_labels is None:
        return probs.copy(), np.zeros(0, dtype=np.float32), 0
    labels = np.asarray(eval_labels)
    if labels.ndim != 2:
        raise ValueError(f"eval_labels must be a 2-D label image, got shape {labels.shape}")
    max_label = int(labels.max()) if labels.size else 0
    itc = {int(i) for i in itc}
    if any(not 1 <= i <= max_label for i in itc):
        raise ValueError(f"ITC labels {sorted(itc)} not all within 1..{max_label}")
    rows = _mask_indices(ys, level, labels.shape[0], "Y")
    cols = _mask_indices(xs, level, labels.shape[1], "X")
    hits = labels[rows, cols].astype(np.int64)
    is_itc = np.isin(hits, list(itc))
    tp_hit = (hits > 0) & ~is_itc
    slots = np.zeros(max_label, dtype=np.float64)
    np.fmax.at(slots, hits[tp_hit] - 1, probs[tp_hit])
    # float32(max p) equals the official sequential "if p > slot: slot = p" into float32 storage
    return probs[hits == 0], slots.astype(np.float32), max_label - len(itc)


# ----------------------------------------------------------------------------------------------
# Curve and score
# ----------------------------------------------------------------------------------------------

def _count_at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: ``(values >= t).sum()`` (values and thresholds share a dtype)."""
    return len(values) - np.searchsorted(np.sort(values), thresholds, side="left")


def froc_curve(fp_probs_all, tp_probs_all, num_targets: int, num_images: int,
               tp_threshold_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Official ``computeFROC`` (= MONAI ``compute_froc_curve_data``) on all slides' probabilities.

    ``thresholds = sorted(set(fp ∪ tp))[1:]`` — the smallest value is **dropped** (a 0 sentinel from
    a missed lesion or ITC slot is assumed). For each t: ``#fp >= t`` and ``#tp >= t``; then (0, 0)
    is appended. FP probabilities are float64; TP slots are float32 and are compared with ``t`` cast
    to ``tp_threshold_dtype``: float32 is what NumPy does for ``float32_array >= python_float`` in
    the official script; MONAI compares with NumPy float64 scalars, see
    :data:`MONAI_TP_THRESHOLD_DTYPE`. ``fps = #fp / num_images``; ``sensitivity = #tp / num_targets``,
    or all zeros when ``num_targets == 0`` (undefined; the reference scripts would produce NaN).

    Args:
        fp_probs_all: 1-D FP probabilities of all slides.
        tp_probs_all: 1-D TP slots of all slides (zeros for missed lesions and ITC slots).
        num_targets: total number of non-ITC lesions.
        num_images: number of evaluated slides (tumour and normal), the FP-rate denominator.

    Returns:
        ``(fps_per_image, sensitivity)`` float64 arrays, thresholds ascending, ending at (0, 0).
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    fp = np.asarray(fp_probs_all, dtype=np.float64).reshape(-1)
    tp = np.asarray(tp_probs_all, dtype=np.float32).reshape(-1)
    thresholds = np.unique(np.concatenate([fp, tp.astype(np.float64)]))[1:]
    n_fp = np.append(_count_at_least(fp, thresholds), 0)
    n_tp = np.append(_count_at_least(tp.astype(tp_threshold_dtype), thresholds.astype(tp_threshold_dtype)), 0)
    fps = n_fp / float(num_images)
    sens = n_tp / float(num_targets) if num_targets > 0 else np.zeros(len(n_tp))
    return fps, sens


def froc_score(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float] = FP_RATES
               ) -> tuple[float, np.ndarray]:
    """Mean of ``np.interp(rates, fps[::-1], sens[::-1])`` (clamps outside the curve's range)."""
    at_rates = np.interp(np.asarray(rates, dtype=np.float64), np.asarray(fps)[::-1],
                         np.asarray(sens)[::-1])
    return float(np.mean(at_rates)), at_rates


@dataclass
class SlideResult:
    """Per-slide FROC inputs (what each rank gathers to rank 0): output of :func:`slide_fp_tp`."""

    name: str
    fp_probs: np.ndarray
    tp_probs: np.ndarray
    num_targets: int


def compute_froc(slides: Sequence[SlideResult], rates: Sequence[float] = FP_RATES,
                 tp_threshold_dtype=np.float32) -> dict:
    """Score a whole evaluation set once: concatenate all slides, :func:`froc_curve`, :func:`froc_score`.

    Every slide passed counts in the FP-rate denominator: the official protocol passes tumour and
    normal slides, the MONAI/bundle protocol tumour slides only. ``tp_threshold_dtype``: see
    :func:`froc_curve`.

    Returns:
        ``{"froc": float, "sensitivities": {rate: float}, "fps": list, "sensitivity": list,
        "num_images": int, "num_targets": int}``.
    """
    if not slides:
        raise ValueError("compute_froc needs at least one slide")
    fp = np.concatenate([np.asarray(s.fp_probs, dtype=np.float64).reshape(-1) for s in slides])
    tp = np.concatenate([np.asarray(s.tp_probs, dtype=np.float32).reshape(-1) for s in slides])
    num_targets = int(sum(s.num_targets for s in slides))
    fps, sens = froc_curve(fp, tp, num_targets, len(slides), tp_threshold_dtype)
    score, at_rates = froc_score(fps, sens, rates)
    return {"froc": score, "sensitivities": {r: float(v) for r, v in zip(rates, at_rates)},
            "fps": fps.tolist(), "sensitivity": sens.tolist(),
            "num_images": len(slides), "num_targets": num_targets}
