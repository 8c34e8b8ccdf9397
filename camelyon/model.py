"""ResNet18 with a 1x1-conv head: MONAI ``TorchVisionFCModel("resnet18", num_classes=1, use_conv=True)``.

The state_dict keys are MONAI's, so the released bundle ``model.pt`` loads as is:
``features.{0,1,4,5,6,7}.*`` (conv1, bn1, layer1..4 of torchvision ResNet18; 2 = relu and
3 = maxpool hold no parameters) and ``fc.{weight (1,512,1,1), bias (1,)}``. 122 tensors,
11,177,025 parameters.

The network is fully convolutional: a 224 input gives (B, 1, 1, 1); a 224 + 32k input gives
(B, 1, k+1, k+1), output (i, j) being the 224 window at offset (32i, 32j). Dense whole-slide
inference relies on that.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn as nn
import torchvision

from common.backbones import import_backbone
from common.checkpoint import CheckpointError, extract_state_dict, load_file, load_weights

PATCH = 224
STRIDE = 32  # total stride of the ResNet18 body


class TumorDetectionNet(nn.Module):
    """ResNet18 body -> AvgPool2d(7, stride 1) -> Conv2d(512, 1, 1). Outputs logits."""

    def __init__(self, num_classes: int = 1):
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        # children in order: conv1, bn1, relu, maxpool, layer1..4 -> features.0..7
        self.features = nn.Sequential(*list(resnet.children())[:-2])
        self.pool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Conv2d(512, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, (H-224)/32+1, ...)
        return self.fc(self.pool(self.features(x)))


def build_model(channels_last: bool = False) -> TumorDetectionNet:
    model = TumorDetectionNet()
    return model.to(memory_format=torch.channels_last) if channels_last else model


# ----------------------------------------------------------------------------- weight loading
_RESNET_TO_BUNDLE = [(r"^conv1\.", "features.0."), (r"^bn1\.", "features.1."),
                     (r"^layer1\.", "features.4."), (r"^layer2\.", "features.5."),
                     (r"^layer3\.", "features.6."), (r"^layer4\.", "features.7.")]


def torchvision_to_bundle_key(key: str) -> str | None:
    """Map a torchvision ResNet18 key to the bundle layout; drops the 1000-class ``fc``."""
    if key.startswith("fc."):
        return None
    for pattern, repl in _RESNET_TO_BUNDLE:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def load_imagenet_backbone(model: TumorDetectionNet, path: str | os.PathLike) -> str:
    """Initialise the body from a resnet18 backbone file: torchvision's ImageNet ``resnet18-*.pth``
    or anything ``common.backbones.import_backbone`` reads (SimCLR, MoCo, BYOL, DINO, project runs).
    Every body weight must match; only the head (``fc``) stays at its random init. Returns the
    import report."""
    imported = import_backbone(path, "resnet18")
    load_weights(model, imported.state_dict, key_map=torchvision_to_bundle_key,
                 allow_missing=[r"fc\.weight", r"fc\.bias"])
    return imported.report()


def load_detector_weights(model: TumorDetectionNet, path: str | os.PathLike) -> dict:
    """Load a project checkpoint (``{"model": sd, "config": ...}``) or the bundle's ``model.pt``
    (a flat state_dict, possibly with ``module.`` prefixes) strictly. Returns a small summary."""
    obj = load_file(path)
    kind = "project checkpoint" if isinstance(obj, dict) and "config" in obj and "model" in obj else "bundle state_dict"
    sd = extract_state_dict(obj)
    if "fc.weight" in sd and sd["fc.weight"].ndim == 2:  # a Linear head (1, 512): reshape to the conv kernel
        sd["fc.weight"] = sd["fc.weight"][:, :, None, None]
    try:
        load_weights(model, sd)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return {"path": str(path), "kind": kind, "tensors": len(sd),
            "epoch": obj.get("epoch") if kind == "project checkpoint" else None}
