"""camelyon/train.py initialisation: ImageNet ResNet18 by default (the bundle's start), none, a
local file, the whole-model checkpoint; recorded in the banner, config.json and checkpoints; a
missing file stops the run before any data is read, and the command line says so in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import camelyon.train as train_module
from camelyon.config import TrainConfig
from camelyon.model import build_model
from common.checkpoint import load_file
from common.config import parse_config
from common.dist import DistContext
from common.pretrained import PretrainedError
from common.pyramidal_tiff import write_pyramidal_tiff
from common_testutils import REPO_ROOT, child_env
from pretrained_testutils import fake_torchvision_file

R18 = "resnet18-f37072fd.pth"
CTX = DistContext()


def test_defaults_start_from_imagenet_and_the_demo_from_scratch():
    assert TrainConfig().pretrained == "imagenet" and parse_config(TrainConfig, []).pretrained == "imagenet"
    assert parse_config(TrainConfig, ["--demo"]).pretrained == "none"
    assert parse_config(TrainConfig, ["--demo", "--pretrained", "imagenet"]).pretrained == "imagenet"


def test_default_config_loads_the_cached_torchvision_file_with_the_key_map(hub):
    sd = fake_torchvision_file(hub / R18, "resnet18", seed=1)
    model, record = train_module.build_model_for(TrainConfig(), CTX)
    assert torch.equal(model.features[0].weight, sd["conv1.weight"])  # conv1 -> features.0
    assert torch.equal(model.features[1].running_var, sd["bn1.running_var"])  # bn1 -> features.1
    assert torch.equal(model.features[7][1].conv2.weight, sd["layer4.1.conv2.weight"])  # layer4 -> features.7
    assert record == f"imagenet (torchvision ResNet18_Weights.IMAGENET1K_V1, {hub / R18})"


def test_none_is_the_seeded_random_init_and_path_loads_a_local_file(tmp_path, hub):
    torch.manual_seed(5)
    model, record = train_module.build_model_for(TrainConfig(pretrained="none"), CTX)
    torch.manual_seed(5)
    assert torch.equal(model.features[0].weight, build_model().features[0].weight) and record == "none (random init)"
    path = (tmp_path / "mine.pth").resolve()
    sd = fake_torchvision_file(path, "resnet18", seed=2)
    model, record = train_module.build_model_for(TrainConfig(pretrained=str(path)), CTX)
    assert torch.equal(model.features[6][0].downsample[0].weight, sd["layer3.0.downsample.0.weight"])
    assert record.startswith(f"file {path} (sha256 ")


def test_a_file_of_another_architecture_is_refused_in_one_line(tmp_path, hub):
    path = (tmp_path / "r50.pth").resolve()
    fake_torchvision_file(path, "resnet50")
    with pytest.raises(PretrainedError, match=f"--pretrained: {path}: backbone does not fit resnet18") as err:
        train_module.build_model_for(TrainConfig(pretrained=str(path)), CTX)
    assert "\n" not in str(err.value)


def test_init_checkpoint_skips_imagenet(tmp_path, hub):
    src = build_model()
    torch.save(src.state_dict(), tmp_path / "model.pt")  # the bundle's plain state_dict
    model, record = train_module.build_model_for(TrainConfig(init_checkpoint=str(tmp_path / "model.pt")), CTX)
    assert torch.equal(model.fc.weight, src.fc.weight)
    assert "--pretrained imagenet not loaded" in record


def test_offline_with_an_empty_cache_stops_before_any_data(tmp_path, hub, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data loaders were built")

    monkeypatch.setattr(train_module, "build_loaders", no_data)
    cfg = TrainConfig(data_root=str(tmp_path / "no_such_data"), output_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(PretrainedError) as err:
        train_module.main(cfg)
    assert f"at {hub / R18}" in str(err.value) and "--pretrained none" in str(err.value)
    assert not (tmp_path / "run").exists()  # not even the run folder


def _tiny_run(tmp_path) -> TrainConfig:
    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[200:900, 200:900] = (230, 150, 200)
    (tmp_path / "slides").mkdir()
    write_pyramidal_tiff(tmp_path / "slides" / "tissue.tif", img, compression="deflate")
    (tmp_path / "list.csv").write_text("tissue,500,500,1,1,1,0,0,0,0,0,0\ntissue,520,480,0,0,0,0,0,0,0,0,0\n")
    return TrainConfig(output_dir=str(tmp_path / "run"), train_list=str(tmp_path / "list.csv"),
                       val_list=str(tmp_path / "list.csv"), image_dir=str(tmp_path / "slides"), epochs=1,
                       batch_size=1, max_steps_per_epoch=1, max_val_regions=1, num_workers=0, log_every=1,
                       device="cpu", precision="fp32")


def test_run_records_the_initialisation_in_banner_config_and_checkpoints(tmp_path, hub, capsys):
    fake_torchvision_file(hub / R18, "resnet18")
    train_module.main(_tiny_run(tmp_path))
    expected = f"imagenet (torchvision ResNet18_Weights.IMAGENET1K_V1, {hub / R18})"
    assert f"initialisation: {expected}\n" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["pretrained"], config["initialisation"]) == ("imagenet", expected)
    for name in ("last.pt", "best.pt"):
        assert load_file(tmp_path / "run" / name)["config"]["initialisation"] == expected
    again = parse_config(TrainConfig, ["--config", str(tmp_path / "run" / "config.json")])  # reloads as is
    assert again.initialisation == expected


def test_command_line_names_a_missing_file_in_one_line(tmp_path):
    env = child_env(TORCH_HOME=str(tmp_path / "torch"), PATHMONO_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "camelyon" / "train.py"), "--pretrained", "/nonexistent.pth",
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --pretrained '/nonexistent.pth': no such file; expected "
                                                "imagenet, none or the path of a weights file"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
