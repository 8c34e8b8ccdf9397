"""Dense-mode tiles that hug the tissue: a guillotine partition of the tissue mask under a cost model.

A dense tile of ``rows x cols`` grid cells is read as a network input of
``tile_side(rows) x tile_side(cols)`` pixels: its own windows (224 + 32 * step * (n - 1)) plus the
halo of HALO strides on every side that keeps every kept output away from zero padding. The
forward pass costs about its pixel area, so a tile pays for

- the background cells inside its rectangle (a grid of fixed blocks over an island's bounding box
  computes mostly glass: 32-cell blocks over three round islands were 32 % tissue), and
- its halo (2 x 448 px per side: a 1-cell tile costs 27 cells' worth of pixels),

and the two pull in opposite directions: small tiles hug the tissue but pay the halo many times.
:func:`plan_tiles` starts from the tissue's bounding box and cuts recursively (one straight cut
through the whole rectangle at a time, both parts shrunk to their tissue), at the cut that lowers
the summed cost most, while a cut lowers it; a rectangle above the memory cap (the pixel area of a
``max_cells`` x ``max_cells`` tile) is cut even when that costs more, near its middle. Every
tissue cell lands in exactly one tile, and the map does not depend on the plan (the halo), so the
plan changes speed, never values.

The sparse engine (``camelyon.sparse``) pays for neither background nor the halo beyond the cone of
the tissue cells, but pays twice for the cone along every cut through tissue: its tiles
(:func:`plan_sparse_tiles`) are as large as a memory cap allows and cut where the tissue is thinnest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATCH = 224  # the network's window (camelyon.dataset.PATCH)
STRIDE = 32  # the network's output stride (camelyon.model.STRIDE)
#: Context read on every side of a dense tile, in network outputs (strides of 32 px). One output
#: (AvgPool2d(7) over the ResNet18 body, receptive field 435 px at stride 32) sees [-217, 409] around
#: its 224 window's top-left, i.e. 217 px before and 186 px after the window: rounded up to whole
#: strides (so the stride grid stays on the cell centres) and kept equal on both sides (tile sides stay
#: 224 + a multiple of 64) that is 7 strides = 224 px. With it no kept output sees the tile's zero
#: padding, and the map is the same for every tile plan (tests/test_camelyon_tiling.py).
HALO = 7
#: Fixed cost of one tile (one forward call, one read, one item through the loader) in pixels:
#: about 10 ms of a 2-core CPU's forward throughput. Keeps the planner from cutting for tiny gains.
TILE_OVERHEAD_PX = 32_768


@dataclass(frozen=True)
class Tile:
    r0: int  # first cell row
    c0: int  # first cell column
    rows: int  # cells in this tile
    cols: int


def tile_side(cells, step: int, halo: bool = True):
    """Network pixels read along one side of a tile of ``cells`` cells (numpy arrays too)."""
    return PATCH + STRIDE * step * (cells - 1) + (2 * HALO * STRIDE if halo else 0)


def tile_cost(rows, cols, step: int):
    """The planner's cost of one tile: its input pixels plus the per-tile overhead."""
    return tile_side(rows, step) * tile_side(cols, step) + TILE_OVERHEAD_PX


def _span(any_cols: np.ndarray) -> np.ndarray:
    """(n, w) bool -> width of the span from the first to the last True of each row (0 if none)."""
    w = any_cols.shape[1]
    first, last = any_cols.argmax(1), w - 1 - any_cols[:, ::-1].argmax(1)
    return np.where(any_cols.any(1), last - first + 1, 0)


