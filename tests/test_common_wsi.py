"""common/wsi.py: the slide's µm/px (OpenSlide properties, TIFF tags, none), the scale between a slide
and a model's resolution, level choice, and the resolution-aware reader (exactly the level-0 read at
scale 1; the real 20x fixture read at 0.243 µm/px equals an independent bicubic upsampling)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from common import wsi
from common.pyramidal_tiff import write_pyramidal_tiff


class FakeSlide:
    """Just the ``properties`` of a slide, for the header-parsing fallbacks."""

    def __init__(self, **props):
        self.properties = props


# ============================================================================= resolution from the header
def test_fixture_slides_report_their_resolution(fixtures_dir):
    with wsi.open_slide(fixtures_dir / "wsi" / "CMU-1-Small-Region.svs") as slide:
        assert wsi.slide_mpp(slide) == pytest.approx(0.499)
    with wsi.open_slide(fixtures_dir / "wsi" / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        assert wsi.slide_mpp(slide) is None  # histolab re-save: no MPP, ResolutionUnit inch but no X/YResolution


def test_pyramidal_tiff_resolution_tags(tmp_path):
    write_pyramidal_tiff(tmp_path / "half.tif", np.full((128, 192, 3), 200, np.uint8), mpp=0.5, compression="deflate")
    with wsi.open_slide(tmp_path / "half.tif") as slide:
        assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
        assert wsi.slide_mpp(slide) == pytest.approx(0.5, rel=1e-9)
    # no resolution tags (tifffile writes 1 pixel per 'no unit')
    tifffile.imwrite(tmp_path / "plain.tif", np.full((256, 256, 3), 200, np.uint8), tile=(128, 128), photometric="rgb")
    with wsi.open_slide(tmp_path / "plain.tif") as slide:
        assert wsi.slide_mpp(slide) is None


@pytest.mark.parametrize("props, expected", [
    ({"openslide.mpp-x": "0.2431", "openslide.mpp-y": "0.2431"}, 0.2431),
    ({"openslide.mpp-x": "0.25"}, 0.25),  # y missing: square pixels
    # OpenSlide versions that do not derive openslide.mpp-*: the TIFF tags (pixels per unit)
    ({"tiff.XResolution": "20000", "tiff.YResolution": "20000", "tiff.ResolutionUnit": "centimeter"}, 0.5),
    ({"tiff.XResolution": "101600", "tiff.YResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25),
    ({"tiff.XResolution": "2", "tiff.YResolution": "2", "tiff.ResolutionUnit": "none"}, None),
    ({"tiff.ResolutionUnit": "inch"}, None),
    ({"openslide.mpp-x": "nan"}, None),
    ({}, None),
])
def test_mpp_from_properties(props, expected):
    mpp = wsi.slide_mpp(FakeSlide(**props))
    assert mpp == (pytest.approx(expected) if expected else None)


def test_screen_dpi_and_anisotropic_pixels_warn():
    with pytest.warns(UserWarning, match="implausible"):  # 72 dpi: 352.8 µm/px is no microscope
        assert wsi.slide_mpp(FakeSlide(**{"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"})) is None
    with pytest.warns(UserWarning, match="anisotropic"):
        assert wsi.slide_mpp(FakeSlide(**{"openslide.mpp-x": "0.24", "openslide.mpp-y": "0.26"})) == pytest.approx(0.25)
    assert wsi.mpp_from_tiff_resolution(40000, 20000, 3) == (0.25, 0.5)  # TIFF unit codes: 3 = cm


def test_recorded_mpp_of_checkpoints():
    assert wsi.recorded_mpp({"model": {}, "config": {"mpp": 0.5}}) == 0.5
    assert wsi.recorded_mpp({"model": {}, "config": {"mpp": 0.0}}) is None  # "read from the slides", unresolved
    assert wsi.recorded_mpp({"model": {}, "config": {"lr": 1e-3}}) is None  # older project checkpoint
    assert wsi.recorded_mpp({"fc.weight": 0}) is None  # flat state_dict (the bundle's model.pt)


def test_dataset_mpp_agree_differ_none(tmp_path):
    img = np.full((64, 64, 3), 200, np.uint8)
    for name, mpp in (("a", 0.243), ("b", 0.2431), ("c", 0.226), ("d", 0.243)):
        write_pyramidal_tiff(tmp_path / f"{name}.tif", img, mpp=mpp, compression="deflate")
    tifffile.imwrite(tmp_path / "none.tif", np.full((128, 128, 3), 200, np.uint8), tile=(64, 64), photometric="rgb")
    paths = [tmp_path / f"{n}.tif" for n in "abd"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mpp, note = wsi.dataset_mpp(paths + paths[:1], default=0.3)  # duplicates count once
    assert mpp == pytest.approx(0.243, abs=1e-4) and "3 slide(s)" in note
    with pytest.warns(UserWarning, match=r"differ in resolution \(0.226, 0.243"):
        mpp, _ = wsi.dataset_mpp(paths + [tmp_path / "c.tif", tmp_path / "none.tif"], default=0.3)
    assert mpp == pytest.approx(0.243, abs=1e-4)  # median of 0.226, 0.243, 0.2431, 0.243
    mpp, note = wsi.dataset_mpp([tmp_path / "none.tif"], default=0.3)
    assert mpp == 0.3 and "assuming 0.3" in note


# ============================================================================= scale and level
def test_resolve_scale_tolerance_override_and_missing():
    same = wsi.resolve_scale(0.2431, 0.243)
    assert same.scale == 1.0 and same.identity and same.source == "header"
    utrecht = wsi.resolve_scale(0.226, 0.243)  # Camelyon16's second scanner: within the 10 % default
    assert utrecht.identity
    assert wsi.resolve_scale(0.226, 0.243, tolerance=0.01).scale == pytest.approx(0.243 / 0.226)
    half = wsi.resolve_scale(0.499, 0.243)
    assert half.scale == pytest.approx(0.243 / 0.499) and not half.identity
    with pytest.warns(UserWarning, match="no resolution.*--slide-mpp"):
        unknown = wsi.resolve_scale(None, 0.243, source="x.svs")
    assert unknown.scale == 1.0 and unknown.source == "assumed" and unknown.slide_mpp == 0.243
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an override silences the warning ...
        given = wsi.resolve_scale(None, 0.243, override=0.5)
        wrong_header = wsi.resolve_scale(0.5, 0.243, override=0.243)  # ... and beats a wrong header
    assert given.scale == pytest.approx(0.486) and given.source == "override"
    assert wrong_header.identity and wrong_header.source == "override"


def test_best_level_is_the_coarsest_not_coarser_than_a_target_pixel(tmp_path):
    write_pyramidal_tiff(tmp_path / "p.tif", np.full((512, 512, 3), 200, np.uint8), mpp=0.125, compression="deflate")
    with wsi.open_slide(tmp_path / "p.tif") as slide:
        assert slide.level_downsamples[:4] == (1.0, 2.0, 4.0, 8.0)
        assert wsi.best_level(slide, 0.487) == 0  # upsampling: level 0
        assert wsi.best_level(slide, 1.0) == 0
        assert wsi.best_level(slide, 2.0) == 1
        assert wsi.best_level(slide, 3.9) == 1  # level 2 (4x) would be 2.6 % coarser than the target
        assert wsi.best_level(slide, 3.97) == 2  # within 1 %
        assert wsi.best_level(slide, 1000.0) == slide.level_count - 1


# ============================================================================= reading
@pytest.fixture(scope="module")
def noise_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "noise.tif"
    rgb = np.random.default_rng(0).integers(0, 256, (600, 700, 3)).astype(np.uint8)
    write_pyramidal_tiff(path, rgb, mpp=0.125, compression="deflate")
    return path, rgb


def test_scale_one_is_exactly_the_level0_read(noise_slide):
    path, rgb = noise_slide
    with wsi.open_slide(path) as slide:
        for x, y in ((100, 37), (-30, -20), (650, 560)):  # inside, and across the borders (white outside)
            a = wsi.read_rgb_scaled(slide, x, y, 96, 80, 1.0)
            b = wsi.read_rgb(slide, x, y, 96, 80)
            assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.array_equal(b[:40, :50], rgb[560:600, 650:700]) and (b[40:] == 255).all() and (b[:, 50:] == 255).all()


def test_scale_two_reads_level_one_pixels(noise_slide):
    """Scale 2 on a 2x pyramid is the level-1 image itself: the pyramid's pixels, not a resample."""
    path, _ = noise_slide
    with wsi.open_slide(path) as slide:
        assert wsi.best_level(slide, 2.0) == 1
        got = wsi.read_rgb_scaled(slide, 40, 30, 120, 90, 2.0)
        level1 = wsi.read_rgb(slide, 80, 60, 120, 90, level=1)
    assert np.array_equal(got, level1)


