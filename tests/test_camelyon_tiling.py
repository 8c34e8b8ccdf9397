"""Dense-mode maps do not depend on how the slide is cut into tiles: every kept output is computed
with its whole receptive field read from the slide (a halo around each tile), never zero padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from camelyon.infer import cell_top_left, dense_mode_map
from camelyon.model import build_model
from camelyon.prepare import compute_tissue_mask
from common.amp import MixedPrecision
from common.augment import scale_intensity
from common.pyramidal_tiff import write_pyramidal_tiff
from common.wsi import open_slide, read_rgb_scaled

CPU = torch.device("cpu")
FP32 = MixedPrecision(CPU, "fp32")


@pytest.fixture(scope="module")
def textured_slide(tmp_path_factory):
    """A 1024x1024 slide: textured pink tissue in rows [256, 640) x cols [256, 704) (6 x 7 cells of
    64 px) with a purple block, so that an output computed from wrong pixels cannot look right."""
    rng = np.random.default_rng(3)
    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[256:640, 256:704] = (np.array((230, 150, 200)) + rng.integers(-40, 20, (384, 448, 3))).clip(0, 255)
    img[384:512, 384:512] = (90, 50, 150)
    path = tmp_path_factory.mktemp("tiling") / "textured.tif"
    write_pyramidal_tiff(path, img, compression="deflate")
    return path


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return build_model().eval()


def test_dense_map_is_the_same_for_any_tile_size(textured_slide, random_model):
    tm = compute_tissue_mask(textured_slide)
    assert tm.mask.sum() == 42
    maps = {n: dense_mode_map(random_model, str(textured_slide), tm, CPU, FP32, tile_cells=n, workers=0)
            for n in (2, 3, 8)}
    on = tm.mask
    assert (maps[8][~on] == 0).all() and (maps[8][on] > 0).all()
    assert maps[8][on].std() > 1e-3  # the map is not flat: a difference would show
    # a halo one stride short on either side leaves differences of ~2e-5 here; with the full halo
    # only float rounding of different-sized convolutions could differ (0 on CPU)
    np.testing.assert_allclose(maps[2], maps[8], rtol=0, atol=5e-6)
    np.testing.assert_allclose(maps[3], maps[8], rtol=0, atol=5e-6)


def test_dense_cell_equals_the_network_on_a_window_holding_its_whole_receptive_field(textured_slide,
                                                                                     random_model):
    """Independent evidence: read a 672-px window (224 + 7 strides each side, more than the 627-px
    receptive field of one output) centred on a cell and take the centre output."""
    tm = compute_tissue_mask(textured_slide)
    dense = dense_mode_map(random_model, str(textured_slide), tm, CPU, FP32, tile_cells=3, workers=0)
    for r, c in [(4, 4), (5, 9), (9, 10)]:  # tissue corners and an edge cell
        assert tm.mask[r, c]
        top, left = cell_top_left(np.array([r]), np.array([c]), tm.ratio)
        margin = 7 * 32
        rgb = read_rgb_scaled(open_slide(str(textured_slide)), int(left[0]) - margin, int(top[0]) - margin,
                              224 + 2 * margin, 224 + 2 * margin, 1.0)
        with torch.no_grad():
            logits = random_model(scale_intensity(torch.from_numpy(rgb).permute(2, 0, 1)[None].float()))
        assert logits.shape[-2:] == (15, 15)
        expected = torch.sigmoid(logits[0, 0, 7, 7]).item()
        assert abs(dense[r, c] - expected) < 1e-5
