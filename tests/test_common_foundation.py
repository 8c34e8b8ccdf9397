"""common.foundation: every tile encoder's weights, saved in the layout its authors publish (built
here independently: the published constructors typed from shared/reference/foundation-mil.md A2,
and for Phikon HuggingFace ViTModel keys made by an inverse mapping written here), load strictly
and give the published embedding size and the same values as a direct forward; files that do not
fit fail naming the file and the keys; the published preprocessing on hand-made images.

Random weights, reduced depth for the ViT-g/H widths (``depth=`` test override); Phikon at full
depth. No network: every socket connection fails in this module.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from timm.layers.mlp import GluMlp
from timm.models.vision_transformer import VisionTransformer

from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.errors import UserError
from common.foundation import FOUNDATION_MODELS, TileEncoder, list_tile_encoders, load_tile_encoder

# reference A3 (and A2 for kaiko sizes): the published embedding sizes, typed, not computed
PUBLISHED_EMBED_DIM = {
    "uni": 1024, "uni2-h": 1536, "virchow": 2560, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
    "prov-gigapath": 1536, "phikon": 768, "kaiko-vits16": 384, "kaiko-vits8": 384, "kaiko-vitb16": 768,
    "kaiko-vitb8": 768, "kaiko-vitl14": 1024, "lunit-vits16": 384, "lunit-vits8": 384,
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
PUBLISHED_NORMALISATION = {
    "uni": IMAGENET, "uni2-h": IMAGENET, "virchow": IMAGENET, "virchow2": IMAGENET, "h-optimus-0": H_OPTIMUS,
    "h-optimus-1": H_OPTIMUS, "prov-gigapath": IMAGENET, "phikon": IMAGENET, "kaiko-vits16": KAIKO,
    "kaiko-vits8": KAIKO, "kaiko-vitb16": KAIKO, "kaiko-vitb8": KAIKO, "kaiko-vitl14": KAIKO,
    "lunit-vits16": LUNIT, "lunit-vits8": LUNIT,
}
# (resize of the shorter side, crop/input size): GigaPath Resize(256) -> CenterCrop(224); H-optimus and
# Lunit take the 224 tile as it is; the others Resize(224) (-> CenterCrop(224))
PUBLISHED_GEOMETRY = {name: (224, 224) for name in PUBLISHED_EMBED_DIM}
PUBLISHED_GEOMETRY.update({"prov-gigapath": (256, 224), "h-optimus-0": (None, 224), "h-optimus-1": (None, 224),
                           "lunit-vits16": (None, 224), "lunit-vits8": (None, 224)})
# tokens before the patch tokens in Virchow's output (card: out[:, 1:]) and Virchow2's (out[:, 5:])
PATCH_TOKENS_START = {"virchow": 1, "virchow2": 5}
TWO_BLOCKS = {"uni", "kaiko-vits16", "lunit-vits16"}  # the others with one block, to keep the test fast


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- published constructors
def randomise_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights of useful scale, fast (no timm init): LayerNorm weights ~1, LayerScale ~0.5
    (timm's 1e-5 would hide the blocks from the comparisons), the rest ~N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"norm\d?\.weight$", name):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(".gamma"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model.eval()


def published_model(name: str, depth: int, seed: int = 0) -> nn.Module:
    """The authors' local-file constructor (reference A2), typed here, with ``depth`` blocks."""
    with torch.device("meta"):
        model = _published_model(name, depth)
    return randomise_(model.to_empty(device="cpu"), seed)


