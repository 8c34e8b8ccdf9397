"""common.augment: geometric ops with hand-checked index maps, MONAI-style zoom, image/mask
alignment under replayed parameters, colour jitter against torchvision, reproducible generators."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from common.augment import (ColorJitterParams, apply_color_jitter, apply_crop, apply_flip, apply_rot90,
                            apply_zoom, make_generator, sample_color_jitter, sample_crop, sample_flags,
                            sample_rot90, sample_zoom, scale_intensity, scale_intensity_)


def positions(b: int, h: int, w: int) -> torch.Tensor:
    """(b, 1, h, w) int64 mask whose value encodes the pixel's own (row, col): 1000*row + col."""
    r = torch.arange(h).view(h, 1)
    c = torch.arange(w).view(1, w)
    return (1000 * r + c).expand(b, 1, h, w).clone()


# ----------------------------------------------------------------------------- generators
def test_make_generator_reproducible_and_distinct_per_key():
    draw = lambda *k: torch.rand(8, generator=make_generator(*k))  # noqa: E731
    assert torch.equal(draw(0, 1, 7), draw(0, 1, 7))
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1), (1, 0), (0,), (0, 0), (5, 0, 0)]
    draws = [draw(*k) for k in keys]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.equal(draws[i], draws[j]), (keys[i], keys[j])
    # independent of the global RNG
    torch.manual_seed(1)
    a = draw(3, 4, 5)
    torch.manual_seed(2)
    assert torch.equal(a, draw(3, 4, 5))


def test_sampled_parameters_replay_from_the_same_keys():
    def sample(gen):
        return (sample_flags(6, 0.5, gen), sample_rot90(6, 0.75, gen), sample_zoom(6, 0.5, 0.9, 1.1, gen),
                sample_crop(6, (32, 32), (24, 24), gen), sample_color_jitter(6, 0.2, 0.2, 0.2, 0.05, gen))
    a, b = sample(make_generator(5, 1, 99)), sample(make_generator(5, 1, 99))
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert all(torch.equal(getattr(a[4], f), getattr(b[4], f))
               for f in ("brightness", "contrast", "saturation", "hue", "order"))


def test_sampler_ranges():
    gen = make_generator(0)
    assert not sample_flags(100, 0.0, gen).any() and sample_flags(100, 1.0, gen).all()
    k = sample_rot90(400, 1.0, gen)
    assert set(k.tolist()) == {1, 2, 3}
    assert sample_rot90(50, 0.0, gen).eq(0).all()
    z = sample_zoom(400, 1.0, 0.9, 1.1, gen)
    assert z.dtype == torch.float64 and z.min() >= 0.9 and z.max() <= 1.1 and z.std() > 0.03
    assert sample_zoom(20, 0.0, 0.9, 1.1, gen).eq(1.0).all()
    c = sample_crop(400, (10, 12), (4, 5), gen)
    assert c[:, 0].min() == 0 and c[:, 0].max() == 6 and c[:, 1].min() == 0 and c[:, 1].max() == 7
    p = sample_color_jitter(300, 0.25, 0.5, 1.5, 0.1, gen)
    assert p.brightness.min() >= 0.75 and p.brightness.max() <= 1.25
    assert p.contrast.min() >= 0.5 and p.contrast.max() <= 1.5
    assert p.saturation.min() >= 0.0 and p.saturation.max() <= 2.5  # lower bound clamped at 0
    assert p.hue.abs().max() <= 0.1
    assert sorted(p.order[0].tolist()) == [0, 1, 2, 3] and len({tuple(o) for o in p.order.tolist()}) > 10


# ----------------------------------------------------------------------------- flips / rot90 / crop
def test_flip_both_axes_is_a_180_degree_rotation():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    flags = torch.tensor([True, False])
    out = apply_flip(x, flags)
    assert torch.equal(out[0], torch.rot90(x[0], 2, dims=(-2, -1)))
    assert torch.equal(out[1], x[1])
    assert torch.equal(apply_rot90(x, torch.tensor([2, 0])), out)
    # single axis: rows reversed
    assert apply_flip(x, torch.tensor([True, True]), dims=(-2,))[0, 0, :, 0].tolist() == [20, 15, 10, 5, 0]


def test_rot90_k_mapping_hand_checked():
    x = torch.tensor([[0, 1], [2, 3]]).view(1, 1, 2, 2).expand(4, 1, 2, 2).clone()
    out = apply_rot90(x, torch.tensor([0, 1, 2, 3]))
    assert out[0, 0].tolist() == [[0, 1], [2, 3]]
    assert out[1, 0].tolist() == [[1, 3], [0, 2]]  # one quarter turn counter-clockwise
    assert out[2, 0].tolist() == [[3, 2], [1, 0]]
    assert out[3, 0].tolist() == [[2, 0], [3, 1]]
    with pytest.raises(ValueError, match="square"):
        apply_rot90(torch.zeros(1, 1, 2, 3), torch.tensor([1]))
    assert apply_rot90(torch.zeros(1, 1, 2, 3), torch.tensor([2])).shape == (1, 1, 2, 3)


