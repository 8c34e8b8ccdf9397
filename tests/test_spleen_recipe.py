"""The spleen training recipe against ../shared/reference/spleen.md (MONAI spleen_ct_segmentation
v0.5.9): resolved default config field by field (§1-§8), the learning rate the real Novograd +
StepLR objects hold at chosen epochs, the schedule seen by the optimizer inside ``train.main``
(stepped per epoch, not per step; validation every epoch), and how the defaults reach the data
pipeline (split, preprocessing, crops, batch sizes) and the sliding-window validation. Expected
values are typed from the reference."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import spleen.train as train
from common import dist
from common.amp import MixedPrecision, resolve_dtype
from common.config import parse_config
from common.optim import FunctionScheduler, Novograd
from spleen.config import InferConfig, TrainConfig
from spleen.model import DiceCELoss, build_model
from spleen.transforms import plan_geometry, scale_hu

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_config_is_the_bundle_recipe():
    cfg = parse_config(TrainConfig, [])
    assert not cfg.demo  # the recipe defaults, not the demo preset
    # §1 data and split: the last 9 sorted cases validate
    assert cfg.data_root == "/workspace/data/Task09_Spleen" and cfg.val_count == 9
    # §2 preprocessing: pixdim (1.5, 1.5, 2.0), HU window a_min -57, a_max 164
    assert cfg.pixdim == [1.5, 1.5, 2.0]
    assert cfg.hu_range == [-57.0, 164.0]
    # §3 random crops: 96^3, pos 1, neg 1, num_samples 4
    assert cfg.roi_size == [96, 96, 96]
    assert (cfg.pos, cfg.neg, cfg.num_samples) == (1.0, 1.0, 4)
    # §1: RandShiftIntensity is not in the bundle; the config documents "tutorial 0.1; not in the bundle"
    assert cfg.intensity_shift == 0.0
    # §4 network
    assert cfg.channels == [16, 32, 64, 128, 256] and cfg.strides == [2, 2, 2, 2] and cfg.num_res_units == 2
    # §6 optimisation: Novograd 2e-3, betas (0.9, 0.98), wd 0; StepLR(5000, 0.1); 800 epochs; seed 123; AMP
    assert cfg.lr == 2e-3
    assert cfg.betas == [0.9, 0.98]
    assert cfg.weight_decay == 0.0
    assert (cfg.lr_step_size, cfg.lr_gamma) == (5000, 0.1)
    assert cfg.epochs == 800
    assert cfg.seed == 123
    assert cfg.precision == "auto" and resolve_dtype(cfg.precision, torch.device("cuda")) == torch.float16
    # §3: batch of 2 volumes (x 4 crops = 8 patches), 4 workers
    assert cfg.batch_size == 2 and cfg.num_workers == 4
    # §6/§7 validation every epoch; sliding window roi 96^3 (above), window batch 4, overlap 0.5, constant
    assert cfg.val_every == 1
    assert (cfg.sw_batch_size, cfg.sw_overlap, cfg.sw_mode) == (4, 0.5, "constant")
    assert cfg.max_steps_per_epoch == 0
    # plain BN per process, as the bundle (SyncBN is an opt-in, documented in config.py)
    assert cfg.sync_bn is False
    assert cfg.to_dict() == TrainConfig().to_dict()


def test_default_infer_config_is_the_bundle_inference():
    # §9: same preprocessing, roi 96^3, window batch 4, overlap 0.5, constant; no largest component
    inf = InferConfig(images="x", checkpoint="y")
    assert inf.pixdim == [1.5, 1.5, 2.0] and inf.hu_range == [-57.0, 164.0]
    assert inf.roi_size == [96, 96, 96]
    assert (inf.sw_batch_size, inf.sw_overlap, inf.sw_mode) == (4, 0.5, "constant")
    assert inf.largest_component is False


def test_preprocessing_with_the_default_config():
    cfg = TrainConfig()
    # §2.3 fixture anchors: (122, 101, 112) at 3 mm -> (243, 201, 168) [111 * 1.5 + 1 = 167.5 -> 168];
    # (122, 101, 30) -> (243, 201, 44) [29 * 1.5 + 1 = 44.5 -> 44, half to even]; 121 * 2 + 1 = 243
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    assert plan_geometry((122, 101, 112), affine, cfg.pixdim).shape == (243, 201, 168)
    assert plan_geometry((122, 101, 30), affine, cfg.pixdim).shape == (243, 201, 44)
    # §2.2 orientation to RAS: an LPS volume (x and y reversed) is flipped on its first two axes
    geom = plan_geometry((10, 11, 12), np.diag([-3.0, -3.0, 3.0, 1.0]), cfg.pixdim)
    assert geom.ornt.tolist() == [[0, -1], [1, -1], [2, 1]]
    assert np.allclose(np.diag(geom.affine)[:3], [1.5, 1.5, 2.0])  # +R, +A, +S at the target spacing
    # §2.4 HU window clip((HU + 57) / 221, 0, 1): -1000 -> 0, -57 -> 0, 53.5 -> 0.5, 164 -> 1, 3000 -> 1
    hu = torch.tensor([-1000.0, -57.0, 53.5, 164.0, 3000.0])
    torch.testing.assert_close(scale_hu(hu, cfg.hu_range), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_loss_weights():
    # §5: 0.5 Dice + 0.5 CE. Logits 0 everywhere (p = 0.5 for both classes) and an all-background
    # label of 1000 voxels: Dice_bg = 1 - (2*500)/(250 + 1000) = 0.2, Dice_fg = 1 - 0/(250 + 0) = 1
    # (smoothing 1e-5 negligible), mean 0.6; CE = ln 2 = 0.693147. Total 0.3 + 0.346574 = 0.646574.
    loss = DiceCELoss()(torch.zeros(1, 2, 10, 10, 10), torch.zeros(1, 1, 10, 10, 10, dtype=torch.uint8))
    assert loss.item() == pytest.approx(0.646574, abs=1e-5)


def test_optimizer_and_step_lr_hold_the_reference_values():
    cfg = TrainConfig()
    optimizer, scheduler = train.build_optimizer(cfg, build_model(cfg.channels, cfg.strides, cfg.num_res_units))
    assert isinstance(optimizer, Novograd) and isinstance(scheduler, FunctionScheduler)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-8 and group["weight_decay"] == 0.0
    assert group["grad_averaging"] is False and group["amsgrad"] is False
    # §4: 4,808,917 parameters, all trained
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 4_808_917
    lr_at = {}
    for epoch in range(5001):
        lr_at[epoch] = optimizer.param_groups[0]["lr"]
        scheduler.step()
    # §6: StepLR(5000, 0.1) per epoch never fires within 800 epochs: 2e-3 throughout; it would at
    # epoch 5000: 2e-3 * 0.1 = 2e-4
    assert lr_at[0] == lr_at[1] == lr_at[799] == lr_at[4999] == 2e-3
    assert lr_at[5000] == pytest.approx(2e-4, rel=1e-12)


# ----------------------------------------------------------------------------- inside train.main
def test_main_steps_the_schedule_once_per_epoch_and_validates_every_epoch(tmp_path, monkeypatch, lr_per_step):
    """Two steps per epoch and StepLR(step_size 2): the optimizer must see 2e-3 for the four steps
    of epochs 1-2 and 2e-4 for both steps of epoch 3 (a per-step StepLR would drop after step 2)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 2, 1, 16, 16, 16, generator=g)  # 1 volume x 2 crops
    labels = (images > 0.7).to(torch.uint8)
    sampler = types.SimpleNamespace(set_epoch=lambda epoch, skip=0: None)
    monkeypatch.setattr(train, "build_loaders", lambda cfg, ctx: ([(images, labels)] * 2, [], sampler))
    evaluations = []

    def fake_evaluate(model, loader, amp, ctx, cfg):
        evaluations.append(1)
        return {"dice": 0.5, "cases": {}}

    monkeypatch.setattr(train, "validation_dice", fake_evaluate)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", channels=[2, 4, 8], strides=[2, 2],
                      num_res_units=1, roi_size=[16, 16, 16], num_samples=2, batch_size=1, epochs=3,
                      lr_step_size=2, num_workers=0, log_every=100)  # lr 2e-3, gamma 0.1: the recipe's
    train.main(cfg)
    assert lr_per_step == pytest.approx([2e-3, 2e-3, 2e-3, 2e-3, 2e-4, 2e-4], rel=1e-12)
    assert len(evaluations) == 3  # val_every 1


