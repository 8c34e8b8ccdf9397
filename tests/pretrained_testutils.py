"""Helpers for the initialisation tests: a private, offline torch.hub cache and fake ImageNet files.

No test touches the network: :func:`offline_hub` points torch.hub at a temporary folder and makes
``torch.hub.download_url_to_file`` raise, as on a machine without network access.
"""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import torch


def offline_hub(monkeypatch, root: Path) -> Path:
    """torch.hub's cache in ``root`` (empty), downloads failing; returns ``<hub>/checkpoints``."""
    monkeypatch.setenv("TORCH_HOME", str(root))
    assert Path(torch.hub.get_dir()) == root / "hub", "torch.hub.set_dir was called elsewhere: TORCH_HOME ignored"
    calls = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        raise URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return root / "hub" / "checkpoints"


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
