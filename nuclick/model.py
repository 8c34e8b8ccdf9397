"""BasicUNet 2-D (MONAI ``monai.networks.nets.BasicUNet``) with MONAI's state_dict key layout, so the
released ``pathology_nuclick_annotation`` weights load strictly, plus the axis-order adapter.

Layout (features f = (32, 64, 128, 256, 512, 32) in the bundle; 7,784,001 parameters, 82 tensors)::

    conv_0   TwoConv(5 -> f0)                    conv_{0,1}.conv (Conv2d 3x3) + conv_{0,1}.adn.N (InstanceNorm)
    down_k   MaxPool2d(2) -> TwoConv             down_k.convs.conv_{0,1}...            k = 1..4
    upcat_k  ConvTranspose2d(2, stride 2) -> cat[encoder, upsampled] -> TwoConv
                                                 upcat_k.upsample.deconv, upcat_k.convs.conv_{0,1}...
    final_conv Conv2d(f5, 1, 1)                  logits

Axis order. MONAI reads PNGs transposed ((C, W, H), see nuclick.md §2), so the released network was
trained on images whose first spatial axis is the column. ``axis_order="wh"`` reproduces that
exactly: the input is transposed before the network and the output transposed back, so callers
always pass and receive (row, col) tensors. The project's own training uses ``"hw"`` (no
transposition) and records the order in its checkpoints; a bare state_dict (the bundle's
``model.pt``) is taken to be ``"wh"`` (:func:`load_nuclick_weights`).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import CheckpointError, extract_state_dict, load_file, load_weights
from nuclick.config import AXIS_ORDERS, BUNDLE_FEATURES


class ConvUnit(nn.Module):
    """MONAI ``Convolution``: Conv2d(3x3, pad 1) -> ADN(InstanceNorm(affine) -> Dropout -> LeakyReLU)."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, negative_slope: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True)
        adn = {"N": nn.InstanceNorm2d(cout, affine=True, eps=1e-5)}
        if dropout:
            adn["D"] = nn.Dropout(dropout)
        adn["A"] = nn.LeakyReLU(negative_slope)
        self.adn = nn.Sequential()
        for name, module in adn.items():
            self.adn.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adn(self.conv(x))


class TwoConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.add_module("conv_0", ConvUnit(cin, cout, dropout))
        self.add_module("conv_1", ConvUnit(cout, cout, dropout))


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.add_module("max_pooling", nn.MaxPool2d(2))
        self.add_module("convs", TwoConv(cin, cout, dropout))


class UpCat(nn.Module):
    """Deconv the decoder input (to in/2 channels, or in with ``halves=False``), replicate-pad by one
    on the trailing side where it is smaller than the encoder feature, cat [encoder, up], TwoConv."""

    def __init__(self, cin: int, cat: int, cout: int, halves: bool = True, dropout: float = 0.0):
        super().__init__()
        up = cin // 2 if halves else cin
        self.upsample = nn.Sequential()
        self.upsample.add_module("deconv", nn.ConvTranspose2d(cin, up, kernel_size=2, stride=2))
        self.convs = TwoConv(cat + up, cout, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(x)
        pad_h = int(skip.shape[-2] != up.shape[-2])
        pad_w = int(skip.shape[-1] != up.shape[-1])
        if pad_h or pad_w:  # only for inputs that are not multiples of 16
            up = F.pad(up, [0, pad_w, 0, pad_h], mode="replicate")
        return self.convs(torch.cat([skip, up], dim=1))


class BasicUNet(nn.Module):
    """(B, in, H, W) -> (B, out, H, W) logits. ``axis_order`` (not a parameter: the state_dict is
    MONAI's) says whether the weights expect transposed input (``"wh"``, the released bundle)."""

    def __init__(self, in_channels: int = 5, out_channels: int = 1, features: Sequence[int] = BUNDLE_FEATURES,
                 dropout: float = 0.0, axis_order: str = "hw"):
        super().__init__()
        if len(features) != 6:
            raise ValueError(f"BasicUNet needs 6 feature widths, got {list(features)}")
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        f = [int(v) for v in features]
        self.features = tuple(f)
        self.axis_order = axis_order
        self.transpose_input = axis_order == "wh"
        self.conv_0 = TwoConv(in_channels, f[0], dropout)
        self.down_1 = Down(f[0], f[1], dropout)
        self.down_2 = Down(f[1], f[2], dropout)
        self.down_3 = Down(f[2], f[3], dropout)
        self.down_4 = Down(f[3], f[4], dropout)
        self.upcat_4 = UpCat(f[4], f[3], f[3], dropout=dropout)
        self.upcat_3 = UpCat(f[3], f[2], f[2], dropout=dropout)
        self.upcat_2 = UpCat(f[2], f[1], f[1], dropout=dropout)
        self.upcat_1 = UpCat(f[1], f[0], f[5], halves=False, dropout=dropout)
        self.final_conv = nn.Conv2d(f[5], out_channels, kernel_size=1)

    def set_axis_order(self, axis_order: str) -> None:
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        self.axis_order, self.transpose_input = axis_order, axis_order == "wh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose_input:
            x = x.transpose(-1, -2)  # (B, C, H, W) -> (B, C, W, H): the layout the weights saw
        x0 = self.conv_0(x)  # full resolution, f0
        x1 = self.down_1(x0)  # 1/2
        x2 = self.down_2(x1)  # 1/4
        x3 = self.down_3(x2)  # 1/8
        x4 = self.down_4(x3)  # 1/16
        u = self.upcat_4(x4, x3)
        u = self.upcat_3(u, x2)
        u = self.upcat_2(u, x1)
        u = self.upcat_1(u, x0)
        logits = self.final_conv(u)
        return logits.transpose(-1, -2) if self.transpose_input else logits


def build_model(features: Sequence[int] = BUNDLE_FEATURES, axis_order: str = "hw") -> BasicUNet:
    """The bundle network: BasicUNet(2-D, in 5, out 1, ``features``)."""
    return BasicUNet(5, 1, features, axis_order=axis_order)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, number of tensors)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


