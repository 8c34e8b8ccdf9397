"""common.sliding_window: MONAI sliding_window_inference algorithm (scan, padding, border windows,
importance maps, accumulation), checked against hand-computed cases and a naive re-implementation;
the whole-volume mode (padding, blocks and their halo) against the network run directly."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.sliding_window import (block_plan, importance_map, padded_size, scan_intervals, sliding_window_inference,
                                   whole_volume_inference, window_count, window_slices, window_starts,
                                   window_weight_sum)


@pytest.mark.parametrize("size, roi, interval, expected", [
    (226, 96, 48, [0, 48, 96, 130]),  # the reference's examples
    (113, 96, 48, [0, 17]),
    (96, 96, 96, [0]),
    (144, 96, 48, [0, 48]),
    (145, 96, 48, [0, 48, 49]),
    (10, 4, 1, list(range(7))),
])
def test_window_starts_last_window_flush_with_border(size, roi, interval, expected):
    assert window_starts(size, roi, interval) == expected


def test_scan_intervals():
    assert scan_intervals((226, 96, 50), (96, 96, 40), 0.5) == (48, 96, 20)
    assert scan_intervals((226,), (96,), 0.25) == (72,)  # MONAI default overlap
    assert scan_intervals((10,), (1,), 0.5) == (1,)  # int(0.5) = 0 -> 1
    with pytest.raises(ValueError):
        scan_intervals((10,), (4,), 1.0)


def test_windows_are_the_cartesian_product_last_axis_fastest():
    slices = window_slices((100, 60), (50, 40), (25, 20))
    starts = [(s[0].start, s[1].start) for s in slices]
    assert starts == [(0, 0), (0, 20), (25, 0), (25, 20), (50, 0), (50, 20)]
    assert all(s[0].stop - s[0].start == 50 and s[1].stop - s[1].start == 40 for s in slices)
    assert window_count((100, 60), (50, 40), overlap=0.5) == 6
    # the bundle's 96^3 windows on a 226 x 113 x 96 volume: 4 * 2 * 1
    assert window_count((226, 113, 96), 96, overlap=0.5) == 8


def test_gaussian_importance_map_formula():
    roi = (7, 10)
    w = importance_map(roi, "gaussian", 0.125)
    expected = np.ones(())
    for n in roi:
        x = np.arange(n) - (n - 1) / 2.0
        expected = np.multiply.outer(expected, np.exp(-x ** 2 / (2 * (0.125 * n) ** 2)))
    expected = np.maximum(expected, max(expected.min(), 1e-3))
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert w.dtype == torch.float32
    assert float(w.min()) == pytest.approx(1e-3)  # the tails are clamped at 1e-3
    odd = importance_map((5, 9, 3), "gaussian", 0.5)
    assert float(odd[2, 4, 1]) == 1.0 and float(odd.max()) == 1.0  # peak 1 at the centre, not normalised
    assert torch.equal(importance_map((3, 4), "constant"), torch.ones(3, 4))
    with pytest.raises(ValueError):
        importance_map((3,), "triangle")


def naive_sliding_window(x, roi, predictor, overlap, weights):
    """Reference written from the algorithm's description: pad, loop windows one by one, blend."""
    spatial = x.shape[2:]
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(spatial, roi)]
    flat = [p for pair in reversed(pads) for p in pair]
    xp = torch.nn.functional.pad(x, flat)
    size = xp.shape[2:]
    starts = []
    for s, r in zip(size, roi):
        interval = r if r == s else max(int(r * (1 - overlap)), 1)
        k = 1
        while (k - 1) * interval + r < s:
            k += 1
        starts.append([min(d * interval, s - r) for d in range(k)])
    out, count = None, torch.zeros(size)
    for b in range(x.shape[0]):
        for st in itertools.product(*starts):
            sl = tuple(slice(a, a + r) for a, r in zip(st, roi))
            pred = predictor(xp[(slice(b, b + 1), slice(None), *sl)])[0]
            if out is None:
                out = torch.zeros(x.shape[0], pred.shape[0], *size)
            out[(b, slice(None), *sl)] += pred * weights
            if b == 0:
                count[sl] += weights
    out = out / count
    return out[(slice(None), slice(None), *(slice(a, a + s) for (a, _), s in zip(pads, spatial)))]


