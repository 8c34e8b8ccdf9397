"""The PCam200 fine-tuning and MAE pretraining defaults are the reference's
(../shared/reference/pretrain-segpanda.md §1, §3, §7, §8, §9): the resolved default configs, the
learning rate the real optimizer holds at chosen updates (numbers worked out by hand below) and
the resampling of the training crops (PIL's antialiased bilinear, as the evaluation resize)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.augment import make_generator, sample_resized_crop
from common.config import parse_config
from pretrain.config import FinetuneConfig, PretrainConfig
from pretrain.dataset import train_transform
from pretrain.finetune import build_optimizer as build_finetune_optimizer
from pretrain.schedule import apply_schedules, build_optimizer as build_pretrain_optimizer, peak_lr

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def lr_at_updates(optimizer, scheduler, updates: list[int]) -> dict[int, float]:
    """The lr each listed update (counted from 1) runs with: stepping the scheduler as the training
    loop does, once after every update."""
    held, done = {}, 0
    for k in sorted(updates):
        while done < k - 1:
            scheduler.step()
            done += 1
        held[k] = optimizer.param_groups[0]["lr"]
        assert all(g["lr"] == held[k] for g in optimizer.param_groups)
    return held


# ============================================================================= PCam200 fine-tuning
def test_finetune_defaults_are_patchtcga_pcam200():
    cfg = parse_config(FinetuneConfig, [])
    assert cfg.dataset == "pcam200" and cfg.num_classes == 2 and cfg.arch == "resnet50"
    assert cfg.dropout == 0.4 and not cfg.linear_probe
    assert cfg.lr == 1e-4 and cfg.base_batch_size == 512 and cfg.batch_size == 128
    assert cfg.weight_decay == 5e-5 and cfg.clip_norm == 1.0 and cfg.min_lr == 1e-6
    assert cfg.warmup_epochs == 1.0 and cfg.epochs == 5 and cfg.max_updates == 1000
    assert cfg.image_size == 224 and cfg.eval_crop == 287
    assert cfg.crop_scale == [0.8, 1.0]
    assert cfg.jitter == [0.4, 0.4, 0.4, 0.1] and cfg.blur_sigma == [0.1, 2.0]
    assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD
    assert cfg.seed == 1234 and cfg.eval_every == 200


def test_finetune_optimizer_and_the_lr_of_chosen_updates():
    cfg = parse_config(FinetuneConfig, [])
    # 300 loader batches per epoch on 8 processes: global batch 128 * 8 = 1024, peak = 1e-4 * 1024 / 512 = 2e-4.
    # cold = 0, peak step = 300 * 1 = 300, max = 300 * 5 = 1500 (the cosine is planned over 5 epochs).
    optimizer, scheduler, last_step = build_finetune_optimizer(cfg, tiny_model(), 300, 8)
    assert last_step == 1000  # the run stops after 1000 updates, at 2/3 of the planned cosine
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.999)] * 2
    assert [g["eps"] for g in optimizer.param_groups] == [1e-8] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-5, 0.0]  # weights / biases and norms
    held = lr_at_updates(optimizer, scheduler, [1, 2, 150, 299, 300, 900, 1000])
    expected = {
        1: 1e-4,  # the first update: the unscaled base lr
        2: 1e-4 + 2 / 300 * (2e-4 - 1e-4),  # 1.00667e-4: warm-up s / peak of the way from 1e-4 to 2e-4
        150: 1.5e-4,  # 1e-4 + 150/300 * 1e-4
        299: 1e-4 + 299 / 300 * 1e-4,  # 1.99667e-4
        300: 2e-4 + 1e-6,  # s = peak: 2e-4 * (1 + cos 0) / 2 + 1e-6
        900: 1e-4 + 1e-6,  # (900 - 300) / (1500 - 300) = 1/2: 2e-4 * (1 + cos(pi/2)) / 2 + 1e-6
        # 700 / 1200 = 7/12, cos(7 pi / 12) = -sin(pi / 12) = -0.2588190451: 1e-4 * 0.7411809549 + 1e-6
        1000: 7.411809549e-5 + 1e-6,
    }
    for k, lr in expected.items():
        assert held[k] == pytest.approx(lr, rel=1e-9, abs=0), k


def test_finetune_short_loader_ends_the_cosine_at_min_lr_and_one_process_warms_down():
    cfg = parse_config(FinetuneConfig, [])
    # 100 batches/epoch, 1 process: peak = 1e-4 * 128 / 512 = 2.5e-5 (below the base lr: the
    # warm-up runs from 1e-4 down to it); peak step 100, max = 500 < 1000, so all 5 epochs run.
    optimizer, scheduler, last_step = build_finetune_optimizer(cfg, tiny_model(), 100, 1)
    assert last_step == 500
    held = lr_at_updates(optimizer, scheduler, [1, 50, 100, 300, 500])
    assert held[1] == pytest.approx(1e-4, rel=1e-12)
    assert held[50] == pytest.approx(1e-4 - 50 / 100 * 7.5e-5, rel=1e-12)  # 6.25e-5
    assert held[100] == pytest.approx(2.5e-5 + 1e-6, rel=1e-12)
    assert held[300] == pytest.approx(1.25e-5 + 1e-6, rel=1e-12)  # half-way: (300 - 100) / 400
    assert held[500] == pytest.approx(1e-6, rel=1e-9)  # the last update: the cosine's end + 1e-6


# ----------------------------------------------------------------------------- training crops
def _identity_colour_cfg(size: int) -> SimpleNamespace:
    """A crop of the whole image (scale 1) with colour jitter and blur that change nothing, so the
    output is the resampling alone."""
    return SimpleNamespace(image_size=size, crop_scale=[1.0, 1.0], jitter=[0.0, 0.0, 0.0, 0.0],
                           blur_sigma=[1e-3, 1e-3], mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def test_training_crop_is_antialiased_checkerboard_averages_to_grey():
    i, j = np.mgrid[:96, :96]
    board = torch.from_numpy(((i + j) % 2 * 255).astype(np.uint8)).expand(1, 3, 96, 96).contiguous()
    out = train_transform(board, make_generator(0), _identity_colour_cfg(24))
    # shrinking by 4 with a bilinear (triangle) filter spanning 8 input pixels weighs both colours
    # equally: flat grey 127.5 (point sampling would return black and white pixels)
    assert out.shape == (1, 3, 24, 24)
    assert (out - 0.5).abs().max() < 2 / 255


def test_training_crop_matches_pil_bilinear_resize():
    assert sample_resized_crop(1, 96, 96, (1.0, 1.0), make_generator(0)).tolist() == [[0, 0, 95, 95]]  # whole image
    i, j = np.mgrid[:96, :96]
    r = np.hypot(i - 47.5, j - 47.5)  # rings about the centre: unchanged by the random flips
    rings = np.stack([127.5 + 127.5 * np.cos(r * f) for f in (0.5, 0.9, 1.3)], -1).round().astype(np.uint8)
    x = torch.from_numpy(rings).permute(2, 0, 1).unsqueeze(0).contiguous()
    out = train_transform(x, make_generator(0), _identity_colour_cfg(24))[0].permute(1, 2, 0).numpy() * 255
    pil = np.asarray(Image.fromarray(rings).resize((24, 24), Image.BILINEAR)).astype(np.float64)
    assert np.abs(out - pil).max() < 1.0  # PIL rounds to uint8


# ============================================================================= MAE pretraining
def test_mae_defaults_are_upstream():
    cfg = PretrainConfig(method="mae")
    cfg.validate()
    assert cfg.arch == "vit_large_patch16_224" and cfg.epochs == 40
    assert cfg.batch_size == 64 and cfg.lr == 1.5e-4 and cfg.base_batch_size == 256
    assert cfg.optimizer == "adamw" and cfg.weight_decay == 0.05 and cfg.min_lr == 0.0
    assert cfg.warmup_epochs == 40.0
    assert cfg.mask_ratio == 0.75 and cfg.norm_pix_loss
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (512, 8, 16)
    assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD
    optimizer = build_pretrain_optimizer(tiny_model(), cfg)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.95)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]  # none on biases and norms


@pytest.mark.parametrize("epochs", [40, 80])
def test_mae_lr_warms_up_over_40_epochs(epochs):
    cfg = PretrainConfig(method="mae", epochs=epochs)
    cfg.validate()
    optimizer = build_pretrain_optimizer(tiny_model(), cfg)
    peak = peak_lr(cfg, 8)
    assert peak == pytest.approx(3e-4, rel=1e-12)  # 1.5e-4 * (64 * 8) / 256
    upe, total = 100, 100 * epochs  # 100 updates per epoch: warm-up 40 * 100 = 4000 updates

    def lr(step: int) -> float:  # what the training loop sets before update ``step`` (from 0)
        apply_schedules(optimizer, step, cfg, peak, upe, total)
        return optimizer.param_groups[0]["lr"]

    assert lr(0) == 0.0
    assert lr(1000) == pytest.approx(7.5e-5, rel=1e-12)  # 3e-4 * 1000 / 4000
    assert lr(3999) == pytest.approx(3e-4 * 3999 / 4000, rel=1e-12)
    if epochs == 80:  # the half-cosine over the other 4000 updates, to 0
        assert lr(4000) == pytest.approx(3e-4, rel=1e-12)
        assert lr(6000) == pytest.approx(1.5e-4, rel=1e-12)  # 3e-4 * (1 + cos(pi / 2)) / 2
        # 3e-4 * (1 + cos(3 pi / 4)) / 2 = 1.5e-4 * (1 - 0.7071067812)
        assert lr(7000) == pytest.approx(4.393398282e-5, rel=1e-9)