def _published_model(name: str, depth: int) -> nn.Module:
    timm_recipes = {
        "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                              dynamic_img_size=True)),
        "uni2-h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, num_heads=24, init_values=1e-5,
                                                 embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                                                 no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
                                                 reg_tokens=8, dynamic_img_size=True)),
        "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                                 global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                                                 act_layer=nn.SiLU)),
        "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                                  global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked,
                                                  act_layer=nn.SiLU, reg_tokens=4)),
        "prov-gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                           num_heads=24, mlp_ratio=5.33334, num_classes=0,
                                                           dynamic_img_size=True)),
        "kaiko-vits16": ("vit_small_patch16_224", dict(num_classes=0, dynamic_img_size=True)),
        "kaiko-vits8": ("vit_small_patch8_224", dict(num_classes=0, dynamic_img_size=True)),
        "kaiko-vitb16": ("vit_base_patch16_224", dict(num_classes=0, dynamic_img_size=True)),
        "kaiko-vitb8": ("vit_base_patch8_224", dict(num_classes=0, dynamic_img_size=True)),
        # TRIDENT's local recipe: built at the registry's 518 px, tiles of 224 through dynamic_img_size
        "kaiko-vitl14": ("vit_large_patch14_reg4_dinov2", dict(num_classes=0, img_size=518, dynamic_img_size=True)),
    }
    if name in ("h-optimus-0", "h-optimus-1"):  # the bioptimus GitHub recipe, not the registry route
        return VisionTransformer(patch_size=14, embed_dim=1536, depth=depth, num_heads=24, init_values=1e-5,
                                 mlp_ratio=5.33334, mlp_layer=partial(GluMlp, act_layer=nn.SiLU, gate_last=False),
                                 act_layer=nn.SiLU, reg_tokens=4, no_embed_class=True, img_size=224, num_classes=0,
                                 in_chans=3)
    if name in ("lunit-vits16", "lunit-vits8"):  # lunit-io/benchmark-ssl-pathology README
        return VisionTransformer(img_size=224, patch_size=16 if name.endswith("16") else 8, embed_dim=384,
                                 num_heads=6, num_classes=0, depth=depth)
    arch, kwargs = timm_recipes[name]
    return timm.create_model(arch, pretrained=False, depth=depth, **kwargs)


PUBLISHED_FILE_NAME = {"h-optimus-0": "checkpoint.pth", "virchow2": "model.safetensors",
                       "lunit-vits16": "dino_vit_small_patch16_ep200.torch",
                       "lunit-vits8": "dino_vit_small_patch8_ep200.torch", "kaiko-vits16": "vits16.pth",
                       "kaiko-vits8": "vits8.pth", "kaiko-vitb16": "vitb16.pth", "kaiko-vitb8": "vitb8.pth",
                       "kaiko-vitl14": "vitl14.pth"}