def test_defaults_reach_the_data_pipeline(tmp_path, monkeypatch):
    """build_loaders with the default config: the 32/9 split, preprocessing at pixdim / HU window,
    4 crops of 96^3 at pos:neg 1:1, shuffled training batches of 2 volumes, validation batch 1."""
    seen = {}
    monkeypatch.setattr(train, "split_cases",
                        lambda root, data_list, val_count: seen.update(val_count=val_count) or
                        ([f"t{i}" for i in range(32)], [f"v{i}" for i in range(9)]))
    monkeypatch.setattr(train, "validate_cases", lambda cases: None)
    monkeypatch.setattr(train, "build_cache", lambda cases, cache_dir, pixdim, hu_range:
                        seen.update(pixdim=pixdim, hu=hu_range) or list(cases))
    monkeypatch.setattr(train, "check_crop_fits", lambda cases, roi: None)

    def crop_dataset(cases, roi, num_samples, pos, neg, seed):
        seen.update(train_cases=len(cases), roi=roi, num_samples=num_samples, pos=pos, neg=neg)
        return list(cases)

    monkeypatch.setattr(train, "CropDataset", crop_dataset)
    monkeypatch.setattr(train, "VolumeDataset", lambda cases: seen.update(val_cases=len(cases)) or list(cases))
    real_sampler = dist.make_sampler
    monkeypatch.setattr(dist, "make_sampler",
                        lambda ds, shuffle, seed=0, drop_last=False: seen.update(shuffle=shuffle) or
                        real_sampler(ds, shuffle, seed, drop_last))
    ctx = types.SimpleNamespace(device=torch.device("cpu"), is_main=True, rank=0)
    train_loader, val_loader, _ = train.build_loaders(TrainConfig(output_dir=str(tmp_path), num_workers=0), ctx)
    assert seen == {"val_count": 9, "pixdim": [1.5, 1.5, 2.0], "hu": [-57.0, 164.0], "train_cases": 32,
                    "roi": [96, 96, 96], "num_samples": 4, "pos": 1.0, "neg": 1.0, "val_cases": 9, "shuffle": True}
    assert train_loader.batch_size == 2 and val_loader.batch_size == 1  # §3 and §7


