"""nuclick/infer.py: click formats, click boxes and patches, post-processing, overlap resolution,
outputs, and inference on the real NuClick demo image with its 84 clicks; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from common.amp import MixedPrecision
from nuclick.config import InferConfig
from nuclick.infer import (ArrayImage, ClickError, ClickPatches, click_boxes, instance_polygons, largest_component,
                           network_input, open_image, post_filter, read_clicks, run, segment_clicks, usable_clicks)
from nuclick.model import build_model

DEMO = "nuclei/nuclick_demo"


pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions: threads only add overhead


class DiscModel(nn.Module):
    """Stand-in network: logits > 0 within radius r of the positive click, minus the negative clicks'
    discs (so the pipeline's geometry, batching and overlap handling can be checked exactly)."""

    def __init__(self, radius: int = 6):
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(-radius, radius + 1.0), torch.arange(-radius, radius + 1.0), indexing="ij")
        self.register_buffer("disc", (yy ** 2 + xx ** 2 <= radius ** 2).float()[None, None])
        self.radius = radius

    def forward(self, x):
        pos = nn.functional.conv2d(x[:, 3:4], self.disc, padding=self.radius)
        return 20 * (pos - 0.5)


def test_read_clicks_formats(fixtures_dir, tmp_path):
    demo = read_clicks(fixtures_dir / DEMO / "test_img.csv")
    assert demo.shape == (84, 2) and demo[0].tolist() == [3, 15] and demo[:, 0].max() == 244
    (tmp_path / "h.csv").write_text("x,y,label\n10.7,20.2,a\n\n30,40,b\n")
    assert read_clicks(tmp_path / "h.csv").tolist() == [[10.7, 20.2], [30, 40]]
    (tmp_path / "pairs.json").write_text("[[1, 2], [3, 4]]")
    (tmp_path / "objs.json").write_text('[{"x": 1, "y": 2}, {"x": 3, "y": 4}]')
    (tmp_path / "bundle.json").write_text('{"foreground": [[2, 1], [4, 3]]}')  # [row, col]
    for name in ("pairs.json", "objs.json", "bundle.json"):
        assert read_clicks(tmp_path / name).tolist() == [[1, 2], [3, 4]]
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5.5, 6.5]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[7, 8], [9, 10]]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}}]}
    (tmp_path / "q.geojson").write_text(json.dumps(geo))
    with pytest.warns(UserWarning, match="1 non-point feature"):
        assert read_clicks(tmp_path / "q.geojson").tolist() == [[5.5, 6.5], [7, 8], [9, 10]]
    (tmp_path / "bad.csv").write_text("1,2\nfoo,bar\n")
    with pytest.raises(ClickError, match=r"bad\.csv:2"):
        read_clicks(tmp_path / "bad.csv")


def test_bad_clicks_outside_and_empty():
    with pytest.warns(UserWarning, match="2 click\\(s\\) outside the 50x40 image"):
        xy = usable_clicks(np.array([[3.9, 4.2], [-1, 5], [10, 40], [49, 39]]), height=40, width=50)
    assert xy.tolist() == [[3, 4], [49, 39]]
    with pytest.raises(ClickError, match="empty"):
        usable_clicks(np.zeros((0, 2)), 40, 50, source="c.csv")
    with pytest.raises(ClickError, match="none of the 1 clicks"), pytest.warns(UserWarning):
        usable_clicks(np.array([[60.0, 1.0]]), 40, 50)


def test_click_boxes_shift_inside_and_patches():
    xy = np.array([[5, 3], [100, 60], [199, 119]])
    boxes = click_boxes(xy, height=120, width=200, bb=64)
    assert boxes.tolist() == [[0, 0, 64, 64], [28, 68, 92, 132], [56, 136, 120, 200]]
    with pytest.raises(ClickError, match="smaller than the 128-px click box"):
        click_boxes(xy, 120, 200, 128)
    rgb = np.full((120, 200, 3), 255, np.uint8)
    xy = np.array([[100, 60], [110, 70], [100, 60], [5, 3]])  # a duplicate and a far click
    patches = ClickPatches(ArrayImage(rgb), xy, click_boxes(xy, 120, 200, 64), 64)
    x, i = patches[0]
    assert i == 0 and x.shape == (5, 64, 64) and torch.all(x[:3] == 255.0)  # scaled on the device
    assert torch.all(network_input(x[None])[0, :3] == 1.0) and torch.equal(network_input(x[None])[0, 3:], x[3:])
    assert torch.nonzero(x[3]).tolist() == [[60 - 28, 100 - 68]]
    assert torch.nonzero(x[4]).tolist() == [[70 - 28, 110 - 68]]  # duplicate pixel is not negative; far click outside


def test_largest_component_and_post_filter():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True  # 9 px
    mask[6:8, 6:8] = True  # 4 px
    mask[4, 4] = True  # diagonal to the first: joins it under 8-connectivity
    big = largest_component(mask)
    assert big.sum() == 10 and not big[6:8, 6:8].any()
    ring = np.zeros((12, 12), bool)
    ring[2:9, 2:9] = True
    ring[4:7, 4:7] = False  # a 9-px hole
    ring[10, 10] = True  # a 1-px speck
    cleaned = post_filter(ring, min_size=10, min_hole=30)
    assert not cleaned[10, 10] and cleaned[4:7, 4:7].all() and cleaned.sum() == 49
    assert post_filter(ring, min_size=0, min_hole=5)[4:7, 4:7].sum() == 0  # hole larger than min_hole stays


