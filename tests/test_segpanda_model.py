"""segPANDA models: torchvision DeepLabv3 layout (the released checkpoint loads strictly), output
stride 8, backbones from imported checkpoints, ViT heads at a crop size other than 224."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from common.checkpoint import CheckpointError
from segpanda.config import TrainConfig
from segpanda.model import (ViTSegmenter, build_deeplabv3, build_model, default_indices, load_pretrained_backbone,
                            load_segmentation_weights, resize_pos_embed)

TINY_VIT = dict(embed_dim=32, depth=4, num_heads=2)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_deeplabv3_resnet50_has_torchvision_layout():
    with torch.device("meta"):
        ours = build_deeplabv3(6, "resnet50", aux_loss=True)
        ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=6,
                                                                 aux_loss=True)
    assert shapes(ours) == shapes(ref)
    dilations = [m.dilation for m in ours.backbone.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilations == [(2, 2), (4, 4), (4, 4)]  # torchvision's replace_stride_with_dilation=[F, T, T]
    assert [m.dilation for m in ours.classifier[0].convs[1:4] for m in [m[0]]] == [(12, 12), (24, 24), (36, 36)]


def released_like_state_dict(num_classes=6):
    """What AI_handson loads: torchvision deeplabv3_resnet50 with classifier[4] = Conv2d(256, 6, 1), no aux."""
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                             aux_loss=False)
    ref.classifier[4] = nn.Conv2d(256, num_classes, 1)
    return ref.eval(), ref.state_dict()


def test_released_checkpoint_layout_loads_strictly_and_reproduces_outputs(tmp_path):
    ref, sd = released_like_state_dict()
    path = tmp_path / "Last_segPANDA200_DeepLabv3_1000itr.pt"
    torch.save(sd, path)  # a plain state_dict
    model = build_deeplabv3(6, "resnet50").eval()
    report = load_segmentation_weights(model, path)
    assert not report.missing and not report.unexpected
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)["out"], ref(x)["out"], atol=1e-5)
    with_aux = build_deeplabv3(6, "resnet50", aux_loss=True)
    load_segmentation_weights(with_aux, path)  # only the absent auxiliary head is tolerated
    assert torch.equal(with_aux.classifier[4].weight, sd["classifier.4.weight"])
    five = {**sd, "classifier.4.weight": torch.zeros(5, 256, 1, 1), "classifier.4.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"classifier\.4\.weight: checkpoint \(5, 256, 1, 1\)"):
        load_segmentation_weights(model, five)  # a wrong class count is named


@pytest.mark.parametrize("arch,layers,width", [("resnet18", [1, 1, 1, 1], 512), ("resnet50", [1, 1, 1, 1], 2048)])
def test_output_stride_8_and_full_resolution_logits(arch, layers, width):
    model = build_deeplabv3(4, arch, aux_loss=True, layers=layers).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    assert feats["out"].shape == (2, width, 8, 10) and feats["aux"].shape[-2:] == (8, 10)
    assert out["out"].shape == (2, 4, 64, 80) and out["aux"].shape == (2, 4, 64, 80)


def test_backbone_from_plain_and_moco_checkpoints():
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)  # a plain torchvision (ImageNet-layout) file
    model = build_deeplabv3(6, "resnet18")
    report = load_pretrained_backbone(model, resnet.state_dict())
    assert "resnet18" in report
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, resnet.bn1.running_var)
    moco = {"state_dict": {f"module.encoder_q.{k}": v + 1 for k, v in resnet.state_dict().items()
                           if not k.endswith("num_batches_tracked")},
            "arch": "resnet18", "epoch": 40}
    moco["state_dict"].update({"module.encoder_q.fc.0.weight": torch.zeros(2048, 512), "module.queue": torch.zeros(128, 8)})
    load_pretrained_backbone(model, moco)
    assert torch.equal(model.backbone.conv1.weight, resnet.conv1.weight + 1)


@pytest.mark.parametrize("head,size", [("upernet", 96), ("progressive", 128)])
def test_vit_heads_at_crop_sizes_other_than_224(head, size):
    torch.manual_seed(0)
    model = ViTSegmenter("vit_small_patch16_224", 6, head=head, img_size=size, channels=16, **TINY_VIT)
    assert model.backbone.pos_embed.shape == (1, 1 + (size // 16) ** 2, 32)
    x = torch.randn(2, 3, size, size)
    out = model(x)["out"]
    assert out.shape == (2, 6, size, size)
    out.float().logsumexp(1).mean().backward()  # gradients reach the first block through the head
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # windows of another size (sliding window / centre crop) work too
        assert model(torch.randn(1, 3, 64, 128))["out"].shape == (1, 6, 64, 128)


def test_vit_backbone_from_224_checkpoint_resizes_position_grid():
    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    dino = {"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "epoch": 40}
    dino["teacher"]["head.mlp.0.weight"] = torch.zeros(8, 32)
    model = ViTSegmenter("vit_small_patch16_224", 6, img_size=96, channels=16, **TINY_VIT)
    load_pretrained_backbone(model, dino)
    assert torch.equal(model.backbone.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    pe = model.backbone.pos_embed
    assert pe.shape == (1, 37, 32) and torch.equal(pe[:, 0], src.pos_embed[:, 0])  # class token kept
    # the resampled grid interpolates the 14x14 one: its mean over the grid is (nearly) preserved
    assert torch.allclose(pe[0, 1:].mean(0), src.pos_embed[0, 1:].mean(0), atol=0.05)
    same = resize_pos_embed({"pos_embed": pe.detach()}, model.backbone)
    assert torch.equal(same["pos_embed"], pe)


def test_whole_vit_checkpoint_reloads_at_another_crop(tmp_path):
    a = ViTSegmenter("vit_small_patch16_224", 6, img_size=64, channels=16, **TINY_VIT)
    torch.save({"model": a.state_dict(), "step": 3}, tmp_path / "best.pt")
    b = ViTSegmenter("vit_small_patch16_224", 6, img_size=96, channels=16, **TINY_VIT)
    load_segmentation_weights(b, tmp_path / "best.pt")
    assert torch.equal(b.head.classifier.weight, a.head.classifier.weight)
    assert b.backbone.pos_embed.shape == (1, 37, 32)


def test_build_model_from_config_and_indices():
    assert default_indices(12) == [2, 5, 8, 11] and default_indices(24) == [5, 11, 17, 23]
    cfg = TrainConfig(model="deeplabv3", backbone="resnet18", backbone_layers=[1, 1, 1, 1], num_classes=3)
    assert build_model(cfg).classifier[4].out_channels == 3
    with pytest.raises(ValueError, match="does not fit"):
        TrainConfig(model="vit_upernet", backbone="resnet50").validate()
