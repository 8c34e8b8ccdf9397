"""Sliding-window inference over N-d images, MONAI ``sliding_window_inference`` algorithm (1.4).

For an input (B, C, *spatial) and a window (region of interest) size ``roi``:

1. Pad every spatial axis shorter than the window with ``cval`` (``diff // 2`` before, the rest
   after) and work on ``image_size = max(size, roi)``; the padding is cropped off at the end.
2. Interval per axis: ``roi`` when the window equals the (padded) size, otherwise
   ``max(int(roi * (1 - overlap)), 1)`` (48 for roi 96 and overlap 0.5).
3. Starts per axis: ``d * interval`` for the smallest count k with ``(k - 1) * interval + roi >= size``,
   each moved back to at most ``size - roi``: the last window is flush with the far border
   (size 226 -> 0, 48, 96, 130). Windows are the Cartesian product, last axis fastest.
4. Importance map of window size: ones (``constant``) or the outer product of 1-D Gaussians with
   sigma = ``sigma_scale * roi`` (peak 1), clamped below at ``max(min, 1e-3)`` (``gaussian``).
5. Windows of all batch items are evaluated ``sw_batch_size`` at a time (batch index slowest);
   ``out[window] += pred * w`` and ``count[window] += w`` in the input's floating dtype, on
   ``device`` (default: the input's device), so half-precision window outputs are accumulated in
   float32 and the output buffer is allocated once.
6. Result = out / count, padding cropped off. Blend raw logits; apply softmax afterwards.

The predictor must return a tensor whose spatial size equals the window's (any channel count).
What MONAI pays for and this does not: with constant blending the weights are ones, so windows
are added without the multiplication, and the count is the outer product of per-axis counts
(exact small integers) instead of a volume-sized addition per window. The output is the same.

:func:`whole_volume_inference` is the fully convolutional alternative: the network on the whole
padded volume at once (or on blocks whose halo covers its receptive field), no overlap, no
blending; each voxel is computed once instead of about (1 / (1 - overlap))^3 times.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from common.logging import progress as progress_bar


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} needs {n} values for {n} spatial dimensions, got {values}")
    return values


def resolve_roi(roi_size: int | Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
    """Window size per axis; a non-positive entry means "the whole axis" (MONAI ``fall_back_tuple``)."""
    roi = _as_tuple(roi_size, len(spatial), "roi_size")
    return tuple(r if r > 0 else s for r, s in zip(roi, spatial))


def scan_intervals(image_size: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float]) -> tuple[int, ...]:
    """Step between window starts per axis (``image_size`` already padded to at least ``roi``)."""
    overlaps = (overlap,) * len(roi) if isinstance(overlap, (int, float)) else tuple(overlap)
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return tuple(r if r == s else max(int(r * (1 - o)), 1) for s, r, o in zip(image_size, roi, overlaps))


def window_starts(size: int, roi: int, interval: int) -> list[int]:
    """Starts along one axis: ``d * interval`` for d < k, the last moved back to ``size - roi``."""
    if roi > size:
        raise ValueError(f"window {roi} is larger than the (padded) axis {size}")
    count = next(d for d in range(size + 1) if d * interval + roi >= size) + 1
    return [min(d * interval, size - roi) for d in range(count)]


def window_slices(image_size: Sequence[int], roi: Sequence[int], intervals: Sequence[int]) -> list[tuple[slice, ...]]:
    """All windows as tuples of slices, Cartesian product with the last axis varying fastest."""
    per_axis = [window_starts(s, r, i) for s, r, i in zip(image_size, roi, intervals)]
    return [tuple(slice(a, a + r) for a, r in zip(starts, roi)) for starts in itertools.product(*per_axis)]


def importance_map(roi: Sequence[int], mode: str = "constant", sigma_scale: float | Sequence[float] = 0.125,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Blending weights of window size: ones, or a separable Gaussian with peak 1 (see module doc)."""
    if mode == "constant":
        return torch.ones(tuple(roi), dtype=dtype, device=device)
    if mode != "gaussian":
        raise ValueError(f"blending mode must be 'constant' or 'gaussian', got {mode!r}")
    scales = (sigma_scale,) * len(roi) if isinstance(sigma_scale, (int, float)) else tuple(sigma_scale)
    weights = torch.ones((), dtype=torch.float32, device=device)
    for n, scale in zip(roi, scales):
        sigma = n * scale
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        weights = weights.unsqueeze(-1) * torch.exp(x ** 2 / (-2 * sigma ** 2))  # outer product, last axis new
    floor = max(float(weights.min()), 1e-3)
    return weights.clamp(min=floor).to(dtype)


