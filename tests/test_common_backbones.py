"""common.backbones: every released SSL checkpoint layout, saved as its upstream code saves it
(containers, argparse Namespaces, wrapper prefixes), imports strictly; tampered files fail naming keys."""
from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from common.backbones import build_backbone, detect_format, import_backbone, load_backbone
from common.checkpoint import CheckpointError, save_training_state


@pytest.fixture(scope="module")
def r50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _backbone_sd(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


# ----------------------------------------------------------------------------- upstream layouts
def simclr_checkpoint(r50: nn.Module, cifar: bool = False) -> dict:
    """simclr-pytorch EncodeProject: convnet (torchvision ResNet50 incl. unused fc) + projection."""
    model = nn.Module()
    model.convnet = r50 if not cifar else torchvision.models.resnet50(weights=None)
    if cifar:
        model.convnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.projection = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(2048, 2048, bias=False)), ("bn1", nn.BatchNorm1d(2048)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(2048, 128, bias=False)), ("bn2", nn.BatchNorm1d(128))]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hparams = argparse.Namespace(arch="ResNet50", data="cifar" if cifar else "imagenet", temperature=0.1)
    return {"state_dict": model.state_dict(), "hparams": hparams, "opt_state_dict": opt.state_dict(), "iter": 500}


def moco_checkpoint(r50: nn.Module) -> dict:
    """MoCo v2 (--mlp): DDP-wrapped MoCo with encoder_q/encoder_k (MLP fc), queue (dim, K), queue_ptr."""
    def encoder(seed_model):
        enc = torchvision.models.resnet50(weights=None, num_classes=128)
        enc.load_state_dict({**seed_model.state_dict(), **{k: v for k, v in enc.state_dict().items()
                                                            if k.startswith("fc.")}})
        enc.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), enc.fc)
        return enc
    moco = nn.Module()
    moco.encoder_q, moco.encoder_k = encoder(r50), encoder(r50)
    moco.register_buffer("queue", nn.functional.normalize(torch.randn(128, 256), dim=0))
    moco.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    sd = {f"module.{k}": v for k, v in moco.state_dict().items()}
    opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": opt.state_dict()}


def byol_checkpoint(r50: nn.Module, hidden: int = 64) -> dict:
    """PatchTCGA byol_torch.BYOL: net_online.net = Sequential(conv1, bn1, act, maxpool, layer1-4)."""
    def encoder():
        net = nn.Module()
        net.net = nn.Sequential(OrderedDict([("conv1", r50.conv1), ("bn1", r50.bn1), ("act", nn.ReLU()),
                                             ("maxpool", r50.maxpool), ("layer1", r50.layer1),
                                             ("layer2", r50.layer2), ("layer3", r50.layer3),
                                             ("layer4", r50.layer4)]))
        return net

    def mlp(dim, out):
        m = nn.Module()
        m.net = nn.Sequential(OrderedDict([("ln1", nn.Linear(dim, hidden)), ("bn", nn.BatchNorm1d(hidden)),
                                           ("act", nn.ReLU()), ("ln2", nn.Linear(hidden, out, bias=False))]))
        return m
    byol = nn.Module()
    byol.net_online, byol.projector_online, byol.predictor_online = encoder(), mlp(2048, 32), mlp(32, 32)
    byol.classifier_online = nn.Linear(2048, 20)
    byol.net_target, byol.projector_target = encoder(), mlp(2048, 32)
    sd = byol.state_dict()
    sd = {k: (v + 1 if k.startswith("net_target.") and v.is_floating_point() else v) for k, v in sd.items()}
    return {"state_dict": sd, "opt_state_dict": {}, "sch_state_dict": {"last_epoch": 3},
            "scaler_state_dict": {"scale": 65536.0}, "epoch": 40, "itr": 12, "num_updates": 4000}


def dino_head(dim: int, hidden: int = 64, bottleneck: int = 32, out: int = 100) -> nn.Module:
    head = nn.Module()
    head.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, bottleneck))
    with pytest.warns(FutureWarning):
        head.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out, bias=False))  # weight_g / weight_v
    return head