def _row_cut_costs(block: np.ndarray, step: int) -> np.ndarray:
    """Summed cost of the two parts for a cut above row k, k = 1 .. h - 1, of a block whose first and
    last rows hold tissue; each part is shrunk to its tissue's bounding box."""
    h = block.shape[0]
    rows = np.arange(h)
    has = block.any(1)
    last_up_to = np.maximum.accumulate(np.where(has, rows, -1))  # last tissue row <= i
    first_from = np.minimum.accumulate(np.where(has, rows, h)[::-1])[::-1]  # first tissue row >= i
    above = np.logical_or.accumulate(block, axis=0)  # (h, w): columns with tissue in rows [0, i]
    below = np.logical_or.accumulate(block[::-1], axis=0)[::-1]  # ... in rows [i, h)
    k = np.arange(1, h)
    up_h, up_w = last_up_to[k - 1] + 1, _span(above[k - 1])
    down_h, down_w = h - first_from[k], _span(below[k])
    return (np.where(up_w > 0, tile_cost(up_h, up_w, step), 0)
            + np.where(down_w > 0, tile_cost(down_h, down_w, step), 0))


def _shrink(mask: np.ndarray, r0: int, r1: int, c0: int, c1: int):
    """The bounding box of the tissue in mask[r0:r1, c0:c1], or None without tissue."""
    block = mask[r0:r1, c0:c1]
    rows, cols = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
    if not len(rows):
        return None
    return r0 + int(rows[0]), r0 + int(rows[-1]) + 1, c0 + int(cols[0]), c0 + int(cols[-1]) + 1


def _best_cut(costs: np.ndarray, forced: bool) -> int:
    """Index of the cheapest cut; when forced by the memory cap, the cheapest of the middle half (a
    cut near an end would leave a part still over the cap, cut again and again)."""
    if not forced or len(costs) < 4:
        return int(costs.argmin())
    lo, hi = len(costs) // 4, len(costs) - len(costs) // 4
    return lo + int(costs[lo:hi].argmin())


def plan_tiles(mask: np.ndarray, max_cells: int, step: int = 2) -> list[Tile]:
    """Tiles covering every tissue cell of ``mask`` once, hugging the tissue (see the module
    docstring); none is larger in pixels than a ``max_cells`` x ``max_cells`` tile. Deterministic:
    the same mask and settings give the same tiles in the same order (restarts rely on it)."""
    cap = tile_side(max_cells, step) ** 2

    def cut(block: np.ndarray) -> tuple[int, int] | None:
        here = tile_cost(*block.shape, step)
        forced = here - TILE_OVERHEAD_PX > cap
        axes = (0, 1) if not forced else (0,) if block.shape[0] >= block.shape[1] else (1,)  # cap: the long side
        options = []  # (cost, axis, cut position)
        for axis in axes:
            part = block if axis == 0 else block.T
            if part.shape[0] > 1:
                costs = _row_cut_costs(part, step)
                k = _best_cut(costs, forced)
                options.append((int(costs[k]), axis, k + 1))
        if options:
            cost, axis, k = min(options)
            if cost < here or forced:
                return axis, k
        return None

    return _guillotine(mask, cut)


def _guillotine(mask: np.ndarray, cut) -> list[Tile]:
    """Tiles from recursive straight cuts through whole boxes, starting from the tissue's bounding box:
    ``cut(block)`` (the box's part of the mask) gives (axis, k), a cut above row (axis 0) or left of
    column (axis 1) k, or None to keep the box as a tile; both parts are shrunk to their tissue and
    cut in turn, the first part first (deterministic: restarts rely on the tile indices)."""
    tiles: list[Tile] = []
    todo = [_shrink(mask, 0, mask.shape[0], 0, mask.shape[1])]
    while todo:
        box = todo.pop()
        if box is None:
            continue
        r0, r1, c0, c1 = box
        decision = cut(mask[r0:r1, c0:c1])
        if decision is None:
            tiles.append(Tile(r0, c0, r1 - r0, c1 - c0))
            continue
        axis, k = decision
        halves = ((r0, r0 + k, c0, c1), (r0 + k, r1, c0, c1)) if axis == 0 else \
                 ((r0, r1, c0, c0 + k), (r0, r1, c0 + k, c1))
        todo += [_shrink(mask, *h) for h in reversed(halves)]
    return tiles