def window_weight_sum(image_size: Sequence[int], windows: Sequence[tuple[slice, ...]], weights: torch.Tensor,
                      mode: str) -> torch.Tensor:
    """Sum of the blending weights of every window at each voxel, (1, 1, *image_size).

    With constant weights the windows are a Cartesian product of per-axis starts, so the count is
    the outer product of per-axis counts: small integers, exact in floating point, hence the same
    values as adding ones window by window, without a volume-sized pass per window."""
    if mode == "constant":
        count = torch.ones((), dtype=weights.dtype, device=weights.device)
        for axis, size in enumerate(image_size):
            per_axis = torch.zeros(size, dtype=weights.dtype, device=weights.device)
            for sl in sorted({w[axis].indices(size) for w in windows}):
                per_axis[slice(*sl)] += 1
            count = count.unsqueeze(-1) * per_axis  # outer product, last axis new
        return count[None, None]
    total = torch.zeros((1, 1, *image_size), dtype=weights.dtype, device=weights.device)
    for window in windows:  # Gaussian weights are clamped below, so not separable: add them up
        total[(slice(None), slice(None), *window)] += weights
    return total


def _pad_amounts(spatial: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) constant padding per axis so every axis is at least the window size."""
    return [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(spatial, roi)]


@torch.no_grad()
def sliding_window_inference(inputs: torch.Tensor, roi_size: int | Sequence[int], sw_batch_size: int,
                             predictor: Callable[[torch.Tensor], torch.Tensor], overlap: float | Sequence[float] = 0.25,
                             mode: str = "constant", sigma_scale: float | Sequence[float] = 0.125,
                             cval: float = 0.0, sw_device: torch.device | str | None = None,
                             device: torch.device | str | None = None, progress: bool = False,
                             desc: str = "windows") -> torch.Tensor:
    """Blend ``predictor`` outputs over overlapping windows of ``inputs`` (B, C, *spatial).

    Args:
        roi_size: window size (an int for every axis, or one per axis; <= 0 = the whole axis).
        sw_batch_size: windows per predictor call (across batch items and windows).
        overlap: fraction of the window shared by neighbours (MONAI default 0.25, bundles 0.5).
        mode: ``constant`` (plain average) or ``gaussian`` (centre-weighted) blending.
        sw_device: where windows are evaluated (default: the input's device).
        device: where the output is accumulated (default: the input's device), e.g. the CPU for a
            volume that does not fit on the GPU next to the network.
        progress: show a progress bar over window batches (rank 0).

    Returns:
        (B, C_out, *spatial) in the input's floating dtype (float32 for integer inputs).
    """
    if inputs.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial), got shape {tuple(inputs.shape)}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    spatial = tuple(inputs.shape[2:])
    roi = resolve_roi(roi_size, spatial)
    compute_dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    device = torch.device(device) if device is not None else inputs.device

    pads = _pad_amounts(spatial, roi)
    if any(p for pair in pads for p in pair):  # F.pad takes the last axis first
        inputs = F.pad(inputs, [p for pair in reversed(pads) for p in pair], mode="constant", value=cval)
    image_size = tuple(inputs.shape[2:])
    windows = window_slices(image_size, roi, scan_intervals(image_size, roi, overlap))
    weights = importance_map(roi, mode, sigma_scale, dtype=compute_dtype, device=device)

    batch = inputs.shape[0]
    jobs = [(b, w) for b in range(batch) for w in windows]  # batch index slowest
    output: torch.Tensor | None = None
    count = window_weight_sum(image_size, windows, weights, mode)
    starts = range(0, len(jobs), sw_batch_size)
    for start in progress_bar(starts, desc=desc, total=len(starts)) if progress else starts:
        chunk = jobs[start:start + sw_batch_size]
        x = torch.cat([inputs[(slice(b, b + 1), slice(None), *w)] for b, w in chunk]).to(sw_device)
        pred = predictor(x)  # (n, C_out, *roi)
        if tuple(pred.shape[2:]) != tuple(roi) or pred.shape[0] != len(chunk):
            raise ValueError(f"predictor returned {tuple(pred.shape)} for windows {tuple(x.shape)}; "
                             "it must keep the batch and spatial size")
        if output is None:
            output = torch.zeros((batch, pred.shape[1], *image_size), dtype=compute_dtype, device=device)
        pred = pred.to(device=device, dtype=compute_dtype)
        if mode != "constant":  # in place (MONAI too); constant weights are ones: nothing to do
            pred *= weights
        for k, (b, w) in enumerate(chunk):
            output[(b, slice(None), *w)] += pred[k]
        del x, pred
    assert output is not None
    output /= count
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
    return output[(slice(None), slice(None), *crop)] if any(p for pair in pads for p in pair) else output


def window_count(spatial: Sequence[int], roi_size: int | Sequence[int], overlap: float = 0.25) -> int:
    """Number of windows per batch item (for progress estimates and benchmarks)."""
    roi = resolve_roi(roi_size, spatial)
    size = tuple(max(s, r) for s, r in zip(spatial, roi))
    intervals = scan_intervals(size, roi, overlap)
    return math.prod(len(window_starts(s, r, i)) for s, r, i in zip(size, roi, intervals))


# ----------------------------------------------------------------------------- whole volume
def padded_size(size: int, multiple: int, minimum: int) -> int:
    """The smallest size >= ``max(size, minimum)`` that is a multiple of ``multiple``."""
    return max(minimum, -(-size // multiple) * multiple)


def block_plan(size: int, block: int, halo: int) -> list[tuple[slice, slice, slice]]:
    """Blocks along one axis: (read, core within the read block, core within the axis).

    Cores of ``block`` voxels tile ``[0, size)``; each is read with ``halo`` extra voxels on both
    sides (clipped at the axis ends). With ``block``, ``halo`` and ``size`` multiples of the
    network's down-sampling factor every block sits on the whole volume's stride grid, so a
    halo at least the receptive field's radius gives the whole-volume result in every core."""
    if block <= 0 or block >= size:
        return [(slice(0, size), slice(0, size), slice(0, size))]
    plan = []
    for start in range(0, size, block):
        stop = min(start + block, size)
        lo, hi = max(start - halo, 0), min(stop + halo, size)
        plan.append((slice(lo, hi), slice(start - lo, stop - lo), slice(start, stop)))
    return plan


@torch.no_grad()
def whole_volume_inference(inputs: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
                           multiple_of: int | Sequence[int], min_size: int | Sequence[int] = 0, cval: float = 0.0,
                           block_size: int | Sequence[int] = 0, halo: int | Sequence[int] = 0,
                           device: torch.device | str | None = None, progress: bool = False,
                           desc: str = "blocks") -> torch.Tensor:
    """``predictor`` on the whole volume (B, C, *spatial) at once, for a fully convolutional network.

    Each axis is padded with ``cval`` to ``padded_size(size, multiple_of, min_size)`` (``diff // 2``
    before, as the sliding window pads), so a volume that fits in one window of size ``min_size``
    gets exactly the sliding window's result. ``block_size`` > 0 splits the padded volume into
    blocks of that core size read with ``halo`` voxels of context (see :func:`block_plan`) for
    volumes whose activations do not fit in memory; 0 runs one pass. The output (B, C_out,
    *spatial) is in the input's floating dtype on ``device`` (default: the input's device)."""
    if inputs.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial), got shape {tuple(inputs.shape)}")
    spatial = tuple(inputs.shape[2:])
    n = len(spatial)
    multiples = _as_tuple(multiple_of, n, "multiple_of")
    minimums, blocks, halos = (_as_tuple(v, n, name) for v, name in
                               ((min_size, "min_size"), (block_size, "block_size"), (halo, "halo")))
    compute_dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    device = torch.device(device) if device is not None else inputs.device
    target = [padded_size(s, m, lo) for s, m, lo in zip(spatial, multiples, minimums)]
    pads = _pad_amounts(spatial, target)
    padded = any(p for pair in pads for p in pair)
    if padded:
        inputs = F.pad(inputs, [p for pair in reversed(pads) for p in pair], mode="constant", value=cval)
    plans = [block_plan(s, b, h) for s, b, h in zip(target, blocks, halos)]
    output: torch.Tensor | None = None
    jobs = list(itertools.product(*plans))
    for job in progress_bar(jobs, desc=desc, total=len(jobs)) if progress and len(jobs) > 1 else jobs:
        read, core, place = zip(*job)
        pred = predictor(inputs[(slice(None), slice(None), *read)])  # (B, C_out, *block)
        if tuple(pred.shape[2:]) != tuple(r.stop - r.start for r in read) or pred.shape[0] != inputs.shape[0]:
            raise ValueError(f"predictor returned {tuple(pred.shape)} for a block of "
                             f"{tuple(r.stop - r.start for r in read)}; it must keep the batch and spatial size")
        if len(jobs) == 1:  # one pass: the prediction is the output, no second volume-sized buffer
            output = pred.to(device=device, dtype=compute_dtype)
            break
        if output is None:
            output = torch.empty((inputs.shape[0], pred.shape[1], *target), dtype=compute_dtype, device=device)
        output[(slice(None), slice(None), *place)] = pred[(slice(None), slice(None), *core)]
        del pred
    assert output is not None
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
    return output[(slice(None), slice(None), *crop)] if padded else output