def dino_checkpoint() -> dict:
    """DINO ViT-S/16: teacher MultiCropWrapper (no DDP for ViT) and DDP student, args Namespace."""
    torch.manual_seed(1)
    wrappers = []
    for _ in range(2):
        w = nn.Module()
        w.backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        w.head = dino_head(384)
        wrappers.append(w)
    student, teacher = wrappers
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=100, epochs=40, lr=5e-4)
    return {"student": {f"module.{k}": v for k, v in student.state_dict().items()},
            "teacher": teacher.state_dict(), "optimizer": {}, "epoch": 40, "args": args,
            "dino_loss": {"center": torch.zeros(1, 100)}}, teacher


class TinyMAE(nn.Module):
    """facebookresearch/mae MaskedAutoencoderViT key layout at small widths."""

    def __init__(self, dim=64, depth=2, dec_dim=32, dec_depth=1, patch=16, img=224):
        super().__init__()
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, 2, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, 2, 4.0, qkv_bias=True) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)


def mae_checkpoint() -> tuple[dict, TinyMAE]:
    torch.manual_seed(2)
    mae = TinyMAE()
    args = argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, norm_pix_loss=True, epochs=40)
    return {"model": mae.state_dict(), "optimizer": {}, "epoch": 39, "scaler": {"scale": 1024.0}, "args": args}, mae


# ----------------------------------------------------------------------------- tests per format
def test_simclr_saved_with_namespace_imports_strictly(r50, tmp_path):
    path = tmp_path / "checkpoint-500.pth.tar"
    torch.save(simclr_checkpoint(r50), path)
    with pytest.raises(pickle.UnpicklingError):  # a Namespace is not loadable without the allow-list
        torch.load(path, weights_only=True)
    imp = import_backbone(path)
    assert (imp.format, imp.arch, imp.build_kwargs) == ("simclr", "resnet50", {})
    assert _same(imp.state_dict, _backbone_sd(r50))
    assert any("projection" in n for n in imp.notes) and any("fc.weight" in n for n in imp.notes)


def test_simclr_cifar_stem_is_refused(r50, tmp_path):
    path = tmp_path / "cifar.pth.tar"
    torch.save(simclr_checkpoint(r50, cifar=True), path)
    with pytest.raises(CheckpointError, match=r"conv1.weight.*\(64, 3, 3, 3\).*CIFAR"):
        import_backbone(path)


def test_moco_keeps_encoder_q_only(r50, tmp_path):
    path = tmp_path / "checkpoint_0199.pth.tar"
    ckpt = moco_checkpoint(r50)
    ckpt["state_dict"]["module.encoder_k.conv1.weight"] += 5  # must not leak into the backbone
    torch.save(ckpt, path)
    imp = import_backbone(path)
    assert (imp.format, imp.arch) == ("moco", "resnet50")
    assert _same(imp.state_dict, _backbone_sd(r50))
    assert any("fc.0.weight" in n and "fc.2.bias" in n for n in imp.notes)


def test_byol_online_and_target(r50, tmp_path):
    path = tmp_path / "byol_40epochs_4000.pth.tar"
    torch.save(byol_checkpoint(r50), path)
    imp = import_backbone(path)
    assert (imp.format, imp.arch) == ("byol", "resnet50")
    assert _same(imp.state_dict, _backbone_sd(r50))
    assert any("classifier_online" in n and "net_target" in n for n in imp.notes)


def test_dino_teacher_imports_into_timm_vit_small(tmp_path):
    ckpt, teacher = dino_checkpoint()
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    imp = import_backbone(path)
    assert (imp.format, imp.arch, imp.build_kwargs) == ("dino", "vit_small_patch16_224", {})
    assert _same(imp.state_dict, teacher.backbone.state_dict())
    vit = build_backbone(imp.arch, **imp.build_kwargs)
    vit.load_state_dict(imp.state_dict, strict=True)
    assert tuple(imp.state_dict["pos_embed"].shape) == (1, 197, 384)


