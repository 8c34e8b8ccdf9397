"""The Camelyon-scale benchmark slide: a streamed pyramid that is valid, shows what its analytic
description says, and is written in flat memory."""
from __future__ import annotations

import math

import numpy as np
import openslide
import pytest
import tifffile

from camelyon.large_slide import (BACKGROUND, STROMA, Island, SlideSpec, large_spec, render, small_spec,
                                  tiles_near_tissue, write_slide, write_slide_in_fresh_process)
from common.pyramidal_tiff import encode_jpeg_tile, halving_shapes, write_pyramidal_tiff, write_streamed_pyramid
from common.wsi import open_slide, read_rgb, slide_mpp

PLAIN = Island(cy=1500, cx=1800, a=800, b=500)  # axis-aligned ellipse: inside iff (dx/800)^2 + (dy/500)^2 < 1
IRREGULAR = Island(cy=1200, cx=3900, a=700, b=450, angle=0.6, harmonics=((3, 0.1, 0.5), (5, 0.05, 2.0)))


def _spec(texture: float = 0.0) -> SlideSpec:
    return SlideSpec(3000, 5000, (PLAIN, IRREGULAR), tile=256, min_levels=1, texture=texture)


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("large_slide") / "flat.tif"
    write_slide(_spec(texture=0.0), path)
    return path


def test_halving_shapes_hand_computed():
    assert halving_shapes(3000, 5000, 1000) == [(3000, 5000), (1500, 2500), (750, 1250), (375, 625)]
    assert halving_shapes(3000, 5000, 1000, min_levels=6)[4:] == [(188, 313), (94, 157)]
    assert halving_shapes(1, 1, 1000) == [(1, 1)]