def conv_net(dim: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.Tanh(), conv(4, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("shape, roi", [((1, 1, 37, 50), (16, 24)), ((2, 1, 20, 9, 13), (8, 8, 8))])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_matches_naive_reference(shape, roi, mode):
    torch.manual_seed(1)
    x = torch.randn(shape)
    net = conv_net(len(roi))
    with torch.no_grad():
        got = sliding_window_inference(x, roi, 3, net, overlap=0.5, mode=mode)
        expected = naive_sliding_window(x, roi, net, 0.5, importance_map(roi, mode))
    assert got.shape == (shape[0], 2, *shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 40, 28), (1, 1, 24, 16, 20)])
def test_one_window_covering_the_volume_equals_whole_volume_inference(shape):
    torch.manual_seed(2)
    x = torch.randn(shape)
    net = conv_net(len(shape) - 2)
    with torch.no_grad():
        whole = net(x)
        for mode in ("constant", "gaussian"):
            sw = sliding_window_inference(x, shape[2:], 4, net, overlap=0.5, mode=mode)
            torch.testing.assert_close(sw, whole, rtol=1e-6, atol=1e-6)
        assert torch.equal(sliding_window_inference(x, shape[2:], 4, net, overlap=0.5), whole)


def test_smaller_image_is_padded_with_cval_and_cropped_back():
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    seen = []

    def predictor(w):
        seen.append(w.clone())
        return w * 2
    out = sliding_window_inference(x, (8, 8), 1, predictor, overlap=0.5, cval=-1.0)
    assert torch.equal(out, x * 2)
    assert len(seen) == 1 and seen[0].shape == (1, 1, 8, 8)
    # 3 rows of padding: 1 before, 2 after; 1 column: 0 before, 1 after
    assert torch.equal(seen[0][0, 0, 1:6, 0:7], x[0, 0])
    assert (seen[0][0, 0, 0] == -1).all() and (seen[0][0, 0, 6:] == -1).all() and (seen[0][0, 0, :, 7] == -1).all()


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_pointwise_predictor_is_reproduced_exactly_enough(mode):
    """Every window agrees for a pointwise predictor, so any blending returns f(x)."""
    x = torch.randn(2, 1, 33, 18, 21)
    out = sliding_window_inference(x, (16, 16, 16), 5, lambda w: torch.cat([3 * w + 1, -w], dim=1),
                                   overlap=0.6, mode=mode)
    torch.testing.assert_close(out, torch.cat([3 * x + 1, -x], dim=1), rtol=1e-5, atol=1e-5)


def test_window_batch_size_and_batch_items_do_not_change_the_result():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 30, 26)
    net = conv_net(2)
    with torch.no_grad():
        results = [sliding_window_inference(x, (12, 12), n, net, overlap=0.5) for n in (1, 4, 7, 100)]
        single = torch.cat([sliding_window_inference(x[i:i + 1], (12, 12), 4, net, overlap=0.5) for i in range(2)])
    for r in results[1:] + [single]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6)


def test_window_batches_and_half_precision_outputs_accumulate_in_input_dtype():
    calls = []

    def predictor(w):
        calls.append(w.shape[0])
        return w.half()
    x = torch.rand(1, 1, 20, 20)
    out = sliding_window_inference(x, (8, 8), 4, predictor, overlap=0.5)
    assert out.dtype == torch.float32
    assert calls == [4, 4, 4, 4]  # 4 x 4 windows, 4 per call
    torch.testing.assert_close(out, x.half().float())


