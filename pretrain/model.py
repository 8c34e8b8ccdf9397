"""PatchTCGA classifier: a backbone from ``common.backbones`` whose head is Dropout(0.4) + Linear.

The head replaces torchvision's ``fc`` (keys ``fc.1.*``) or timm's ``head`` (``head.1.*``), so a
fine-tuned model keeps the backbone's own key names and ``import_backbone`` reads it back. For a
linear probe every backbone tensor is frozen and the backbone stays in eval mode (BatchNorm
statistics do not move); :func:`assert_unchanged` checks that after training.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from common.backbones import ImportedBackbone, backbone_dim, build_backbone, load_backbone
from common.checkpoint import unwrap_model


def head_name(model: nn.Module) -> str:
    return "head" if hasattr(unwrap_model(model), "patch_embed") else "fc"


def build_classifier(arch: str, num_classes: int, dropout: float = 0.4, backbone: str = "",
                     **kwargs) -> tuple[nn.Module, ImportedBackbone | None]:
    """Backbone (random, or strictly loaded from any supported checkpoint) + Dropout + Linear."""
    model = build_backbone(arch, **kwargs)
    setattr(model, head_name(model), nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone_dim(model), num_classes)))
    imported = load_backbone(model, backbone, arch) if backbone else None
    return model, imported


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad only on the head; returns the head parameters."""
    head = getattr(model, head_name(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return list(head.parameters())


def set_train_mode(model: nn.Module, linear_probe: bool) -> None:
    """Train mode, except a probed backbone, which stays in eval mode (BN uses and keeps its statistics)."""
    model.train()
    if linear_probe:
        model.eval()
        getattr(unwrap_model(model), head_name(model)).train()  # dropout stays active


def backbone_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every backbone parameter and buffer (BN running statistics included)."""
    head = head_name(model) + "."
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(head)}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """MoCo's linear-probe sanity check, extended to buffers: raise naming what moved."""
    current = model.state_dict()
    moved = [k for k, v in snapshot.items() if not torch.equal(current[k].cpu(), v.cpu())]
    if moved:
        raise RuntimeError(f"frozen backbone changed during the linear probe: {moved[:10]} ({len(moved)} tensors)")
