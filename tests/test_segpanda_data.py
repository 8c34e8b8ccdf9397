"""segPANDA data: discovery and start-up validation (bad input named), joint augmentation that
keeps image and mask aligned, colour ops on the image only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from common.augment import make_generator
from segpanda.dataset import (AugmentConfig, DatasetError, SegPandaDataset, apply_blur, center_crop,
                              find_samples, read_mask, sample_augment, train_transform, validate_samples)
from segpanda.demo import make_demo, synthetic_tile


def write_pair(root, split, name, image, mask, grade="3", slide="slideA", mask_rgb=True):
    folder = root / split / grade / slide
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.jpg", quality=95)
    m = np.stack([mask, (mask.astype(np.int64) * 40) % 256, np.full_like(mask, 9)], -1) if mask_rgb else mask
    Image.fromarray(m.astype(np.uint8)).save(folder / f"{name}_mask.png")
    return folder


def tile(h=40, w=48, value=3):
    return np.full((h, w, 3), 120, np.uint8), np.full((h, w), value, np.uint8)


def test_finds_pairs_and_reads_labels_from_channel_zero(tmp_path):
    img, mask = tile()
    mask[:10] = 5
    write_pair(tmp_path, "train", "b", img, mask, grade="0", slide="s2")
    write_pair(tmp_path, "train", "a", img, mask, grade="4", slide="s1")
    samples = find_samples(tmp_path, "train")
    assert [(s.grade, s.slide, s.image.name) for s in samples] == [("0", "s2", "b.jpg"), ("4", "s1", "a.jpg")]
    labels = read_mask(samples[0].mask)  # channels 1/2 hold other values: channel 0 is the label
    assert labels.dtype == np.uint8 and (labels[:10] == 5).all() and (labels[10:] == 3).all()
    assert validate_samples(samples, min_size=40, uniform=True) == (40, 48)
    image, target = SegPandaDataset(samples)[1]
    assert image.shape == (3, 40, 48) and image.dtype == torch.uint8 and torch.equal(target, torch.from_numpy(labels))


def test_mask_value_seven_is_named(tmp_path):
    img, mask = tile()
    mask[3, 4] = 7
    write_pair(tmp_path, "train", "bad", img, mask)
    samples = find_samples(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"bad_mask\.png.*\[7\].*0-5"):
        validate_samples(samples)
    with pytest.raises(DatasetError, match=r"bad_mask\.png"):  # also when loading without the start-up check
        SegPandaDataset(samples)[0]


def test_image_without_mask_is_named(tmp_path):
    img, mask = tile()
    folder = write_pair(tmp_path, "val", "ok", img, mask)
    Image.fromarray(img).save(folder / "lonely.jpg")
    with pytest.raises(DatasetError, match=r"lonely\.jpg"):
        find_samples(tmp_path, "val")
    with pytest.raises(DatasetError, match="split folder not found"):
        find_samples(tmp_path, "test")


def test_size_mismatch_and_crop_larger_than_image(tmp_path):
    img, mask = tile(40, 48)
    write_pair(tmp_path, "train", "small", img, mask)
    samples = find_samples(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"small\.jpg.*smaller than the crop 64"):
        validate_samples(samples, min_size=64)
    with pytest.raises(ValueError, match="larger than the image"):
        sample_augment(1, (40, 48), AugmentConfig(crop_size=64), make_generator(0))
    with pytest.raises(DatasetError, match="larger than the tile"):
        center_crop(img, 41, "x.jpg")
    write_pair(tmp_path, "test", "mis", img, tile(40, 40)[1])
    with pytest.raises(DatasetError, match=r"mis_mask\.png: mask size 40x40 differs"):
        validate_samples(find_samples(tmp_path, "test"))
    big_img, big_mask = tile(44, 48)
    write_pair(tmp_path, "train", "other", big_img, big_mask)
    with pytest.raises(DatasetError, match="one size"):
        validate_samples(find_samples(tmp_path, "train"), uniform=True)


def test_center_crop_matches_torchvision():
    x = np.arange(7 * 9).reshape(7, 9).astype(np.uint8)
    ours = center_crop(x, 4)
    ref = TF.center_crop(torch.from_numpy(x)[None], [4, 4])[0].numpy()
    np.testing.assert_array_equal(ours, ref)


def position_batch(n=6, h=37, w=45):
    """Image channels = (row, col, 0); mask = (row + 2 col) % 6: any misalignment shows."""
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    image = torch.stack([rows, cols, torch.zeros_like(rows)]).to(torch.uint8).expand(n, 3, h, w).clone()
    mask = ((rows + 2 * cols) % 6).to(torch.uint8).expand(n, h, w).clone()
    return image, mask


@pytest.mark.parametrize("seed", range(4))
def test_joint_geometry_keeps_image_and_mask_aligned(seed):
    image, mask = position_batch()
    cfg = AugmentConfig(crop_size=24, jitter_prob=0.0, blur_prob=0.0)
    params = sample_augment(len(image), (37, 45), cfg, make_generator(seed))
    x, y = train_transform(image, mask, params, cfg, mean=[0, 0, 0], std=[1 / 255] * 3)
    rows, cols = x[:, 0].round().long(), x[:, 1].round().long()
    assert torch.equal(y, (rows + 2 * cols) % 6)  # every pixel of the mask came from the same place
    for b in range(len(image)):  # the crop lies where sampled, flips reverse the order
        t, l = params.corners[b].tolist()
        r = torch.arange(t, t + 24).flip(0) if params.vflip[b] else torch.arange(t, t + 24)
        c = torch.arange(l, l + 24).flip(0) if params.hflip[b] else torch.arange(l, l + 24)
        assert torch.equal(rows[b, :, 0], r) and torch.equal(cols[b, 0], c)
    assert params.hflip.any() and (~params.hflip).any()  # both branches exercised over the batch


def test_colour_and_blur_touch_the_image_only():
    image, mask = position_batch(n=8)
    image = (image.float() * 3).clamp(0, 255).to(torch.uint8)
    plain = AugmentConfig(crop_size=24, jitter_prob=0.0, blur_prob=0.0)
    full = AugmentConfig(crop_size=24, jitter_prob=1.0, blur_prob=1.0)
    p_plain = sample_augment(8, (37, 45), plain, make_generator(3))
    p_full = sample_augment(8, (37, 45), full, make_generator(3))
    assert torch.equal(p_plain.corners, p_full.corners) and torch.equal(p_plain.hflip, p_full.hflip)
    x0, y0 = train_transform(image, mask, p_plain, plain, [0.5] * 3, [0.25] * 3)
    x1, y1 = train_transform(image, mask, p_full, full, [0.5] * 3, [0.25] * 3)
    assert torch.equal(y0, y1) and y1.dtype == torch.int64
    assert (x0 - x1).abs().mean() > 0.05


def test_blur_properties():
    const = torch.full((2, 3, 20, 20), 77.0)
    flags = torch.tensor([True, False])
    assert torch.allclose(apply_blur(const, flags, torch.tensor([1.5, 1.5], dtype=torch.float64)), const, atol=1e-4)
    spike = torch.zeros(2, 1, 21, 21)
    spike[:, :, 10, 10] = 1.0
    out = apply_blur(spike, flags, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(out[1], spike[1])  # not flagged: untouched
    assert abs(out[0].sum().item() - 1.0) < 1e-4 and out[0, 0, 10, 10] < 0.2  # mass kept, spread out
    g = np.exp(-np.arange(-3, 4) ** 2 / 2.0)
    g /= g.sum()
    assert out[0, 0, 10, 11].item() == pytest.approx(g[3] * g[4], rel=1e-3)


def test_demo_tiles_in_real_layout(tmp_path):
    layout = make_demo(tmp_path, {"train": 3, "val": 1, "test": 1}, size=64)
    assert layout.generated and (tmp_path / ".complete").is_file()
    assert not make_demo(tmp_path, {"train": 3, "val": 1, "test": 1}, size=64).generated  # cached
    samples = find_samples(tmp_path, "train")
    assert len(samples) == 3 and all(s.image.name.endswith(".jpg") and "_level0_x" in s.image.name for s in samples)
    assert validate_samples(samples, uniform=True) == (64, 64)
    image, labels = synthetic_tile(np.random.default_rng(0), 64, [0, 1, 2, 3, 4, 5])
    means = [image[labels == c].mean() for c in np.unique(labels)]
    assert len(set(np.round(means))) == len(means)  # classes are visibly different