def test_real_20x_slide_read_at_camelyon_resolution(fixtures_dir):
    """CMU-1-Small-Region (0.499 µm/px) read at 0.243 µm/px: the network pixels equal the level-0
    read upsampled by 0.499 / 0.243 (independently: cubic spline at the target pixel centres,
    (u + 0.5) * scale - 0.5 in level-0 pixel indices)."""
    with wsi.open_slide(fixtures_dir / "wsi" / "CMU-1-Small-Region.svs") as slide:
        res = wsi.resolve_scale(wsi.slide_mpp(slide), 0.243)
        s = res.scale
        x, y, w, h = 1500, 2600, 300, 200  # network pixels: level-0 (730.5, 1266.1), 146 x 97 px
        got = wsi.read_rgb_scaled(slide, x, y, w, h, s)
        level0 = wsi.read_rgb(slide, 0, 0, *slide.dimensions).astype(np.float64)
    assert got.shape == (h, w, 3)
    rows = (y + np.arange(h) + 0.5) * s - 0.5
    cols = (x + np.arange(w) + 0.5) * s - 0.5
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    expected = np.stack([ndi.map_coordinates(level0[..., k], [rr, cc], order=3) for k in range(3)], -1)
    diff = np.abs(got - expected)  # measured: mean 0.12, 99th percentile 2.2 (PIL's cubic vs the spline)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) < 5  # half a pixel off gives 1.05 / 26, 1 % off 3.3 / 100
    # the same network-pixel box read without the resolution step is a different (half-scale) image
    with wsi.open_slide(fixtures_dir / "wsi" / "CMU-1-Small-Region.svs") as slide:
        naive = wsi.read_rgb(slide, x, y, w, h).astype(np.float64)
    assert np.abs(naive - expected).mean() > 5 * diff.mean()


