"""Exact dense inference that computes every layer only where the tissue cells need it.

A dense tile (``camelyon.infer.DenseTiles``) runs the whole network over its rectangle and its 224-px
halo, although a tissue cell's output depends only on a cone of each layer: the layer-4 positions of
its 7 x 7 pool, the layer-3 positions those read, and so on down to 627 px of input. Over background
inside the rectangle, and in the halo where the cone has already narrowed, that work is thrown
away: on the ``bench.py --shapes`` slides the whole-tile engine reads 2.1--6.1 input pixels per
tissue pixel, this engine computes 1.4--3.6 pixel-equivalents of multiply-adds, the exact cones of
the whole slides 1.2--3.1 (the bench prints all three).

:class:`SparseResNet` runs the same ResNet layer by layer (stage-synchronous), each convolution on
the blocks (``block_px``: one 64-px grid cell for the stem and layers 1-2, 128 and 256 px for
layers 3-4) that hold a position the cells need, as in SBNet (Ren et al., CVPR 2018): the blocks'
inputs, with the kernel's border, are gathered from the previous layer in one indexing operation,
convolved without padding (batch-norm folded into the convolution) and stored. Nothing is computed
twice, no output sees padding: a needed position reads only positions that were needed one layer
down and therefore computed. Positions computed only because their block was (the rounding) may
read uncleared memory and hold anything, NaN included; no needed position reads them. The result
equals the whole-tile forward at the needed outputs up to float rounding (tests/test_camelyon_sparse.py).

A layer is stored as the rows of its computed positions, block after block, plus a table from every
position of the tile's grid to its row (:class:`Stored`), so memory follows the cone, not the tile's
rectangle: a tile may be large and mostly background (``camelyon.tiling.plan_sparse_tiles`` cuts
only at a memory cap), at ~0.3 MB per tissue cell. At most two buffers of a layer's size are alive:
a block with an identity shortcut overwrites its input in place, a projection shortcut is computed
first and its input released before conv2; buffers are reused from layer to layer, and each
convolution's gathered input is at most ``chunk`` values (16 MB).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import maximum_filter

#: block sides in input pixels for the stem and layers 1-4: one grid cell where positions are many,
#: larger where they are few (a convolution on 2 x 2-position blocks runs far below the machine's rate)
BLOCK_PX = (64, 64, 64, 128, 256)
#: positions around every position table (pointing at the spare row), so that every block's gather window lies inside it
MARGIN = 8


@dataclass
class Conv:
    """A convolution with its batch-norm folded in: y = conv(x, weight, stride, padding) + bias."""
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int

    @property
    def kernel(self) -> int:
        return self.weight.shape[-1]

    @classmethod
    def folded(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "Conv":
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight.detach() * scale[:, None, None, None]
        bias = bn.bias.detach() - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias.detach() * scale
        return cls(weight.contiguous(memory_format=torch.channels_last), bias.contiguous(), conv.stride[0],
                   conv.padding[0])

    def needed_input(self, need: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Input positions (a bool mask of ``shape``) that the outputs ``need`` read."""
        return _needed_input(need, self.kernel, self.stride, self.padding, shape)


def _needed_input(need: np.ndarray, kernel: int, stride: int, padding: int, shape: tuple[int, int]) -> np.ndarray:
    """Output j of a (kernel, stride, padding) window reads inputs [stride j - padding, ... + kernel - 1]."""
    out = np.zeros(shape, dtype=bool)
    r, c = np.nonzero(need)
    centre = (kernel - 1) // 2 - padding
    rr, cc = stride * r + centre, stride * c + centre
    keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    out[rr[keep], cc[keep]] = True
    return maximum_filter(out, size=kernel) if kernel > 1 else out


@dataclass
class Block:
    """A ResNet basic block, folded: relu(conv2(relu(conv1(x))) + shortcut(x))."""
    conv1: Conv
    conv2: Conv
    shortcut: Conv | None  # None: identity


