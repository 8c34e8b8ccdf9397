"""nuclick/infer.py on a whole-slide image at another resolution than the network's: the click boxes
reach the network at its training µm/px and every output comes back in the slide's level-0 pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import nuclick.infer as infer
from common.pyramidal_tiff import write_pyramidal_tiff
from nuclick.config import InferConfig

CENTRES = [(200, 200), (262, 240), (300, 176)]  # level-0 (x, y) of the nuclei and the clicks
RADIUS = 8  # level-0 px: 4 µm at 0.5 µm/px, 16 network px at 0.25 µm/px


class DarkNearClick(nn.Module):
    """Logits > 0 on dark pixels within 24 px of the positive click; keeps every input."""

    def __init__(self, reach: int = 24):
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(-reach, reach + 1.0), torch.arange(-reach, reach + 1.0), indexing="ij")
        self.register_buffer("disc", (yy ** 2 + xx ** 2 <= reach ** 2).float()[None, None])
        self.reach, self.inputs = reach, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        near = F.conv2d(x[:, 3:4], self.disc, padding=self.reach) > 0.5
        return torch.where(near, -20 * x[:, :1], torch.full_like(x[:, :1], -20.0))


@pytest.fixture
def slide_20x(tmp_path):
    img = np.zeros((1024, 1024, 3), np.uint8)
    img[...] = (230, 150, 200)
    rows, cols = np.mgrid[:1024, :1024]
    for x, y in CENTRES:
        img[np.hypot(cols + 0.5 - (x + 0.5), rows + 0.5 - (y + 0.5)) <= RADIUS] = (60, 30, 110)
    write_pyramidal_tiff(tmp_path / "slide.tif", img, mpp=0.5, compression="deflate")
    (tmp_path / "clicks.csv").write_text("".join(f"{x},{y}\n" for x, y in CENTRES))
    torch.save({"model": {}, "config": {"mpp": 0.25}}, tmp_path / "best.pt")  # read for its training µm/px only
    return tmp_path


def test_slide_clicks_are_segmented_at_the_training_resolution(slide_20x, monkeypatch):
    model = DarkNearClick()
    monkeypatch.setattr(infer, "load_nuclick_weights", lambda *a, **k: (model, {"kind": "stub", "axis_order": "hw"}))
    cfg = InferConfig(image=str(slide_20x / "slide.tif"), clicks=str(slide_20x / "clicks.csv"),
                      checkpoint=str(slide_20x / "best.pt"), output_dir=str(slide_20x / "out"), device="cpu",
                      num_workers=0, max_region_pixels=200_000)  # the 1 Mpx slide is read around the clicks
    result = infer.run(cfg)
    assert (result["slide_mpp"], result["model_mpp"], result["scale"], result["level"]) == (0.5, 0.25, 0.5, 0)
    assert result["resampling"] == 2.0 and result["n_instances"] == 3
    # the network saw each nucleus twice as wide as the slide holds it: area pi * 16^2 = 804 network px
    crop = torch.cat(model.inputs)[0, 0]  # red of click 0's box
    assert abs(int((crop < 0).sum()) - np.pi * (2 * RADIUS) ** 2) < 0.1 * np.pi * (2 * RADIUS) ** 2
    # outputs in level-0 pixels: instance map over the level-0 region, polygons and clicks at the centres
    instances = np.asarray(Image.open(result["instances"]))
    r0, c0, h, w = result["region"]
    assert instances.shape == (h, w)
    geo = json.loads(open(result["geojson"]).read())
    assert geo["properties"]["instance_map_origin_xy"] == [c0, r0]
    for k, (x, y) in enumerate(CENTRES, start=1):
        rr, cc = np.nonzero(instances == k)
        assert abs(len(rr) - np.pi * RADIUS ** 2) < 0.15 * np.pi * RADIUS ** 2  # ~201 level-0 px, not ~804
        assert abs(cc.mean() + c0 - x) < 1 and abs(rr.mean() + r0 - y) < 1
        feature = next(f for f in geo["features"] if f["properties"]["instance"] == k)
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert abs(ring[:-1, 0].mean() - (x + 0.5)) < 1.5 and abs(ring[:-1, 1].mean() - (y + 0.5)) < 1.5
        assert feature["properties"]["click"] == [x, y]
        assert abs(feature["properties"]["measurements"]["area_px"] - np.pi * RADIUS ** 2) < 0.15 * np.pi * RADIUS ** 2
    overlay = Image.open(result["overlay"])
    assert overlay.size == (w, h)
