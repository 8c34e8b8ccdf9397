"""The NuClick training recipe against ../shared/reference/nuclick.md (MONAI pathology_nuclick_annotation
v0.2.1): resolved default configs field by field (§1 preparation, §4 guidance, §5 transforms, §6
network, §7 training, §8 inference), the learning rate the real Adam holds at every step inside
``train.main`` (constant: no schedule), the guidance settings train and validation pass on, the
shuffled sampler, and the order of the training transforms (§5). Expected values are typed from the
reference."""
from __future__ import annotations

import types

import pytest
import torch

import common.augment as aug
import nuclick.dataset as nd
import nuclick.train as train
from common import dist
from common.amp import resolve_dtype
from common.config import parse_config
from nuclick.config import AugmentConfig, GuidanceConfig, InferConfig, PrepareConfig, TrainConfig
from nuclick.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [4, 8, 8, 8, 8, 4]


def test_default_train_config_is_the_bundle_recipe():
    cfg = parse_config(TrainConfig, [])
    assert not cfg.demo  # the recipe defaults, not the demo preset
    # §7 training
    assert cfg.lr == 1e-4
    assert cfg.epochs == 50
    assert cfg.batch_size == 64
    assert cfg.num_workers == 4
    assert cfg.seed == 123
    assert cfg.precision == "auto" and resolve_dtype(cfg.precision, torch.device("cuda")) == torch.float16  # AMP on
    # §6 network widths
    assert cfg.features == [32, 64, 128, 256, 512, 32]
    # §5 train transforms
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.251, 0.75, 0.25, 0.04)
    assert cfg.flip_prob == 0.5 and cfg.rot90_prob == 0.5
    # §4 guidance: bundle use_distance=True, gaussian=False; defaults drop 0.5, sigma 1.0, truncated 2.0;
    # validation drop_rate 1.0 (§4.4)
    assert cfg.drop_rate == 0.5 and cfg.val_drop_rate == 1.0
    assert cfg.use_distance is True and cfg.gaussian is False
    assert (cfg.sigma, cfg.truncated) == (1.0, 2.0)
    # §5 caching: cache_rate 1.0
    assert cfg.cache is True
    # whole epochs and the whole validation list by default
    assert cfg.max_steps_per_epoch == 0 and cfg.max_val == 0
    # Deliberate deviation, documented in config.py: "hw: images as stored; wh: MONAI's transposed
    # layout (set by init_checkpoint)". The bundle trained on transposed images (§2); the project
    # trains in (row, col) order and switches to "wh" only for the released weights.
    assert cfg.axis_order == "hw"
    assert cfg.to_dict() == TrainConfig().to_dict()


def test_default_prepare_and_infer_configs():
    prep = parse_config(PrepareConfig, [])
    # §1: --crop_size 128 --limit 0, min_area 80, min_distance 20; Train -> training, Test -> validation
    assert (prep.crop_size, prep.min_area, prep.min_distance, prep.limit) == (128, 80, 20, 0)
    assert prep.splits == ["Train", "Test"]
    assert (prep.input, prep.output) == ("/workspace/data/CoNSeP", "/workspace/data/CoNSePNuclei")
    inf = InferConfig()
    # §8: bb_size 128, gaussian False (sigma 1, truncated 2), threshold >= 0.5,
    # PostFilterLabeld not used by the bundle (thresh/min_size 10/min_hole 30 when enabled)
    assert (inf.bb_size, inf.threshold, inf.gaussian, inf.sigma, inf.truncated) == (128, 0.5, False, 1.0, 2.0)
    assert inf.post_filter is False and (inf.min_size, inf.min_hole) == (10, 30)


def test_dataset_level_defaults_are_the_same_recipe():
    # code that builds these on its own (eval, bench) gets the §4/§5 values too
    a, g = AugmentConfig(), GuidanceConfig()
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.251, 0.75, 0.25, 0.04)
    assert (a.flip_prob, a.rot90_prob) == (0.5, 0.5)
    assert (g.drop_rate, g.use_distance, g.gaussian, g.sigma, g.truncated) == (0.5, True, False, 1.0, 2.0)


def test_optimizer_is_plain_adam_at_1e_4():
    cfg = TrainConfig()
    model = build_model(cfg.features)
    optimizer = train.build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.Adam
    group = optimizer.param_groups[0]
    # §7: torch Adam, lr 1e-4, defaults otherwise: betas (0.9, 0.999), eps 1e-8, no weight decay, no amsgrad
    assert group["lr"] == 1e-4
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0 and group["amsgrad"] is False
    # §6: 7,784,001 parameters, all trained
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 7_784_001


# ----------------------------------------------------------------------------- inside train.main
class _Loader(list):
    def __init__(self, batches, n: int):
        super().__init__(batches)
        self.dataset = range(n)


def _batch(g: torch.Generator, n: int = 2, size: int = 32):
    image = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    mask = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    mask[:, :, 10:20, 10:20] = 1
    others = torch.zeros(n, 1, size, size, dtype=torch.int16)
    others[:, :, 0:3, 0:3] = 1
    others[:, :, 24:30, 24:30] = 2
    return image, mask, others, torch.arange(n)


