"""Segmentation networks for segPANDA200; every model returns ``{"out": logits (B, C, H, W)}``
(plus ``"aux"`` for DeepLabv3 with the auxiliary head), logits at the input size.

- :func:`build_deeplabv3`: torchvision DeepLabv3 (ResNet, output stride 8, ASPP 12/24/36) with
  torchvision's key names, so the released ``Last_segPANDA200_DeepLabv3_1000itr.pt`` (a plain
  state_dict, 6-class ``classifier.4``) loads strictly with :func:`load_segmentation_weights`.
- :class:`ViTSegmenter`: a timm ViT with an UPerNet-style head over four intermediate blocks
  (BEiT/MAE's ADE20K set-up: deconvolution / identity / max-pool to strides 4/8/16/32, then PPM +
  FPN) or a progressive-upsampling head (SETR-PUP); the position grid is resized to the crop.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from common.backbones import HEAD_KEYS, build_backbone, import_backbone
from common.checkpoint import CheckpointError, LoadReport, extract_state_dict, load_file, load_weights


# ============================================================================= DeepLabv3
def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """torchvision's ``replace_stride_with_dilation`` for BasicBlock layers (which torchvision
    refuses): stride 1 everywhere, the first block's first conv at ``previous`` dilation, the rest
    at ``dilation``; padding = dilation keeps the size."""
    for i, block in enumerate(layer):
        for j, conv in enumerate((block.conv1, block.conv2)):
            d = previous if i == 0 and j == 0 else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def build_resnet_os8(arch: str, **kwargs) -> nn.Module:
    """A ResNet whose layer3/layer4 are dilated (2, 4) instead of strided: output stride 8."""
    backbone = build_backbone(arch, **kwargs, **({} if arch in ("resnet18", "resnet34") else
                                                 {"replace_stride_with_dilation": [False, True, True]}))
    if isinstance(backbone.layer1[0], BasicBlock):
        _dilate_basic_layer(backbone.layer3, 1, 2)
        _dilate_basic_layer(backbone.layer4, 2, 4)
    return backbone


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def build_deeplabv3(num_classes: int = 6, backbone: str = "resnet50", aux_loss: bool = False,
                    **backbone_kwargs) -> DeepLabV3:
    """torchvision ``deeplabv3_resnet50(num_classes=C, aux_loss=...)`` for any ResNet depth.

    ``backbone_kwargs`` reach the ResNet constructor (``layers=[1, 1, 1, 1]`` for tiny test nets)."""
    resnet = build_resnet_os8(backbone, **backbone_kwargs)
    returns = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    body = IntermediateLayerGetter(resnet, return_layers=returns)
    high = _out_channels(resnet.layer4)
    aux = FCNHead(_out_channels(resnet.layer3), num_classes) if aux_loss else None
    return DeepLabV3(body, DeepLabHead(high, num_classes), aux)


# ============================================================================= ViT heads
def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MultiScaleAdapter(nn.Module):
    """Four stride-16 ViT maps -> strides 4, 8, 16, 32 (BEiT/MAE segmentation ``fpn1-4``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2, ceil_mode=True)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f(x) for f, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class UPerHead(nn.Module):
    """UPerNet decoder (Xiao et al. 2018, mmseg ``UPerHead``): pyramid pooling on the coarsest map,
    a top-down FPN, every level upsampled to the finest and fused by a 3x3 conv."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                                 for o in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class ProgressiveHead(nn.Module):
    """SETR-PUP: the last block's map, four (conv 3x3 + BN + ReLU, x2 bilinear) stages, classifier."""

    def __init__(self, dim: int, channels: int, num_classes: int, stages: int = 4):
        super().__init__()
        self.stages = nn.ModuleList(conv_bn_relu(dim if i == 0 else channels, channels) for i in range(stages))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classifier(x)


