"""The sparse dense-mode engine (camelyon/sparse.py) computes, at every output a tile needs, the value
of the plain network on the whole tile; it reads nothing it did not compute; it computes about the
receptive field of the needed outputs, not the tile; and the map is the same with either engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from camelyon.infer import HALO, TileProbability, dense_mode_map, tile_outputs
from camelyon.model import build_model
from camelyon.prepare import compute_tissue_mask
from camelyon.sparse import WORTH_IT, SparseResNet
from camelyon.tiling import Tile, tile_side
from common.amp import MixedPrecision
from common.pyramidal_tiff import write_pyramidal_tiff
from common.tta import parse_tta

CPU = torch.device("cpu")
FP32 = MixedPrecision(CPU, "fp32")


@pytest.fixture(scope="module")
def model():
    """Random weights with batch-norm statistics far from (0, 1), so that folding them matters."""
    torch.manual_seed(0)
    net = build_model().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return net


class PoisonedSparse(SparseResNet):
    """Buffers filled with NaN: a needed output that read anything not computed would be NaN."""

    def _buffer(self, *args):
        return super()._buffer(*args).fill_(float("nan"))


def cells_of(kind: str, rows: int, cols: int) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    if kind == "disk":
        return (yy - rows / 2 + 0.5) ** 2 + (xx - cols / 2 + 0.5) ** 2 <= (min(rows, cols) / 2) ** 2
    if kind == "strip":
        return np.abs(yy - xx) <= 1
    if kind == "scattered":
        return np.random.default_rng(1).random((rows, cols)) < 0.15
    return np.ones((rows, cols), bool)


def tile_input(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, int(tile_side(rows, 2)), int(tile_side(cols, 2)), generator=g) * 2 - 1


@pytest.mark.parametrize("kind,rows,cols,block_px", [
    ("disk", 12, 12, (64, 64, 64, 128, 256)),
    ("strip", 14, 10, (64, 64, 64, 128, 256)),
    ("scattered", 9, 13, (32, 32, 32, 32, 32)),
    ("full", 7, 5, (128, 128, 128, 128, 128)),
])
def test_sparse_equals_the_network_on_the_whole_tile(model, kind, rows, cols, block_px):
    cells = cells_of(kind, rows, cols)
    need = tile_outputs(Tile(0, 0, rows, cols), cells, 2, HALO)
    x = tile_input(rows, cols)
    with torch.no_grad():
        whole = model(x)[0, 0]  # the plain network, zero padding at the tile's border
    assert whole.shape == need.shape
    got = PoisonedSparse(model, block_px=block_px)(x[0], need)
    at = torch.from_numpy(need)
    assert not torch.isnan(got[at]).any()
    assert whole[at].std() > 1e-3  # outputs differ from each other: a misplaced one would show
    torch.testing.assert_close(got[at], whole[at], rtol=0, atol=2e-5)


def test_one_output_costs_its_receptive_field_not_the_tile(model):
    """One needed output of a 40 x 40-cell tile: its 627-px receptive field (ResNet18's 435 px plus
    six 32-px strides of the 7 x 7 pool), each layer rounded out to its blocks (at most 256 px on
    every side), against the whole tile's 2,720 x 2,720 px (224 + 39 x 64 + 448)."""
    sparse = SparseResNet(model)
    side = int(tile_side(40, 2))
    assert side == 224 + 39 * 64 + 448
    one = np.zeros((40, 40), bool)
    one[20, 20] = True
    plan = sparse.plan(tile_outputs(Tile(0, 0, 40, 40), one, 2, HALO), side, side)
    per_px = sparse.dense_multiply_adds_per_pixel()
    assert per_px == pytest.approx(1.8136e9 / 224 ** 2, rel=1e-3)  # ResNet18 body: 1.81 GMAC per 224 patch
    assert sparse.multiply_adds(plan) <= per_px * (627 + 2 * 256) ** 2
    assert sparse.saving(plan, side, side) > 6
    two = one.copy()
    two[5, 35] = True  # far away: its own cone, about as much again
    plan2 = sparse.plan(tile_outputs(Tile(0, 0, 40, 40), two, 2, HALO), side, side)
    assert 1.8 < sparse.multiply_adds(plan2) / sparse.multiply_adds(plan) < 2.2