def test_streamed_pyramid_is_valid_for_openslide_tifffile_and_wsi(flat_slide):
    with open_slide(flat_slide) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_dimensions == ((5000, 3000), (2500, 1500), (1250, 750), (625, 375))
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8))
        assert slide_mpp(slide, str(flat_slide)) == pytest.approx(0.243, rel=1e-6)
    with tifffile.TiffFile(flat_slide) as tf:
        assert len(tf.pages) == 4
        for k, page in enumerate(tf.pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG and page.is_reduced == (k > 0)
            level = page.asarray()  # decodes every tile of the level
            assert level.shape == (math.ceil(3000 / 2 ** k), math.ceil(5000 / 2 ** k), 3)


@pytest.mark.parametrize("level", [0, 2])
def test_pixels_follow_the_geometry_at_hand_picked_points(flat_slide, level):
    """Without texture, tissue is the flat stroma colour inside the ellipse, background outside:
    points chosen with (dx/800)^2 + (dy/500)^2 well away from 1."""
    inside = [(0, 0), (300, 0), (0, 600), (-250, -450)]  # (dy, dx): 0, 0.36, 0.56, 0.57
    outside = [(0, 950), (620, 0), (-450, 600), (-1400, -1700), (1400, 3100)]  # 1.41, 1.54, 1.37, far, far
    ds = 2 ** level
    with open_slide(flat_slide) as slide:
        for points, colour in ((inside, STROMA), (outside, BACKGROUND)):
            for dy, dx in points:
                y, x = PLAIN.cy + dy, PLAIN.cx + dx
                px = read_rgb(slide, x // ds * ds, y // ds * ds, 1, 1, level)[0, 0]
                assert np.abs(px.astype(int) - colour).max() <= 4, (level, dy, dx, px)


def test_textured_tiles_equal_the_description(tmp_path):
    spec = _spec(texture=1.0)
    write_slide(spec, tmp_path / "textured.tif")
    with open_slide(tmp_path / "textured.tif") as slide:
        for level, (top, left) in ((0, (1280, 1536)), (0, (1024, 3840)), (1, (512, 1024)), (3, (0, 0))):
            ds = 2 ** level
            got = read_rgb(slide, left * ds, top * ds, 256, 256, level).astype(int)
            want = render(spec, level, top, left, 256, 256)
            assert np.abs(got - want).mean() < 3 and np.abs(got.mean((0, 1)) - want.mean((0, 1))).max() < 1
            assert (want != BACKGROUND).any(-1).mean() > 0.1  # the compared tiles do hold tissue


def test_encoded_tile_decodes_as_write_pyramidal_tiffs_tile(tmp_path):
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(180, 40, (256, 512, 3)), 0, 255).astype(np.uint8)
    write_pyramidal_tiff(tmp_path / "array.tif", img, min_levels=1, min_size=1000)
    tiles = lambda k: (encode_jpeg_tile(img[:, j:j + 256]) for j in (0, 256))  # noqa: E731
    write_streamed_pyramid(tmp_path / "streamed.tif", [(256, 512)], tiles)
    with open_slide(tmp_path / "array.tif") as a, open_slide(tmp_path / "streamed.tif") as b:
        assert np.array_equal(read_rgb(a, 0, 0, 512, 256), read_rgb(b, 0, 0, 512, 256))


def test_tiles_away_from_tissue_are_the_shared_blank_tile(flat_slide):
    near = tiles_near_tissue(_spec(), 0)
    assert (5, 7) in near and (0, 0) not in near and (11, 19) not in near
    with tifffile.TiffFile(flat_slide) as tf:
        page = tf.pages[0]
        per_row = math.ceil(5000 / 256)
        counts = {(i // per_row, i % per_row): n for i, n in enumerate(page.databytecounts)}
    blank = {n for rc, n in counts.items() if rc not in near}
    assert len(blank) == 1  # one stream, written again and again


def test_writing_20k_squared_stays_far_below_the_image_size(tmp_path):
    spec = SlideSpec(20_000, 20_000, (PLAIN.moved(9000, 11000),))
    info = write_slide_in_fresh_process(spec, tmp_path / "big.tif")
    image_mb = 20_000 * 20_000 * 3 / 2 ** 20  # 1,144 MB at level 0 alone
    assert info["peak_rss_mb"] < 150 < image_mb / 7, info  # measured ~40 MB (Python, NumPy, codecs)
    with openslide.OpenSlide(str(tmp_path / "big.tif")) as slide:
        assert slide.dimensions == (20_000, 20_000) and slide.level_dimensions[-1] == (313, 313)


def test_benchmark_specs_are_camelyon_scale_with_the_same_islands():
    large, small = large_spec(), small_spec()
    assert large.width >= 90_000 and large.height >= 200_000 and max(large.shapes()[-1]) < 1000
    assert small.shapes()[6] == (128, 128)
    for spec in (large, small):
        for i, a in enumerate(spec.islands):
            assert a.reach < min(a.cy, a.cx, spec.height - a.cy, spec.width - a.cx)
            for b in spec.islands[i + 1:]:
                assert math.hypot(a.cy - b.cy, a.cx - b.cx) > a.reach + b.reach
    shape = lambda i: (i.a, i.b, i.angle, i.harmonics)  # noqa: E731
    assert [shape(i) for i in large.islands] == [shape(i) for i in small.islands]


def test_peak_rss_of_a_fresh_interpreter_is_its_own():
    """ru_maxrss after exec carries the parent's peak on Linux; the measurement must not."""
    import subprocess
    import sys

    code = ("import sys; from common.memory import peak_rss_mb; before = peak_rss_mb(); "
            "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); print(before, peak_rss_mb())")
    ballast = bytearray(400 * 2**20)  # make sure this (parent) process has a peak far above a bare interpreter's
    ballast[::4096] = b"1" * len(ballast[::4096])
    before, after = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split())
    assert before < 100 and 300 < after < 400


def test_bench_large_measures_both_slides_in_fresh_processes(tmp_path, capsys):
    from camelyon.bench import BenchConfig, large_vs_small
    from camelyon.large_slide import BenchmarkSlides

    island = Island(0, 0, 300, 200, 0.3, ((3, 0.1, 0.0),))
    specs = {"large": SlideSpec(4096, 3072, (island.moved(3008, 1984),)),
             "small": SlideSpec(2048, 2048, (island.moved(1024, 1024),))}
    for name, spec in specs.items():
        write_slide(spec, tmp_path / f"{name}.tif")
    slides = BenchmarkSlides(tmp_path / "large.tif", tmp_path / "small.tif", specs)
    out = large_vs_small(BenchConfig(device="cpu", num_workers=0, large_mode="patch"), slides)  # patch: fast
    text = capsys.readouterr().out
    assert "large / small:" in text and "goal" in text
    large, small = out["results"]["large"], out["results"]["small"]
    assert 0.95 < large["tissue_cells"] / small["tissue_cells"] < 1.05  # the same island
    for r in (large, small):
        assert r["tissue_cells"] > 20 and r["infer_s"] > 0 and r["mask_s"] > 0
        assert 100 < r["peak_rss_mb"] < 2048 and r["tree_peak_pss_mb"] > 0  # a process with torch, not the test's
    assert out["ratios"]["peak_rss_mb"] == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"])