def test_main_keeps_lr_constant_and_passes_the_guidance_settings(tmp_path, monkeypatch, lr_per_step):
    g = torch.Generator().manual_seed(0)
    batches = _Loader([_batch(g), _batch(g)], 4)
    sampler = types.SimpleNamespace(num_samples=4, set_epoch=lambda epoch, skip=0: None)
    monkeypatch.setattr(train, "build_loaders", lambda cfg, ctx: (batches, _Loader([], 0), sampler))
    seen = {"train": [], "valid": []}
    real_batch = train.train_batch

    def recording_batch(batch, gen, aug_cfg, guide_cfg, device, **kwargs):
        seen["train"].append((aug_cfg, guide_cfg))
        return real_batch(batch, gen, aug_cfg, guide_cfg, device, **kwargs)

    monkeypatch.setattr(train, "train_batch", recording_batch)

    def fake_evaluate(model, loader, amp, ctx, seed, epoch, guide_cfg, *args, **kwargs):
        seen["valid"].append(guide_cfg)
        return {"dice": 0.5, "accuracy": 0.5, "loss": 0.5, "samples": 4.0}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", features=TINY, batch_size=2, epochs=2,
                      num_workers=0, log_every=100, preview=False)  # lr and augmentation: the recipe's
    train.main(cfg)
    assert lr_per_step == [1e-4] * 4  # 2 epochs x 2 steps, no scheduler (§7)
    assert len(seen["valid"]) == 2  # validation every epoch
    # §5 train transforms and §4 guidance with drop_rate 0.5; validation drop_rate 1.0
    assert all(a == AugmentConfig(0.251, 0.75, 0.25, 0.04, 0.5, 0.5) for a, _ in seen["train"])
    assert all(gc == GuidanceConfig(0.5, True, False, 1.0, 2.0) for _, gc in seen["train"])
    assert all(gc == GuidanceConfig(1.0, True, False, 1.0, 2.0) for gc in seen["valid"])


def test_training_sampler_shuffles(monkeypatch):
    # §7: "shuffle"; the sampler is seeded with the run's seed (123)
    calls = []
    real = dist.make_sampler

    def recording(dataset, shuffle, seed=0, drop_last=False):
        calls.append((len(dataset), shuffle, seed))
        return real(dataset, shuffle, seed, drop_last)

    monkeypatch.setattr(dist, "make_sampler", recording)
    monkeypatch.setattr(train, "read_datalist", lambda path, key: [{"image": "x", "label": "y"}] * 3)
    monkeypatch.setattr(train, "NucleiDataset", lambda items, cache, desc: list(items))
    ctx = types.SimpleNamespace(device=torch.device("cpu"), is_main=True, rank=0)
    train.build_loaders(TrainConfig(num_workers=0), ctx)
    assert calls == [(3, True, 123)]


# ----------------------------------------------------------------------------- transform order (§5)
def test_training_transforms_run_in_the_reference_order(call_recorder):
    call_recorder.wrap(aug, "apply_color_jitter", "apply_flip", "apply_rot90", "scale_intensity")
    call_recorder.wrap(nd, "guidance_inputs")
    calls = call_recorder.calls
    cfg = TrainConfig()
    aug_cfg = AugmentConfig(**{k: getattr(cfg, k) for k in AugmentConfig.__dataclass_fields__})
    guide_cfg = GuidanceConfig(cfg.drop_rate, cfg.use_distance, cfg.gaussian, cfg.sigma, cfg.truncated)
    x, target = nd.train_batch(_batch(torch.Generator().manual_seed(3), n=4), torch.Generator().manual_seed(4),
                               aug_cfg, guide_cfg, torch.device("cpu"))
    names = [c[0] for c in calls]
    # 3. colour jitter on the image only, first; 4-5. flip then rot90 on image, label and others;
    # 6. scaling to [-1, 1]; 7. guidance signals last
    assert names == ["apply_color_jitter"] + ["apply_flip", "apply_rot90"] * 3 + ["scale_intensity",
                                                                                  "guidance_inputs"]
    flips = [c for c in calls if c[0] == "apply_flip"]
    rots = [c for c in calls if c[0] == "apply_rot90"]
    assert all(torch.equal(f[1][1], flips[0][1][1]) for f in flips)  # one flip decision for all three
    assert all(torch.equal(r[1][1], rots[0][1][1]) for r in rots)  # one k for all three
    assert all(f[2].get("dims", (-2, -1)) == (-2, -1) for f in flips)  # both spatial axes
    scaled = calls[-2][3]
    torch.testing.assert_close(scaled, rots[0][3] / 127.5 - 1)  # x / 127.5 - 1 of the augmented image
    assert calls[-1][1][0] is scaled  # guidance gets the scaled image
    assert x.shape == (4, 5, 32, 32) and target.shape == (4, 1, 32, 32)  # §4 output: 5 channels
    torch.testing.assert_close(x[:, :3], scaled)
    torch.testing.assert_close(target, rots[1][3].float())  # target = the augmented binary mask


def test_flip_turns_both_axes():
    # §5.4: the flip acts on both spatial axes at once (a 180-degree turn), here forced with p = 1
    _, mask, others, _ = _batch(torch.Generator().manual_seed(5), n=2)
    mask = torch.zeros_like(mask)
    mask[:, :, 0, 1] = 1  # one pixel at (row 0, col 1) of a 32 x 32 crop
    image = torch.zeros(2, 3, 32, 32)
    cfg = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, flip_prob=1.0, rot90_prob=0.0)
    _, flipped, _ = nd.augment(image, mask, others, torch.Generator().manual_seed(6), cfg)
    assert flipped[:, 0].nonzero().tolist() == [[0, 31, 30], [1, 31, 30]]  # (0, 1) -> (31, 30)
