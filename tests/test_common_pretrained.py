"""common/pretrained.py: --pretrained imagenet|none|PATH and --init-checkpoint resolution, the
torch.hub cache, downloads (faked: no test touches the network), one-line errors."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn

from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.errors import exit_on_user_error
from common.pretrained import (PretrainedError, apply_initialisation, cache_path, imagenet_weights,
                               resolve_initialisation)
from pretrained_testutils import fake_torchvision_file

R18 = "resnet18-f37072fd.pth"
R18_URL = "https://download.pytorch.org/models/" + R18


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_cache_path_is_torch_hubs(hub):
    assert cache_path(imagenet_weights("resnet18")) == hub / R18
    assert cache_path(imagenet_weights("resnet50")) == hub / "resnet50-0676ba61.pth"  # PatchTCGA's DeepLabv3 backbone


def test_cached_imagenet_file_is_used_without_download(hub):
    fake_torchvision_file(hub / R18, "resnet18")
    init = resolve_initialisation("imagenet", "", "resnet18")
    assert (init.kind, init.path) == ("imagenet", str(hub / R18))
    assert init.description == f"imagenet (torchvision ResNet18_Weights.IMAGENET1K_V1, {hub / R18})"


def test_empty_cache_offline_stops_with_one_line_naming_the_cache_path(hub):
    with pytest.raises(PretrainedError) as err:
        resolve_initialisation("imagenet", "", "resnet18")
    text = one_line(err)
    assert f"put {R18_URL} at {hub / R18}" in text
    assert "--pretrained none" in text and "--pretrained PATH" in text and "URLError" in text
    assert isinstance(err.value, ConfigError) and not (hub / R18).exists()


def test_absent_file_is_downloaded_with_its_hash_prefix(hub, monkeypatch):
    seen = {}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        seen.update(url=url, dst=dst, hash_prefix=hash_prefix)
        torch.save({"conv1.weight": torch.zeros(1)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    init = resolve_initialisation("imagenet", "", "resnet18")
    assert seen == {"url": R18_URL, "dst": str(hub / R18), "hash_prefix": "f37072fd"}
    assert init.path == str(hub / R18) and (hub / R18).is_file()


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "vit_large_patch16_224"])
def test_imagenet_for_a_vit_asks_for_a_path(hub, arch):
    with pytest.raises(PretrainedError) as err:
        resolve_initialisation("imagenet", "", arch)
    text = one_line(err)
    assert arch in text and "--pretrained PATH" in text and "MAE" in text and "--pretrained none" in text


def test_none_and_local_file(tmp_path, hub):
    assert resolve_initialisation("none", "", "resnet18").description == "none (random init)"
    path = (tmp_path / "weights.pth").resolve()
    path.write_bytes(b"not checked here: the task's loader reads it")
    init = resolve_initialisation(str(path), "", "vit_small_patch16_224")
    assert (init.kind, init.path) == ("file", str(path))
    assert init.description == f"file {path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


@pytest.mark.parametrize("value,expected", [("/nonexistent.pth", "'/nonexistent.pth': no such file"),
                                            ("imagnet", "'imagnet': no such file; expected imagenet, none or"),
                                            ("", "used to mean random weights: pass --pretrained none")])
def test_bad_values_name_the_problem(hub, value, expected):
    with pytest.raises(PretrainedError) as err:
        resolve_initialisation(value, "", "resnet18")
    assert expected in one_line(err)


def test_init_checkpoint_replaces_the_backbone_initialisation(tmp_path, hub):
    ckpt = (tmp_path / "model.pt").resolve()
    torch.save({"w": torch.ones(2)}, ckpt)
    init = resolve_initialisation("imagenet", str(ckpt), "resnet50")  # empty cache, offline: not needed
    assert (init.kind, init.path, init.flag) == ("checkpoint", str(ckpt), "--init-checkpoint")
    assert init.description.startswith(f"init_checkpoint {ckpt} (sha256 ")
    assert "--pretrained imagenet not loaded" in init.description
    assert "not loaded" not in resolve_initialisation("none", str(ckpt), "resnet50").description
    with pytest.raises(PretrainedError, match="both set"):
        resolve_initialisation(str(ckpt), str(ckpt), "resnet50")
    with pytest.raises(PretrainedError, match="--init-checkpoint '/no/model.pt': no such file"):
        resolve_initialisation("none", "/no/model.pt", "resnet50")


def test_unfit_weights_become_one_line_naming_the_flag(tmp_path, hub):
    path = (tmp_path / "w.pth").resolve()
    path.write_bytes(b"x")
    init = resolve_initialisation(str(path), "", "resnet18")

    def load(model, p):
        raise CheckpointError(f"{p}: weights do not fit Linear:\nmissing=['weight']")

    with pytest.raises(PretrainedError) as err:
        apply_initialisation(init, nn.Linear(2, 2), load, load)
    assert one_line(err) == f"--pretrained: {path}: weights do not fit Linear: missing=['weight']"
    none = resolve_initialisation("none", "", "resnet18")
    assert apply_initialisation(none, nn.Linear(2, 2), load, load) is None  # nothing is loaded


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exited:
        with exit_on_user_error():
            raise PretrainedError("--pretrained '/x.pth': no such file")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --pretrained '/x.pth': no such file\n"
    with pytest.raises(RuntimeError):  # anything else keeps its traceback
        with exit_on_user_error():
            raise RuntimeError("bug")
