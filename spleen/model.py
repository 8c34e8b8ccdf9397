"""The bundle's residual 3-D UNet and its DiceCE loss.

``UNet`` re-implements MONAI ``monai.networks.nets.UNet`` (spatial_dims 3, in 1, out 2, channels
(16, 32, 64, 128, 256), strides (2, 2, 2, 2), num_res_units 2, batch norm, PReLU, NDA order) with
**identical state_dict keys**, so the released ``model.pt`` (a flat state_dict) loads strictly:

    model.0                                     down RU(1->16, s2)           96 -> 48
    model.1.submodule.0                         down RU(16->32, s2)          48 -> 24
    model.1.submodule.1.submodule.0             down RU(32->64, s2)          24 -> 12
    ...submodule.1.submodule.1.submodule.0      down RU(64->128, s2)         12 -> 6
    ...submodule.1.submodule                    bottom RU(128->256, s1)      6, cat -> 384
    ...submodule.2.{0,1}                        up conv 384->64 + RU         6 -> 12, cat -> 128
    model.1.submodule.1.submodule.2.{0,1}       up conv 128->32 + RU         12 -> 24, cat -> 64
    model.1.submodule.2.{0,1}                   up conv 64->16 + RU          24 -> 48, cat -> 32
    model.2.{0,1}                               up conv 32->2 + RU(conv only) 48 -> 96

Each level is ``Sequential(down, SkipConnection(inner), up)``; a skip concatenates [x, inner(x)].
4,808,917 parameters in 148 tensors (+ BN buffers). Inputs must be divisible by prod(strides) = 16.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.checkpoint import CheckpointError, extract_state_dict, load_file, load_weights
from common.sliding_window import sliding_window_inference, whole_volume_inference

BUNDLE_ARCH = dict(in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                   num_res_units=2)


class ConvUnit(nn.Sequential):
    """MONAI ``Convolution``: conv (k3, padding 1, bias) then ``adn`` = BatchNorm -> Dropout -> PReLU.

    Keys ``conv.{weight,bias}``, ``adn.N.*``, ``adn.A.weight``; ``conv_only`` keeps just ``conv``.
    Transposed (up) units use k3, padding 1, output_padding stride - 1, so size doubles at stride 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, transposed: bool = False,
                 conv_only: bool = False, dropout: float = 0.0):
        super().__init__()
        if transposed:
            self.conv = nn.ConvTranspose3d(in_channels, out_channels, 3, stride=stride, padding=1,
                                           output_padding=stride - 1)
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        if not conv_only:
            self.adn = nn.Sequential()
            self.adn.add_module("N", nn.BatchNorm3d(out_channels))
            self.adn.add_module("D", nn.Dropout(dropout))
            self.adn.add_module("A", nn.PReLU())  # one shared slope, 0.25