def save_published(name: str, model: nn.Module, folder: Path) -> Path:
    path = folder / PUBLISHED_FILE_NAME.get(name, "pytorch_model.bin")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def published_embedding(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Computed here from the reference model's final-normed tokens (model cards' rules)."""
    tokens = model.forward_features(x)
    if name in PATCH_TOKENS_START:
        return torch.cat([tokens[:, 0], tokens[:, PATCH_TOKENS_START[name]:].mean(1)], dim=-1)
    return tokens[:, 0]


def batch(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def sha256_12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# ============================================================================= timm layouts
def test_every_registered_model_is_tested_here():
    assert set(FOUNDATION_MODELS) == set(PUBLISHED_EMBED_DIM)
    listing = list_tile_encoders()
    assert all(name in listing for name in PUBLISHED_EMBED_DIM)


@pytest.mark.parametrize("name", [n for n in PUBLISHED_EMBED_DIM if n != "phikon"])
def test_published_file_loads_strictly_and_matches_a_direct_forward(name, tmp_path):
    depth = 2 if name in TWO_BLOCKS else 1
    reference = published_model(name, depth, seed=1)
    path = save_published(name, reference, tmp_path)

    encoder = load_tile_encoder(name, path, depth=depth)

    assert isinstance(encoder, TileEncoder) and encoder.name == name
    assert encoder.embed_dim == PUBLISHED_EMBED_DIM[name]
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.weights_sha256 == sha256_12(path)
    assert encoder.precision in (torch.float16, torch.bfloat16, torch.float32)
    x = batch()
    with torch.no_grad():
        got = encoder.model(x)
        expected = published_embedding(name, reference, x)
    assert got.shape == (2, PUBLISHED_EMBED_DIM[name])
    torch.testing.assert_close(got, expected)
    text = encoder.describe()
    assert str(path) in text and encoder.weights_sha256 in text


def test_virchow_embedding_is_cls_and_mean_of_patch_tokens_without_registers(tmp_path):
    """The registers (tokens 1-4) would change the mean: taking them in must not give the same value."""
    reference = published_model("virchow2", 1, seed=2)
    encoder = load_tile_encoder("virchow2", save_published("virchow2", reference, tmp_path), depth=1)
    x = batch()
    with torch.no_grad():
        got = encoder.model(x)
        tokens = reference.forward_features(x)
    assert tokens.shape[1] == 1 + 4 + 256  # CLS, 4 registers, 16x16 patches
    torch.testing.assert_close(got[:, :1280], tokens[:, 0])
    torch.testing.assert_close(got[:, 1280:], tokens[:, 5:].mean(1))
    assert not torch.allclose(got[:, 1280:], tokens[:, 1:].mean(1), atol=1e-4)


def test_huggingface_snapshot_folder(tmp_path):
    reference = published_model("uni", 1, seed=3)
    folder = tmp_path / "vit_large_patch16_224.dinov2.uni_mass100k"
    folder.mkdir()
    save_published("uni", reference, folder)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch16_224"}))
    encoder = load_tile_encoder("uni", folder, depth=1)
    assert encoder.weights_path == str(folder / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(batch()), reference.forward_features(batch())[:, 0])


def test_kaiko_file_in_a_timm_container_loads(tmp_path):
    reference = published_model("kaiko-vits16", 1, seed=4)
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "vits16.pth")
    encoder = load_tile_encoder("kaiko-vits16", tmp_path / "vits16.pth", depth=1)
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(batch()), reference.forward_features(batch())[:, 0])


# ============================================================================= Phikon
def timm_to_hf_vit(sd: dict[str, torch.Tensor], with_pooler: bool = True) -> dict[str, torch.Tensor]:
    """timm ViT-B keys -> HuggingFace ViTModel keys, the inverse of the A4 table, written here."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for param in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{param}"].chunk(3, dim=0)
            out[h + f"attention.attention.query.{param}"] = q.clone()
            out[h + f"attention.attention.key.{param}"] = k.clone()
            out[h + f"attention.attention.value.{param}"] = v.clone()
            out[h + f"attention.output.dense.{param}"] = sd[b + f"attn.proj.{param}"]
            out[h + f"layernorm_before.{param}"] = sd[b + f"norm1.{param}"]
            out[h + f"layernorm_after.{param}"] = sd[b + f"norm2.{param}"]
            out[h + f"intermediate.dense.{param}"] = sd[b + f"mlp.fc1.{param}"]
            out[h + f"output.dense.{param}"] = sd[b + f"mlp.fc2.{param}"]
    if with_pooler:
        out["pooler.dense.weight"] = torch.randn(768, 768)
        out["pooler.dense.bias"] = torch.randn(768)
    return {k: v.contiguous() for k, v in out.items()}


def hf_vit_cls(sd: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``ViTModel(...).last_hidden_state[:, 0]`` written out from the HF keys (12 heads, GELU)."""
    def ln(t, name):
        return F.layer_norm(t, (768,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(t, name):
        return F.linear(t, sd[name + ".weight"], sd[name + ".bias"])

    patches = F.conv2d(x, sd["embeddings.patch_embeddings.projection.weight"],
                       sd["embeddings.patch_embeddings.projection.bias"], stride=16)
    t = torch.cat([sd["embeddings.cls_token"].expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    t = t + sd["embeddings.position_embeddings"]
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(n_layers):
        layer = f"encoder.layer.{i}."
        h = ln(t, layer + "layernorm_before")
        heads = [lin(h, layer + f"attention.attention.{p}").unflatten(-1, (12, 64)).transpose(1, 2)
                 for p in ("query", "key", "value")]
        q, k, v = heads
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(64), dim=-1) @ v
        t = t + lin(attention.transpose(1, 2).flatten(2), layer + "attention.output.dense")
        h = ln(t, layer + "layernorm_after")
        t = t + lin(F.gelu(lin(h, layer + "intermediate.dense")), layer + "output.dense")
    return ln(t, "layernorm")[:, 0]


PHIKON_CONFIG = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "image_size": 224,
                 "patch_size": 16, "num_channels": 3, "qkv_bias": True, "layer_norm_eps": 1e-12}


def phikon_timm_reference(depth: int, eps: float = 1e-12, seed: int = 0) -> nn.Module:
    """timm's ViT-B/16 with HF ViT's LayerNorm eps (Phikon config.json: 1e-12; iBOT: 1e-6)."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, depth=depth,
                                  norm_layer=partial(nn.LayerNorm, eps=eps))
    return randomise_(model.to_empty(device="cpu"), seed)