def test_mae_drops_decoder_and_loads_small_vit(tmp_path):
    ckpt, mae = mae_checkpoint()
    path = tmp_path / "checkpoint-39.pth"
    torch.save(ckpt, path)
    imp = import_backbone(path)
    assert imp.format == "mae"
    assert imp.build_kwargs["embed_dim"] == 64 and imp.build_kwargs["depth"] == 2
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in imp.state_dict)
    vit = build_backbone(imp.arch, **imp.build_kwargs)
    vit.load_state_dict(imp.state_dict, strict=True)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert torch.equal(vit.pos_embed, mae.pos_embed)


def test_mae_vit_large_key_layout_matches_timm():
    """The real MAE ViT-L/16 encoder layout (meta tensors, no memory) fits timm vit_large_patch16_224."""
    with torch.device("meta"):
        mae = TinyMAE(dim=1024, depth=24, dec_dim=512, dec_depth=8)
    imp = import_backbone({"model": mae.state_dict(), "epoch": 39})
    assert (imp.arch, imp.build_kwargs) == ("vit_large_patch16_224", {})
    assert tuple(imp.state_dict["pos_embed"].shape) == (1, 197, 1024)


# ----------------------------------------------------------------------------- tampering
def test_missing_key_is_named(r50):
    ckpt = simclr_checkpoint(r50)
    del ckpt["state_dict"]["convnet.layer3.2.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['layer3.2.conv2.weight'\]"):
        import_backbone(ckpt)


def test_wrong_shape_is_named(tmp_path):
    ckpt, _ = dino_checkpoint()
    ckpt["teacher"]["backbone.blocks.3.mlp.fc1.weight"] = torch.zeros(10, 384)
    with pytest.raises(CheckpointError, match=r"blocks.3.mlp.fc1.weight: checkpoint \(10, 384\) vs"):
        import_backbone(ckpt)


def test_mismatched_architecture_lists_keys(r50):
    with pytest.raises(CheckpointError, match=r"does not fit resnet18.*layer1.0.conv3.weight"):
        import_backbone(byol_checkpoint(r50), arch="resnet18")


def test_unrecognised_layout():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout.*'foo'"):
        detect_format({"foo": {"bar": 1}})


# ----------------------------------------------------------------------------- plain + project
def test_plain_torchvision_and_project_checkpoint(r50, tmp_path):
    imp = import_backbone(r50.state_dict())
    assert (imp.format, imp.arch) == ("torchvision", "resnet50") and "fc.weight" not in imp.state_dict
    r18 = torchvision.models.resnet18(weights=None)
    r18.fc = nn.Sequential(nn.Dropout(0.4), nn.Linear(512, 2))  # a fine-tuned PatchTCGA-style classifier
    save_training_state(tmp_path / "last.pt", model=r18, epoch=1, step=10, config={"arch": "resnet18"})
    imp = import_backbone(tmp_path / "last.pt")
    assert (imp.format, imp.arch) == ("project", "resnet18")
    assert _same(imp.state_dict, _backbone_sd(r18))


def test_load_backbone_into_classifier_keeps_head(r50):
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Sequential(nn.Dropout(0.4), nn.Linear(2048, 2))
    head = {k: v.clone() for k, v in model.fc.state_dict().items()}
    imp = load_backbone(model, moco_checkpoint(r50))
    assert imp.format == "moco"
    assert torch.equal(model.layer4[2].conv3.weight, r50.layer4[2].conv3.weight)
    assert torch.equal(model.bn1.running_var, r50.bn1.running_var)
    assert all(torch.equal(v, head[k]) for k, v in model.fc.state_dict().items())


def test_old_checkpoint_without_bn_counters_is_completed(r50):
    sd = {k: v for k, v in r50.state_dict().items() if not k.endswith("num_batches_tracked")}
    imp = import_backbone({"state_dict": sd})
    assert any("num_batches_tracked" in n for n in imp.notes)
    assert int(imp.state_dict["bn1.num_batches_tracked"]) == 0
