"""The sparse dense-mode engine (camelyon/sparse.py) computes, at every output a tile needs, the value
of the plain network on the whole tile; it reads nothing it did not compute; it computes about the
receptive field of the needed outputs, not the tile; and the map is the same with either engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from camelyon.infer import HALO, SlideProgress, TileProbability, dense_engine_for, dense_mode_map, tile_outputs
from camelyon.model import build_model
from camelyon.prepare import compute_tissue_mask
from camelyon.sparse import SparseResNet
from camelyon.tiling import Tile, plan_sparse_tiles, tile_side
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
    """Buffers and the input outside the image NaN: a needed output that read anything not computed,
    or the tile's zero padding, would be NaN."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outside = float("nan")

    def _buffer(self, *args):
        return super()._buffer(*args).fill_(float("nan"))


class Metered(SparseResNet):
    """Records the most layer-buffer values alive at once during a forward pass."""

    def __call__(self, *args):
        self.alive = self.most_alive = 0
        return super().__call__(*args)

    def _buffer(self, n_rows, channels, like):
        buf = super()._buffer(n_rows, channels, like)
        self.alive += buf.numel()
        self.most_alive = max(self.most_alive, self.alive)
        return buf

    def _release(self, buf):
        self.alive -= buf.numel()
        super()._release(buf)


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


def test_memory_follows_the_computed_positions_not_the_tile(model):
    """Layer buffers hold the computed blocks only: one needed output of a 90 x 90-cell tile (6,432 px
    a side) keeps at most ~3 layer-1 buffers of its cone alive (64 channels at stride 4 over the
    627-px receptive field rounded out to 64-px blocks: 3 x 64 x (768 / 4)^2 = 7.1 M values), not
    a layer-1 buffer of the tile (64 x 1608^2 = 165 M values)."""
    side = int(tile_side(90, 2))
    one = np.zeros((90, 90), bool)
    one[45, 45] = True
    need = tile_outputs(Tile(0, 0, 90, 90), one, 2, HALO)
    metered = Metered(model)
    x = torch.zeros(3, side, side)
    assert torch.isfinite(metered(x, need)[torch.from_numpy(need)]).all()
    assert metered.most_alive <= 3 * 64 * (768 // 4) ** 2 + 8 * 512


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
    assert len(plan_sparse_tiles(tm.mask, 96, 40)) >= 3  # a tighter memory cap: more tiles, same map
    cut = dense_mode_map(model, str(ragged_slide), tm, CPU, FP32, workers=0, engine="sparse", sparse_tile_tissue=40)
    np.testing.assert_allclose(cut, maps["tile"], rtol=0, atol=2e-5)
    flips = parse_tta("flips4")
    tta = {engine: dense_mode_map(model, str(ragged_slide), tm, CPU, FP32, tile_cells=12, workers=0, engine=engine,
                                  tta=flips) for engine in ("tile", "sparse")}
    assert np.abs(tta["tile"] - maps["tile"])[tm.mask].max() > 1e-4  # the transforms change the map
    np.testing.assert_allclose(tta["sparse"], tta["tile"], rtol=0, atol=2e-5)


def test_sparse_tiles_read_only_what_their_stem_reads(ragged_slide, model, monkeypatch):
    """One large sparse tile over the band and the blob: the reader decodes well under the tile's
    pixels, every pixel it reads equals the whole read, and the map equals the whole-tile engine's."""
    from camelyon import infer

    tm = compute_tissue_mask(ragged_slide)
    sparse = SparseResNet(model)
    tiles = plan_sparse_tiles(tm.mask, 80, 4096)
    assert len(tiles) == 1
    ratio, step = tm.ratio, infer.cell_step(tm.ratio)
    plans = infer.SparsePlans(sparse, tiles, tm.mask, step)
    image, _, plan = infer.DenseTiles(str(ragged_slide), tiles, ratio, step, plans=plans, partial_reads=True)[0]
    regions = sparse.input_regions(plan, image.shape[1], image.shape[2])
    read = np.zeros(image.shape[1:], bool)
    for y0, y1, x0, x1 in regions:
        read[y0:y1, x0:x1] = True
    assert read.mean() < 0.8  # the background between band and blob is not decoded
    whole, _, _ = infer.DenseTiles(str(ragged_slide), tiles, ratio, step)[0]
    assert torch.equal(image[:, torch.from_numpy(read)], whole[:, torch.from_numpy(read)])
    assert (image[:, torch.from_numpy(~read)] == 0).all()
    partial = []
    real = infer.read_rgb_regions
    monkeypatch.setattr(infer, "read_rgb_regions", lambda *a: partial.append(a) or real(*a))
    sparse_map = dense_mode_map(model, str(ragged_slide), tm, CPU, FP32, workers=0, engine="sparse")
    assert len(partial) == 1  # the map below came from the partial read
    tile_map = dense_mode_map(model, str(ragged_slide), tm, CPU, FP32, workers=0, engine="tile")
    np.testing.assert_allclose(sparse_map, tile_map, rtol=0, atol=2e-5)


def test_auto_is_sparse_on_the_cpu_and_whole_tiles_elsewhere(model):
    assert dense_engine_for("auto", torch.device("cpu"), model) == "sparse"
    assert dense_engine_for("auto", torch.device("cuda", 0), model) == "tile"
    assert dense_engine_for("sparse", torch.device("cuda", 0), model) == "sparse"
    assert dense_engine_for("tile", torch.device("cpu"), model) == "tile"
    stand_in = torch.nn.Conv2d(3, 1, 1)  # not the detector: whole tiles whatever is asked
    assert dense_engine_for("sparse", torch.device("cpu"), stand_in) == "tile"


def test_a_partial_map_of_another_tile_plan_is_not_resumed(tmp_path):
    mask = np.ones((4, 4), bool)
    first = SlideProgress(tmp_path / "p.npz", key="k", every=1)
    prob, _ = first.start(mask, 3, plan="plan A")
    prob[mask] = 0.5
    first.unit_done(0)
    assert SlideProgress(tmp_path / "p.npz", key="k").start(mask, 3, plan="plan A")[1].tolist() == [True, False, False]
    assert not SlideProgress(tmp_path / "p.npz", key="k").start(mask, 3, plan="plan B")[1].any()