def test_crop_takes_the_sampled_window():
    m = positions(3, 10, 12)
    corners = torch.tensor([[0, 0], [6, 7], [2, 3]])
    out = apply_crop(m, corners, (4, 5))
    assert out.shape == (3, 1, 4, 5)
    assert out[1, 0, 0, 0].item() == 6007 and out[1, 0, -1, -1].item() == 9011
    assert out[2, 0].tolist()[1][:2] == [3003, 3004]
    with pytest.raises(ValueError, match="larger"):
        sample_crop(1, (4, 4), (5, 4), make_generator(0))


# ----------------------------------------------------------------------------- zoom (MONAI RandZoom, keep_size)
def _replicate_pad(r: torch.Tensor, before: int, size: int) -> torch.Tensor:
    """Edge padding by index clamping (independent of F.pad): output pixel i <- input clamp(i - before)."""
    idx = (torch.arange(size) - before).clamp(0, r.shape[-1] - 1)
    return r[..., idx, :][..., :, idx]


@pytest.mark.parametrize("z, new, before", [(0.9, 201, 11), (0.75, 168, 28), (0.5, 112, 56)])
def test_zoom_out_size_floor_and_edge_padding_floor_half_before(z, new, before):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 224, 224, generator=gen)
    assert int(224 * z) == new
    out = apply_zoom(x, torch.tensor([z], dtype=torch.float64))
    resized = F.interpolate(x, size=(new, new), mode="area")
    assert out.shape == x.shape
    assert torch.equal(out, _replicate_pad(resized, before, 224))
    diff = 224 - new
    assert before == diff // 2  # floor(diff/2) before, the rest after
    assert torch.equal(out[..., before, before], resized[..., 0, 0])
    assert torch.equal(out[..., 0, 0], resized[..., 0, 0]) and torch.equal(out[..., -1, -1], resized[..., -1, -1])


@pytest.mark.parametrize("z, new, start", [(1.1, 246, 11), (1.05, 235, 5), (1.2, 268, 22)])
def test_zoom_in_centre_crop_floor_half_before(z, new, start):
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(1))
    out = apply_zoom(x, torch.tensor([z, 1.0], dtype=torch.float64))
    resized = F.interpolate(x[:1], size=(new, new), mode="area")
    assert start == (new - 224) // 2
    assert torch.equal(out[0], resized[0, :, start:start + 224, start:start + 224])
    assert torch.equal(out[1], x[1])  # zoom 1: untouched


def test_zoom_odd_target_size_crops_like_monai_center_spatial_crop():
    # 9 -> floor(9 * 1.2) = 10; MONAI start = 10//2 - 9//2 = 1 (not floor(1/2) = 0)
    m = positions(1, 9, 9)
    out = apply_zoom(m, torch.tensor([1.2], dtype=torch.float64), mode="nearest")
    resized = F.interpolate(m.float(), size=(10, 10), mode="nearest").long()
    assert torch.equal(out, resized[..., 1:10, 1:10])
    # 9 -> floor(6.3) = 6: pad 1 before, 2 after
    out = apply_zoom(m, torch.tensor([0.7], dtype=torch.float64), mode="nearest")
    resized = F.interpolate(m.float(), size=(6, 6), mode="nearest").long()
    assert torch.equal(out, _replicate_pad(resized, 1, 9))


def test_zoom_keeps_integer_masks_exact_with_nearest():
    m = positions(2, 16, 16)
    out = apply_zoom(m, torch.tensor([1.3, 0.8], dtype=torch.float64), mode="nearest")
    assert out.dtype == torch.int64
    valid = set(m.flatten().tolist())
    assert set(out.flatten().tolist()) <= valid  # no interpolated (invented) labels


# ----------------------------------------------------------------------------- image / mask alignment
def test_replayed_parameters_keep_image_and_mask_aligned():
    B, H = 8, 32
    mask = positions(B, H, H)
    image = torch.cat([mask.float(), torch.rand(B, 2, H, H)], 1)
    gen = make_generator(7, 0, 3)
    flips, k = sample_flags(B, 0.5, gen), sample_rot90(B, 0.75, gen)
    zoom, corners = sample_zoom(B, 0.8, 0.8, 1.25, gen), sample_crop(B, (H, H), (20, 20), gen)

    def geometry(x, mode):
        return apply_crop(apply_zoom(apply_rot90(apply_flip(x, flips), k), zoom, mode=mode), corners, (20, 20))

    img_out, mask_out = geometry(image, "nearest"), geometry(mask, "nearest")
    assert torch.equal(img_out[:, :1], mask_out.float())
    assert zoom.ne(1).any() and k.ne(0).any() and flips.any()


