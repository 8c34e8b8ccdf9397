"""Click-guidance signals (nuclick/guidance.py) and batch augmentation (nuclick/dataset.py) against
scipy/skimage and the bundle's sampling rules (nuclick.md §4-5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.measure import label, regionprops

from common.augment import make_generator
from nuclick.config import AugmentConfig, GuidanceConfig
from nuclick.dataset import augment, val_batch
from nuclick.guidance import chessboard_distance, guidance_inputs, negative_points, positive_points, smooth_points


pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions: threads only add overhead


def _blobs(seed: int, shape=(40, 48), n=6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([(ndi.gaussian_filter(rng.random(shape), 2.5) > 0.52) for _ in range(n)]).astype(np.uint8)


def test_chessboard_distance_matches_scipy():
    masks = _blobs(0)
    masks[0, :, :10] = 1  # touching the image border: the outside is not background
    d = chessboard_distance(torch.from_numpy(masks)[:, None]).numpy()[:, 0]
    for m, got in zip(masks, d):
        np.testing.assert_array_equal(got, np.where(m > 0, ndi.distance_transform_cdt(m), 0))


def test_positive_click_distribution_is_exp_distance_minus_one():
    """Quantile-grid draws reproduce the exact probabilities (e^d - 1) / sum."""
    mask = np.zeros((16, 16), np.uint8)
    mask[3:12, 4:13] = 1  # 9x9 square: d = 1..5 in rings
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    points = positive_points(torch.from_numpy(mask)[None, None].expand(n, 1, 16, 16), u)
    counts = points.sum(0)[0].numpy()
    d = ndi.distance_transform_cdt(mask)
    expected = np.where(mask > 0, np.exp(d) - 1, 0)
    expected = expected / expected.sum()
    assert points.flatten(1).sum(1).eq(1).all()  # exactly one click per sample
    np.testing.assert_allclose(counts / n, expected, atol=1.5 / n)
    ring_means = [counts[d == k].mean() for k in range(1, 6)]
    assert all(a < b for a, b in zip(ring_means, ring_means[1:]))  # deeper is more likely
    assert counts[d == 5].sum() / n == pytest.approx(expected[d == 5].sum(), abs=1e-3)


def test_positive_click_always_inside_random_masks_and_uniform_option():
    masks = torch.from_numpy(_blobs(1, n=32))[:, None]
    masks[5] = 0  # an empty mask gives an empty map
    gen = torch.Generator().manual_seed(0)
    for use_distance in (True, False):
        for _ in range(20):
            p = positive_points(masks, torch.rand(32, generator=gen, dtype=torch.float64), use_distance)
            assert ((p > 0) <= (masks > 0)).all()
            assert p.flatten(1).sum(1).tolist() == [0.0 if i == 5 else 1.0 for i in range(32)]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    n = 1600
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    counts = positive_points(mask.expand(n, 1, 8, 8), u, use_distance=False).sum(0)[0]
    assert torch.all(counts[2:6, 2:6] == n / 16)  # uniform over the 16 pixels


def _others(seed: int, n: int = 400) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = label(ndi.gaussian_filter(rng.random((32, 32)), 1.5) > 0.55, connectivity=1)
    return torch.from_numpy(base.astype(np.int16))[None, None].expand(n, 1, 32, 32).contiguous()


def test_negative_clicks_at_floored_centroids_with_drop_rates():
    others = _others(2)
    base = others[0, 0].numpy()
    K = int(base.max())
    assert K >= 4
    props = {p.label: (int(np.floor(p.centroid[0])), int(np.floor(p.centroid[1]))) for p in regionprops(base)}
    full = negative_points(others[:1], make_generator(0), drop_rate=0.0)[0, 0]
    assert sorted(map(tuple, torch.nonzero(full).tolist())) == sorted(props.values())
    assert negative_points(others[:50], make_generator(0), drop_rate=1.0).sum() == 0

    n, drop = others.shape[0], 0.5
    neg = negative_points(others, make_generator(1), drop_rate=drop)[:, 0]
    marked = np.array([[bool(neg[i, r, c]) for (r, c) in props.values()] for i in range(n)])  # (n, K)
    empty = ~marked.any(1)
    assert empty.mean() == pytest.approx(drop + (1 - drop) * drop ** K, abs=0.08)
    assert marked.mean() == pytest.approx((1 - drop) ** 2, abs=0.05)  # kept map and kept nucleus
    assert neg.sum(dim=(1, 2)).max() <= K


def test_guidance_inputs_and_gaussian_option():
    mask = torch.zeros(2, 1, 20, 20)
    mask[:, :, 5:15, 5:15] = 1
    others = torch.zeros(2, 1, 20, 20, dtype=torch.int16)
    others[:, :, 0:3, 16:19] = 1
    image = torch.zeros(2, 3, 20, 20)
    cfg = GuidanceConfig(drop_rate=0.0, gaussian=True, sigma=1.0, truncated=2.0)
    x = guidance_inputs(image, mask, others, torch.tensor([0.3, 0.7], dtype=torch.float64), make_generator(0), cfg)
    assert x.shape == (2, 5, 20, 20)
    assert torch.allclose(x[:, 3].sum((1, 2)), torch.ones(2), atol=1e-5)  # interior point: kernel sums to 1
    r, c = divmod(int(x[0, 3].argmax()), 20)
    assert mask[0, 0, r, c] == 1
    assert x[0, 4, 1, 17] == x[0, 4].max() > 0  # negative at the floored centroid (1, 17), smoothed
    radius = int(2.0 * 1.0 + 0.5)
    assert (x[0, 3] > 0).sum() == (2 * radius + 1) ** 2
    g = torch.exp(-torch.arange(-2, 3.0) ** 2 / 2)
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    point = torch.zeros(1, 1, 9, 9)
    point[..., 4, 4] = 1
    assert torch.allclose(smooth_points(point)[0, 0, 2:7, 2:7], kernel, atol=1e-6)


def test_augment_shares_geometry_between_image_and_masks():
    n = 64
    gen = make_generator(3)
    mask = (torch.rand(n, 1, 16, 16, generator=gen) > 0.6).to(torch.uint8)
    mask[:, :, 0, :4] = 1  # asymmetric marker so every flip/rotation is visible
    others = (mask.to(torch.int16) * torch.arange(1, n + 1, dtype=torch.int16).view(n, 1, 1, 1))
    image = mask.float().repeat(1, 3, 1, 1) * 200
    no_colour = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    img2, mask2, others2 = augment(image, mask, others, make_generator(4), no_colour)
    assert torch.equal(img2[:, 0] / 200, mask2[:, 0].float())
    assert torch.equal(others2 > 0, mask2 > 0)
    assert torch.equal(others2.flatten(1).max(1).values, others.flatten(1).max(1).values)
    changed = (mask2 != mask).flatten(1).any(1).float().mean()
    assert 0.55 < changed < 0.9  # 1 - P(no flip and no rotation) = 1 - 0.25
    jittered, _, _ = augment(image, mask, others, make_generator(4), AugmentConfig())
    assert not torch.equal(jittered, img2) and jittered.min() >= 0 and jittered.max() <= 255


def test_validation_clicks_do_not_depend_on_batch_composition():
    mask = torch.zeros(4, 1, 12, 12, dtype=torch.uint8)
    mask[:, :, 2:10, 2:10] = 1
    image = torch.zeros(4, 3, 12, 12, dtype=torch.uint8)
    others = torch.zeros(4, 1, 12, 12, dtype=torch.int16)
    cfg, dev = GuidanceConfig(drop_rate=1.0), torch.device("cpu")
    whole, target = val_batch((image, mask, others, torch.arange(4)), 7, 2, cfg, dev)
    part, _ = val_batch((image[2:], mask[2:], others[2:], torch.tensor([2, 3])), 7, 2, cfg, dev)
    assert torch.equal(whole[2:], part)
    assert torch.equal(target, mask.float()) and whole[:, 4].sum() == 0
    assert whole[:, :3].eq(-1).all()  # uint8 0 -> -1
    other_epoch, _ = val_batch((image, mask, others, torch.arange(4)), 7, 3, cfg, dev)
    assert not torch.equal(other_epoch[:, 3], whole[:, 3])