def test_auto_runs_thin_tissue_sparsely_and_compact_tissue_whole(model):
    strip = cells_of("strip", 24, 24)
    full = cells_of("full", 24, 24)
    sparse = SparseResNet(model)
    side = int(tile_side(24, 2))
    plans = {k: sparse.plan(tile_outputs(Tile(0, 0, 24, 24), c, 2, HALO), side, side)
             for k, c in (("strip", strip), ("full", full))}
    assert sparse.saving(plans["strip"], side, side) > 1.5 * WORTH_IT
    assert sparse.saving(plans["full"], side, side) < WORTH_IT
    auto = TileProbability(model, FP32, ["id"], "auto")
    x = tile_input(24, 24)
    for cells in (strip, full):
        need = tile_outputs(Tile(0, 0, 24, 24), cells, 2, HALO)
        with torch.no_grad():
            whole = torch.sigmoid(model(x))[0, 0]
        torch.testing.assert_close(auto(x, need)[torch.from_numpy(need)], whole[torch.from_numpy(need)],
                                   rtol=0, atol=1e-5)
    assert auto.sparse_tiles == 1  # the strip


def test_sparse_under_bfloat16_autocast_stays_close(model):
    cells = cells_of("disk", 8, 8)
    need = tile_outputs(Tile(0, 0, 8, 8), cells, 2, HALO)
    x = tile_input(8, 8, seed=2)
    exact = TileProbability(model, FP32, ["id"], "sparse")(x, need)
    low = TileProbability(model, MixedPrecision(CPU, "bf16"), ["id"], "sparse")(x, need)
    at = torch.from_numpy(need)
    assert low.dtype == torch.float32
    assert (low[at] - exact[at]).abs().max() < 0.05


def test_bad_block_sides_are_refused(model):
    with pytest.raises(ValueError, match="block_px"):
        SparseResNet(model, block_px=(64, 64, 64, 96, 256))  # 96 does not divide 256
    with pytest.raises(ValueError, match="block_px"):
        SparseResNet(model, block_px=48)  # not a multiple of layer 4's stride 32


@pytest.fixture(scope="module")
def ragged_slide(tmp_path_factory):
    """A 1536 x 1536 slide with a thin diagonal band and a small blob of textured tissue."""
    rng = np.random.default_rng(5)
    img = np.full((1536, 1536, 3), 240, np.uint8)
    yy, xx = np.mgrid[:1536, :1536]
    tissue = (np.abs(yy - xx) < 90) | ((yy - 1200) ** 2 + (xx - 300) ** 2 < 160 ** 2)
    texture = (np.array((225, 140, 195)) + rng.integers(-50, 25, (1536, 1536, 3))).clip(0, 255)
    img[tissue] = texture[tissue]
    path = tmp_path_factory.mktemp("sparse") / "ragged.tif"
    write_pyramidal_tiff(path, img, compression="deflate")
    return path


def test_dense_map_is_the_same_with_either_engine(ragged_slide, model):
    tm = compute_tissue_mask(ragged_slide)
    assert tm.mask.sum() > 40
    maps = {engine: dense_mode_map(model, str(ragged_slide), tm, CPU, FP32, tile_cells=12, workers=0, engine=engine)
            for engine in ("tile", "sparse", "auto")}
    assert maps["tile"][tm.mask].std() > 1e-3
    np.testing.assert_allclose(maps["sparse"], maps["tile"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(maps["auto"], maps["tile"], rtol=0, atol=2e-5)
    flips = parse_tta("flips4")
    tta = {engine: dense_mode_map(model, str(ragged_slide), tm, CPU, FP32, tile_cells=12, workers=0, engine=engine,
                                  tta=flips) for engine in ("tile", "sparse")}
    assert np.abs(tta["tile"] - maps["tile"])[tm.mask].max() > 1e-4  # the transforms change the map
    np.testing.assert_allclose(tta["sparse"], tta["tile"], rtol=0, atol=2e-5)


def test_auto_means_whole_tiles_off_the_cpu():
    from camelyon.infer import dense_engine_for

    assert dense_engine_for("auto", torch.device("cpu")) == "auto"
    assert dense_engine_for("auto", torch.device("cuda", 0)) == "tile"
    assert dense_engine_for("sparse", torch.device("cuda", 0)) == "sparse"
    assert dense_engine_for("tile", torch.device("cpu")) == "tile"
