"""Dense-mode maps do not depend on how the slide is cut into tiles: every kept output is computed
with its whole receptive field read from the slide (a halo around each tile), never zero padding.
The tile plan (camelyon/tiling.py), the stem in row strips, and test-time augmentation in both modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from camelyon.infer import cell_top_left, dense_mode_map, patch_mode_map
from camelyon.model import build_model, lean_dense_model
from camelyon.tiling import plan_sparse_tiles, plan_tiles, tile_side
from camelyon.prepare import compute_tissue_mask
from common.amp import MixedPrecision
from common.augment import scale_intensity
from common.pyramidal_tiff import write_pyramidal_tiff
from common.tta import parse_tta
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


# ============================================================================= the tile plan
def test_plan_covers_every_tissue_cell_once_and_respects_the_memory_cap():
    rng = np.random.default_rng(0)
    mask = np.zeros((90, 120), bool)
    yy, xx = np.mgrid[:90, :120]
    for cy, cx, r in [(20, 25, 14), (60, 80, 22), (75, 20, 6)]:  # round islands
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    mask[5:85, 100:103] = True  # a thin strip
    mask &= rng.random(mask.shape) > 0.03  # pinholes
    tiles = plan_tiles(mask, 16)
    hits = np.zeros(mask.shape, int)
    for t in tiles:
        hits[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols] += 1
        # no tile reads more pixels than a 16 x 16-cell tile: 224 + 64 * 15 + 2 * 224 = 1632 px a side
        assert tile_side(t.rows, 2) * tile_side(t.cols, 2) <= 1632 ** 2
    assert (hits[mask] == 1).all()  # every tissue cell in exactly one tile
    assert plan_tiles(mask, 16) == tiles  # deterministic (restarts rely on the tile indices)
    # hugging the tissue: far fewer pixels than the 16-cell grid blocks over the bounding box
    grid = [(r, c, min(16, 90 - r), min(16, 120 - c)) for r in range(0, 90, 16) for c in range(0, 120, 16)
            if mask[r:r + 16, c:c + 16].any()]
    grid_px = sum(tile_side(h, 2) * tile_side(w, 2) for _, _, h, w in grid)
    plan_px = sum(tile_side(t.rows, 2) * tile_side(t.cols, 2) for t in tiles)
    assert plan_px < 0.75 * grid_px


def test_plan_cuts_an_l_shape_into_its_two_bars():
    """Hand-computed: the 30 x 30 bounding box reads (64 * 30 + 608)^2 = 6.39 Mpx; the bars read
    672 x 2528 + 2464 x 672 = 3.36 Mpx (+ 2 x 32,768 px per tile), so the plan is the two bars."""
    mask = np.zeros((40, 40), bool)
    mask[3, 5:35] = True  # horizontal bar, 30 cells
    mask[4:33, 5] = True  # vertical bar below its left end, 29 cells
    tiles = plan_tiles(mask, 64)
    assert sorted((t.r0, t.c0, t.rows, t.cols) for t in tiles) == [(3, 5, 1, 30), (4, 5, 29, 1)]
    full = np.zeros((10, 12), bool)
    full[2:8, 1:11] = True  # a solid block is one tile
    assert [(t.r0, t.c0, t.rows, t.cols) for t in plan_tiles(full, 32)] == [(2, 1, 6, 10)]


def test_sparse_plan_cuts_only_at_its_caps_where_the_tissue_is_thinnest():
    """The sparse engine computes cones, not rectangles: far-apart islands under the caps stay one
    tile; over the tissue cap, a dumbbell (two 10 x 10 blobs, 100 cells each, joined by a 20-cell
    bridge on row 5) is cut once, across the bridge: cuts above columns 15..25 have only bridge
    cells within 5 columns (10 each), the middle one is 20."""
    islands = np.zeros((60, 60), bool)
    islands[2:6, 2:6] = islands[50:58, 40:47] = True
    assert [(t.r0, t.c0, t.rows, t.cols) for t in plan_sparse_tiles(islands, 96, 4096)] == [(2, 2, 56, 45)]
    bell = np.zeros((10, 40), bool)
    bell[:, :10] = bell[:, 30:] = True
    bell[5, 10:30] = True
    tiles = plan_sparse_tiles(bell, 96, 150)
    assert sorted((t.r0, t.c0, t.rows, t.cols) for t in tiles) == [(0, 0, 10, 20), (0, 20, 10, 20)]


def test_sparse_plan_covers_every_tissue_cell_once_within_both_caps():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:150, :170]
    mask = ((yy - 70) ** 2 / 60 ** 2 + (xx - 85) ** 2 / 75 ** 2 < 1) & (rng.random((150, 170)) > 0.05)
    mask[140:145, 5:165] = True  # a long strip: over the side cap on its own
    for max_side, max_tissue in [(96, 4096), (64, 1500), (40, 700)]:
        tiles = plan_sparse_tiles(mask, max_side, max_tissue)
        hits = np.zeros(mask.shape, int)
        for t in tiles:
            hits[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols] += 1
            assert max(t.rows, t.cols) <= max_side and mask[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols].sum() <= max_tissue
        assert (hits[mask] == 1).all()
        assert len(tiles) <= 2 * -(-int(mask.sum()) // max_tissue) + 2  # not cut into crumbs
        assert plan_sparse_tiles(mask, max_side, max_tissue) == tiles  # deterministic
    with pytest.raises(ValueError, match="positive"):
        plan_sparse_tiles(mask, 96, 0)


def test_stem_in_row_strips_equals_the_whole_forward(random_model):
    """RowStrips runs the stem on strips of 16 output rows (64 input rows + 8 px margins): the
    output of a 1,248 x 672 input (20 strips) equals the plain forward."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 1248, 672) * 2 - 1
    lean = lean_dense_model(random_model, strip_rows=16)
    with torch.no_grad():
        whole, striped = random_model(x), lean(x)
    assert striped.shape == whole.shape == (1, 1, 33, 15)
    torch.testing.assert_close(striped, whole, rtol=0, atol=1e-5)
    # a margin one stride too small would not be exact: the check above can fail
    from camelyon.model import RowStrips
    short = torch.nn.Sequential(RowStrips(torch.nn.Sequential(*random_model.features[:4]), 4, 0, 16),
                                *random_model.features[4:])
    with torch.no_grad():
        wrong = random_model.fc(random_model.pool(short(x)))
    assert (wrong - whole).abs().max() > 1e-5