def test_phikon_huggingface_folder_at_full_depth(tmp_path):
    reference = phikon_timm_reference(12, seed=5)
    folder = tmp_path / "phikon"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PHIKON_CONFIG))
    torch.save(timm_to_hf_vit(reference.state_dict()), folder / "pytorch_model.bin")

    encoder = load_tile_encoder("phikon", folder)

    assert len(encoder.model.trunk.blocks) == 12 and encoder.embed_dim == 768
    x = batch(n=1)
    with torch.no_grad():
        got = encoder.model(x)
        torch.testing.assert_close(got, reference.forward_features(x)[:, 0])
    assert got.shape == (1, 768)
    assert any("pooler.dense.weight" in note for note in encoder.notes)


def test_phikon_qkv_order_against_a_hand_written_huggingface_forward(tmp_path):
    """query, key, value fused in that order: the output equals the CLS of a forward written from the
    HF keys; the same file with query and key exchanged gives another output (the check can fail)."""
    hf = timm_to_hf_vit(phikon_timm_reference(1, seed=6).state_dict(), with_pooler=False)
    save_file(hf, str(tmp_path / "model.safetensors"))
    swapped = dict(hf)
    for param in ("weight", "bias"):
        q, k = f"encoder.layer.0.attention.attention.query.{param}", f"encoder.layer.0.attention.attention.key.{param}"
        swapped[q], swapped[k] = hf[k], hf[q]
    save_file(swapped, str(tmp_path / "swapped.safetensors"))
    x = batch(seed=1)
    with torch.no_grad():
        expected = hf_vit_cls(hf, x)
        got = load_tile_encoder("phikon", tmp_path / "model.safetensors", depth=1).model(x)
        from_swapped = load_tile_encoder("phikon", tmp_path / "swapped.safetensors", depth=1).model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (from_swapped - expected).abs().max() > 1e-2


def test_phikon_ibot_training_file_uses_the_student_backbone(tmp_path):
    student, teacher = phikon_timm_reference(2, eps=1e-6, seed=7), phikon_timm_reference(2, eps=1e-6, seed=17)
    ibot = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    "module.backbone.masked_embed": torch.zeros(1, 768),
                    "module.head.mlp.0.weight": torch.randn(16, 768),
                    "module.head.last_layer.weight_g": torch.ones(8, 1)},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    "head.mlp.0.weight": torch.randn(16, 768)},
        "epoch": 100,
    }
    torch.save(ibot, tmp_path / "ibot_vit_base_pancan.pth")
    encoder = load_tile_encoder("phikon", tmp_path / "ibot_vit_base_pancan.pth", depth=2)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(x), student.forward_features(x)[:, 0])
    assert encoder.model.trunk.norm.eps == 1e-6


def test_phikon_config_of_another_architecture_is_refused(tmp_path):
    folder = tmp_path / "not-phikon"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**PHIKON_CONFIG, "hidden_size": 1024}))
    torch.save(timm_to_hf_vit(phikon_timm_reference(1).state_dict()), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"config\.json.*hidden_size=1024 \(expected 768\)"):
        load_tile_encoder("phikon", folder, depth=1)