def test_instance_polygons_exact_for_a_rectangle():
    inst = np.zeros((10, 12), np.uint16)
    inst[2:6, 3:8] = 1  # rows 2..5, cols 3..7: 4 x 5 pixels
    ((k, xy),) = instance_polygons(inst, r0=100, c0=50)
    assert k == 1 and np.array_equal(xy[0], xy[-1])
    assert xy[:, 0].min() == 53 and xy[:, 0].max() == 58 and xy[:, 1].min() == 102 and xy[:, 1].max() == 106
    area = 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
    assert area == pytest.approx(20 - 4 * 0.125)  # corners cut by half-pixel diagonals


def test_real_demo_image_84_clicks(fixtures_dir):
    """The 256x256 RGBA NuClick demo image with its 84 clicks: at most 84 instances inside the image,
    each click in its own disc unless another click took the pixel first."""
    image = open_image(fixtures_dir / DEMO / "test_img.png", 10 ** 8)
    assert isinstance(image, ArrayImage) and image.rgb.shape == (256, 256, 3)  # alpha dropped
    xy = usable_clicks(read_clicks(fixtures_dir / DEMO / "test_img.csv"), image.height, image.width)
    cfg = InferConfig(batch_size=16)
    instances, region = segment_clicks(DiscModel(6), image, xy, cfg, torch.device("cpu"),
                                       MixedPrecision(torch.device("cpu"), "fp32"))
    assert region == (0, 0, 256, 256) and instances.shape == (256, 256) and instances.dtype == np.uint16
    n = int(instances.max())
    assert 70 <= n <= 84 and len(np.unique(instances)) == n + 1
    owners = instances[xy[:, 1], xy[:, 0]]
    assert (owners > 0).all()
    first = {}
    for i, o in enumerate(owners.tolist()):
        first.setdefault(o, i)
    assert list(first) == sorted(first)  # ids are numbered in click order
    areas = np.bincount(instances.ravel())[1:]
    assert areas.max() <= (2 * 6 + 1) ** 2


def test_run_writes_outputs(fixtures_dir, tmp_path):
    torch.manual_seed(0)
    net = build_model((4, 8, 8, 8, 8, 4))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    result = run(InferConfig(image=str(fixtures_dir / DEMO / "test_img.png"),
                             clicks=str(fixtures_dir / DEMO / "test_img.csv"), checkpoint=str(tmp_path / "model.pt"),
                             output_dir=str(tmp_path / "out"), device="cpu", threshold=0.0, num_workers=0))
    assert result["clicks"] == 84 and result["checkpoint"]["axis_order"] == "wh"
    instances = np.asarray(Image.open(result["instances"]))
    assert instances.dtype == np.uint16 and instances.shape == (256, 256)
    assert 1 <= result["n_instances"] == instances.max() <= 84
    overlay = Image.open(result["overlay"])
    assert overlay.size == (256, 256) and overlay.mode == "RGB"
    geo = json.loads(Path(result["geojson"]).read_text())
    assert len(geo["features"]) == result["n_instances"]
    for f in geo["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and ring[0].tolist() == ring[-1].tolist()
        assert ring.min() >= 0 and ring[:, 0].max() <= 256 and ring[:, 1].max() <= 256
        assert f["properties"]["objectType"] == "detection"


def test_grey_image_is_converted_and_small_image_refused(tmp_path):
    grey = (np.arange(130 * 140) % 256).astype(np.uint8).reshape(130, 140)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    image = open_image(tmp_path / "g.png", 10 ** 8)
    assert image.rgb.shape == (130, 140, 3) and np.array_equal(image.rgb[..., 2], grey)
    Image.fromarray(grey[:100]).save(tmp_path / "small.png")
    small = open_image(tmp_path / "small.png", 10 ** 8)
    with pytest.raises(ClickError, match="smaller than the 128-px click box"):
        segment_clicks(DiscModel(), small, np.array([[5, 5]]), InferConfig(), torch.device("cpu"),
                       MixedPrecision(torch.device("cpu"), "fp32"))


def test_large_tiff_is_read_around_the_clicks_only(tmp_path):
    """A tiled TIFF above max_region_pixels is opened with OpenSlide, read box by box, and the maps
    cover the bounding box of the click boxes; results equal those of the decoded image."""
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", rgb, tile=(128, 128), photometric="rgb", compression="zlib")
    slide = open_image(tmp_path / "big.tif", max_pixels=1000)
    assert type(slide).__name__ == "SlideImage" and (slide.height, slide.width) == (300, 400)
    xy = np.array([[100, 80], [140, 100], [300, 250]])
    cfg, cpu = InferConfig(bb_size=64, batch_size=2, max_region_pixels=1000 * 1000), torch.device("cpu")
    amp = MixedPrecision(cpu, "fp32")
    sparse, region = segment_clicks(DiscModel(5), slide, xy, cfg, cpu, amp)
    assert region == (48, 68, 282 - 48, 332 - 68)  # boxes span rows 48..282, cols 68..332
    whole, full_region = segment_clicks(DiscModel(5), ArrayImage(rgb), xy, cfg, cpu, amp)
    assert full_region == (0, 0, 300, 400)
    np.testing.assert_array_equal(whole[48:282, 68:332], sparse)
    assert whole.sum() == sparse.sum() and sparse.max() == 3
