"""segpanda/train.py initialisation: DeepLabv3 on torchvision's ImageNet ResNet50 by default (what
torchvision 0.10's ``deeplabv3_resnet50(pretrained=False)`` loaded for PatchTCGA), none, any
backbone file common.backbones imports, the whole-model checkpoint; ViTs need a PATH; recorded in
config.json and checkpoints; a missing file stops the run before any data is read."""
from __future__ import annotations

import json

import pytest
import torch

import segpanda.train as train_module
from common.backbones import build_backbone
from common.checkpoint import load_file
from common.config import parse_config
from common.dist import DistContext
from common.pretrained import PretrainedError
from pretrained_testutils import fake_torchvision_file
from segpanda.config import TrainConfig
from segpanda.demo import make_demo
from segpanda.model import build_model

R50 = "resnet50-0676ba61.pth"
CTX = DistContext()
TINY = dict(backbone="resnet18", backbone_layers=[1, 1, 1, 1])


def test_defaults_start_from_imagenet_and_the_demo_from_scratch():
    assert TrainConfig().pretrained == "imagenet" and parse_config(TrainConfig, []).pretrained == "imagenet"
    assert parse_config(TrainConfig, ["--demo"]).pretrained == "none"
    assert not hasattr(TrainConfig(), "backbone_weights")  # unified into --pretrained


def test_default_deeplabv3_loads_the_cached_imagenet_resnet50(hub):
    sd = fake_torchvision_file(hub / R50, "resnet50", seed=3)
    model, record = train_module.build_model_for(TrainConfig(), CTX)
    body = model.backbone  # IntermediateLayerGetter over the dilated ResNet50: torchvision's own key names
    assert torch.equal(body.conv1.weight, sd["conv1.weight"])
    assert torch.equal(body.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])
    assert torch.equal(body.layer3[0].bn1.running_var, sd["layer3.0.bn1.running_var"])
    assert record == f"imagenet (torchvision ResNet50_Weights.IMAGENET1K_V1, {hub / R50})"


def test_empty_cache_offline_names_the_resnet50_file(hub):
    with pytest.raises(PretrainedError) as err:
        train_module.build_model_for(TrainConfig(), CTX)
    assert f"at {hub / R50}" in str(err.value) and "--pretrained none" in str(err.value)


@pytest.mark.parametrize("kw,expected", [
    (dict(model="vit_upernet", backbone="vit_small_patch16_224"),
     "backbone 'vit_small_patch16_224'; pass --pretrained PATH"),
    (TINY, "backbone resnet18 with --backbone-layers [1, 1, 1, 1] is not a standard ResNet")])
def test_imagenet_without_a_torchvision_file_asks_for_a_path_or_none(hub, kw, expected):
    with pytest.raises(PretrainedError) as err:
        train_module.build_model_for(TrainConfig(**kw), CTX)
    assert expected in str(err.value) and "--pretrained none" in str(err.value) and "\n" not in str(err.value)


def test_none_path_and_init_checkpoint(tmp_path, hub):
    torch.manual_seed(7)
    model, record = train_module.build_model_for(TrainConfig(pretrained="none", **TINY), CTX)
    torch.manual_seed(7)
    assert torch.equal(model.backbone.conv1.weight, build_model(TrainConfig(**TINY)).backbone.conv1.weight)
    assert record == "none (random init)"

    src = build_backbone("resnet18", layers=[1, 1, 1, 1])
    moco = {"state_dict": {f"module.encoder_q.{k}": v + 1 for k, v in src.state_dict().items()}, "epoch": 3}
    torch.save(moco, tmp_path / "moco.pth.tar")
    path = (tmp_path / "moco.pth.tar").resolve()
    model, record = train_module.build_model_for(TrainConfig(pretrained=str(path), **TINY), CTX)
    assert torch.equal(model.backbone.layer2[0].conv1.weight, src.layer2[0].conv1.weight + 1)
    assert record.startswith(f"file {path} (sha256 ")

    whole = build_model(TrainConfig(**TINY))
    torch.save(whole.state_dict(), tmp_path / "released.pt")
    cfg = TrainConfig(init_checkpoint=str(tmp_path / "released.pt"), **TINY)  # imagenet default: skipped
    model, record = train_module.build_model_for(cfg, CTX)
    assert torch.equal(model.classifier[4].weight, whole.classifier[4].weight)
    assert "--pretrained imagenet not loaded" in record


def test_offline_stops_before_any_data_and_a_run_records_its_file(tmp_path, hub, monkeypatch):
    real_loader = train_module.build_train_loader

    def no_data(*args, **kwargs):
        raise AssertionError("the data loader was built")

    monkeypatch.setattr(train_module, "build_train_loader", no_data)
    with pytest.raises(PretrainedError, match="--pretrained none"):
        train_module.main(TrainConfig(data_root=str(tmp_path / "no_such_data"), output_dir=str(tmp_path / "x"),
                                      backbone="resnet18", device="cpu"))
    assert not (tmp_path / "x").exists()

    monkeypatch.setattr(train_module, "build_train_loader", real_loader)
    make_demo(tmp_path / "data", {"train": 2, "val": 1, "test": 1}, size=48)
    torch.save(build_backbone("resnet18", layers=[1, 1, 1, 1]).state_dict(), tmp_path / "tiny.pth")
    path = (tmp_path / "tiny.pth").resolve()
    cfg = TrainConfig(data_root=str(tmp_path / "data"), output_dir=str(tmp_path / "run"), pretrained=str(path),
                      crop_size=32, val_crop_size=0, batch_size=2, epochs=1, max_updates=0, eval_every=0,
                      num_workers=0, device="cpu", precision="fp32", num_overlays=0, log_every=1, **TINY)
    train_module.main(cfg)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pretrained"] == str(path) and config["initialisation"].startswith(f"file {path} (sha256 ")
    assert load_file(tmp_path / "run" / "best.pt")["config"]["initialisation"] == config["initialisation"]