class ResidualUnit(nn.Module):
    """MONAI ``ResidualUnit``: ``conv.unit0`` (stride s) + ``conv.unit{i}`` (stride 1), plus a
    shortcut ``residual``: k3 stride-s conv when strided, k1 conv when only channels change,
    identity otherwise. Output = main + shortcut, no activation after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, subunits: int = 2,
                 last_conv_only: bool = False, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Sequential()
        channels, s = in_channels, stride
        for i in range(max(1, subunits)):
            conv_only = last_conv_only and i == max(1, subunits) - 1
            self.conv.add_module(f"unit{i}", ConvUnit(channels, out_channels, s, conv_only=conv_only, dropout=dropout))
            channels, s = out_channels, 1
        self.residual: nn.Module = nn.Identity()
        if stride != 1:
            self.residual = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        elif in_channels != out_channels:
            self.residual = nn.Conv3d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class SkipConnection(nn.Module):
    """concat([x, submodule(x)]) on the channel axis (x first)."""

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet(nn.Module):
    """Residual UNet with MONAI's key layout (see module docstring). Returns logits (B, out, *spatial)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: Sequence[int] = (16, 32, 64, 128, 256),
                 strides: Sequence[int] = (2, 2, 2, 2), num_res_units: int = 2, dropout: float = 0.0):
        super().__init__()
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(f"need >= 2 channels and len(strides) == len(channels) - 1, got {channels}, {strides}")
        if num_res_units < 1:
            raise ValueError("this implementation covers the residual variant (num_res_units >= 1)")
        self.channels, self.strides = tuple(channels), tuple(strides)
        self.units, self.dropout = num_res_units, dropout
        self.model = self._level(in_channels, out_channels, self.channels, self.strides, is_top=True)

    def _level(self, inc: int, outc: int, channels: Sequence[int], strides: Sequence[int],
               is_top: bool) -> nn.Sequential:
        c, s = channels[0], strides[0]
        if len(channels) > 2:
            inner: nn.Module = self._level(c, c, channels[1:], strides[1:], is_top=False)
            up_in = 2 * c
        else:  # bottom: stride-1 residual unit to the last width
            inner = ResidualUnit(c, channels[1], 1, self.units, dropout=self.dropout)
            up_in = c + channels[1]
        down = ResidualUnit(inc, c, s, self.units, dropout=self.dropout)
        up = nn.Sequential(ConvUnit(up_in, outc, s, transposed=True, dropout=self.dropout),
                           ResidualUnit(outc, outc, 1, 1, last_conv_only=is_top, dropout=self.dropout))
        return nn.Sequential(down, SkipConnection(inner), up)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (total down-sampling)."""
        return math.prod(self.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(f"UNet input spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor}")
        return self.model(x)


def build_model(channels: Sequence[int] = BUNDLE_ARCH["channels"], strides: Sequence[int] = BUNDLE_ARCH["strides"],
                num_res_units: int = BUNDLE_ARCH["num_res_units"]) -> UNet:
    return UNet(BUNDLE_ARCH["in_channels"], BUNDLE_ARCH["out_channels"], channels, strides, num_res_units)


def load_unet_weights(model: UNet, path: str | os.PathLike) -> dict:
    """Load the bundle's ``model.pt`` (flat state_dict, optionally ``{"model": sd}`` or ``module.``
    prefixed) or a project checkpoint, strictly. Returns a short summary."""
    obj = load_file(path)
    kind = "project checkpoint" if isinstance(obj, dict) and "step" in obj and "model" in obj else "state_dict"
    try:
        load_weights(model, extract_state_dict(obj))
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return {"path": str(path), "kind": kind}


def arch_from_checkpoint(path: str | os.PathLike) -> dict:
    """Network widths stored in a project checkpoint's config; the bundle's for a plain state_dict."""
    obj = load_file(path)
    cfg = obj.get("config") if isinstance(obj, dict) else None
    if isinstance(cfg, dict) and "channels" in cfg:
        return dict(channels=tuple(cfg["channels"]), strides=tuple(cfg["strides"]), num_res_units=cfg["num_res_units"])
    return {k: BUNDLE_ARCH[k] for k in ("channels", "strides", "num_res_units")}


# ============================================================================= loss
class DiceCELoss(nn.Module):
    """0.5 * Dice + 0.5 * CE (MONAI ``DiceCELoss(to_onehot_y, softmax, squared_pred, batch=True)``).

    Dice: p = softmax(logits), g = one-hot(label); per class, over batch *and* space,
    D_c = 1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5); mean over classes (background
    included). CE: mean cross-entropy of the logits against the integer label. Computed in fp32."""

    def __init__(self, lambda_dice: float = 0.5, lambda_ce: float = 0.5, smooth: float = 1e-5):
        super().__init__()
        self.lambda_dice, self.lambda_ce, self.smooth = lambda_dice, lambda_ce, smooth

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """logits (B, K, *spatial); label (B, 1, *spatial) integer classes."""
        logits = logits.float()
        target = label[:, 0].long()  # (B, *spatial)
        prob = logits.softmax(1)
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)  # (B, K, *spatial)
        dims = [0] + list(range(2, logits.ndim))  # batch and space
        inter = (prob * onehot).sum(dims)
        denom = (prob * prob).sum(dims) + onehot.sum(dims)  # g^2 == g for one-hot
        dice = 1 - (2 * inter + self.smooth) / (denom + self.smooth)
        return self.lambda_dice * dice.mean() + self.lambda_ce * F.cross_entropy(logits, target)


# ============================================================================= prediction
PREDICTIONS = ("sliding_window", "whole_volume")
#: Radius of the UNet's receptive field (bundle architecture), in voxels: measured as the extent of
#: the input gradient of one output voxel. A block halo of at least this gives the whole-volume result.
RECEPTIVE_RADIUS = 93


def prepare_for_inference(model: UNet, channels_last: bool = False, fold_batchnorm: bool = False) -> UNet:
    """An eval-mode copy of ``model`` for prediction: ``fold_batchnorm`` folds each BatchNorm into the
    convolution before it (one pass less over every activation), ``channels_last`` stores weights
    channels-last-3d (the layout oneDNN and cuDNN convolve fastest). Both change the logits only
    by float rounding (measured < 2e-6 on the bundle architecture); the model itself is untouched."""
    model = copy.deepcopy(model).eval()
    if fold_batchnorm:
        for unit in model.modules():
            if isinstance(unit, ConvUnit) and hasattr(unit, "adn") and isinstance(unit.adn.N, nn.BatchNorm3d):
                unit.conv = fuse_conv_bn_eval(unit.conv, unit.adn.N, transpose=isinstance(unit.conv, nn.ConvTranspose3d))
                unit.adn.N = nn.Identity()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int = 4,
                   overlap: float = 0.5, mode: str = "constant", autocast=None, output_device=None,
                   channels_last: bool = False, progress: bool = False, desc: str = "windows",
                   prediction: str = "sliding_window", block_size: Sequence[int] | int = 0,
                   halo: int = RECEPTIVE_RADIUS) -> torch.Tensor:
    """Logits (B, 2, *spatial) of a preprocessed (B, 1, *spatial) volume, blended over sliding
    windows (spleen.md §8) or, with ``prediction="whole_volume"``, computed on the whole volume
    at once (padded to a multiple of 16 and at least ``roi_size``; in blocks of ``block_size``
    with ``halo`` voxels of context when ``block_size`` > 0).

    Windows or blocks run under ``autocast`` (a context factory, e.g. ``MixedPrecision.autocast``)
    on the image's device; results are kept in float32 on ``output_device``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if autocast is None:
            return model(x)
        with autocast():
            return model(x)

    if prediction == "whole_volume":
        divisor = getattr(model, "divisor", 16)
        halo = -(-halo // divisor) * divisor  # blocks stay on the stride grid
        return whole_volume_inference(image, predictor, divisor, tuple(roi_size), block_size=block_size, halo=halo,
                                      device=output_device, progress=progress, desc=desc)
    return sliding_window_inference(image, tuple(roi_size), sw_batch_size, predictor, overlap=overlap, mode=mode,
                                    device=output_device, progress=progress, desc=desc)