def plan_summary(mask: np.ndarray, tiles: list[Tile], step: int = 2) -> dict:
    """How much of the computed area is tissue: cells inside tiles, and network pixels read (with
    halos) against the tissue's own pixels (one cell = (32 * step)^2 px)."""
    tissue = int(mask.sum())
    own = sum(t.rows * t.cols for t in tiles)
    read = sum(int(tile_side(t.rows, step)) * int(tile_side(t.cols, step)) for t in tiles)
    return {"tiles": len(tiles), "tissue_cells": tissue, "tile_cells": own,
            "tissue_fraction_of_tile_cells": tissue / own if own else 1.0,
            "pixels_per_tissue_pixel": read / (tissue * (STRIDE * step) ** 2) if tissue else 0.0}


#: The sparse engine's largest tile side, in cells (a 5,728-px read: 0.4 GB as the float input)
SPARSE_MAX_SIDE = 80
#: The sparse engine's cone around a tile's tissue cells, in cells on each side: a cell's output reads
#: 627 px of input (camelyon.sparse), about 5 cells of 64 px beyond its own on every side
CONE_CELLS = 5


def plan_sparse_tiles(mask: np.ndarray, max_side: int, max_tissue: int) -> list[Tile]:
    """Tiles for the sparse engine (:mod:`camelyon.sparse`), which computes the cone of a tile's tissue
    cells, not its rectangle: background costs nothing, and a cut through tissue costs the cone on
    both sides of it (each part computes the other's edge as its context). So a box is cut only when
    over a memory cap, ``max_tissue`` tissue cells (the layer buffers follow the computed positions)
    or ``max_side`` cells on a side (its input image and position tables span its rectangle),
    across its long side and as few times as the caps allow (:func:`_sparse_cut`), both parts
    shrunk to their tissue. Every tissue cell lands in exactly one tile; deterministic."""
    if max_side < 1 or max_tissue < 1:
        raise ValueError(f"sparse tile caps must be positive (max_side {max_side}, max_tissue {max_tissue})")

    def cut(block: np.ndarray) -> tuple[int, int] | None:
        if max(block.shape) <= max_side and block.sum() <= max_tissue or block.shape == (1, 1):
            return None
        axis = 0 if block.shape[0] >= block.shape[1] else 1  # the long side
        return axis, _sparse_cut((block if axis == 0 else block.T).sum(1), max_side, max_tissue)

    return _guillotine(mask, cut)


def _sparse_cut(line: np.ndarray, max_side: int, max_tissue: int) -> int:
    """Where to cut a box with ``line[i]`` tissue cells in row i: above a row k that leaves a first
    part within both caps and a rest that fits in one part fewer than the whole needs, with the
    fewest tissue cells within CONE_CELLS rows of the cut (the cone computed twice); the middle one of
    ties. When no k qualifies (the other side is too long as well), the middle half."""
    n = len(line)
    cum = np.cumsum(line)
    total = int(cum[-1])
    parts = max(-(-total // max_tissue), -(-n // max_side))
    k = np.arange(1, n)
    before = cum[k - 1]
    fits = (k <= max_side) & (before <= max_tissue) & (n - k <= (parts - 1) * max_side) \
        & (total - before <= (parts - 1) * max_tissue)
    if not fits.any():
        fits = (k >= n // 4) & (k <= n - n // 4) if n >= 4 else np.ones(n - 1, bool)
    padded = np.concatenate([np.zeros(CONE_CELLS), cum, np.full(CONE_CELLS, total)])
    band = padded[k + 2 * CONE_CELLS - 1] - padded[k - 1]  # tissue in rows [k - CONE_CELLS, k + CONE_CELLS)
    band = np.where(fits, band, np.inf)
    best = np.flatnonzero(band == band.min())
    return int(k[best[len(best) // 2]])
