"""Import released self-supervised checkpoints as plain backbones (torchvision ResNet / timm ViT).

One entry point, :func:`import_backbone`, recognises the container and key layout of

- ``simclr``: simclr-pytorch ``{state_dict: convnet.* + projection.*, hparams: Namespace, ...}``;
- ``moco``: MoCo v1/v2 ``{state_dict: module.encoder_q.* + module.encoder_k.* + module.queue, ...}``;
- ``byol``: PatchTCGA BYOL ``{state_dict: net_online.net.* + net_target.net.* + projector/predictor/classifier}``;
- ``dino``: DINO ``{teacher: backbone.* + head.*, student: module.backbone.* + ..., args: Namespace}``;
- ``mae``: MAE pretraining ``{model: encoder + decoder_* + mask_token, args: Namespace, ...}``;
- ``project``: this project's training states (``save_training_state``: ``model`` + ``step`` + ``config``);
- ``torchvision`` / ``timm``: plain state dicts (what ``pretrain/convert.py`` writes),

converts it to the backbone's own key names without any head (no ``fc.*`` / ``head.*``), infers
the architecture from the tensor shapes and checks the result **strictly** against a reference
model built on the meta device: every key present, none extra, every shape equal. Pickled
``argparse.Namespace`` objects (SimCLR, DINO, MAE) are allow-listed for ``weights_only`` loading,
safety is never turned off.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from common.checkpoint import CheckpointError, load_file, load_weights

HEAD_KEYS = re.compile(r"(fc|head)(\..*)?")  # classification heads a backbone may lack
_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
            ("bottleneck", (3, 8, 36, 3)): "resnet152"}
_VITS = {(192, 12): ("tiny", 3), (384, 12): ("small", 6), (768, 12): ("base", 12),
         (1024, 24): ("large", 16), (1280, 32): ("huge", 16)}  # (embed, depth) -> (name, heads)


@dataclass
class ImportedBackbone:
    arch: str  # "resnet50" (torchvision keys) or a timm ViT name, e.g. "vit_small_patch16_224"
    state_dict: dict  # plain backbone keys, no head (no fc.* / head.*)
    format: str  # "simclr" | "moco" | "byol" | "dino" | "mae" | "project" | "torchvision" | "timm"
    notes: list[str]  # human-readable report (what was found / dropped)
    build_kwargs: dict = field(default_factory=dict)  # non-standard widths: build_backbone(arch, **build_kwargs)

    def report(self) -> str:
        n = sum(v.numel() for v in self.state_dict.values())
        head = f"format: {self.format}\narchitecture: {self.arch}"
        if self.build_kwargs:
            head += f" {self.build_kwargs}"
        return f"{head}\ntensors: {len(self.state_dict)} ({n / 1e6:.2f}M values)\n" + \
            "\n".join(f"- {note}" for note in self.notes)


# ============================================================================= models
def build_backbone(arch: str, **kwargs) -> nn.Module:
    """A randomly initialised backbone without classifier: torchvision ``resnet*`` with
    ``fc = Identity`` (``layers=[...]`` builds a non-standard depth), or a timm ViT with
    ``num_classes=0``; other kwargs go to the constructor (``embed_dim=``, ``depth=``, ...)."""
    if arch.startswith("resnet"):
        import torchvision
        layers = kwargs.pop("layers", None)
        if layers is not None:
            block = torchvision.models.resnet.BasicBlock if arch in ("resnet18", "resnet34") \
                else torchvision.models.resnet.Bottleneck
            model = torchvision.models.resnet.ResNet(block, list(layers), **kwargs)
        else:
            model = getattr(torchvision.models, arch)(weights=None, **kwargs)
        model.fc = nn.Identity()
        return model
    if arch.startswith("vit_"):
        import timm
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    raise ValueError(f"unknown backbone architecture {arch!r} (resnet18/34/50/101/152 or a timm vit_* name)")


def backbone_dim(model: nn.Module) -> int:
    """Feature width of a backbone built by :func:`build_backbone`."""
    if hasattr(model, "num_features"):  # timm
        return int(model.num_features)
    return int(model.layer4[-1].conv3.out_channels if hasattr(model.layer4[-1], "conv3")
               else model.layer4[-1].conv2.out_channels)


# ============================================================================= loading
def _load(path: str | os.PathLike) -> Any:
    """weights_only load; ``argparse.Namespace`` (SimCLR hparams, DINO/MAE args) is allow-listed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_file(path)