def test_flip_rot_crop_map_pixels_where_expected():
    B, H = 4, 12
    m = positions(B, H, H)
    flips = torch.tensor([True, False, True, False])
    k = torch.tensor([0, 1, 1, 3])
    corners = torch.tensor([[1, 2], [0, 0], [3, 4], [5, 1]])
    out = apply_crop(apply_rot90(apply_flip(m, flips), k), corners, (6, 6))
    for b in range(B):
        for i in range(6):
            for j in range(6):
                r, c = corners[b, 0].item() + i, corners[b, 1].item() + j  # position after rotation
                for _ in range(k[b].item()):  # undo quarter turns: rot90 maps out[r][c] <- in[c][H-1-r]
                    r, c = c, H - 1 - r
                if flips[b]:
                    r, c = H - 1 - r, H - 1 - c
                assert out[b, 0, i, j].item() == 1000 * r + c


# ----------------------------------------------------------------------------- colour jitter vs torchvision
def _torchvision_jitter(x: torch.Tensor, p: ColorJitterParams) -> torch.Tensor:
    out = []
    for b in range(x.shape[0]):
        img = x[b]
        for op in p.order[b].tolist():
            if op == 0:
                img = TF.adjust_brightness(img, float(p.brightness[b]))
            elif op == 1:
                img = TF.adjust_contrast(img, float(p.contrast[b]))
            elif op == 2:
                img = TF.adjust_saturation(img, float(p.saturation[b]))
            else:
                img = TF.adjust_hue(img, float(p.hue[b]))
        out.append(img)
    return torch.stack(out)


def _images(seed, n=48, size=16):
    gen = make_generator(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    x[0] = 255  # saturated and black images hit the clamps
    x[1] = 0
    return x, gen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_color_jitter_brightness_contrast_saturation_exact_on_uint8(seed):
    x, gen = _images(seed)
    p = sample_color_jitter(x.shape[0], 0.5, 0.5, 0.5, 0.0, gen)
    assert p.hue.eq(0).all()
    p.hue = torch.zeros_like(p.hue)
    ref = _torchvision_jitter(x, p).float()
    out = apply_color_jitter(x.float(), p)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} pixels differ, max {(out - ref).abs().max()}"


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_color_jitter_single_ops_exact(op):
    x, gen = _images(10 + len(op))
    p = sample_color_jitter(x.shape[0], 0.6, 0.6, 0.6, 0.0, gen)
    for other in ("brightness", "contrast", "saturation"):
        if other != op:
            setattr(p, other, torch.ones_like(p.brightness))
    assert torch.equal(apply_color_jitter(x.float(), p), _torchvision_jitter(x, p).float())


@pytest.mark.parametrize("seed", [0, 1])
def test_color_jitter_with_hue_within_one(seed):
    x, gen = _images(20 + seed)
    p = sample_color_jitter(x.shape[0], 0.25, 0.75, 0.25, 0.04, gen)
    assert p.hue.abs().max() > 0.02
    ref = _torchvision_jitter(x, p).float()
    diff = (apply_color_jitter(x.float(), p) - ref).abs()
    assert diff.max() <= 1
    assert diff.gt(0).float().mean() < 0.01  # off-by-one is rare rounding, not a different op


def test_color_jitter_float_images_match_torchvision_floats():
    x, gen = _images(30)
    xf = x.float() / 255
    p = sample_color_jitter(x.shape[0], 0.4, 0.4, 0.4, 0.05, gen)
    out = apply_color_jitter(xf, p, bound=1.0, uint8_semantics=False)
    ref = _torchvision_jitter(xf, p)
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()


def test_scale_intensity():
    x = torch.tensor([0.0, 127.5, 255.0, 510.0])
    assert scale_intensity(x).tolist() == [-1.0, 0.0, 1.0, 3.0]  # no clipping
    assert scale_intensity(x, 0, 255, 0, 1).tolist() == [0.0, 0.5, 1.0, 2.0]


def test_scale_intensity_in_place_is_bit_identical():
    x = torch.arange(256, dtype=torch.float32).repeat(3, 1)
    ref = scale_intensity(x.clone())
    out = scale_intensity_(x)
    assert out.data_ptr() == x.data_ptr()  # no copy of the tile
    assert torch.equal(out, ref)
    assert not torch.equal(ref, torch.arange(256, dtype=torch.float32) * (2 / 255) - 1)  # the order matters
