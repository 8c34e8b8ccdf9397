"""Pathology foundation-model tile encoders, loaded from a local weights file (issue 15).

One entry point, :func:`load_tile_encoder`, builds a named encoder from :data:`FOUNDATION_MODELS`
as a timm ``VisionTransformer`` (``pretrained=False``: no hub call, no download, ever), reads the
weights the authors publish, converts them where the published layout is not timm's, and loads
them **strictly**: every key present, none extra, every shape equal, or a
:class:`TileEncoderWeightsError` naming the file and the first offending keys. The result is a
:class:`TileEncoder`: the frozen model (normalised ``(B, 3, S, S)`` batch -> ``(B, D)``
embeddings), the published preprocessing as a batched on-device :meth:`TileEncoder.preprocess`,
and the recommended µm/px and inference precision.

The facts (constructors, key layouts, preprocessing, embedding sizes) come from the project's
reference ``shared/reference/foundation-mil.md`` Part A (A1-A4), which cites the model cards and
the authors' code; each spec below names its sources. In short:

- timm layouts (UNI, UNI2-h, Virchow, Virchow2, H-optimus-0/1, Prov-GigaPath, kaiko, Lunit): the
  official local-file recipes build a registry architecture with explicit kwargs and call
  a strict ``load_state_dict`` of the file (A1 "Route 1", A2; read here with ``weights_only=True``). The kwargs matter: without
  ``init_values`` there are no LayerScale keys, DINOv2 registry tags default to 518 px (so
  ``img_size=224`` is passed), ``global_pool='avg'`` would rename ``norm`` to ``fc_norm``, and
  Prov-GigaPath uses 16-px patches despite its ``patch14`` architecture name (A1, A3 notes).
- Phikon is published for HuggingFace ``transformers.ViTModel`` (a folder with ``config.json`` and
  ``pytorch_model.bin`` / ``model.safetensors``), converted here to timm keys with the A4 table:
  ``query``, ``key``, ``value`` concatenated in that order along dim 0 into ``attn.qkv``. The
  authors' original iBOT file ``ibot_vit_base_pancan.pth`` is read too (see :data:`PHIKON_IBOT_BRANCH`).
- Embeddings are the CLS token of the final-normed tokens, except Virchow and Virchow2:
  CLS ⊕ mean of the patch tokens, registers excluded (2560-d, Virchow model card, TRIDENT).

The weights are cast to float32 on load; ``precision`` is the dtype the authors' tooling runs
inference in (for ``torch.autocast``), not the dtype of the module. Licences are the authors'
(most are non-commercial and gated): this module never fetches or redistributes weights.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn as nn

from common.checkpoint import CheckpointError, load_file
from common.config import ConfigError
from common.pretrained import sha256_prefix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # bioptimus/releases models/h-optimus/v0/README.md
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
KAIKO_MEAN = (0.5, 0.5, 0.5)  # kaiko-ai/towards_large_pathology_fms README
KAIKO_STD = (0.5, 0.5, 0.5)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)  # kaiko-ai/eva backbones/pathology/lunit.py
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

CLS = "cls"
CLS_AND_PATCH_MEAN = "cls+patch-mean"  # CLS ⊕ mean of the patch tokens (registers excluded)
TIMM_LAYOUT = "timm"
PHIKON_LAYOUT = "hf-vit/ibot"

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")  # what a HuggingFace snapshot folder holds
#: Phikon's original iBOT file holds a ``student`` and a ``teacher``; the authors' extractor
#: (owkin/HistoSSLscaling rl_benchmarks/models/feature_extractors/ibot_vit.py, ``iBOTViT``) reads
#: ``encoder="student"`` by default, so this module does too. Which branch the HuggingFace
#: ``owkin/phikon`` weights were exported from is not documented (unverified).
PHIKON_IBOT_BRANCH = "student"
HF_VIT_LAYER_NORM_EPS = 1e-12  # transformers ViTConfig default and Phikon's config.json (main revision)
IBOT_LAYER_NORM_EPS = 1e-6  # iBOT / HistoSSLscaling VisionTransformer: partial(nn.LayerNorm, eps=1e-6)


class TileEncoderWeightsError(CheckpointError):
    """A weights file (or folder) that is missing, unreadable, or does not fit the named encoder;
    the message starts with the path and lists the first offending keys."""


def _swiglu_packed():
    from timm.layers import SwiGLUPacked
    return SwiGLUPacked


# ============================================================================= specs
@dataclass(frozen=True)
class FoundationModelSpec:
    """What the authors publish for one tile encoder (see the module docstring and ``sources``).

    ``timm_kwargs`` are passed to ``timm.create_model(timm_name, pretrained=False, **timm_kwargs)``
    exactly as the cited local-file recipe passes them (callables such as ``mlp_layer`` are
    resolved when the model is built, so importing this module does not import timm).
    ``resize`` is the shorter-side resize before the centre crop to ``input_size`` (None: the
    published pipeline takes the tile as it is, so it must already be ``input_size``).
    ``mpp`` is the µm/px the authors pretrained or evaluated at, None when they state none.
    """
    name: str
    title: str
    timm_name: str
    timm_kwargs: Mapping[str, Any]
    embed_dim: int  # published embedding size
    pooling: str = CLS
    input_size: int = 224
    resize: int | None = 224
    interpolation: str = "bilinear"  # "bilinear" | "bicubic", for the resize
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float | None = 0.5
    mpp_note: str = ""
    precision: torch.dtype = torch.float32
    layout: str = TIMM_LAYOUT
    containers: tuple[str, ...] = ()  # dict keys a published file may wrap the state_dict in
    strip_prefixes: tuple[str, ...] = ()  # key prefixes a published file may carry
    weights_hint: str = ""  # where the file comes from, for messages
    licence: str = ""
    sources: str = ""

    def build_kwargs(self) -> dict[str, Any]:
        """``timm_kwargs`` with the lazily named layers resolved (``"SwiGLUPacked"``, ``"SiLU"``)."""
        named = {"SwiGLUPacked": _swiglu_packed, "SiLU": lambda: nn.SiLU}
        return {k: named[v]() if isinstance(v, str) and v in named else v for k, v in self.timm_kwargs.items()}

    @property
    def tile_size(self) -> int:
        """Side of the tile to read from the slide at ``mpp``: the published resize target (so the
        resize is a no-op) or the input size (256 for Prov-GigaPath, 224 otherwise)."""
        return self.resize or self.input_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The published preprocessing of a ``(B, 3, H, W)`` batch; see :func:`preprocess_tiles`."""
        return preprocess_tiles(images, input_size=self.input_size, resize=self.resize,
                                interpolation=self.interpolation, mean=self.mean, std=self.std, name=self.name)

    def summary(self) -> str:
        """One line for ``--help`` texts."""
        mpp = f"{self.mpp:g} µm/px" if self.mpp is not None else "µm/px not published"
        prep = f"resize {self.resize} -> crop {self.input_size}" if self.resize and self.resize != self.input_size \
            else f"{self.input_size} px"
        return f"{self.name}: {self.title}; {self.embed_dim}-d {self.pooling}; {prep}; {mpp}"


