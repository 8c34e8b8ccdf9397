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
from typing import Mapping

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


# ----------------------------------------------------------------------------- large inputs
class RowStrips(nn.Module):
    """``body`` (total stride ``stride``, each output reaching at most ``margin`` input rows above and
    below its own) run on horizontal strips of its input, so its stride-2 activations -- the
    largest tensors of the network: conv1's output is 64 x H/2 x W/2, 5.3 times the input -- exist
    one strip at a time. Each strip of ``rows`` output rows is read with ``margin`` extra input rows
    on both sides (zero padding only where the image itself ends) and cropped back, so the output
    equals the whole-input call up to float rounding. Inputs of at most one strip go straight
    through. Needs an input height divisible by ``stride`` (dense tiles: 224 + 32k)."""

    def __init__(self, body: nn.Module, stride: int, margin: int, rows: int):
        super().__init__()
        if margin % stride:
            raise ValueError(f"margin {margin} must be a multiple of the stride {stride}")
        self.body, self.stride, self.margin, self.rows = body, stride, margin, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        if height <= self.rows * self.stride:
            return self.body(x)
        if height % self.stride:
            raise ValueError(f"input height {height} is not a multiple of the stride {self.stride}")
        out_rows, s, m = height // self.stride, self.stride, self.margin
        out = None
        for a in range(0, out_rows, self.rows):
            b = min(a + self.rows, out_rows)
            lo, hi = max(s * a - m, 0), min(s * b + m, height)  # input rows of this strip
            y = self.body(x[..., lo:hi, :])[..., a - lo // s:b - lo // s, :]  # (B, C, b - a, W')
            if out is None:
                out = torch.empty((*y.shape[:-2], out_rows, y.shape[-1]), dtype=y.dtype, device=y.device,
                                  memory_format=_memory_format(y))
            out[..., a:b, :] = y
        return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def lean_dense_model(model: TumorDetectionNet, strip_rows: int = 64) -> TumorDetectionNet:
    """The same network (shared weights) with its stem (conv1, bn1, relu, max-pool) run in row strips
    (:class:`RowStrips`): a forward pass on a large tile no longer holds conv1's and bn1's stride-2
    outputs whole (2 x 64 x H/2 x W/2 floats: 0.9 GB for a 2,656-px tile), and the output is
    unchanged within float rounding. The stem has stride 4 and reaches 5 input px beyond each
    output's 4-px footprint (conv1 3, max-pool 1 stride-2 row); the margin is 8 px, so the strips
    recompute 2 x 2 of every 64 rows of the stem's output (3 %)."""
    lean = TumorDetectionNet.__new__(TumorDetectionNet)
    nn.Module.__init__(lean)
    f = model.features
    lean.features = nn.Sequential(RowStrips(nn.Sequential(*f[:4]), stride=4, margin=8, rows=strip_rows), *f[4:])
    lean.pool, lean.fc = model.pool, model.fc
    return lean.train(model.training)


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


def load_detector_weights(model: TumorDetectionNet, path: str | os.PathLike | Mapping,
                          name: str | None = None) -> dict:
    """Load a project checkpoint (``{"model": sd, "config": ...}``) or the bundle's ``model.pt``
    (a flat state_dict, possibly with ``module.`` prefixes) strictly: a file, or one already loaded
    (``common.checkpoint.load_file``; ``name`` is then its file, for messages). Returns a small summary."""
    obj = load_file(path) if isinstance(path, (str, os.PathLike)) else path
    path = name or (str(path) if isinstance(path, (str, os.PathLike)) else "state_dict")
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
