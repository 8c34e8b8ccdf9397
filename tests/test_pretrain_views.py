"""pretrain.views and its common.augment blocks: resized crop against torchvision, PIL solarize and
grey levels, blur properties, reproducibility, DINO's per-view probabilities, normalisation."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from common.augment import (apply_blur, apply_grayscale, apply_resized_crop, apply_solarize, make_generator,
                            sample_resized_crop)
from pretrain.views import (IMAGENET_MEAN, IMAGENET_STD, dino_specs, mae_specs, make_views, method_specs,
                            render_views, simclr_taps, simclr_views)

MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def _images(n, h, w, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------- resized crop
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [24, 90])  # down- and up-sampling
def test_resized_crop_equals_torchvision(mode, size):
    x = torch.rand(8, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    boxes = sample_resized_crop(8, 50, 70, (0.08, 1.0), make_generator(2))
    out = apply_resized_crop(x, boxes, size, mode)
    for b, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(x[b], y0, x0, y1 - y0 + 1, x1 - x0 + 1, [size, size], MODES[mode], antialias=True)
        assert (out[b] - ref).abs().max() < 1e-4


def test_resized_crop_sampling_matches_torchvision():
    """Same distribution as RandomResizedCrop.get_params (retry loop included): on a wide image
    with scale up to 1 many draws do not fit, which a clamping sampler would get wrong."""
    h, w, n = 40, 64, 4000
    ours = sample_resized_crop(n, h, w, (0.08, 1.0), make_generator(3))
    ow, oh = ours[:, 2] - ours[:, 0] + 1, ours[:, 3] - ours[:, 1] + 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        img = torch.zeros(1, h, w)
        ref = torch.tensor([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)],
                           dtype=torch.float64)  # (n, 4) top, left, height, width
    rh, rw = ref[:, 2], ref[:, 3]
    for a, b in ((ow, rw), (oh, rh), (ow * oh, rw * rh)):
        assert abs(a.mean() - b.mean()) < 0.03 * b.mean()
        assert abs(a.std() - b.std()) < 0.06 * b.std()
    assert ours[:, :2].min() >= 0 and ours[:, 2].max() <= w - 1 and ours[:, 3].max() <= h - 1


def test_resized_crop_fallback_is_torchvision_centre_crop():
    # scale > 1 never fits: torchvision falls back to the centre crop cut to the ratio range
    boxes = sample_resized_crop(3, 30, 100, (1.5, 2.0), make_generator(0))
    assert boxes.tolist() == [[30, 0, 69, 29]] * 3  # width round(30 * 4/3) = 40 at left (100 - 40) // 2
    ref = T.RandomResizedCrop.get_params(torch.zeros(1, 30, 100), (1.5, 2.0), (3 / 4, 4 / 3))
    assert ref == (0, 30, 30, 40)


# ----------------------------------------------------------------------------- colour blocks
def test_solarize_and_grayscale_match_pil():
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack([levels, levels[::-1], (levels.astype(int) * 7) % 256], -1).reshape(16, 16, 3).astype(np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x2 = torch.cat([x, x])
    flags = torch.tensor([True, False])
    sol = apply_solarize(x2, flags, 128 / 255)
    pil_sol = np.asarray(ImageOps.solarize(Image.fromarray(rgb), 128))
    assert np.array_equal((sol[0] * 255).round().byte().permute(1, 2, 0).numpy(), pil_sol)
    assert torch.equal(sol[1], x[0])
    gray = apply_grayscale(x2, flags)
    pil_gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)  # PIL rounds to uint8
    assert np.abs(gray[0, 0].numpy() * 255 - pil_gray).max() <= 0.5 + 1e-3
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2])
    assert torch.equal(gray[1], x[0])
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1.0
    assert apply_grayscale(red, torch.tensor([True])).flatten().tolist() == pytest.approx([0.299] * 3)


def test_blur_properties():
    x = torch.rand(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    flags = torch.tensor([False, True, False])
    sigma = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    for kwargs in ({}, {"kernel_size": 23, "border_type": "constant"}):
        out = apply_blur(x, flags, sigma, **kwargs)
        assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])
    const = torch.full((2, 3, 30, 30), 0.3)
    assert (apply_blur(const, torch.tensor([True, True]), sigma[:2]) - 0.3).abs().max() < 1e-6


def test_simclr_blur_is_upstream_zero_padded_kernel():
    """simclr-pytorch: taps from size // 10 (224 -> 23), normalised exp(-x^2 / 2 sigma^2), separable
    Conv2d with zero padding (so borders darken)."""
    assert [simclr_taps(s) for s in (224, 96, 64, 32)] == [23, 9, 7, 3]
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    sigma = 1.3
    r = np.arange(-11, 12)
    g = torch.tensor(np.exp(-r ** 2 / (2 * sigma ** 2)) / np.exp(-r ** 2 / (2 * sigma ** 2)).sum(), dtype=torch.float32)
    ref = F.conv2d(x, g.view(1, 1, 23, 1).repeat(3, 1, 1, 1), padding=(11, 0), groups=3)
    ref = F.conv2d(ref, g.view(1, 1, 1, 23).repeat(3, 1, 1, 1), padding=(0, 11), groups=3)
    out = apply_blur(x, torch.tensor([True]), torch.tensor([sigma], dtype=torch.float64), 23, "constant")
    assert (out - ref).abs().max() < 1e-5


# ----------------------------------------------------------------------------- recipes
def test_reproducible_and_views_differ():
    x = _images(4, 48, 48)
    cfg = SimpleNamespace(image_size=32, local_size=16, n_local=2)
    for method in ("simclr", "moco", "byol", "dino", "mae"):
        a = make_views(method, x, make_generator(7, 0, 3), cfg)
        b = make_views(method, x, make_generator(7, 0, 3), cfg)
        c = make_views(method, x, make_generator(7, 0, 4), cfg)
        assert all(torch.equal(u, v) for u, v in zip(a, b)), method
        assert not any(torch.equal(u, v) for u, v in zip(a, c)), method
        if len(a) > 1:
            assert not torch.equal(a[0], a[1]), method


def test_hflip_is_applied_about_half_the_time():
    """MAE with a full-image crop at the input size: each view is the image or its mirror."""
    spec = replace(mae_specs(16)[0], scale=(1.0, 1.0), ratio=(1.0, 1.0), ops=("hflip",))
    x = _images(1, 16, 16).expand(200, -1, -1, -1)
    v = render_views(x, [spec], make_generator(0))[0]
    ref = x[:1].float() / 255
    same = ((v - ref).abs().amax((1, 2, 3)) < 1e-4)
    mirrored = ((v - ref.flip(-1)).abs().amax((1, 2, 3)) < 1e-4)
    assert bool((same ^ mirrored).all()) and 0.4 < same.float().mean() < 0.6


def _high_freq(v):
    return (v[..., 1:, :] - v[..., :-1, :]).pow(2).mean((1, 2, 3)) + (v[..., 1:] - v[..., :-1]).pow(2).mean((1, 2, 3))


def test_dino_views_blur_and_solarize_frequencies():
    """Same generator with and without DINO's blur / solarize: the random streams stay aligned, so
    per sample the only difference is the op itself."""
    n, board = 200, torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    board[..., ::2, ::2] = board[..., 1::2, 1::2] = 255  # 1-px checkerboard: maximal high frequency
    x = board.expand(n, -1, -1, -1)
    specs = dino_specs(32, 16, 2)
    views = render_views(x, specs, make_generator(5))
    assert len(views) == 4 and [tuple(v.shape) for v in views] == [(n, 3, 32, 32)] * 2 + [(n, 3, 16, 16)] * 2
    plain = render_views(x, [replace(s, blur_prob=0.0, solarize_prob=0.0) for s in specs], make_generator(5))
    no_sol = render_views(x, [replace(s, solarize_prob=0.0) for s in specs], make_generator(5))
    ratios = [_high_freq(v) / _high_freq(p) for v, p in zip(no_sol, plain)]
    assert all(r.max() < 1 + 1e-5 for r in ratios)  # a blur never adds high frequencies
    blurred = [(r < 1 - 1e-5).float().mean().item() for r in ratios]
    # sigma ~ U[0.1, 2]: below ~0.2 the Gaussian is a float32 identity, so ~94 % of applied blurs show
    assert blurred[0] > 0.88 and 0.03 < blurred[1] < 0.17 and 0.38 < (blurred[2] + blurred[3]) / 2 < 0.56
    solarized = [(v - p).abs().amax((1, 2, 3)).gt(1e-6).float().mean().item() for v, p in zip(views, no_sol)]
    assert solarized[0] == 0 and 0.11 < solarized[1] < 0.29 and solarized[2] == solarized[3] == 0


def test_simclr_unnormalised_others_normalised():
    mean_rgb = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    x = mean_rgb.expand(6, 3, 40, 40).contiguous()
    cfg = SimpleNamespace(image_size=24, local_size=12, n_local=2, mean=None, std=None)
    quiet = dict(jitter_prob=0.0, gray_prob=0.0, solarize_prob=0.0)
    for method in ("moco", "byol", "dino", "mae"):
        views = render_views(x, [replace(s, **quiet) for s in method_specs(method, cfg)], make_generator(1))
        assert max(v.abs().max().item() for v in views) < 0.01, method  # rounding of the mean to uint8
    simclr = render_views(x, [replace(s, blur_prob=0.0, **quiet) for s in method_specs("simclr", cfg)],
                          make_generator(1))
    assert all((v - mean_rgb / 255).abs().max() < 1e-5 for v in simclr)
    for v in simclr_views(_images(16, 40, 40), make_generator(2), size=24):  # all ops on, real content
        assert v.min() >= 0 and v.max() <= 1 and v.max() > 0.9
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    moco = make_views("moco", _images(16, 40, 40), make_generator(2), cfg)
    assert all(v.amin((0, 2, 3)).sub(lo).abs().max() < 0.5 for v in moco)  # dark pixels map near (0 - mean) / std


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown method 'swav'"):
        make_views("swav", _images(2, 16, 16), make_generator(0), SimpleNamespace())
    with pytest.raises(ValueError, match="uint8"):
        make_views("mae", torch.rand(2, 3, 16, 16), make_generator(0), SimpleNamespace(image_size=8))
    with pytest.raises(ValueError, match="unknown op"):
        replace(mae_specs(8)[0], ops=("hflip", "rotate"))
