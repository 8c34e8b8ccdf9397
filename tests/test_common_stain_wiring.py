"""Stain robustness wired into the pathology scripts: the flags are declared once (common.config),
``--stain-augment none`` leaves every trainer's augmentation bit-identical to the pipeline without
the stain step while ``hed`` changes it with parameters that survive a resume, a checkpoint trained
with ``--stain-normalize`` stores its target and camelyon inference reuses it without the image file,
and ``--stain-fit slide`` fits each slide once. (Bad targets and missing ones as one-line errors:
tests/test_common_cli.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camelyon.config
import nuclick.config
import pretrain.config
import segpanda.config
from common.augment import make_generator
from common.checkpoint import load_file
from common.config import (ConfigError, StainAugmentConfig, StainNormalizeConfig, StainTrainConfig, field_choices,
                           field_comments)
from common.pyramidal_tiff import write_pyramidal_tiff
from common.stain import HEDAugment, StainNormalizer, StainTarget, hed_to_rgb, resolve_stain_target
from common_testutils import assert_same_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # light on a shared 2-core machine
CPU = torch.device("cpu")


def he_rgb(h: int, w: int, seed: int, eosin: float = 1.0) -> np.ndarray:
    """(h, w, 3) uint8 H&E-like tissue: haematoxylin and eosin amounts varying in 4-px blocks and
    per pixel (so Macenko finds two stain directions), composed with the Ruifrok-Johnston matrix."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(2, h // 4, w // 4, generator=g, dtype=torch.float64).repeat_interleave(4, 1)
    blocks = blocks.repeat_interleave(4, 2)
    noise = torch.rand(2, h, w, generator=g, dtype=torch.float64)
    hem = 0.01 + 0.06 * blocks[0] + 0.01 * noise[0]
    eos = (0.01 + 0.05 * blocks[1] + 0.01 * noise[1]) * eosin
    hed = torch.stack([hem, eos, torch.zeros_like(hem)])[None]
    return hed_to_rgb(hed)[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def he_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, size, size) H&E-like tiles."""
    return torch.stack([torch.from_numpy(he_rgb(size, size, seed + i)).permute(2, 0, 1) for i in range(n)])


@pytest.fixture
def without_stain_step(monkeypatch):
    """Run a function with the HED step taken out of every pipeline (it draws and does nothing)."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(HEDAugment, "sample", lambda self, n, gen: None)
            return fn()
    return run


# ============================================================================= flags
TRAIN_CONFIGS = [camelyon.config.TrainConfig, nuclick.config.TrainConfig, segpanda.config.TrainConfig,
                 pretrain.config.FinetuneConfig]
EVAL_CONFIGS = [camelyon.config.InferConfig, camelyon.config.EvalConfig, nuclick.config.EvalConfig,
                nuclick.config.InferConfig, segpanda.config.EvalConfig, pretrain.config.EvalConfig]