def default_indices(depth: int) -> list[int]:
    """Four evenly spaced blocks ending with the last: 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23]."""
    return [depth * (i + 1) // 4 - 1 for i in range(4)]


class ViTSegmenter(nn.Module):
    """timm ViT backbone (``backbone.*`` keys = timm's) + ``head`` ("upernet" | "progressive")."""

    def __init__(self, arch: str = "vit_small_patch16_224", num_classes: int = 6, head: str = "upernet",
                 img_size: int = 224, indices: list[int] | None = None, channels: int = 256, **backbone_kwargs):
        super().__init__()
        self.backbone = build_backbone(arch, img_size=img_size, dynamic_img_size=True, **backbone_kwargs)
        dim, depth = self.backbone.embed_dim, len(self.backbone.blocks)
        self.indices = list(indices) if indices else default_indices(depth)
        if len(self.indices) != 4 or max(self.indices) >= depth:
            raise ValueError(f"need four block indices below the depth {depth}, got {self.indices}")
        if head == "upernet":
            self.neck = MultiScaleAdapter(dim)
            self.head = UPerHead([dim] * 4, channels, num_classes)
        elif head == "progressive":
            self.neck = nn.Identity()
            self.head = ProgressiveHead(dim, channels, num_classes)
        else:
            raise ValueError(f"unknown ViT head {head!r} (upernet | progressive)")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.forward_intermediates(x, indices=self.indices, output_fmt="NCHW",
                                                    intermediates_only=True)  # 4 x (B, D, H/16, W/16)
        logits = self.head(self.neck(feats))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def resize_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Bicubic resampling of a checkpoint's ``pos_embed`` grid to the model's (class token kept)."""
    from timm.layers import resample_abs_pos_embed

    target = model.pos_embed
    if "pos_embed" not in sd or sd["pos_embed"].shape == target.shape:
        return sd
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"].float(), new_size=list(grid),
                                              num_prefix_tokens=prefix).to(sd["pos_embed"].dtype)
    return out


# ============================================================================= builders / weights
def build_model(cfg) -> nn.Module:
    """The network a :class:`segpanda.config.ModelConfig` describes (random weights)."""
    if cfg.model == "deeplabv3":
        layers = {"layers": list(cfg.backbone_layers)} if cfg.backbone_layers else {}
        return build_deeplabv3(cfg.num_classes, cfg.backbone, cfg.aux_loss, **layers)
    return ViTSegmenter(cfg.backbone, cfg.num_classes, head=cfg.model.removeprefix("vit_"), img_size=cfg.crop_size,
                        indices=cfg.vit_indices or None, channels=cfg.head_channels)


def load_pretrained_backbone(model: nn.Module, source: str | os.PathLike | Mapping, arch: str | None = None) -> str:
    """Initialise the backbone from any checkpoint ``common.backbones.import_backbone`` accepts
    (ImageNet / SimCLR / MoCo / BYOL / DINO / MAE / this project's runs); strict apart from the
    classification head the backbone does not have. Returns the import report."""
    imported = import_backbone(source, arch)
    if isinstance(model, ViTSegmenter):
        sd = resize_pos_embed(imported.state_dict, model.backbone)
        load_weights(model.backbone, sd, allow_missing=[HEAD_KEYS.pattern])
    else:  # DeepLabV3.backbone is an IntermediateLayerGetter: conv1, bn1, layer1-4 (no avgpool/fc)
        load_weights(model.backbone, imported.state_dict)
    return imported.report()


def load_segmentation_weights(model: nn.Module, source: str | os.PathLike | Mapping) -> LoadReport:
    """Whole-model weights: the released segPANDA200 DeepLabv3 (plain state_dict) or a run's
    checkpoint. Strict, except an auxiliary head present on one side only (the released file has
    none; torchvision's COCO models force one); a ViT's position grid is resized to the model's."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    sd = extract_state_dict(load_file(source) if isinstance(source, (str, os.PathLike)) else source)
    if isinstance(model, ViTSegmenter) and "backbone.pos_embed" in sd:
        sd["backbone.pos_embed"] = resize_pos_embed({"pos_embed": sd["backbone.pos_embed"]}, model.backbone)["pos_embed"]
    aux = [r"aux_classifier\..*"]
    try:
        return load_weights(model, sd, allow_missing=aux, allow_unexpected=aux)
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}\n(the model is {type(model).__name__}; check --model, --backbone, "
                              "--num-classes and --aux-loss against the checkpoint)") from None