def _tensors(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _take(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _drop_head(sd: Mapping[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    dropped = sorted(k for k in sd if HEAD_KEYS.fullmatch(k))
    if dropped:
        notes.append(f"dropped classification head: {', '.join(dropped)}")
    return {k: v for k, v in sd.items() if k not in dropped}


def _summary(keys, limit: int = 6) -> str:
    prefixes = sorted({k.split(".")[0] for k in keys})
    return ", ".join(prefixes[:limit]) + (" ..." if len(prefixes) > limit else "")


# ----------------------------------------------------------------------------- per format
def _from_simclr(obj: Mapping, notes: list[str]) -> dict[str, torch.Tensor]:
    sd = _strip(_tensors(obj["state_dict"], "state_dict"), "module.")
    sd = _strip(sd, "model.") if not any(k.startswith("convnet.") for k in sd) else sd
    projection = [k for k in sd if k.startswith("projection.")]
    notes.append(f"simclr-pytorch: kept convnet.* ({sum(k.startswith('convnet.') for k in sd)} tensors), "
                 f"dropped projection.* ({len(projection)} tensors)")
    hparams = obj.get("hparams")
    if isinstance(hparams, argparse.Namespace):
        notes.append("hparams: " + ", ".join(f"{k}={getattr(hparams, k)}" for k in ("arch", "data", "temperature")
                                             if hasattr(hparams, k)))
    return _drop_head(_take(sd, "convnet."), notes)


def _from_moco(obj: Mapping, notes: list[str]) -> dict[str, torch.Tensor]:
    sd = _strip(_tensors(obj["state_dict"], "state_dict"), "module.")
    n_k = sum(k.startswith("encoder_k.") for k in sd)
    notes.append(f"MoCo (arch {obj.get('arch', '?')}, epoch {obj.get('epoch', '?')}): kept encoder_q.*, "
                 f"dropped encoder_k.* ({n_k} tensors) and queue/queue_ptr")
    return _drop_head(_take(sd, "encoder_q."), notes)


def _from_byol(obj: Mapping, notes: list[str], target: bool = False) -> dict[str, torch.Tensor]:
    sd = _strip(_tensors(obj["state_dict"], "state_dict"), "module.")
    which = "net_target.net." if target else "net_online.net."
    others = sorted({k.split(".")[0] for k in sd if not k.startswith(which)})
    notes.append(f"PatchTCGA BYOL: kept {which}* (the {'target' if target else 'online'} encoder), "
                 f"dropped {', '.join(others)}")
    return _take(sd, which)


def _from_dino(obj: Mapping, notes: list[str]) -> dict[str, torch.Tensor]:
    key = "teacher" if isinstance(obj.get("teacher"), Mapping) else "student"
    sd = _strip(_tensors(obj[key], key), "module.")
    head = [k for k in sd if k.startswith("head.")]
    notes.append(f"DINO (epoch {obj.get('epoch', '?')}): kept {key} backbone.*, dropped head.* "
                 f"({len(head)} tensors){'' if key == 'teacher' else '; no teacher found'}")
    return _drop_head(_take(sd, "backbone."), notes)


def _from_mae(obj: Mapping, notes: list[str]) -> dict[str, torch.Tensor]:
    sd = _strip(_tensors(obj["model"], "model"), "module.")
    decoder = sorted(k for k in sd if k.startswith("decoder_") or k == "mask_token")
    notes.append(f"MAE (epoch {obj.get('epoch', '?')}): dropped decoder_* and mask_token ({len(decoder)} tensors)")
    sd = {k: v for k, v in sd.items() if k not in decoder}
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
        notes.append("fine-tuned with global pooling: fc_norm.* kept (build the ViT with global_pool='avg')")
    return _drop_head(sd, notes)


def _from_project(obj: Mapping, notes: list[str]) -> dict[str, torch.Tensor]:
    sd = _strip(_tensors(obj["model"], "model"), "module.")
    prefix = str(obj.get("backbone_prefix", "backbone."))
    if any(k.startswith(prefix) for k in sd):  # an SSL wrapper: backbone + heads
        notes.append(f"project checkpoint{' (' + str(obj['method']) + ')' if obj.get('method') else ''}: kept "
                     f"{prefix}*, dropped {_summary(k for k in sd if not k.startswith(prefix))}")
        sd = _take(sd, prefix)
    else:
        notes.append(f"project checkpoint (epoch {obj.get('epoch', '?')}, step {obj.get('step', '?')})")
    return _drop_head(sd, notes)


def detect_format(obj: Any) -> str:
    """Name of the checkpoint layout (see the module docstring); raises on anything else."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(obj).__name__}")
    if isinstance(obj.get("teacher"), Mapping) or isinstance(obj.get("student"), Mapping):
        return "dino"
    if isinstance(obj.get("model"), Mapping) and "backbone_prefix" in obj:
        return "project"  # a pretrain/train.py run: method wrapper around backbone.*
    if isinstance(obj.get("model"), Mapping):
        keys = obj["model"].keys()
        if "mask_token" in keys or any(str(k).startswith(("decoder_", "module.decoder_")) for k in keys):
            return "mae"
        return "project"
    if isinstance(obj.get("state_dict"), Mapping):
        keys = [str(k) for k in obj["state_dict"]]
        if any(re.match(r"(module\.)?(model\.)?convnet\.", k) for k in keys):
            return "simclr"
        if any(re.match(r"(module\.)?encoder_q\.", k) for k in keys):
            return "moco"
        if any(re.match(r"(module\.)?net_online\.net\.", k) for k in keys):
            return "byol"
        obj = obj["state_dict"]
    keys = [str(k) for k in obj]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if any(k.endswith("cls_token") or "patch_embed.proj.weight" in k for k in keys):
            return "timm"
        if any(k.endswith("conv1.weight") for k in keys) and any(".layer1." in f".{k}" for k in keys):
            return "torchvision"
    raise CheckpointError(f"unrecognised checkpoint layout; top-level keys: {sorted(map(str, obj))[:12]} "
                          "(expected SimCLR, MoCo, BYOL, DINO, MAE, a project run, or a torchvision/timm state_dict)")


def _convert(obj: Mapping, fmt: str, notes: list[str]) -> dict[str, torch.Tensor]:
    if fmt in ("simclr", "moco", "byol", "dino", "mae", "project"):
        fn = {"simclr": _from_simclr, "moco": _from_moco, "byol": _from_byol, "dino": _from_dino,
              "mae": _from_mae, "project": _from_project}[fmt]
        return fn(obj, notes)
    sd = _tensors(obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), Mapping) else obj, "state_dict")
    sd = _strip(_strip(sd, "module."), "_orig_mod.")
    notes.append(f"plain {fmt} state_dict ({len(sd)} tensors)")
    return _drop_head(sd, notes)


# ============================================================================= architecture
def _infer_resnet(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    stem = sd.get("conv1.weight")
    if stem is None:
        raise CheckpointError(f"no conv1.weight: not a ResNet backbone (keys start with {_summary(sd)})")
    if tuple(stem.shape) != (64, 3, 7, 7):
        kind = " - the CIFAR 3x3 stem" if tuple(stem.shape[-2:]) == (3, 3) else ""
        raise CheckpointError(f"conv1.weight has shape {tuple(stem.shape)}{kind}; an ImageNet ResNet stem "
                              "is (64, 3, 7, 7)")
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    layers = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    name = _RESNETS.get((block, layers))
    if name is None:
        name = "resnet50" if block == "bottleneck" else "resnet18"
        return name, {"layers": list(layers)}
    return name, {}


def _infer_vit(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    proj = sd.get("patch_embed.proj.weight")
    if proj is None:
        raise CheckpointError(f"no patch_embed.proj.weight: not a ViT backbone (keys start with {_summary(sd)})")
    embed, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    tokens = int(sd["pos_embed"].shape[1]) - (1 if "cls_token" in sd else 0) if "pos_embed" in sd else 196
    grid = math.isqrt(tokens)
    img = grid * patch
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed if "blocks.0.mlp.fc1.weight" in sd else 4.0
    standard = _VITS.get((embed, depth))
    size, heads = standard if standard else ("base", max(1, embed // 64))
    kwargs: dict[str, Any] = {}
    if standard is None:
        kwargs.update(embed_dim=embed, depth=depth, num_heads=heads)
    if mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    if "blocks.0.attn.qkv.bias" not in sd and depth:
        kwargs["qkv_bias"] = False
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
        kwargs["global_pool"] = "avg"
    name = f"vit_{size}_patch{patch}_{img if img in (224, 384) else 224}"
    if img not in (224, 384):
        kwargs["img_size"] = img
    return name, kwargs


def _reference_keys(arch: str, kwargs: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_backbone(arch, **dict(kwargs))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_backbone(sd: Mapping[str, torch.Tensor], arch: str, kwargs: dict | None = None, source: str = "") -> None:
    """Strict comparison with the reference ``arch``: raises naming missing / unexpected keys and
    shape mismatches (a head is never expected: the reference has none)."""
    ref = _reference_keys(arch, kwargs or {})
    missing = sorted(k for k in ref if k not in sd)
    unexpected = sorted(k for k in sd if k not in ref)
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs {arch} {ref[k]}" for k in ref
              if k in sd and tuple(sd[k].shape) != ref[k]]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source or 'checkpoint'}: backbone does not fit {arch}{' ' + str(kwargs) if kwargs else ''}: "
            f"missing {missing[:12]}{' ...' if len(missing) > 12 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''} ({len(unexpected)}), "
            f"shape mismatch {shapes[:6]}")


def _fill_bn_counters(sd: dict[str, torch.Tensor], notes: list[str]) -> None:
    """Checkpoints older than PyTorch 0.4.1 lack BatchNorm ``num_batches_tracked``: add zeros."""
    added = [k[:-len("running_mean")] + "num_batches_tracked" for k in sd if k.endswith("running_mean")
             and k[:-len("running_mean")] + "num_batches_tracked" not in sd]
    for k in added:
        sd[k] = torch.zeros((), dtype=torch.long)
    if added:
        notes.append(f"added {len(added)} missing BatchNorm num_batches_tracked counters (old PyTorch file)")


# ============================================================================= public API
def import_backbone(source: str | os.PathLike | Mapping, arch: str | None = None,
                    **build_kwargs) -> ImportedBackbone:
    """Recognise a checkpoint (path or loaded dict), convert it to plain backbone keys and check it
    strictly against ``arch`` (default: inferred from the shapes; ``build_kwargs`` for
    non-standard widths). Raises :class:`CheckpointError` naming the offending keys."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint"
    obj = _load(source) if isinstance(source, (str, os.PathLike)) else source
    fmt = detect_format(obj)
    notes: list[str] = []
    sd = _convert(obj, fmt, notes)
    if not sd:
        raise CheckpointError(f"{name}: the {fmt} checkpoint holds no backbone tensors")
    family = "vit" if "patch_embed.proj.weight" in sd or "cls_token" in sd else "resnet"
    if fmt == "timm" or fmt == "torchvision":  # the plain layout names the family, not the file's keys
        fmt = "timm" if family == "vit" else "torchvision"
    if family == "resnet":
        _fill_bn_counters(sd, notes)
    inferred, kwargs = (_infer_vit if family == "vit" else _infer_resnet)(sd)
    if arch is None or arch == inferred:  # the shapes also give the non-standard widths
        arch = inferred
        kwargs = {**kwargs, **build_kwargs}
    else:
        kwargs = dict(build_kwargs)
        if arch != inferred:
            notes.append(f"requested {arch}; the weights look like {inferred}")
    check_backbone(sd, arch, kwargs, name)
    notes.append(f"loads strictly into {arch}{' ' + str(kwargs) if kwargs else ''} (no head)")
    return ImportedBackbone(arch=arch, state_dict=sd, format=fmt, notes=notes, build_kwargs=kwargs)


def load_backbone(model: nn.Module, source: str | os.PathLike | Mapping, arch: str | None = None) -> ImportedBackbone:
    """Import ``source`` and load it strictly into ``model`` (a backbone, or a classifier whose
    only extra keys are the ``fc.*`` / ``head.*`` head, which stays as initialised)."""
    imported = import_backbone(source, arch)
    load_weights(model, imported.state_dict, allow_missing=[HEAD_KEYS.pattern])
    return imported