def _uni_kwargs() -> dict[str, Any]:
    return dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)


def _uni2_kwargs() -> dict[str, Any]:
    return dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked",
                act_layer="SiLU", reg_tokens=8, dynamic_img_size=True)


def _virchow_kwargs(reg_tokens: int) -> dict[str, Any]:
    kwargs = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                  dynamic_img_size=True, mlp_layer="SwiGLUPacked", act_layer="SiLU")
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens
    return kwargs


def _h_optimus_kwargs() -> dict[str, Any]:
    # = the bioptimus GitHub recipe VisionTransformer(patch_size=14, embed_dim=1536, depth=40, num_heads=24,
    # init_values=1e-5, mlp_ratio=5.33334, mlp_layer=GluMlp(SiLU, gate_last=False), act_layer=SiLU,
    # reg_tokens=4, no_embed_class=True, img_size=224, num_classes=0): the entrypoint supplies the rest
    # (A2, derived; tests/test_common_foundation.py builds the recipe itself and compares outputs).
    return dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=True)


def _gigapath_kwargs() -> dict[str, Any]:
    # patch_size=16 although the architecture is named patch14: the hub config's model_args (A3 notes)
    return dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True)


_UNI_LICENCE = "CC-BY-NC-ND-4.0; HuggingFace-gated; no redistribution"
_KAIKO_LICENCE = "Kaiko Non-Commercial Public License v1"
_KAIKO_SOURCES = ("kaiko-ai/towards_large_pathology_fms hubconf.py/README (architectures, 0.5/0.5, "
                  "Resize(224)+CenterCrop(224)); TRIDENT load.py (local checkpoint_path, dynamic_img_size)")