def test_validation_uses_the_bundle_sliding_window(monkeypatch):
    # §7: batch 1, roi 96^3, window batch 4, overlap 0.5, constant blending
    seen = []

    def fake_predict(model, image, roi, sw_batch_size, overlap, mode, **kwargs):
        seen.append((list(roi), sw_batch_size, overlap, mode))
        return torch.zeros(1, 2, *image.shape[2:])

    monkeypatch.setattr(train, "predict_logits", fake_predict)
    loader = [(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8), torch.tensor(0))]
    loader = type("L", (list,), {})(loader)
    loader.dataset = types.SimpleNamespace(cases=[types.SimpleNamespace(name="case")])
    amp = MixedPrecision(torch.device("cpu"), "fp32")
    ctx = types.SimpleNamespace(device=torch.device("cpu"))
    train.validation_dice(torch.nn.Identity(), loader, amp, ctx, TrainConfig())
    assert seen == [([96, 96, 96], 4, 0.5, "constant")]


def test_no_intensity_augmentation_by_default():
    # §1: no RandShiftIntensity in the bundle: the default shift leaves the crops untouched
    cfg = TrainConfig()
    x = torch.rand(3, 1, 4, 4, 4)
    out = train.shift_intensity(x, cfg.intensity_shift, cfg.intensity_shift_prob, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
