"""pretrain.finetune / eval / convert on a tiny synthetic PCam200 folder (ResNet18 at 32 px)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common import dist
from common.checkpoint import load_file
from common.config import parse_config
from common_testutils import assert_same_weights
from pretrain import convert
from pretrain.config import EvalConfig, FinetuneConfig
from pretrain.eval import run as run_eval
from pretrain.finetune import main
from pretrain.model import build_classifier


@pytest.fixture(scope="module")
def pcam_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("PCam200")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for label, name in enumerate(("normal", "tumor")):
            case = root / split / name / f"case_{split}"
            case.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (40, 40, 3)) + (150 if label else 60)
                Image.fromarray(img.astype(np.uint8)).save(case / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A resnet18 with non-trivial BN statistics, saved as MoCo would and converted by convert.py."""
    torch.manual_seed(3)
    enc = torchvision.models.resnet18(weights=None)
    enc.train()
    with torch.no_grad():
        enc(torch.randn(4, 3, 32, 32))  # move running stats away from 0/1
    d = tmp_path_factory.mktemp("bb")
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}},
               d / "moco.pth.tar")
    assert convert.main([str(d / "moco.pth.tar"), "--out", str(d / "backbone.pt")]) == 0
    return d / "backbone.pt", {k: v for k, v in enc.state_dict().items() if not k.startswith("fc.")}


def _cfg(root, out, *extra):
    return parse_config(FinetuneConfig, [
        "--data-root", str(root), "--output-dir", str(out), "--arch", "resnet18", "--epochs", "1", "--batch-size", "4",
        "--base-batch-size", "4", "--lr", "1e-3", "--image-size", "32", "--eval-crop", "36", "--num-workers", "0",
        "--eval-every", "0", "--log-every", "1", "--seed", "0", "--device", "cpu", *extra])


def test_convert_writes_plain_loadable_backbone(backbone_file):
    path, reference = backbone_file
    sd = load_file(path)
    assert sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)
    model = torchvision.models.resnet18(weights=None)
    result = model.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_linear_probe_leaves_backbone_and_bn_statistics_untouched(pcam_root, backbone_file, tmp_path):
    path, reference = backbone_file
    result = main(_cfg(pcam_root, tmp_path / "probe", "--backbone", str(path), "--linear-probe", "true"))
    assert result["steps"] == 4
    trained = load_file(tmp_path / "probe" / "last.pt")["model"]
    assert all(torch.equal(trained[k], reference[k]) for k in reference)  # weights and running stats
    dist.seed_everything(0)  # main's seed before it builds the model: the head's initial weights
    initial, _ = build_classifier("resnet18", 2, 0.4, str(path))
    assert not torch.equal(trained["fc.1.weight"], initial.fc[1].weight)  # only the head trained
    assert torch.isfinite(trained["fc.1.weight"]).all()


def test_full_finetune_moves_backbone_resumes_exactly_and_evaluates(pcam_root, backbone_file, tmp_path):
    path, reference = backbone_file
    straight = main(_cfg(pcam_root, tmp_path / "a", "--backbone", str(path), "--epochs", "2"))
    main(_cfg(pcam_root, tmp_path / "b", "--backbone", str(path), "--epochs", "1"))
    resumed = main(_cfg(pcam_root, tmp_path / "b", "--backbone", str(path), "--epochs", "2"))
    a, b = load_file(tmp_path / "a" / "last.pt"), load_file(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 8 and straight["steps"] == resumed["steps"] == 8
    assert_same_weights(a, b)  # resume = uninterrupted run
    assert not torch.equal(a["model"]["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    metrics = run_eval(EvalConfig(checkpoint=str(tmp_path / "a" / "best.pt"), split="test", num_workers=0, device="cpu"))
    assert metrics["n"] == 8 and metrics["confusion_matrix"] == straight["test"]["confusion_matrix"]
    assert metrics["acc"] == pytest.approx(straight["test"]["acc"])
    saved = json.loads((tmp_path / "a" / "eval_test" / "metrics.json").read_text())
    assert saved["auc"] == pytest.approx(metrics["auc"]) and (tmp_path / "a" / "eval_test" / "roc.png").stat().st_size > 1000


def test_a_run_stopped_by_max_updates_resumes_the_rest_of_its_epoch(pcam_root, tmp_path):
    """Stopped mid-epoch by --max-updates, last.pt records the epoch in progress (not the next one),
    so a resumed run finishes that epoch and equals the uninterrupted run."""
    main(_cfg(pcam_root, tmp_path / "a", "--epochs", "2"))
    main(_cfg(pcam_root, tmp_path / "b", "--epochs", "2", "--max-updates", "3"))  # 4 updates per epoch
    stopped = load_file(tmp_path / "b" / "last.pt")
    assert (stopped["epoch"], stopped["step"]) == (0, 3)
    main(_cfg(pcam_root, tmp_path / "b", "--epochs", "2"))
    a, b = load_file(tmp_path / "a" / "last.pt"), load_file(tmp_path / "b" / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 8)
    assert_same_weights(a, b)


def test_mismatched_backbone_is_refused(pcam_root, backbone_file, tmp_path):
    path, _ = backbone_file
    with pytest.raises(Exception, match="does not fit resnet50.*layer1.0.conv3.weight"):
        main(_cfg(pcam_root, tmp_path / "bad", "--backbone", str(path), "--arch", "resnet50"))


@pytest.mark.usefixtures("one_thread")  # on a busy machine one thread per test is the fastest
def test_finetuning_learns_what_the_untrained_model_cannot(pcam_root, tmp_path):
    """A random-init ResNet18 fine-tuned for 2 epochs (8 updates): the test accuracy (best.pt)
    beats the untrained model's (lr 0, same data) by at least 0.4. This seed, like seeds 1 and 2,
    goes from chance (0.5: one class for every patch) to 1.0."""
    untrained = main(_cfg(pcam_root, tmp_path / "untrained", "--lr", "0"))
    trained = main(_cfg(pcam_root, tmp_path / "trained", "--epochs", "2"))
    assert trained["test"]["acc"] >= untrained["test"]["acc"] + 0.4, (untrained["test"], trained["test"])