_KAIKO_MPP_NOTE = "pretraining µm/px not confirmed (reference 'Unverified'); eva benchmarks tiles at 0.25-0.5"
_LUNIT_SOURCES = ("lunit-io/benchmark-ssl-pathology README (VisionTransformer(img_size=224, patch_size, "
                  "embed_dim=384, num_heads=6, num_classes=0), strict load); eva lunit.py (mean/std)")


def _kaiko(name: str, timm_name: str, embed_dim: int, title: str, **extra: Any) -> FoundationModelSpec:
    return FoundationModelSpec(
        name=name, title=title, timm_name=timm_name,
        timm_kwargs=MappingProxyType(dict(num_classes=0, dynamic_img_size=True, **extra)),
        embed_dim=embed_dim, resize=224, interpolation="bilinear", mean=KAIKO_MEAN, std=KAIKO_STD,
        mpp=None, mpp_note=_KAIKO_MPP_NOTE, precision=torch.float32,
        # read through timm's loader by the published recipes, which unwraps these (A1 Route 2)
        containers=("state_dict", "model"), strip_prefixes=("module.",),
        weights_hint=f"{name.split('-', 1)[1]}.pth from the kaiko-ai/towards_large_pathology_fms GitHub release",
        licence=_KAIKO_LICENCE, sources=_KAIKO_SOURCES)


def _lunit(name: str, patch: int) -> FoundationModelSpec:
    return FoundationModelSpec(
        name=name, title=f"Lunit DINO ViT-S/{patch}", timm_name=f"vit_small_patch{patch}_224",
        timm_kwargs=MappingProxyType(dict(img_size=224, num_classes=0)),
        embed_dim=384, resize=None, mean=LUNIT_MEAN, std=LUNIT_STD, mpp=None,
        mpp_note="pretraining µm/px not confirmed (reference 'Unverified')", precision=torch.float32,
        weights_hint=f"dino_vit_small_patch{patch}_ep200.torch (lunit-io/benchmark-ssl-pathology release)",
        licence="Lunit non-commercial", sources=_LUNIT_SOURCES)