# ----------------------------------------------------------------------------- loading
def infer_features(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Feature widths of a BasicUNet state_dict (from the conv weights)."""
    try:
        return (sd["conv_0.conv_0.conv.weight"].shape[0], sd["down_1.convs.conv_0.conv.weight"].shape[0],
                sd["down_2.convs.conv_0.conv.weight"].shape[0], sd["down_3.convs.conv_0.conv.weight"].shape[0],
                sd["down_4.convs.conv_0.conv.weight"].shape[0], sd["upcat_1.convs.conv_0.conv.weight"].shape[0])
    except KeyError as err:
        raise CheckpointError(f"not a BasicUNet state_dict: key {err} missing "
                              f"(first keys: {sorted(sd)[:5]})") from None


def describe_checkpoint(obj: Any) -> tuple[str, str]:
    """(kind, axis order) of a loaded file: a project checkpoint records its order (files written
    before the field existed were trained by this project, "hw"); anything else is a bare bundle
    state_dict trained by MONAI on transposed images ("wh")."""
    if isinstance(obj, dict) and "model" in obj and "step" in obj and isinstance(obj.get("model"), dict):
        return "project checkpoint", str(obj.get("axis_order") or "hw")
    return "bundle state_dict", "wh"


def load_nuclick_weights(path_or_obj: str | os.PathLike | dict, axis_order: str | None = None,
                         device: torch.device | str = "cpu", name: str | None = None) -> tuple[BasicUNet, dict]:
    """Build the network that fits a checkpoint (a file, or one already loaded whose file ``name``
    names) and load it strictly.

    ``axis_order`` overrides the detected order (``"hw"`` or ``"wh"``). Returns the model (eval
    mode, on ``device``) and a summary ``{path, kind, axis_order, features, epoch}``."""
    name = name or (str(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else "state_dict")
    obj = load_file(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else path_or_obj
    kind, detected = describe_checkpoint(obj)
    order = axis_order or detected
    sd = extract_state_dict(obj)
    model = build_model(infer_features(sd), axis_order=order)
    try:
        load_weights(model, sd)
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from err
    info = {"path": name, "kind": kind, "axis_order": order, "features": list(model.features),
            "epoch": obj.get("epoch") if kind == "project checkpoint" else None}
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------- loss
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """MONAI ``DiceLoss(sigmoid=True, squared_pred=True)``: per sample and channel
    1 - (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s) with p = sigmoid(logits), averaged. fp32."""
    p = torch.sigmoid(logits.float()).flatten(2)
    g = target.float().flatten(2)
    inter = (p * g).sum(-1)
    denom = (p * p).sum(-1) + (g * g).sum(-1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()