@pytest.mark.parametrize("cls", TRAIN_CONFIGS + EVAL_CONFIGS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_stain_flags_are_inherited_from_the_common_mixins(cls):
    assert issubclass(cls, StainNormalizeConfig)
    assert field_choices(cls)["stain_normalize"] == ("none", "macenko", "reinhard")
    cfg = cls()
    assert cfg.stain_normalize == "none" and cfg.stain_target == []
    if cls in TRAIN_CONFIGS:  # off by default: the reference recipes
        assert issubclass(cls, StainAugmentConfig) and issubclass(cls, StainTrainConfig)
        assert (cfg.stain_augment, cfg.hed_sigma, cfg.hed_bias) == ("none", 0.05, 0.05)
        assert field_choices(cls)["stain_augment"] == ("none", "hed")
    own = {name for klass in cls.__mro__ if klass.__module__.split(".")[0] != "common"
           for name in klass.__dict__.get("__annotations__", {})}
    assert not own & {"stain_augment", "hed_sigma", "hed_bias", "stain_normalize", "stain_target"}  # declared once
    assert "stain_target" in field_comments(cls)


def test_stain_fit_is_a_camelyon_inference_choice():
    assert field_choices(camelyon.config.InferConfig)["stain_fit"] == ("tile", "slide")
    with pytest.raises(ConfigError, match="--stain-fit must be tile or slide"):
        camelyon.config.InferConfig(stain_fit="region")


# ============================================================================= augmentation
def _camelyon(kw, gen):
    from camelyon.dataset import train_transform
    return train_transform(he_batch(4, 32, 1), gen, camelyon.config.AugmentConfig(**kw))


def _nuclick(kw, gen):
    from nuclick.dataset import train_batch
    image = he_batch(3, 32, 2)
    mask = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    mask[:, :, 10:20, 10:20] = 1
    others = torch.zeros(3, 1, 32, 32, dtype=torch.int16)
    others[:, :, 24:30, 24:30] = 1
    x, _ = train_batch((image, mask, others, torch.arange(3)), gen, nuclick.config.AugmentConfig(**kw),
                       nuclick.config.GuidanceConfig(), CPU)
    return x


def _segpanda(kw, gen):
    from segpanda.dataset import sample_augment, train_transform
    cfg = segpanda.config.AugmentConfig(crop_size=24, **kw)
    params = sample_augment(3, (32, 32), cfg, gen)
    x, _ = train_transform(he_batch(3, 32, 3), torch.zeros(3, 32, 32, dtype=torch.uint8), params, cfg,
                           [0.5] * 3, [0.25] * 3)
    return x


def _pretrain(kw, gen):
    from pretrain.dataset import train_transform
    cfg = pretrain.config.FinetuneConfig(image_size=24, **kw)
    return train_transform(he_batch(3, 32, 4), gen, cfg, HEDAugment.from_config(cfg))


PIPELINES = {"camelyon": _camelyon, "nuclick": _nuclick, "segpanda": _segpanda, "pretrain": _pretrain}


@pytest.mark.parametrize("task", PIPELINES)
def test_stain_augment_none_is_bit_identical_and_hed_changes_the_batch(task, without_stain_step):
    pipeline = PIPELINES[task]
    none = {"stain_augment": "none"}
    reference = without_stain_step(lambda: pipeline(none, make_generator(5, 0, 3)))
    assert torch.equal(pipeline(none, make_generator(5, 0, 3)), reference)  # nothing drawn, nothing changed
    hed = {"stain_augment": "hed", "hed_sigma": 0.2, "hed_bias": 0.02}
    with_hed = pipeline(hed, make_generator(5, 0, 3))
    assert with_hed.shape == reference.shape and not torch.equal(with_hed, reference)
    assert torch.equal(pipeline(hed, make_generator(5, 0, 3)), with_hed)  # the same (seed, rank, step)
    assert not torch.equal(pipeline(hed, make_generator(5, 0, 4)), with_hed)  # another step


def test_hed_augment_from_config():
    assert not HEDAugment.from_config(camelyon.config.AugmentConfig()).enabled
    step = HEDAugment.from_config(camelyon.config.AugmentConfig(stain_augment="hed", hed_sigma=0.1, hed_bias=0.03))
    assert (step.p, step.sigma, step.bias, step.bound) == (1.0, 0.1, 0.03, 255.0)
    x = he_batch(2, 16, 0)
    gen = make_generator(0)
    assert HEDAugment().sample(2, gen) is None and HEDAugment().apply(x, None) is x
    assert torch.equal(gen.get_state(), make_generator(0).get_state())  # off: nothing drawn


# ============================================================================= camelyon runs
@pytest.fixture(scope="module")
def he_slides(tmp_path_factory) -> Path:
    """train.tif: 768x768, H&E-like tissue in [128, 640)^2 around white; small.tif: 512x512 with
    tissue in [128, 384)^2 (16 cells of 64 px); target.png: a more eosin-heavy 96x96 patch."""
    root = tmp_path_factory.mktemp("he_slides")
    (root / "slides").mkdir()
    for name, size, lo, hi, seed in (("train", 768, 128, 640, 10), ("small", 512, 128, 384, 11)):
        img = np.full((size, size, 3), 245, np.uint8)
        img[lo:hi, lo:hi] = he_rgb(hi - lo, hi - lo, seed)
        write_pyramidal_tiff(root / "slides" / f"{name}.tif", img, compression="deflate")
    Image.fromarray(he_rgb(96, 96, 12, eosin=1.6)).save(root / "target.png")
    (root / "train.csv").write_text("train,384,384,1,0,0,0,1,0,0,0,1\ntrain,400,360,0,0,0,0,0,0,0,0,0\n")
    return root


def _train_cfg(root: Path, out: Path, **kw):
    return camelyon.config.TrainConfig(output_dir=str(out), train_list=str(root / "train.csv"),
                                       val_list=str(root / "train.csv"), image_dir=str(root / "slides"), epochs=1,
                                       batch_size=1, num_workers=0, max_val_regions=1, log_every=1,
                                       pretrained="none", device="cpu", **kw)


def test_hed_parameters_are_the_same_after_a_resume(he_slides, tmp_path, last_pt_by_step, monkeypatch):
    """Two steps straight, and step 2 again after resuming from the step-1 last.pt: the HED
    parameters of step 2 and the final weights are identical."""
    import camelyon.train as train_module
    import common.stain as stain_module

    drawn: list = []
    real = stain_module.sample_hed
    monkeypatch.setattr(stain_module, "sample_hed", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    hed = dict(stain_augment="hed", hed_sigma=0.1, hed_bias=0.05, checkpoint_every=1)
    train_module.main(_train_cfg(he_slides, tmp_path / "a", **hed))
    straight = list(drawn)
    assert len(straight) == 2 and straight[0].alpha.shape == (9, 3)  # one draw per step, per patch
    assert not torch.equal(straight[0].alpha, straight[1].alpha)
    (tmp_path / "b").mkdir()
    shutil.copy(last_pt_by_step[1], tmp_path / "b" / "last.pt")
    drawn.clear()
    train_module.main(_train_cfg(he_slides, tmp_path / "b", **hed))
    assert len(drawn) == 1
    assert torch.equal(drawn[0].alpha, straight[1].alpha) and torch.equal(drawn[0].beta, straight[1].beta)
    assert_same_weights(load_file(tmp_path / "a" / "last.pt"), load_file(tmp_path / "b" / "last.pt"))


def test_checkpoint_stores_the_target_and_inference_reuses_it(he_slides, tmp_path):
    import camelyon.train as train_module
    from camelyon.infer import run as run_inference

    target_file = tmp_path / "target.png"
    shutil.copy(he_slides / "target.png", target_file)
    out = tmp_path / "run"
    train_module.main(_train_cfg(he_slides, out, stain_normalize="macenko", stain_target=[str(target_file)],
                                 max_steps_per_epoch=1))
    expected = StainTarget.from_files([target_file], "macenko")
    for name in ("last.pt", "best.pt"):
        stored, state = load_file(out / name)["stain_target"], expected.to_state()
        assert stored.keys() == state.keys()
        assert all(torch.equal(v, state[k]) if isinstance(v, torch.Tensor) else v == state[k] for k, v in stored.items())
    assert json.loads(json.loads((out / "config.json").read_text())["stain_statistics"]) == \
        json.loads(expected.to_json())

    base = dict(slides=str(he_slides / "slides" / "small.tif"), checkpoint=str(out / "last.pt"), mode="patch",
                batch_size=16, num_workers=0, device="cpu")
    run_inference(camelyon.config.InferConfig(output_dir=str(tmp_path / "a"), stain_normalize="macenko",
                                              stain_target=[str(target_file)], **base))
    target_file.unlink()  # from here on only the checkpoint knows the target
    run_inference(camelyon.config.InferConfig(output_dir=str(tmp_path / "b"), stain_normalize="macenko", **base))
    from_file, from_checkpoint = np.load(tmp_path / "a" / "small.npy"), np.load(tmp_path / "b" / "small.npy")
    assert (from_file > 0).sum() >= 9 and np.array_equal(from_file, from_checkpoint)
    # a changed normalisation is another output: the finished slide is inferred again
    with pytest.warns(UserWarning, match="macenko-normalised images"):
        again = run_inference(camelyon.config.InferConfig(output_dir=str(tmp_path / "a"), **base))
    assert again[0]["status"] == "ok"
    assert not np.array_equal(np.load(tmp_path / "a" / "small.npy"), from_file)


def test_dense_mode_normalises_per_tile_or_per_slide(he_slides, tmp_path):
    """Dense tiles normalised to the checkpoint's stored target: a per-slide fit is another map
    than a per-tile one, and both differ from the unnormalised map."""
    from camelyon.infer import run as run_inference
    from camelyon.model import build_model

    torch.manual_seed(0)
    target = StainTarget.from_files(he_slides / "target.png", "reinhard")
    torch.save({"model": build_model().state_dict(), "config": {"mpp": 0.243}, "stain_target": target.to_state()},
               tmp_path / "model.pt")
    base = dict(slides=str(he_slides / "slides" / "small.tif"), checkpoint=str(tmp_path / "model.pt"), mode="dense",
                tile_cells=8, num_workers=0, device="cpu")
    maps = {}
    for fit in ("tile", "slide"):
        run_inference(camelyon.config.InferConfig(output_dir=str(tmp_path / fit), stain_normalize="reinhard",
                                                  stain_fit=fit, **base))
        maps[fit] = np.load(tmp_path / fit / "small.npy")
    with pytest.warns(UserWarning, match="reinhard-normalised images"):
        run_inference(camelyon.config.InferConfig(output_dir=str(tmp_path / "none"), **base))
    maps["none"] = np.load(tmp_path / "none" / "small.npy")
    assert all((m > 0).sum() >= 9 for m in maps.values())
    assert not np.array_equal(maps["tile"], maps["slide"])
    assert not np.array_equal(maps["tile"], maps["none"]) and not np.array_equal(maps["slide"], maps["none"])


def test_slide_fit_uses_tissue_patches_spread_over_the_slide(he_slides, monkeypatch):
    import camelyon.infer as infer
    from camelyon.prepare import tissue_mask_at

    slide = he_slides / "slides" / "small.tif"
    tm = tissue_mask_at(slide, 64.0, 1.0)
    cells = np.argwhere(tm.mask)
    assert len(cells) >= 9
    per_tile = StainNormalizer(StainTarget.from_files(he_slides / "target.png", "reinhard"))
    assert infer.slide_stain(per_tile, slide, tm, 1.0, "tile") is per_tile
    assert infer.slide_stain(StainNormalizer(), slide, tm, 1.0, "slide").target is None
    monkeypatch.setattr(infer, "STAIN_FIT_CELLS", 3)  # first, middle and last tissue cell (row-major)
    fitted = infer.slide_stain(per_tile, slide, tm, 1.0, "slide")
    chosen = cells[[0, round((len(cells) - 1) / 2), len(cells) - 1]]
    patches = infer.CellPatches(str(slide), chosen, tm.ratio, 1.0)
    expected = per_tile.target.fit_source([patches[i][0] for i in range(3)])
    assert torch.equal(fitted.source.lab_mean, expected.lab_mean) and torch.equal(fitted.source.lab_std,
                                                                                   expected.lab_std)
    x = he_batch(2, 32, 7)
    assert torch.equal(fitted(x), per_tile.with_source(expected)(x))


def test_slide_fit_without_enough_stain_falls_back_to_tile_fits(he_slides, tmp_path):
    """Pale pink tissue (eosin only: optical density below Macenko's beta in the red channel) has no
    Macenko tissue to fit a slide on: a warning, and each forward-pass input is fitted alone."""
    import camelyon.infer as infer
    from camelyon.prepare import tissue_mask_at

    g = torch.Generator().manual_seed(4)
    eosin = 0.03 + 0.01 * torch.rand(1, 256, 256, generator=g, dtype=torch.float64)
    hed = torch.cat([torch.zeros_like(eosin), eosin, torch.zeros_like(eosin)])[None]
    img = np.full((512, 512, 3), 245, np.uint8)
    img[128:384, 128:384] = hed_to_rgb(hed)[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    write_pyramidal_tiff(tmp_path / "pale.tif", img, compression="deflate")
    tm = tissue_mask_at(tmp_path / "pale.tif", 64.0, 1.0)
    assert tm.mask.sum() >= 4
    per_tile = StainNormalizer(StainTarget.from_files(he_slides / "target.png", "macenko"))
    with pytest.warns(RuntimeWarning, match=r"pale\.tif: the \d+ tissue patches of its stain fit: no tissue to fit "
                                            r"stain statistics on.*each forward-pass input is fitted alone instead"):
        assert infer.slide_stain(per_tile, tmp_path / "pale.tif", tm, 1.0, "slide") is per_tile
    reinhard = StainNormalizer(StainTarget.from_files(he_slides / "target.png", "reinhard"))
    assert infer.slide_stain(reinhard, tmp_path / "pale.tif", tm, 1.0, "slide").source is not None  # pink is tissue there


# ============================================================================= nuclick click inference
class InputRecorder(torch.nn.Module):
    """Stand-in click network: keeps every input it is given, finds no nucleus."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return torch.full((x.shape[0], 1, *x.shape[2:]), -10.0)


def test_nuclick_click_boxes_normalised_to_the_file_or_the_checkpoint_target(he_slides, tmp_path, monkeypatch):
    """nuclick/infer.py: the network gets each click box normalised (batched) then scaled, to the
    --stain-target file's target or, without it, to the checkpoint's; click maps untouched; off:
    exactly the scaling it had before the stain step."""
    import nuclick.infer as nuclick_infer
    from common.augment import scale_intensity
    from common.stain import normalize_stain

    rgb = he_rgb(160, 160, 13)
    Image.fromarray(rgb).save(tmp_path / "tile.png")
    clicks = np.array([[40, 50], [100, 90]])
    (tmp_path / "clicks.csv").write_text("".join(f"{x},{y}\n" for x, y in clicks))
    target_file = tmp_path / "target.png"
    shutil.copy(he_slides / "target.png", target_file)
    target = StainTarget.from_files(target_file, "reinhard")
    torch.save({"model": {}, "stain_target": target.to_state()}, tmp_path / "model.pt")
    recorder = InputRecorder()
    monkeypatch.setattr(nuclick_infer, "load_nuclick_weights",
                        lambda *a, **k: (recorder, {"kind": "recorder", "axis_order": "hw"}))

    def network_inputs(out: str, **stain) -> torch.Tensor:
        recorder.inputs.clear()
        nuclick_infer.run(nuclick.config.InferConfig(image=str(tmp_path / "tile.png"), clicks=str(tmp_path / "clicks.csv"),
                                                     checkpoint=str(tmp_path / "model.pt"), output_dir=str(tmp_path / out),
                                                     bb_size=64, device="cpu", num_workers=0, **stain))
        return torch.cat(recorder.inputs)

    with pytest.warns(UserWarning, match="reinhard-normalised images"):
        plain = network_inputs("none")
    from_file = network_inputs("file", stain_normalize="reinhard", stain_target=[str(target_file)])
    target_file.unlink()  # from here on only the checkpoint knows the target
    from_checkpoint = network_inputs("checkpoint", stain_normalize="reinhard")

    image = torch.from_numpy(rgb).permute(2, 0, 1).float()
    boxes = [image[:, r0:r1, c0:c1] for r0, c0, r1, c1 in nuclick_infer.click_boxes(clicks, 160, 160, 64)]
    raw = torch.stack(boxes)
    assert torch.equal(plain[:, :3], raw / 127.5 - 1.0)
    assert torch.equal(from_file[:, :3], scale_intensity(normalize_stain(raw, target)))
    assert not torch.equal(from_file[:, :3], plain[:, :3])
    assert torch.equal(from_file[:, 3:], plain[:, 3:]) and plain[:, 3].sum() == 2  # one click map per box
    assert torch.equal(from_checkpoint, from_file)


# ============================================================================= resolving the target
def _flags(**kw):
    return camelyon.config.InferConfig(**kw)


def test_target_from_files_else_from_the_checkpoint(he_slides):
    target = StainTarget.from_files(he_slides / "target.png", "macenko")
    stored = {"model": {}, "stain_target": target.to_state()}
    assert resolve_stain_target(_flags(), {"model": {}}) is None
    got = resolve_stain_target(_flags(stain_normalize="macenko"), stored)
    assert torch.equal(got.stain_matrix, target.stain_matrix)
    from_file = resolve_stain_target(_flags(stain_normalize="reinhard", stain_target=[str(he_slides / "target.png")]),
                                     stored)
    assert from_file.method == "reinhard"  # a file wins over the stored target
    with pytest.raises(ConfigError, match="stores a macenko target; give --stain-target FILE or --stain-normalize"):
        resolve_stain_target(_flags(stain_normalize="reinhard"), stored, "run/best.pt")
    with pytest.raises(ConfigError, match=r"--stain-normalize macenko: needs --stain-target .*model.pt stores none"):
        resolve_stain_target(_flags(stain_normalize="macenko"), {"fc.weight": torch.zeros(1)}, "model.pt")
    with pytest.warns(UserWarning, match="macenko-normalised images"):
        assert resolve_stain_target(_flags(), stored) is None
    with pytest.raises(ConfigError, match="--stain-target t.png: needs --stain-normalize macenko or reinhard"):
        resolve_stain_target(_flags(stain_target=["t.png"]))


def test_normalizer_without_target_returns_its_input():
    x = he_batch(2, 16, 3)
    assert StainNormalizer()(x) is x