def test_shrinking_is_antialiased(tmp_path):
    """1-px black/white stripes read at 4x fewer pixels from a single-level slide: the antialiased
    reader gives the mean grey, point sampling would give black or white."""
    img = np.zeros((256, 256, 3), np.uint8)
    img[:, ::2] = 255
    tifffile.imwrite(tmp_path / "stripes.tif", img, tile=(128, 128), photometric="rgb",
                     resolution=(1e4 / 0.125, 1e4 / 0.125), resolutionunit="CENTIMETER")
    with wsi.open_slide(tmp_path / "stripes.tif") as slide:
        assert slide.level_count == 1 and wsi.slide_mpp(slide) == pytest.approx(0.125)
        got = wsi.read_rgb_scaled(slide, 8, 8, 40, 40, 4.0)
    assert np.abs(got.astype(float) - 127.5).max() < 3


def test_open_slide_errors_name_the_file(tmp_path):
    with pytest.raises(wsi.SlideError, match="nope.svs: slide not found"):
        wsi.open_slide(tmp_path / "nope.svs")
    (tmp_path / "junk.svs").write_text("not a slide")
    with pytest.raises(wsi.SlideError, match="junk.svs: OpenSlide cannot read"):
        wsi.open_slide(tmp_path / "junk.svs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(wsi.SlideError, match="empty: no slide files"):
        wsi.list_slides(tmp_path / "empty")