def _specs() -> dict[str, FoundationModelSpec]:
    specs = [
        FoundationModelSpec(
            name="uni", title="UNI (ViT-L/16, MahmoodLab)", timm_name="vit_large_patch16_224",
            timm_kwargs=MappingProxyType(_uni_kwargs()), embed_dim=1024, resize=224, precision=torch.float16,
            mpp=0.5, mpp_note="not stated by the authors; MahmoodLab TRIDENT reads 256 px at 20x resized to 224",
            weights_hint="pytorch_model.bin from huggingface.co/MahmoodLab/UNI", licence=_UNI_LICENCE,
            sources="MahmoodLab/UNI README_old.md + uni/get_encoder/get_encoder.py; TRIDENT load.py"),
        FoundationModelSpec(
            name="uni2-h", title="UNI2-h (ViT-H/14, 8 registers, SwiGLU, MahmoodLab)",
            timm_name="vit_giant_patch14_224", timm_kwargs=MappingProxyType(_uni2_kwargs()), embed_dim=1536,
            resize=224, precision=torch.bfloat16, mpp=0.5, mpp_note="as UNI (not stated by the authors)",
            weights_hint="pytorch_model.bin from huggingface.co/MahmoodLab/UNI2-h", licence=_UNI_LICENCE,
            sources="MahmoodLab/UNI README.md; TRIDENT load.py"),
        FoundationModelSpec(
            name="virchow", title="Virchow (ViT-H/14, SwiGLU, Paige)", timm_name="vit_huge_patch14_224",
            timm_kwargs=MappingProxyType(_virchow_kwargs(0)), embed_dim=2560, pooling=CLS_AND_PATCH_MEAN,
            resize=224, interpolation="bicubic", precision=torch.float16, mpp=0.5,
            mpp_note="pretraining tiles at 0.5 µm/px (20x), model card",
            weights_hint="pytorch_model.bin from huggingface.co/paige-ai/Virchow",
            licence="Apache-2.0 with added terms; gated (institutional e-mail)",
            sources="huggingface.co/paige-ai/Virchow model card; TRIDENT load.py"),
        FoundationModelSpec(
            name="virchow2", title="Virchow2 (ViT-H/14, 4 registers, SwiGLU, Paige)",
            timm_name="vit_huge_patch14_224", timm_kwargs=MappingProxyType(_virchow_kwargs(4)), embed_dim=2560,
            pooling=CLS_AND_PATCH_MEAN, resize=224, interpolation="bicubic", precision=torch.float16, mpp=0.5,
            mpp_note="mixed-magnification pretraining (exact set unverified); 0.5 (20x) as Virchow",
            weights_hint="pytorch_model.bin (or model.safetensors) from huggingface.co/paige-ai/Virchow2",
            licence="CC-BY-NC-ND-4.0; gated", sources="TRIDENT load.py; paige-ai/Virchow2 HF page"),
        FoundationModelSpec(
            name="h-optimus-0", title="H-optimus-0 (ViT-g/14, 4 registers, Bioptimus)",
            timm_name="vit_giant_patch14_reg4_dinov2", timm_kwargs=MappingProxyType(_h_optimus_kwargs()),
            embed_dim=1536, resize=None, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, precision=torch.float16,
            mpp=0.5, mpp_note="224 px at 0.5 µm/px, bioptimus README",
            weights_hint="checkpoint.pth (bioptimus GitHub README) or pytorch_model.bin from "
                         "huggingface.co/bioptimus/H-optimus-0",
            licence="Apache-2.0", sources="bioptimus/releases models/h-optimus/v0/README.md; TRIDENT load.py"),
        FoundationModelSpec(
            name="h-optimus-1", title="H-optimus-1 (ViT-g/14, 4 registers, Bioptimus)",
            timm_name="vit_giant_patch14_reg4_dinov2", timm_kwargs=MappingProxyType(_h_optimus_kwargs()),
            embed_dim=1536, resize=None, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, precision=torch.float16,
            mpp=0.5, mpp_note="as H-optimus-0 (H-optimus-1 card not read: unverified)",
            weights_hint="pytorch_model.bin from huggingface.co/bioptimus/H-optimus-1",
            licence="'academic research' access (exact licence unverified)", sources="TRIDENT load.py"),
        FoundationModelSpec(
            name="prov-gigapath", title="Prov-GigaPath tile encoder (ViT-g, 16-px patches)",
            timm_name="vit_giant_patch14_dinov2", timm_kwargs=MappingProxyType(_gigapath_kwargs()),
            embed_dim=1536, resize=256, interpolation="bicubic", precision=torch.float16, mpp=0.5,
            mpp_note="256 px tiles at 0.5 µm/px (demo/1_slide_mpp_check.py), resized 256 -> crop 224",
            weights_hint="pytorch_model.bin from huggingface.co/prov-gigapath/prov-gigapath",
            licence="code Apache-2.0, research use only; gated",
            sources="prov-gigapath README + gigapath/pipeline.py; TRIDENT load.py (kwargs)"),
        FoundationModelSpec(
            name="phikon", title="Phikon (iBOT ViT-B/16, Owkin)", timm_name="vit_base_patch16_224",
            timm_kwargs=MappingProxyType(dict(img_size=224, num_classes=0)), embed_dim=768, resize=224,
            precision=torch.float32, mpp=0.5, mpp_note="the authors' features use 0.5 µm/px (HistoSSLscaling)",
            layout=PHIKON_LAYOUT,
            weights_hint="huggingface.co/owkin/phikon folder (config.json + pytorch_model.bin or "
                         "model.safetensors), or its ibot_vit_base_pancan.pth",
            licence="Owkin non-commercial, non-profit entities only",
            sources="owkin/HistoSSLscaling README + ibot_vit.py; transformers convert_vit_timm_to_pytorch.py"),
        _kaiko("kaiko-vits16", "vit_small_patch16_224", 384, "kaiko ViT-S/16"),
        _kaiko("kaiko-vits8", "vit_small_patch8_224", 384, "kaiko ViT-S/8"),
        _kaiko("kaiko-vitb16", "vit_base_patch16_224", 768, "kaiko ViT-B/16"),
        _kaiko("kaiko-vitb8", "vit_base_patch8_224", 768, "kaiko ViT-B/8"),
        # TRIDENT builds ViT-L/14 at the registry's 518 px (its local file's pos_embed grid is 37x37)
        # and feeds 224-px tiles through dynamic_img_size (pos_embed interpolated in the forward).
        _kaiko("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, "kaiko ViT-L/14 (4 registers)", img_size=518),
        _lunit("lunit-vits16", 16),
        _lunit("lunit-vits8", 8),
    ]
    return {spec.name: spec for spec in specs}


#: every known encoder by name (read-only)
FOUNDATION_MODELS: Mapping[str, FoundationModelSpec] = MappingProxyType(_specs())


def tile_encoder_names() -> tuple[str, ...]:
    return tuple(FOUNDATION_MODELS)


def list_tile_encoders() -> str:
    """One line per known encoder, for ``--help`` texts."""
    return "\n".join(spec.summary() for spec in FOUNDATION_MODELS.values())


def get_spec(name: str) -> FoundationModelSpec:
    spec = FOUNDATION_MODELS.get(name)
    if spec is None:
        raise ConfigError(f"unknown tile encoder {name!r}; known: {', '.join(FOUNDATION_MODELS)}")
    return spec


# ============================================================================= preprocessing
def preprocess_tiles(images: torch.Tensor, *, input_size: int, resize: int | None, interpolation: str,
                     mean: tuple[float, ...], std: tuple[float, ...], name: str = "encoder") -> torch.Tensor:
    """A ``(B, 3, H, W)`` batch (uint8 0-255, or float 0-1) -> float32 ``(B, 3, S, S)``, normalised.

    With ``resize``: shorter side to ``resize`` (torchvision ``Resize(int)``, antialiased, values
    clamped to [0, 1] as an 8-bit image would be), centre crop to ``input_size``. Without: the tile
    is taken as it is and must be ``input_size`` square. Batched torch ops on the input's device.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if resize is not None:
        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
        x = TF.resize(x, [resize], interpolation=mode, antialias=True).clamp_(0.0, 1.0)
        x = TF.center_crop(x, [input_size, input_size])
    elif tuple(x.shape[-2:]) != (input_size, input_size):
        raise ValueError(f"{name}: the published preprocessing takes {input_size}x{input_size} tiles as they are "
                         f"(no resize); got {tuple(x.shape[-2:])}: read tiles of {input_size} px at the model's µm/px")
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# ============================================================================= the encoder
class TileEmbedder(nn.Module):
    """A timm ViT ``trunk`` plus the published pooling: normalised ``(B, 3, S, S)`` -> ``(B, D)``.

    ``cls``: the CLS token of the final-normed tokens (timm ``global_pool='token'``).
    ``cls+patch-mean``: CLS ⊕ mean of the patch tokens after the ``trunk.num_prefix_tokens`` CLS and
    register tokens (Virchow: ``out[:, 1:]``, Virchow2: ``out[:, 5:]``; model card, TRIDENT).
    """

    def __init__(self, trunk: nn.Module, pooling: str):
        super().__init__()
        if pooling not in (CLS, CLS_AND_PATCH_MEAN):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.trunk = trunk
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # (B, prefix + patches, width), final norm applied
        cls = tokens[:, 0]
        if self.pooling == CLS:
            return cls
        patches = tokens[:, self.trunk.num_prefix_tokens:]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


@dataclass
class TileEncoder:
    """A loaded encoder: ``model(preprocess(tiles))`` gives ``(B, embed_dim)`` embeddings.

    ``model`` is in eval mode with ``requires_grad=False``, float32, on the CPU (move it with
    ``.to(device)``; run it under ``torch.autocast(device, dtype=precision)`` for the authors'
    precision). ``tile_size`` is the tile side to read at ``mpp`` so that the resize is a no-op.
    """
    name: str
    model: nn.Module
    embed_dim: int
    input_size: int
    resize: int | None
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None
    precision: torch.dtype
    weights_path: str
    weights_sha256: str  # first 12 hex digits of the weights file's sha256
    spec: FoundationModelSpec | None = field(default=None, repr=False)  # None: not a registry model
    notes: list[str] = field(default_factory=list)  # what the loader found / converted / dropped

    @property
    def tile_size(self) -> int:
        return self.resize or self.input_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize/crop + normalise a ``(B, 3, H, W)`` uint8 (0-255) or float (0-1) batch on its
        device; see :func:`preprocess_tiles`."""
        return preprocess_tiles(images, input_size=self.input_size, resize=self.resize,
                                interpolation=self.interpolation, mean=self.mean, std=self.std, name=self.name)

    def describe(self) -> str:
        """Several lines for a run's banner / log: what was loaded and how tiles must be prepared."""
        spec = self.spec
        if spec is None:  # an encoder built outside the registry (camelyon/features.py's ResNets)
            return (f"tile encoder {self.name}: {self.embed_dim}-d, {self.input_size} px tiles, mean {self.mean}, "
                    f"std {self.std}; weights {self.weights_path or 'random'} (sha256 {self.weights_sha256})")
        depth = len(getattr(getattr(self.model, "trunk", None), "blocks", ()))
        prep = (f"resize shorter side to {self.resize} ({self.interpolation}) -> centre crop {self.input_size}"
                if self.resize is not None else f"{self.input_size}x{self.input_size} tiles as they are (no resize)")
        mpp = f"{self.mpp:g} µm/px" if self.mpp is not None else "not published"
        lines = [
            f"tile encoder {self.name}: {spec.title}",
            f"weights: {self.weights_path} (sha256 {self.weights_sha256})",
            f"architecture: timm {spec.timm_name} {_kwargs_text(spec.timm_kwargs)}, depth {depth}",
            f"embedding: {self.embed_dim}-d ({spec.pooling})",
            f"input: {prep}; mean {self.mean}, std {self.std}; read {self.tile_size} px tiles",
            f"µm/px: {mpp}{' (' + spec.mpp_note + ')' if spec.mpp_note else ''}",
            f"precision: {str(self.precision).removeprefix('torch.')}",
            f"licence: {spec.licence}",
        ]
        return "\n".join(lines + [f"- {note}" for note in self.notes])


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    layers = ("mlp_layer", "act_layer")  # named lazily by strings, shown bare
    return "(" + ", ".join(f"{k}={v if k in layers else repr(v)}" for k, v in kwargs.items()) + ")"


# ============================================================================= reading files
def _resolve_weights_file(path: Path, spec: FoundationModelSpec) -> Path:
    """A file as given, or the weights file inside a HuggingFace snapshot folder."""
    if not path.exists():
        raise TileEncoderWeightsError(f"{path}: no such file or folder (weights of {spec.name}: {spec.weights_hint})")
    if path.is_file():
        return path
    for file_name in WEIGHT_FILE_NAMES:
        if (path / file_name).is_file():
            return path / file_name
    content = sorted(p.name for p in path.iterdir())[:12]
    raise TileEncoderWeightsError(f"{path}: folder without {' or '.join(WEIGHT_FILE_NAMES)} (contains {content}); "
                                  f"pass the weights file of {spec.name} ({spec.weights_hint})")


def read_weights(path: Path) -> Any:
    """``.safetensors`` through safetensors, anything else through ``torch.load(weights_only=True)``
    (``common.checkpoint.load_file``; pickled ``argparse.Namespace`` allow-listed, as in iBOT/DINO
    training files). An unreadable or truncated file raises naming it."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise TileEncoderWeightsError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load_file(path)
    except CheckpointError as err:
        raise TileEncoderWeightsError(str(err)) from err


def _tensor_dict(obj: Any, path: Path, spec: FoundationModelSpec) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` dict of a timm-layout file: unwrapped from the containers and
    stripped of the prefixes this model's published files use, and from nothing else."""
    for key in spec.containers:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = sorted(map(str, obj))[:12] if isinstance(obj, Mapping) else type(obj).__name__
        accepted = f" or one wrapped in {list(spec.containers)}" if spec.containers else ""
        raise TileEncoderWeightsError(f"{path}: expected a flat state_dict of tensors{accepted} for {spec.name} "
                                      f"({spec.weights_hint}); found {top}")
    sd = dict(obj)
    for prefix in spec.strip_prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- Phikon (HF ViTModel / iBOT)
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_HF_FIXED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK = {  # per-layer suffix -> timm block suffix (A4); q/k/v are fused separately
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_QKV = ("query", "key", "value")  # concatenated along dim 0 in this order into attn.qkv
#: in ViTModel files, unused by ViTModel(add_pooling_layer=False) (TRIDENT, HistoSSLscaling README):
#: the pooler and the masked-image-modelling token
HF_VIT_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token")


def hf_vit_to_timm(sd: Mapping[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """HuggingFace ``ViTModel`` keys -> timm ``VisionTransformer`` keys (reference A4, from
    transformers ``convert_vit_timm_to_pytorch.py``). ``attention.attention.{query,key,value}`` are
    concatenated along dim 0 in the order q, k, v into ``blocks.N.attn.qkv``. Keys the table does
    not know are kept as they are (the strict check then names them); an incomplete q/k/v triple is
    left unconverted so both its parts and the missing ``qkv`` are reported."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    dropped = [k for k in HF_VIT_UNUSED if k in sd]
    for key, value in sd.items():
        if key in HF_VIT_UNUSED:
            continue
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
            continue
        match = _HF_LAYER.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        layer, rest = int(match.group(1)), match.group(2)
        attn = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if attn:
            qkv_parts.setdefault((layer, attn.group(2)), {})[attn.group(1)] = value
            continue
        module, _, param = rest.rpartition(".")
        if module in _HF_BLOCK:
            out[f"blocks.{layer}.{_HF_BLOCK[module]}.{param}"] = value
        else:
            out[key] = value
    for (layer, param), parts in sorted(qkv_parts.items()):
        if all(p in parts for p in _HF_QKV):
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts[p] for p in _HF_QKV], dim=0)
        else:
            out.update({f"encoder.layer.{layer}.attention.attention.{p}.{param}": v for p, v in parts.items()})
    notes.append("HuggingFace ViTModel keys converted to timm (q, k, v concatenated into attn.qkv)"
                 + (f"; dropped {', '.join(dropped)} (unused by ViTModel(add_pooling_layer=False))" if dropped else ""))
    return out


def _hf_config(folder: Path, embed_depth: int) -> dict[str, Any]:
    """Read and check a Phikon ``config.json`` against the ViT-B/16 being built; returns it."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TileEncoderWeightsError(f"{path}: not a readable config.json ({err})") from err
    expected = {"model_type": "vit", "hidden_size": 768, "num_hidden_layers": embed_depth, "num_attention_heads": 12,
                "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "num_channels": 3,
                "qkv_bias": True, "hidden_act": "gelu"}
    wrong = [f"{k}={config[k]!r} (expected {v!r})" for k, v in expected.items() if k in config and config[k] != v]
    if wrong:
        raise TileEncoderWeightsError(f"{path}: not the Phikon ViT-B/16 configuration: {', '.join(wrong)}")
    return config


def _phikon_state_dict(obj: Any, path: Path, config: dict[str, Any] | None,
                       notes: list[str]) -> tuple[dict[str, torch.Tensor], float]:
    """Phikon's published files -> (timm state_dict, LayerNorm eps of the published model)."""
    if isinstance(obj, Mapping) and isinstance(obj.get(PHIKON_IBOT_BRANCH), Mapping):
        branch = obj[PHIKON_IBOT_BRANCH]  # ibot_vit_base_pancan.pth: {student, teacher, ...}
        sd = {k.removeprefix("module."): v for k, v in branch.items() if isinstance(v, torch.Tensor)}
        backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
        others = sorted({k.split(".")[0] for k in sd if not k.startswith("backbone.")})
        dropped = ["masked_embed"] if "masked_embed" in backbone else []
        backbone.pop("masked_embed", None)  # iBOT's masked-image-modelling token (student only)
        notes.append(f"iBOT training file: kept {PHIKON_IBOT_BRANCH} backbone.* (HistoSSLscaling's default), "
                     f"dropped {', '.join(others + dropped) or 'nothing'}")
        return backbone, IBOT_LAYER_NORM_EPS
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = sorted(map(str, obj))[:12] if isinstance(obj, Mapping) else type(obj).__name__
        raise TileEncoderWeightsError(f"{path}: expected HuggingFace ViTModel weights or the iBOT file "
                                      f"(with a {PHIKON_IBOT_BRANCH!r} entry) for phikon; found {top}")
    eps = float(config.get("layer_norm_eps", HF_VIT_LAYER_NORM_EPS)) if config else HF_VIT_LAYER_NORM_EPS
    return hf_vit_to_timm(obj, notes), eps


# ============================================================================= building and loading
def _build_trunk(spec: FoundationModelSpec, kwargs: dict[str, Any], device: str | torch.device) -> nn.Module:
    import timm
    with torch.device(device):
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def check_strict(sd: Mapping[str, torch.Tensor], model: nn.Module, path: Path, what: str, limit: int = 8) -> None:
    """Every key of ``model`` in ``sd``, nothing else, every shape equal; else raise naming ``path``."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
              for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        def listed(keys: list[str]) -> str:
            return f"{keys[:limit]}{' ...' if len(keys) > limit else ''} ({len(keys)})"
        raise TileEncoderWeightsError(f"{path}: weights do not fit {what}: missing {listed(missing)}, "
                                      f"unexpected {listed(unexpected)}, shape mismatch {listed(shapes)}")


def load_tile_encoder(name: str, weights: str | Path, *, depth: int | None = None) -> TileEncoder:
    """Build encoder ``name`` (see :data:`FOUNDATION_MODELS`) and load ``weights`` strictly.

    ``weights``: the published file (``.safetensors`` via safetensors; ``.bin`` / ``.pth`` /
    ``.pt`` / ``.torch`` via ``torch.load(weights_only=True)``) or a HuggingFace snapshot folder
    holding ``model.safetensors`` or ``pytorch_model.bin`` (Phikon: plus ``config.json``, whose
    architecture fields are checked and whose ``layer_norm_eps`` is used).

    ``depth`` is a **test/debug override**: the same architecture (widths, tokens, MLP, LayerScale)
    with ``depth`` blocks instead of the published number, so tests can save random weights of
    ViT-g width without multi-GB files. Real weights are loaded with ``depth=None``; a file of
    another depth fails the strict check.

    The model is built on the meta device (no random initialisation of a billion parameters),
    then the file's tensors, cast to float32, are assigned after the strict check.
    Raises :class:`common.config.ConfigError` for an unknown name and
    :class:`TileEncoderWeightsError` (a ``CheckpointError``) for anything wrong with the weights.
    """
    spec = get_spec(name)
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive int (a test/debug override), got {depth!r}")
    given = Path(weights).expanduser()
    path = _resolve_weights_file(given, spec)
    kwargs = spec.build_kwargs()
    if depth is not None:
        kwargs["depth"] = depth
    notes: list[str] = [] if depth is None else [f"depth overridden to {depth} blocks (test/debug)"]
    obj = read_weights(path)
    if spec.layout == PHIKON_LAYOUT:
        config = _hf_config(path.parent, depth or 12) if (path.parent / "config.json").is_file() else None
        sd, eps = _phikon_state_dict(obj, path, config, notes)
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=eps)
        notes.append(f"LayerNorm eps {eps:g}{' (config.json)' if config and 'layer_norm_eps' in config else ''}")
    else:
        sd = _tensor_dict(obj, path, spec)
    del obj
    trunk = _build_trunk(spec, kwargs, "meta")
    what = f"{spec.name} (timm {spec.timm_name} {_kwargs_text(spec.timm_kwargs)}" \
           f"{f', depth={depth}' if depth is not None else ''})"
    check_strict(sd, trunk, path, what)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    trunk.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in [*trunk.named_parameters(), *trunk.named_buffers()] if t.is_meta]
    if leftover:  # a tensor outside the state_dict (non-persistent buffer): a bug in this module
        raise RuntimeError(f"{spec.name}: tensors not set by the weights: {leftover[:8]}")
    trunk.eval().requires_grad_(False)
    model = TileEmbedder(trunk, spec.pooling).eval()
    width = int(trunk.embed_dim) * (2 if spec.pooling == CLS_AND_PATCH_MEAN else 1)
    if width != spec.embed_dim:  # the registry and the constructor disagree: a bug in this module
        raise RuntimeError(f"{spec.name}: built a {width}-d embedding, the published size is {spec.embed_dim}")
    return TileEncoder(name=spec.name, model=model, embed_dim=spec.embed_dim, input_size=spec.input_size,
                       resize=spec.resize, interpolation=spec.interpolation, mean=spec.mean, std=spec.std,
                       mpp=spec.mpp, precision=spec.precision, weights_path=str(path),
                       weights_sha256=sha256_prefix(path), spec=spec, notes=notes)