# ============================================================================= errors
@pytest.fixture
def lunit_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = published_model("lunit-vits16", 1, seed=8).state_dict()
    return tmp_path / "weights.torch", dict(sd)


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_missing_key_names_the_file_and_the_key(lunit_file):
    path, sd = lunit_file
    del sd["blocks.0.attn.qkv.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_tile_encoder("lunit-vits16", path, depth=1)
    assert str(path) in _message(excinfo)
    assert "missing ['blocks.0.attn.qkv.weight'] (1)" in _message(excinfo)
    assert isinstance(excinfo.value, UserError)


def test_extra_key_names_the_file_and_the_key(lunit_file):
    path, sd = lunit_file
    sd["head.weight"] = torch.zeros(1000, 384)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_tile_encoder("lunit-vits16", path, depth=1)
    assert str(path) in _message(excinfo) and "unexpected ['head.weight'] (1)" in _message(excinfo)


def test_wrong_shape_names_the_file_key_and_shapes(lunit_file):
    path, sd = lunit_file
    sd["pos_embed"] = torch.zeros(1, 50, 384)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_tile_encoder("lunit-vits16", path, depth=1)
    assert str(path) in _message(excinfo)
    assert "pos_embed: file (1, 50, 384) vs model (1, 197, 384)" in _message(excinfo)


def test_file_of_fewer_blocks_does_not_fit_the_published_depth(lunit_file):
    path, sd = lunit_file
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\.norm1\.weight'.*\(132\)"):
        load_tile_encoder("lunit-vits16", path)  # 12 blocks expected, 1 in the file


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.safetensors"])
def test_truncated_file_names_the_file(lunit_file, file_name):
    path, sd = lunit_file
    path = path.with_name(file_name)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        load_tile_encoder("lunit-vits16", path, depth=1)
    assert str(path) in _message(excinfo) and "not a readable" in _message(excinfo)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "pytorch_model.bin"
    with pytest.raises(CheckpointError, match="no such file or folder") as excinfo:
        load_tile_encoder("uni", path)
    assert str(path) in _message(excinfo) and "MahmoodLab/UNI" in _message(excinfo)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="folder without model.safetensors or pytorch_model.bin"):
        load_tile_encoder("uni", tmp_path)


def test_unknown_model_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown tile encoder 'uni3'.*uni, uni2-h"):
        load_tile_encoder("uni3", tmp_path / "x.bin")


def test_container_is_refused_where_the_published_file_is_a_plain_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 1024)}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"expected a flat state_dict of tensors for uni.*\['epoch', 'model'\]"):
        load_tile_encoder("uni", path, depth=1)


# ============================================================================= preprocessing
@pytest.mark.parametrize("name", list(PUBLISHED_EMBED_DIM))
def test_published_normalisation_and_geometry(name):
    spec = FOUNDATION_MODELS[name]
    assert (spec.mean, spec.std) == PUBLISHED_NORMALISATION[name]
    assert (spec.resize, spec.input_size) == PUBLISHED_GEOMETRY[name]


def test_h_optimus_preprocess_is_the_published_normalisation_without_resize():
    tiles = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.707223, 0.578729, 0.703617]).view(1, 3, 1, 1)
    std = torch.tensor([0.211883, 0.230117, 0.177517]).view(1, 3, 1, 1)
    expected = (tiles.float() / 255 - mean) / std
    spec = FOUNDATION_MODELS["h-optimus-0"]
    torch.testing.assert_close(spec.preprocess(tiles), expected)
    torch.testing.assert_close(spec.preprocess(tiles.float() / 255), expected)
    with pytest.raises(ValueError, match="224x224 tiles as they are"):
        spec.preprocess(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))


def test_gigapath_preprocess_resizes_256_then_crops_224_like_pil():
    """Resize(256, bicubic) -> CenterCrop(224) of a 300x400 image, against PIL: the shorter side
    becomes 256 (so 256x341), the crop starts at row 16, column 58. A one-pixel offset is ~19 levels."""
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float64)
    image = np.stack([127.5 + 120 * np.sin(2 * np.pi * xx / 50), 127.5 + 120 * np.sin(2 * np.pi * yy / 60),
                      127.5 + 120 * np.cos(2 * np.pi * (xx + yy) / 80)], -1).round().astype(np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BICUBIC)).astype(np.float32) / 255
    crop = resized[16:240, 58:282]
    mean, std = np.array(IMAGENET[0], np.float32), np.array(IMAGENET[1], np.float32)
    expected = torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1))[None]
    got = FOUNDATION_MODELS["prov-gigapath"].preprocess(torch.from_numpy(image).permute(2, 0, 1)[None])
    assert got.shape == (1, 3, 224, 224)
    levels = (got - expected).abs() * torch.from_numpy(std).view(1, 3, 1, 1) * 255
    assert levels.max() < 1.5 and levels.mean() < 0.5


def test_encoder_preprocess_feeds_the_model(tmp_path):
    reference = published_model("kaiko-vits16", 1, seed=9)
    encoder = load_tile_encoder("kaiko-vits16", save_published("kaiko-vits16", reference, tmp_path), depth=1)
    tiles = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = encoder.preprocess(tiles)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, FOUNDATION_MODELS["kaiko-vits16"].preprocess(tiles))
    with torch.no_grad():
        assert encoder.model(x).shape == (3, 384)