# ============================================================================= test-time augmentation
def test_dense_tta_is_the_mean_over_transformed_windows_with_their_context(textured_slide, random_model):
    """Independent evidence: for a few cells, the 672-px window around the cell's patch, each of
    the 8 dihedral transforms of it through the network, the centre output, averaged."""
    tm = compute_tissue_mask(textured_slide)
    dense = dense_mode_map(random_model, str(textured_slide), tm, CPU, FP32, tile_cells=8, workers=0,
                           tta=parse_tta("flips"))
    plain = dense_mode_map(random_model, str(textured_slide), tm, CPU, FP32, tile_cells=8, workers=0)
    assert np.abs(dense - plain)[tm.mask].max() > 1e-5  # the augmentation changes the map
    for r, c in [(4, 4), (5, 9), (9, 10)]:
        top, left = cell_top_left(np.array([r]), np.array([c]), tm.ratio)
        margin = 7 * 32
        rgb = read_rgb_scaled(open_slide(str(textured_slide)), int(left[0]) - margin, int(top[0]) - margin,
                              224 + 2 * margin, 224 + 2 * margin, 1.0)
        window = scale_intensity(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())
        probs = []
        for k in range(4):
            for mirrored in (window, window.flip(-1)):
                with torch.no_grad():
                    probs.append(torch.sigmoid(random_model(torch.rot90(mirrored, k, (-2, -1))))[0, 0, 7, 7].item())
        assert abs(dense[r, c] - np.mean(probs)) < 1e-5


def test_patch_tta_is_the_mean_over_transformed_patches(textured_slide, random_model):
    tm = compute_tissue_mask(textured_slide)
    names = parse_tta("hflip,rot90")
    assert names == ["id", "flip", "rot90"]
    prob = patch_mode_map(random_model, str(textured_slide), tm, CPU, FP32, batch_size=16, workers=0, tta=names)
    for r, c in [(4, 4), (6, 8)]:
        top, left = cell_top_left(np.array([r]), np.array([c]), tm.ratio)
        rgb = read_rgb_scaled(open_slide(str(textured_slide)), int(left[0]), int(top[0]), 224, 224, 1.0)
        patch = scale_intensity(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())
        with torch.no_grad():
            expected = np.mean([torch.sigmoid(random_model(v)).item()
                                for v in (patch, patch.flip(-1), torch.rot90(patch, 1, (-2, -1)))])
        assert abs(prob[r, c] - expected) < 1e-6