def test_predictor_must_keep_the_window_size():
    with pytest.raises(ValueError, match="spatial size"):
        sliding_window_inference(torch.rand(1, 1, 16, 16), (8, 8), 2, lambda w: w[..., :4, :4])


# ----------------------------------------------------------------------------- constant-mode count, whole volume
def test_constant_count_is_the_number_of_windows_over_each_voxel():
    # size 226, roi 96, overlap 0.5 -> starts 0, 48, 96, 130 (hand count per position below)
    windows = window_slices((226,), (96,), (48,))
    count = window_weight_sum((226,), windows, torch.ones(96), "constant")[0, 0]
    expected = {0: 1, 47: 1, 48: 2, 95: 2, 96: 2, 129: 2, 130: 3, 143: 3, 144: 2, 191: 2, 192: 1, 225: 1}
    assert {i: int(count[i]) for i in expected} == expected
    # 3-D: the outer product of the per-axis counts, as adding a ones-window per window gives
    windows = window_slices((130, 96, 113), (96, 96, 96), (48, 96, 48))
    summed = torch.zeros(1, 1, 130, 96, 113)
    for w in windows:
        summed[(slice(None), slice(None), *w)] += 1
    assert torch.equal(window_weight_sum((130, 96, 113), windows, torch.ones(96, 96, 96), "constant"), summed)


@pytest.mark.parametrize("size, multiple, minimum, expected", [(243, 16, 96, 256), (40, 16, 96, 96), (96, 16, 96, 96),
                                                               (97, 16, 0, 112), (168, 16, 96, 176)])
def test_padded_size(size, multiple, minimum, expected):
    assert padded_size(size, multiple, minimum) == expected


def test_block_plan_cores_tile_the_axis_and_reads_carry_the_halo():
    plan = block_plan(256, 96, 32)
    assert [(r.start, r.stop) for r, _, _ in plan] == [(0, 128), (64, 224), (160, 256)]
    assert [(p.start, p.stop) for _, _, p in plan] == [(0, 96), (96, 192), (192, 256)]
    assert [(c.start, c.stop) for _, c, _ in plan] == [(0, 96), (32, 128), (32, 96)]
    assert block_plan(256, 0, 32) == [(slice(0, 256), slice(0, 256), slice(0, 256))]


def _box_filter_net(depth: int) -> nn.Module:
    """``depth`` 3x3x3 mean filters with zero padding: receptive-field radius = depth voxels."""
    layers = []
    for _ in range(depth):
        conv = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(conv.weight, 1 / 27)
        layers.append(conv)
    return nn.Sequential(*layers).double()


def test_whole_volume_equals_the_network_on_the_padded_volume_and_blocks_with_a_wide_halo_equal_it():
    torch.manual_seed(0)
    net = _box_filter_net(3)
    x = torch.rand(2, 1, 50, 37, 20, dtype=torch.float64)
    with torch.no_grad():
        one_pass = whole_volume_inference(x, net, 8, 16)
        # padded to (56, 40, 24) with diff // 2 before, as the sliding window pads
        expected = net(torch.nn.functional.pad(x, (2, 2, 1, 2, 3, 3)))[..., 3:53, 1:38, 2:22]
        assert torch.equal(one_pass, expected)
        blocks = whole_volume_inference(x, net, 8, 16, block_size=16, halo=8)  # halo 8 >= radius 3
        assert torch.allclose(blocks, one_pass, rtol=0, atol=1e-12)
        no_halo = whole_volume_inference(x, net, 8, 16, block_size=16, halo=0)
        assert (no_halo - one_pass).abs().max() > 1e-3  # the halo is what makes blocks exact


def test_whole_volume_equals_the_sliding_window_when_one_window_covers_the_volume():
    torch.manual_seed(1)
    net = _box_filter_net(2).float()
    x = torch.rand(1, 1, 30, 17, 24)
    with torch.no_grad():
        assert torch.equal(whole_volume_inference(x, net, 8, (32, 24, 24)),
                           sliding_window_inference(x, (32, 24, 24), 1, net, overlap=0.5))
