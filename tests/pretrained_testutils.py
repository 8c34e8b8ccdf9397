"""Fake torchvision weight files for the initialisation tests (the offline torch.hub cache they
are put in is conftest's ``hub`` fixture: no test touches the network)."""
from __future__ import annotations

from pathlib import Path

import torch


def fake_torchvision_file(path: Path, arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a torchvision ``arch`` state_dict (ImageNet layout, with ``fc``) of random tensors at
    ``path``; built from the shapes of a meta-device model, so even resnet50 takes a moment."""
    import torchvision

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in getattr(torchvision.models, arch)().state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
          for k, (shape, dtype) in shapes.items()}
    for k in [k for k in sd if k.endswith("running_var")]:
        sd[k] = sd[k].abs() + 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd
