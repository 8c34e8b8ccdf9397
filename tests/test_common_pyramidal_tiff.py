"""common.pyramidal_tiff: the files open in OpenSlide with the right levels and resolution, JPEG
levels are close to the image and to its area downsampling, masks stay lossless and binary."""
from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from skimage.draw import polygon as draw_polygon

from common.pyramidal_tiff import downsample2, write_pyramidal_tiff


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth test image (JPEG reproduces it closely)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(xx / 97.0)
    g = 128 + 100 * np.cos(yy / 131.0)
    b = 128 + 60 * np.sin((xx + yy) / 173.0)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def test_write_pyramidal_tiff_openslide(tmp_path):
    img = _smooth_rgb(1000, 1500)  # not a multiple of the tile size, odd level sizes
    path = tmp_path / "smooth.tif"
    shapes = write_pyramidal_tiff(path, img, mpp=0.5, quality=95)
    assert not list(tmp_path.glob(".*.tmp"))
    s = openslide.OpenSlide(path)
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.level_count == len(shapes) == 7  # min_levels: down to 1000 / 64 -> 16 px
    assert s.dimensions == (1500, 1000)
    for k, ds in enumerate(s.level_downsamples):
        assert ds == pytest.approx(2 ** k, rel=0.05)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-6)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-6)
    got = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3].astype(int)
    assert np.abs(got - img).mean() < 1.5 and np.abs(got - img).max() < 40
    got2 = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]))[..., :3].astype(int)
    assert np.abs(got2 - downsample2(downsample2(img))).mean() < 1.5


def test_write_pyramidal_tiff_mask_lossless(tmp_path):
    mask = np.zeros((900, 1300), np.uint8)
    rr, cc = draw_polygon([100, 700, 650, 150], [200, 250, 1100, 1000], mask.shape)
    mask[rr, cc] = 255
    path = tmp_path / "mask.tif"
    write_pyramidal_tiff(path, mask)  # auto: deflate, majority downsampling
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert np.array_equal(tf.pages[0].asarray(), mask)
        for page in tf.pages:
            assert set(np.unique(page.asarray())) <= {0, 255}
    s = openslide.OpenSlide(path)
    lvl = np.asarray(s.read_region((0, 0), 0, s.dimensions))
    assert np.array_equal(lvl[..., 0], mask)


def test_downsample2_odd_and_majority():
    a = np.arange(15, dtype=np.uint8).reshape(3, 5)
    d = downsample2(a)
    assert d.shape == (2, 3)
    assert d[0, 0] == round((0 + 1 + 5 + 6) / 4)
    m = np.array([[0, 255, 0, 0], [255, 0, 0, 255]], np.uint8)
    assert downsample2(m, "majority").tolist() == [[255, 0]]
