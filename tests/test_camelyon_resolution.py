"""Slide resolution in the Camelyon16 pipeline: the network sees every slide at its training µm/px,
while the grid and every output stay in the slide's own level-0 pixels.

Synthetic slides hold stripes of a known period (20 level-0 px: 10 µm at 0.5 µm/px) and a dark
lesion at a known place; the real ``camelyon.infer.run`` path runs with a recording stand-in network
(fully convolutional, so patch and dense mode see the same function), and the tests measure what it
received and where its outputs land."""
from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
import torch.nn as nn
import torch.nn.functional as F

import camelyon.infer as infer
from camelyon.config import InferConfig, TrainConfig
from camelyon.dataset import PatchRecord, training_mpp
from camelyon.prepare import compute_tissue_mask
from common.augment import scale_intensity
from common.checkpoint import load_file
from common.pyramidal_tiff import write_pyramidal_tiff

PERIOD = 20  # level-0 px of one stripe pair
MODEL_MPP = 0.243


class Recorder(nn.Module):
    """Output (i, j) = -10 x the mean red of the central 32 x 32 of the 224 window at (32 i, 32 j):
    dark centres (the lesion) score high. Keeps every input it receives."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return -10 * F.avg_pool2d(x[:, :1, 96:x.shape[2] - 96, 96:x.shape[3] - 96], 32, 32)


def striped(size: tuple[int, int], lesion: tuple[int, int, int] | None = None) -> np.ndarray:
    """Grey background (240) around tissue whose red makes vertical and green horizontal stripes of
    period ``PERIOD``; blue is 200 in the tissue. ``lesion`` (x, y, radius): red falls to 40 at its
    centre (3 per pixel of distance), so the darkest window is the one centred on it."""
    H, W = size
    img = np.full((H, W, 3), 240, np.uint8)
    rows, cols = np.mgrid[:H, :W]
    tissue = (rows >= 96) & (rows < H - 96) & (cols >= 96) & (cols < W - 96)
    img[..., 0] = np.where(tissue, np.where((cols // (PERIOD // 2)) % 2, 220, 120), 240)
    img[..., 1] = np.where(tissue, np.where((rows // (PERIOD // 2)) % 2, 170, 90), 240)
    img[..., 2] = np.where(tissue, 200, 240)
    if lesion is not None:
        x, y, radius = lesion
        d = np.hypot(cols - x, rows - y)
        img[..., 0] = np.where(d < radius, np.clip(40 + 3 * d, 0, 255), img[..., 0]).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolution")
    write_pyramidal_tiff(root / "half.tif", striped((768, 768), lesion=(500, 300, 45)), mpp=0.5, compression="deflate")
    write_pyramidal_tiff(root / "camelyon.tif", striped((1024, 1152)), mpp=0.243, compression="deflate")
    tifffile.imwrite(root / "unknown.tif", striped((512, 512)), tile=(256, 256), photometric="rgb")  # no resolution
    return root


def run_recorded(monkeypatch, slide: Path, out: Path, **kw) -> tuple[dict, Recorder]:
    """``camelyon.infer.run`` on one slide with the recording network (patch mode unless given)."""
    model = Recorder()
    monkeypatch.setattr(infer, "load_model", lambda *a, **k: (model, {"kind": "recorder", "path": "-"}))
    stand_in = out.with_name(f"{out.name}_recorder.pt")  # infer.py reads its checkpoint file once, the weights unused
    torch.save({"model": {}}, stand_in)
    cfg = dict(slides=str(slide), checkpoint=str(stand_in), output_dir=str(out), num_workers=0, model_mpp=MODEL_MPP,
               mode="patch", export=["geojson", "asap"])
    summary = infer.run(InferConfig(**{**cfg, **kw}))[0]
    return summary, model


@pytest.fixture(scope="module")
def half_run(slides, tmp_path_factory):
    """Patch-mode inference of the 0.5 µm/px slide by a model at 0.243 µm/px, run once."""
    out = tmp_path_factory.mktemp("half_patch")
    with pytest.MonkeyPatch.context() as mp:
        summary, model = run_recorded(mp, slides / "half.tif", out)
    return summary, model.inputs, out


def stripe_periods(inputs: list[torch.Tensor]) -> tuple[float, float]:
    """Mean spacing (network px) of the rising mid-level crossings of red along x and green along y,
    over every received window that holds stripes only (no background: blue below 220; no lesion:
    red above 100)."""
    def spacing(profile: np.ndarray, mid: float) -> list[float]:
        i = np.flatnonzero((profile[:-1] < mid) & (profile[1:] >= mid))
        crossings = i + (mid - profile[i]) / (profile[i + 1] - profile[i])  # linear, sub-pixel
        return list(np.diff(crossings))

    rgb = (torch.cat([x for x in inputs]).double() + 1) * 127.5  # back to 0..255
    inside = (rgb[:, 2].amax(dim=(1, 2)) < 220) & (rgb[:, 0].amin(dim=(1, 2)) > 100)
    assert inside.sum() >= 4, "no window holds stripes only"
    dx, dy = [], []
    for img in rgb[inside].numpy():
        dx += spacing(img[0].mean(axis=0), 170.0)  # red: vertical stripes, 120 / 220
        dy += spacing(img[1].mean(axis=1), 130.0)  # green: horizontal stripes, 90 / 170
    return float(np.mean(dx)), float(np.mean(dy))


# ============================================================================= what the network sees
def test_20x_slide_is_seen_at_the_training_resolution(half_run):
    """0.5 µm/px slide, model at 0.243: stripes of 20 level-0 px arrive 20 * 0.5 / 0.243 = 41.15
    network px apart in both axes; the grid cell is 64 network px = 31.1 level-0 px."""
    summary, inputs, _ = half_run
    scale = MODEL_MPP / 0.5
    assert summary["slide_mpp"] == pytest.approx(0.5) and summary["mpp_source"] == "header"
    assert summary["scale"] == pytest.approx(scale) and summary["level"] == 0
    assert summary["resampling"] == pytest.approx(0.5 / MODEL_MPP)  # 2.06x upsampled
    assert summary["ratio"] == pytest.approx(64 * scale)
    assert all(x.shape[-2:] == (224, 224) for x in inputs)
    px, py = stripe_periods(inputs)
    assert px == pytest.approx(PERIOD / scale, abs=0.1) and py == pytest.approx(PERIOD / scale, abs=0.1)


def test_camelyon_like_slide_keeps_the_bundle_reads_bit_for_bit(slides, tmp_path, monkeypatch):
    """0.243 µm/px, level 6 = 64x: the network receives exactly the level-0 patches of the bundle's
    formula (read here with OpenSlide directly) and the map is exactly their scores."""
    path = slides / "camelyon.tif"
    summary, model = run_recorded(monkeypatch, path, tmp_path)
    assert (summary["scale"], summary["level"], summary["resampling"], summary["ratio"]) == (1.0, 0, 1.0, 64.0)
    tm = compute_tissue_mask(path)
    cells = np.argwhere(tm.mask)
    with openslide.OpenSlide(str(path)) as slide:
        rgba = np.stack([np.asarray(slide.read_region((64 * c - 80, 64 * r - 80), 0, (224, 224))) for r, c in cells])
    alpha = rgba[..., 3:].astype(np.uint16)
    expected = ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # white outside
    received = torch.cat(model.inputs)
    assert received.shape[0] == len(cells)
    back = torch.round((received.double() + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back, expected)
    x = scale_intensity(torch.from_numpy(expected).permute(0, 3, 1, 2).float())
    scores = torch.sigmoid(Recorder()(x).float()).flatten().numpy()
    prob = np.load(tmp_path / "camelyon.npy")
    reference = np.zeros(tm.mask.shape)
    reference[cells[:, 0], cells[:, 1]] = scores
    assert np.array_equal(prob, reference)
    assert stripe_periods(model.inputs) == pytest.approx((PERIOD, PERIOD), abs=0.05)


def test_dense_mode_on_the_20x_slide_matches_patch_mode(slides, half_run, tmp_path, monkeypatch):
    """Dense tiles are laid in network pixels (origin = a cell's patch corner, stride 32, every 2nd
    output on a cell centre); with a network free of padding effects they agree with patch mode."""
    _, model = run_recorded(monkeypatch, slides / "half.tif", tmp_path, mode="dense", tile_cells=6)
    assert len(model.inputs) > 4 and any(x.shape[-1] > 224 for x in model.inputs)
    assert all((x.shape[-1] - 224) % 64 == 0 and (x.shape[-2] - 224) % 64 == 0 for x in model.inputs)
    patch, dense = np.load(half_run[2] / "half.npy"), np.load(tmp_path / "half.npy")
    assert patch.shape == dense.shape and ((patch > 0) == (dense > 0)).all()
    assert np.abs(patch - dense).max() < 1e-4  # measured 6e-6: a tile and a patch resample alike
    assert patch.max() > 0.9  # the lesion is in both


# ============================================================================= outputs in level-0 pixels
def test_detection_on_a_20x_slide_comes_back_in_its_level0_pixels(half_run):
    """The lesion is centred at level-0 (500, 300) of the 0.5 µm/px slide; the detection, its GeoJSON
    point and ASAP square are there (within half a cell), not at the network-pixel (1029, 617)."""
    summary, _, tmp_path = half_run
    ratio, scale = summary["ratio"], summary["scale"]
    rows = [line.split(",") for line in (tmp_path / "half.csv").read_text().splitlines()]
    assert len(rows) == summary["detections"] == 1
    p, x, y = float(rows[0][0]), int(rows[0][1]), int(rows[0][2])
    assert p > 0.9 and abs(x - 500) <= ratio / 2 + 1 and abs(y - 300) <= ratio / 2 + 1
    prob = np.load(tmp_path / "half.npy")
    r, c = np.unravel_index(prob.argmax(), prob.shape)
    assert (x, y) == (int((c + 0.5) * ratio), int((r + 0.5) * ratio))  # the official level-0 X, Y of the cell
    point = json.loads((tmp_path / "half.geojson").read_text())["features"][0]["geometry"]["coordinates"]
    assert point == pytest.approx([x, y])
    xml = [(float(c.get("X")), float(c.get("Y"))) for c in ET.parse(tmp_path / "half.xml").getroot().iter("Coordinate")]
    xs, ys = zip(*xml)
    assert (min(xs) + max(xs)) / 2 == pytest.approx(x) and (min(ys) + max(ys)) / 2 == pytest.approx(y)
    assert max(xs) - min(xs) == pytest.approx(256 * scale)  # 256 network px wide


# ============================================================================= slides without (or with a wrong) resolution
def test_slide_without_resolution_warns_and_slide_mpp_overrides(slides, tmp_path, monkeypatch):
    path = slides / "unknown.tif"
    with pytest.warns(UserWarning, match="no resolution in the slide's header.*--slide-mpp"):
        summary, model = run_recorded(monkeypatch, path, tmp_path / "a")
    assert summary["mpp_source"] == "assumed" and summary["scale"] == 1.0
    assert stripe_periods(model.inputs)[0] == pytest.approx(PERIOD, abs=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, model = run_recorded(monkeypatch, path, tmp_path / "b", slide_mpp=0.5)
    assert not [w for w in caught if "resolution" in str(w.message)]
    assert summary["mpp_source"] == "override" and summary["slide_mpp"] == 0.5
    assert stripe_periods(model.inputs)[0] == pytest.approx(PERIOD * 0.5 / MODEL_MPP, abs=0.1)
    # a wrong header is overridden as well (test_common_wsi: resolve_scale)


def test_near_training_resolution_is_read_as_it_is(slides, tmp_path):
    """Camelyon16's Utrecht scanner (0.226 µm/px) is within the 10 % tolerance: level-0 reads as the
    bundle; 1 % tolerance would resample it."""
    write_pyramidal_tiff(tmp_path / "utrecht.tif", np.full((64, 64, 3), 200, np.uint8), mpp=0.226,
                         compression="deflate")
    res = infer.slide_resolution(tmp_path / "utrecht.tif", MODEL_MPP, InferConfig())
    assert (res["scale"], res["level"], res["resampling"]) == (1.0, 0, 1.0)
    res = infer.slide_resolution(tmp_path / "utrecht.tif", MODEL_MPP, InferConfig(mpp_tolerance=0.01))
    assert res["scale"] == pytest.approx(MODEL_MPP / 0.226)


# ============================================================================= the model's resolution
def test_model_resolution_from_checkpoint_config(tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 512, 1, 1)}, tmp_path / "model.pt")  # bundle: no config
    torch.save({"model": {}, "config": {"mpp": 0.5}}, tmp_path / "best.pt")
    torch.save({"model": {}, "config": {"lr": 1e-3}}, tmp_path / "old.pt")  # before the field existed
    assert infer.model_resolution(load_file(tmp_path / "model.pt"))[0] == 0.243
    assert infer.model_resolution(load_file(tmp_path / "best.pt")) == (0.5, "checkpoint config")
    assert infer.model_resolution(load_file(tmp_path / "old.pt"))[0] == 0.243
    assert infer.model_resolution(load_file(tmp_path / "best.pt"), override=0.25) == (0.25, "--model-mpp")


def test_model_trained_at_20x_reads_a_20x_slide_as_it_is(slides, tmp_path, monkeypatch):
    torch.save({"model": {}, "config": TrainConfig(mpp=0.5).to_dict()}, tmp_path / "best.pt")
    summary, model = run_recorded(monkeypatch, slides / "half.tif", tmp_path / "out", checkpoint=str(tmp_path / "best.pt"),
                                  model_mpp=0.0)
    assert summary["model_mpp"] == 0.5 and summary["scale"] == 1.0 and summary["ratio"] == 64.0
    assert stripe_periods(model.inputs)[0] == pytest.approx(PERIOD, abs=0.05)


def test_training_resolution_from_the_slides(slides, tmp_path):
    records = [PatchRecord(str(slides / "half.tif"), 384, 384, (0.0,) * 9)] * 2
    assert training_mpp(records) == (pytest.approx(0.5), "1 slide(s) at 0.5 µm/px")
    assert training_mpp(records, declared=0.25)[0] == 0.25
    mpp, note = training_mpp([PatchRecord(str(slides / "unknown.tif"), 384, 384, (0.0,) * 9)])
    assert mpp == 0.243 and "no slide declares" in note
    with pytest.warns(UserWarning, match="differ in resolution"):
        mixed, _ = training_mpp(records + [PatchRecord(str(slides / "camelyon.tif"), 500, 500, (0.0,) * 9)])
    assert mixed == pytest.approx((0.5 + 0.243) / 2)  # median of two slides


def test_checkpoints_record_the_training_resolution(slides, tmp_path):
    """A one-step run on the 0.5 µm/px slide records mpp 0.5 in config.json and the checkpoints, and
    inference takes it from there."""
    import camelyon.train as train

    (tmp_path / "list.csv").write_text("half,384,384,1,1,1,0,0,0,0,0,0\n")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), train_list=str(tmp_path / "list.csv"),
                      val_list=str(tmp_path / "list.csv"), image_dir=str(slides), epochs=1, batch_size=1,
                      max_steps_per_epoch=1, num_workers=0, device="cpu", precision="fp32", pretrained="none")
    train.main(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mpp"] == pytest.approx(0.5)
    assert load_file(tmp_path / "run" / "last.pt")["config"]["mpp"] == pytest.approx(0.5)
    assert infer.model_resolution(load_file(tmp_path / "run" / "best.pt")) == (pytest.approx(0.5), "checkpoint config")
