"""The segPANDA200 training defaults are PatchTCGA's (../shared/reference/pretrain-segpanda.md
§1, §3, §4, §7, §9): the resolved default config, the learning rate the real optimizer holds at
chosen updates (numbers worked out by hand below) and the augmentation order (colour jitter and
blur of the whole tile, then crop and flips)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.augment import ColorJitterParams
from common.config import parse_config
from segpanda.config import AugmentConfig, TrainConfig
from segpanda.dataset import AugmentParams, train_transform
from segpanda.train import build_optimizer

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def test_defaults_are_patchtcga_segpanda():
    cfg = parse_config(TrainConfig, [])
    assert cfg.model == "deeplabv3" and cfg.backbone == "resnet50" and cfg.num_classes == 6 and not cfg.aux_loss
    assert cfg.lr == 1e-4 and cfg.base_batch_size == 512 and cfg.batch_size == 128
    assert cfg.weight_decay == 5e-5 and cfg.clip_norm == 1.0 and cfg.min_lr == 1e-6
    assert cfg.warmup_epochs == 1.0 and cfg.epochs == 5 and cfg.max_updates == 1000
    assert cfg.ignore_index == -1 and cfg.class_weights == []  # plain cross-entropy, class 0 trained
    assert cfg.crop_size == 224 and cfg.val_crop_size == 224  # RandomCrop(image_size) / CenterCrop(val_image_size)
    assert cfg.flip_prob == 0.5
    assert cfg.jitter_prob == 0.8 and (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.4, 0.4, 0.4, 0.1)
    assert cfg.blur_prob == 0.5 and cfg.blur_sigma == [0.1, 2.0]
    assert cfg.image_mean == IMAGENET_MEAN and cfg.image_std == IMAGENET_STD
    assert cfg.eval_every == 200 and cfg.seed == 1234


def test_optimizer_and_the_lr_of_chosen_updates():
    cfg = parse_config(TrainConfig, [])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 6, 1))
    # 300 batches per epoch on 8 processes: global batch 128 * 8 = 1024, peak = 1e-4 * 1024 / 512 = 2e-4;
    # cold 0, peak step 300 * 1 = 300, max = 300 * 5 = 1500 (the cosine is planned over 5 epochs).
    optimizer, scheduler, last_step = build_optimizer(cfg, model, 300, 8)
    assert last_step == 1000
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.999)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-5, 0.0]
    expected = {
        1: 1e-4,  # the first update: the unscaled base lr
        2: 1.0066666666666667e-4,  # 1e-4 + 2/300 * 1e-4
        150: 1.5e-4,  # 1e-4 + 150/300 * 1e-4
        300: 2.01e-4,  # s = peak: 2e-4 * (1 + cos 0) / 2 + 1e-6
        900: 1.01e-4,  # 600 / 1200 = 1/2: 2e-4 * (1 + 0) / 2 + 1e-6
        1000: 7.511809549e-5,  # 700/1200 = 7/12, cos(7 pi/12) = -0.2588190451: 1e-4 * 0.7411809549 + 1e-6
    }
    done = 0
    for k, lr in expected.items():
        while done < k - 1:  # the loop steps the scheduler once after every update
            scheduler.step()
            done += 1
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9, abs=0), k
        assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"]


def _params(corner, jitter=False, contrast=1.0, blur=False, sigma=1.0) -> AugmentParams:
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return AugmentParams(corners=torch.tensor([corner]), hflip=torch.tensor([False]), vflip=torch.tensor([False]),
                         jitter=torch.tensor([jitter]),
                         jitter_params=ColorJitterParams(brightness=one(1.0), contrast=one(contrast),
                                                         saturation=one(1.0), hue=one(0.0),
                                                         order=torch.tensor([[1, 0, 2, 3]])),
                         blur=torch.tensor([blur]), sigma=one(sigma))


def test_blur_runs_on_the_whole_tile_before_the_crop():
    tile = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    tile[..., 9, 9:31] = tile[..., 30, 9:31] = 255  # a frame just outside the 20 x 20 crop at (10, 10)
    tile[..., 9:31, 9] = tile[..., 9:31, 30] = 255
    mask = torch.zeros(1, 40, 40, dtype=torch.uint8)
    cfg = AugmentConfig(crop_size=20)  # blur sigma range [0.1, 2.0]: 13 taps (+-6)
    x, y = train_transform(tile, mask, _params((10, 10), blur=True, sigma=1.5), cfg, [0, 0, 0], [1 / 255] * 3)
    assert x.shape == (1, 3, 20, 20) and y.shape == (1, 20, 20)
    # crop row 0, column 10 is tile (10, 20): 1 px below the frame's top edge, 10 px from the others.
    # g(d) = exp(-d^2 / 4.5), sum over d = -6..6 = 1 + 2 * (0.800737 + 0.411112 + 0.135335 + 0.0285655
    # + 0.00386592 + 0.000335463) = 3.759902; 255 * 0.800737 / 3.759902 = 54.307
    assert x[0, 0, 0, 10].item() == pytest.approx(54.307, abs=0.01)  # cropping first would leave 0 here
    assert x[0, :, 10, 10].abs().max() < 1e-3  # the crop's centre is 10 px from the frame
    # the whole crop against a blur written here: separable Gaussian (+-6 taps) of the tile, then the crop
    g = np.exp(-np.arange(-6, 7) ** 2 / 4.5)
    g /= g.sum()
    plane = tile[0, 0].double().numpy()
    blurred = np.apply_along_axis(lambda r: np.convolve(r, g, "same"), 1, plane)
    blurred = np.apply_along_axis(lambda c: np.convolve(c, g, "same"), 0, blurred)
    np.testing.assert_allclose(x[0, 0].double().numpy(), blurred[10:30, 10:30], atol=0.01)


def test_colour_jitter_sees_the_whole_tile():
    tile = torch.full((1, 3, 40, 40), 50, dtype=torch.uint8)
    tile[..., :20] = 200  # left half 200, right half 50; the crop lies in the left half
    mask = torch.zeros(1, 40, 40, dtype=torch.uint8)
    cfg = AugmentConfig(crop_size=20)
    x, _ = train_transform(tile, mask, _params((10, 0), jitter=True, contrast=0.5), cfg, [0, 0, 0], [1 / 255] * 3)
    # contrast 0.5 blends with the mean grey of the image: grey 0.2989 + 0.587 + 0.114 = 0.9999 x value,
    # truncated as uint8: 199 (left) and 49 (right), tile mean 124 -> 0.5 * 200 + 0.5 * 124 = 162.
    # (Jittering the crop alone would blend with 199: 199.5.)
    assert x.min().item() == pytest.approx(162, abs=1) and x.max().item() == pytest.approx(162, abs=1)