class SparseResNet:
    """``model`` (a ``camelyon.model.TumorDetectionNet``, eval mode) evaluated block-sparsely, see the
    module docstring. ``block_px``: the block side in input pixels of the stem and layers 1-4 (or
    one side for all), each a multiple of its layer's stride and dividing the largest."""

    def __init__(self, model: nn.Module, block_px: tuple[int, ...] = BLOCK_PX, chunk: int = 1 << 22):
        block_px = (block_px,) * 5 if isinstance(block_px, int) else tuple(block_px)
        grid_px = max(block_px)
        if len(block_px) != 5 or any(px % s or grid_px % px for px, s in zip(block_px, (4, 4, 8, 16, 32))):
            raise ValueError(f"block_px {block_px}: five block sides (stem, layer1..4), each a multiple of its "
                             f"stride (4, 4, 8, 16, 32) and dividing the largest")
        f = model.features  # conv1, bn1, relu, maxpool, layer1..4
        self.stem = Conv.folded(f[0], f[1])
        self.layers = [[Block(Conv.folded(b.conv1, b.bn1), Conv.folded(b.conv2, b.bn2),
                              Conv.folded(b.downsample[0], b.downsample[1]) if b.downsample is not None else None)
                        for b in layer] for layer in f[4:8]]
        self.pool = model.pool.kernel_size if isinstance(model.pool.kernel_size, int) else model.pool.kernel_size[0]
        self.fc_weight, self.fc_bias = model.fc.weight.detach(), model.fc.bias.detach()
        self.block_px, self.grid_px, self.chunk = block_px, grid_px, chunk
        self._free: list[torch.Tensor] = []  # buffers of the forward pass in progress, free for reuse
        self.outside = 0.0  # the input outside the image (zero padding)

    # ------------------------------------------------------------------ planning
    def plan(self, outputs: np.ndarray, height: int, width: int) -> dict:
        """Needed positions of every layer for the network ``outputs`` (bool, the stride-32 output
        grid of an input of height x width), walking the network backwards; per convolution the
        blocks to compute."""
        n_blocks = (-(-height // self.grid_px), -(-width // self.grid_px))

        def grid(stride: int) -> tuple[int, int]:
            return n_blocks[0] * self.grid_px // stride, n_blocks[1] * self.grid_px // stride

        need = _needed_input(np.pad(outputs, ((0, grid(32)[0] - outputs.shape[0]), (0, grid(32)[1] - outputs.shape[1]))),
                             self.pool, 1, 0, grid(32))  # the average pool reads [j, j + 6]
        plan = {"layers": [], "n_blocks": n_blocks}
        stride = 32
        for px, layer in zip(reversed(self.block_px[1:]), reversed(self.layers)):
            blocks = []
            for block in reversed(layer):
                in_stride = stride // block.conv1.stride
                mid = block.conv2.needed_input(need, grid(stride))
                into = block.conv1.needed_input(mid, grid(in_stride))
                if block.shortcut is not None:
                    into |= block.shortcut.needed_input(need, grid(in_stride))
                else:
                    into |= need
                blocks.append((self._blocks(mid, stride, px), self._blocks(need, stride, px)))
                need = into
            stride = stride // layer[0].conv1.stride
            plan["layers"].append(list(reversed(blocks)))
        plan["layers"].reverse()
        plan["stem"] = self._blocks(need, 4, self.block_px[0])  # stem outputs needed at stride 4
        return plan

    def input_regions(self, plan: dict, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) rectangles of the height x width input that cover every pixel the plan's
        stem reads (a stem block of p px at (i, j) reads rows p i - 5 .. p i + p + 1, columns alike):
        per band of grid rows, the runs of needed block columns. The rest of the input may be
        anything, a reader can skip it."""
        p = self.block_px[0]
        band = self.grid_px // p  # block rows per band
        blocks = plan["stem"].numpy()
        regions = []
        for r in np.unique(blocks[:, 0] // band):
            cols = np.unique(blocks[blocks[:, 0] // band == r, 1])
            breaks = np.flatnonzero(np.diff(cols) > 1)
            rows_here = blocks[blocks[:, 0] // band == r, 0]
            y0, y1 = max(p * int(rows_here.min()) - 5, 0), min(p * (int(rows_here.max()) + 1) + 2, height)
            for c0, c1 in zip(np.r_[cols[0], cols[breaks + 1]], np.r_[cols[breaks], cols[-1]]):
                x0, x1 = max(p * int(c0) - 5, 0), min(p * (int(c1) + 1) + 2, width)
                if y0 < y1 and x0 < x1:
                    regions.append((y0, y1, x0, x1))
        return regions

    def multiply_adds(self, plan: dict) -> int:
        """Multiply-adds the convolutions of ``plan`` compute (the stem's blocks with their overlap)."""
        b = self.block_px[0] // 4
        total = len(plan["stem"]) * (2 * b + 1) ** 2 * self.stem.weight[0].numel() * self.stem.weight.shape[0]
        stride = 4
        for px, layer, layer_plan in zip(self.block_px[1:], self.layers, plan["layers"]):
            for block, (mid_blocks, out_blocks) in zip(layer, layer_plan):
                stride *= block.conv1.stride
                positions = (px // stride) ** 2
                per_out = block.conv2.weight[0].numel() + (block.shortcut.weight[0].numel() if block.shortcut else 0)
                total += positions * (len(mid_blocks) * block.conv1.weight.numel()
                                      + len(out_blocks) * per_out * block.conv2.weight.shape[0])
        return int(total)

    def saving(self, plan: dict, height: int, width: int) -> float:
        """The plain forward pass's multiply-adds on a height x width input over ``plan``'s."""
        return self.dense_multiply_adds_per_pixel() * height * width / max(self.multiply_adds(plan), 1)

    def dense_multiply_adds_per_pixel(self) -> float:
        """Multiply-adds per input pixel of the plain forward pass (every layer at every position)."""
        total, stride = self.stem.weight.numel() / 4, 4
        for layer in self.layers:
            for block in layer:
                total += block.conv1.weight.numel() / (stride * block.conv1.stride) ** 2
                stride *= block.conv1.stride
                total += (block.conv2.weight.numel() + (block.shortcut.weight.numel() if block.shortcut else 0)) / stride ** 2
        return total

    @staticmethod
    def _blocks(need: np.ndarray, stride: int, px: int) -> torch.Tensor:
        """(N, 2) coordinates of the px-sided blocks holding a needed position of a stride-``stride`` grid."""
        b = px // stride
        h, w = need.shape[0] // b, need.shape[1] // b
        any_ = need[:h * b, :w * b].reshape(h, b, w, b).any(axis=(1, 3))
        return torch.from_numpy(np.argwhere(any_))

    # ------------------------------------------------------------------ execution
    def _stored(self, blocks: torch.Tensor, n_blocks, stride: int, px: int, channels: int,
                like: torch.Tensor) -> "Stored":
        """Storage for the ``px``-sided ``blocks`` of a stride-``stride`` layer: their positions' rows in
        block order (uncleared, :meth:`_buffer`) and the table from grid positions to rows."""
        b = px // stride
        g = self.grid_px // px
        n = len(blocks) * b * b
        table = np.full((n_blocks[0] * g, n_blocks[1] * g, b, b), n, dtype=np.int64)  # n: the spare row
        table[blocks[:, 0].numpy(), blocks[:, 1].numpy()] = np.arange(n).reshape(-1, b, b)
        table = table.transpose(0, 2, 1, 3).reshape(n_blocks[0] * g * b, n_blocks[1] * g * b)
        table = np.pad(table, MARGIN, constant_values=n)
        return Stored(self._buffer(n + 1, channels, like), torch.from_numpy(table).to(like.device))

    def _buffer(self, n_rows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        """An uncleared (n_rows, channels) buffer: the smallest free one that fits (:meth:`_release`),
        else new memory."""
        n = n_rows * channels
        fits = [i for i, f in enumerate(self._free) if f.numel() >= n and f.dtype == like.dtype and f.device == like.device]
        if not fits:
            return like.new_empty((n_rows, channels))
        flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return flat[:n].view(n_rows, channels)

    def _release(self, buf: torch.Tensor) -> None:
        """Hand a buffer's memory back for the next :meth:`_buffer` of this forward pass: reused, a
        forward pass touches a few buffers' worth of fresh pages instead of one per layer."""
        self._free.append(buf.new_empty(0).set_(buf.untyped_storage()))

    @staticmethod
    def _windows(table: torch.Tensor, blocks: torch.Tensor, b_out: int, kernel: int, stride: int,
                 padding: int) -> torch.Tensor:
        """The input windows of output blocks of b_out x b_out positions in a (H + 2 MARGIN, W + 2
        MARGIN, ...) grid: (N, win, win, ...)."""
        win = stride * (b_out - 1) + kernel
        start = MARGIN - padding
        view = table[start:, start:].unfold(0, win, stride * b_out).unfold(1, win, stride * b_out)  # (qh, qw, ..., win, win)
        view = view.permute(0, 1, view.dim() - 2, view.dim() - 1, *range(2, view.dim() - 2))  # (qh, qw, win, win, ...)
        return view[blocks[:, 0], blocks[:, 1]]

    def _gather(self, src: "Stored", blocks: torch.Tensor, b_out: int, kernel: int, stride: int,
                padding: int) -> torch.Tensor:
        """The input windows of output blocks, (N, C, win, win) channels-last, from ``src``'s rows."""
        rows = self._windows(src.table, blocks, b_out, kernel, stride, padding)  # (N, win, win) row numbers
        x = src.rows.index_select(0, rows.reshape(-1)).view(*rows.shape, src.rows.shape[1])
        return x.permute(0, 3, 1, 2)

    def _image_windows(self, image: torch.Tensor, blocks: torch.Tensor, b: int) -> torch.Tensor:
        """The stem's input windows of output blocks of b x b positions: (N, 3, 4b + 7, 4b + 7), block
        (i, j) reading image rows and columns from 4b i - 5 and 4b j - 5 (conv1 [2i-3, 2i+3] of
        max-pool [2j-1, 2j+1]). Read in place, no padded copy of the image: pixels outside it hold
        ``outside`` (the network's zero padding; no needed output reads them)."""
        _, height, width = image.shape
        span = torch.arange(4 * b + 7, device=image.device)
        ys = (4 * b * blocks[:, 0] - 5)[:, None] + span  # (N, win)
        xs = (4 * b * blocks[:, 1] - 5)[:, None] + span
        win = image[:, ys.clamp(0, height - 1)[:, :, None], xs.clamp(0, width - 1)[:, None, :]]  # (3, N, win, win)
        inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]  # (N, win, win)
        win = torch.where(inside[None], win, self.outside)
        return win.permute(1, 0, 2, 3).contiguous(memory_format=torch.channels_last)

    def _chunks(self, blocks: torch.Tensor, elements: int):
        """(first block, blocks) in groups whose gathered inputs (``elements`` values per block) hold at
        most ``chunk``."""
        per = max(1, self.chunk // elements)
        for i in range(0, len(blocks), per):
            yield i, blocks[i:i + per]

    def _conv(self, src: "Stored", conv: Conv, blocks: torch.Tensor, b_out: int) -> torch.Tensor:
        x = self._gather(src, blocks, b_out, conv.kernel, conv.stride, conv.padding)
        return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride)  # (N, C_out, b_out, b_out)

    @staticmethod
    def _store(dst: "Stored", first: int, y: torch.Tensor) -> None:
        """Rows of blocks first, first + 1, ... <- y (N, C, b, b)."""
        n, c, b, _ = y.shape
        dst.rows[first * b * b:(first + n) * b * b].view(n, b, b, c).copy_(y.permute(0, 2, 3, 1))

    @staticmethod
    def _rows_of(src: "Stored", first: int, n: int, b: int) -> torch.Tensor:
        """Blocks first .. first + n - 1 of ``src`` (stored by :meth:`_store`): (n, C, b, b), a view."""
        return src.rows[first * b * b:(first + n) * b * b].view(n, b, b, -1).permute(0, 3, 1, 2)

    def _store_at(self, dst: "Stored", blocks: torch.Tensor, y: torch.Tensor) -> None:
        """The positions of output blocks (their grid: y's b x b blocks) in ``dst``'s rows <- y (N, C, b, b)."""
        rows = self._windows(dst.table, blocks, y.shape[-1], 1, 1, 0).reshape(-1)  # (N * b * b,)
        dst.rows.index_copy_(0, rows, y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).to(dst.rows.dtype))

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, outputs: np.ndarray, plan: dict | None = None) -> torch.Tensor:
        """image (3, H, W) float (the network's input scaling); ``outputs`` the needed positions of
        the stride-32 output grid ((H - 224) / 32 + 1 per side; ``plan``: their :meth:`plan`, if
        made already). Returns the logits there (a grid of ``outputs``' shape; other positions hold
        anything, NaN included)."""
        _, height, width = image.shape
        plan = plan or self.plan(outputs, height, width)
        n_blocks = plan["n_blocks"]
        self._free: list[torch.Tensor] = []
        # stem: conv1 (7x7, stride 2) -> relu -> max-pool (3x3, stride 2): stride 4, from the image directly
        px = self.block_px[0]
        b = px // 4
        x = self._stored(plan["stem"], n_blocks, 4, px, self.stem.weight.shape[0], image)
        for first, blocks in self._chunks(plan["stem"].to(image.device), self.stem.weight.shape[0] * (2 * b + 1) ** 2):
            win = self._image_windows(image, blocks, b)  # (N, 3, 4b + 7, 4b + 7)
            y = F.relu_(F.conv2d(win, self.stem.weight, self.stem.bias, stride=2))  # conv1 [2i-3, 2i+3] of max-pool [2j-1, 2j+1]
            self._store(x, first, F.max_pool2d(y, 3, stride=2))  # (N, 64, b, b)
        stride = 4
        for px, layer, layer_plan in zip(self.block_px[1:], self.layers, plan["layers"]):
            for block, (mid_blocks, out_blocks) in zip(layer, layer_plan):
                stride_out = stride * block.conv1.stride
                b = px // stride_out
                c_out = block.conv2.weight.shape[0]
                c_in = block.conv1.weight.shape[1]
                mid = self._stored(mid_blocks, n_blocks, stride_out, px, c_out, image)
                for first, blocks in self._chunks(mid_blocks.to(image.device), c_in * (block.conv1.stride * (b - 1) + 3) ** 2):
                    self._store(mid, first, F.relu_(self._conv(x, block.conv1, blocks, b)))
                # at most two layer buffers the size of x alive: an identity shortcut reads x at each
                # output position only, so the outputs overwrite x in place; a projection shortcut is
                # computed into the output buffer first, and x released before conv2
                blocks_here = out_blocks.to(image.device)
                if block.shortcut is None:
                    out = x
                else:
                    out = self._stored(out_blocks, n_blocks, stride_out, px, c_out, image)
                    for first, blocks in self._chunks(blocks_here, c_in * (2 * b) ** 2):
                        self._store(out, first, self._conv(x, block.shortcut, blocks, b))
                    self._release(x.rows)
                for first, blocks in self._chunks(blocks_here, 2 * c_out * (b + 2) ** 2):
                    y = self._conv(mid, block.conv2, blocks, b)
                    if block.shortcut is None:
                        y += self._gather(x, blocks, b, 1, 1, 0)
                        self._store_at(x, blocks, F.relu_(y))
                    else:
                        y += self._rows_of(out, first, len(blocks), b)
                        self._store(out, first, F.relu_(y))
                self._release(mid.rows)
                x, stride = out, stride_out
        inner = x.table[MARGIN:x.table.shape[0] - MARGIN, MARGIN:x.table.shape[1] - MARGIN]
        feat = x.rows[inner].permute(2, 0, 1)[None]  # (1, 512, h, w); positions not computed hold anything
        logits = F.conv2d(F.avg_pool2d(feat, self.pool, stride=1), self.fc_weight, self.fc_bias)
        self._free = []
        return logits[0, 0, :outputs.shape[0], :outputs.shape[1]].float()


@dataclass
class Stored:
    """One layer's computed positions: ``rows`` (P + 1, C), the blocks' positions in block order and a
    spare row that no needed position reads; ``table`` (H + 2 MARGIN, W + 2 MARGIN) the row of every
    position of the layer's grid (the spare one where not computed). Memory follows the computed
    blocks, not the tile's rectangle."""
    rows: torch.Tensor
    table: torch.Tensor
