"""Attention MIL (camelyon/mil.py, mil_model.py, mil_data.py) and the slide-level metrics it reports."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from camelyon.config import MILConfig
from camelyon.features import write_features
from camelyon.mil import epoch_order, load_mil_weights, my_share, run, train_fold
from camelyon.mil_data import FeatureBags, make_split, read_label_csv, slide_labels, stratified_folds
from camelyon.mil_model import CLAMSB, AttentionMIL, smooth_top1_svm
from common import dist
from common.errors import DataError
from common.metrics.classification import binary_metrics, bootstrap_ci

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- synthetic bags
def write_bags(folder: Path, n_train: int = 24, n_test: int = 12, dim: int = 32, tiles: int = 40, seed: int = 0,
               backbone: str = "toy", shift: float = 4.0) -> dict[str, int]:
    """Feature files whose tumour bags hide 3 tiles shifted along one direction; returns the labels."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    labels = {}
    names = [f"{'tumor' if i % 2 else 'normal'}_{i:03d}" for i in range(n_train)] + \
            [f"test_{i:03d}" for i in range(n_test)]
    for k, name in enumerate(names):
        label = int(name.startswith("tumor") or (name.startswith("test") and k % 2 == 1))
        x = rng.normal(size=(tiles, dim))
        if label:
            x[rng.choice(tiles, 3, replace=False)] += shift * direction
        coords = np.stack(np.meshgrid(np.arange(8) * 100, np.arange(5) * 100), -1).reshape(-1, 2)[:tiles]
        attrs = {"backbone": backbone, "weights_sha256": "abc", "embed_dim": dim, "tile_size_level0": 100.0,
                 "thumbnail_ratio": 25.0, "slide": f"{name}.tif"}
        write_features(folder / f"{name}.h5", x.astype(np.float16), coords.astype(np.int64),
                       np.full((20, 32, 3), 200, np.uint8), attrs)
        labels[name] = label
    return labels


def labels_csv(path: Path, labels: dict[str, int]) -> Path:
    path.write_text("slide,label\n" + "".join(f"{k},{'tumor' if v else 'normal'}\n" for k, v in labels.items()))
    return path


def small_cfg(tmp_path: Path, feats: Path, labels: Path, **kw) -> MILConfig:
    base = dict(features=str(feats), labels=str(labels), output_dir=str(tmp_path / "run"), folds=2, epochs=20,
                stop_epoch=10, patience=5, model="abmil", hidden=[32, 16], bootstrap=200, device="cpu",
                heatmaps=2, top_tiles=3, lr=3e-3)
    return MILConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("cls", [AttentionMIL, CLAMSB])
def test_attention_sums_to_one_and_is_invariant_to_tile_order(cls):
    torch.manual_seed(0)
    model = cls(24, (16, 8), dropout=0.0).eval()
    x = torch.randn(37, 24)
    perm = torch.randperm(37)
    a, b = model(x), model(x[perm])
    assert torch.allclose(a["attention"].sum(), torch.tensor(1.0), atol=1e-6)
    assert (a["attention"] > 0).all()
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5)
    assert torch.allclose(a["attention"][perm], b["attention"], atol=1e-6)


def test_smooth_top1_svm_matches_its_formula_by_hand():
    # x = (0, a): for target 1: log(1 + e^(1 - a)); for target 0: log(1 + e^(a + 1))  (alpha = tau = 1)
    a = 0.7
    logits = torch.tensor([[0.0, a], [0.0, a]])
    got = smooth_top1_svm(logits, torch.tensor([1, 0]))
    want = (math.log(1 + math.exp(1 - a)) + math.log(1 + math.exp(a + 1))) / 2
    assert got.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("inst_loss", ["ce", "svm"])
def test_clam_instance_loss_on_a_hand_built_bag(inst_loss):
    model = CLAMSB(4, (3, 2), dropout=0.0, k_sample=2, inst_loss=inst_loss)
    with torch.no_grad():  # the tumour class's instance classifier scores tile i as (0, h_i[0])
        model.instance_classifiers[1].weight.zero_()
        model.instance_classifiers[1].bias.zero_()
        model.instance_classifiers[1].weight[1, 0] = 1.0
    h = torch.tensor([[0.5, 0, 0], [2.0, 0, 0], [-1.0, 0, 0], [0.1, 0, 0], [3.0, 0, 0], [-2.0, 0, 0]])
    attention = torch.tensor([0.30, 0.05, 0.02, 0.13, 0.40, 0.10])
    # top-2 attended: tiles 4 (h0 = 3.0), 0 (0.5) -> target 1; bottom-2: tiles 2 (-1.0), 1 (2.0) -> target 0
    pos, neg = [3.0, 0.5], [-1.0, 2.0]
    if inst_loss == "ce":
        terms = [math.log(1 + math.exp(-v)) for v in pos] + [math.log(1 + math.exp(v)) for v in neg]
    else:
        terms = [math.log(1 + math.exp(1 - v)) for v in pos] + [math.log(1 + math.exp(v + 1)) for v in neg]
    got = model.instance_loss(attention, h, label=1)
    assert got.item() == pytest.approx(sum(terms) / 4, abs=1e-5)


def test_clam_total_loss_weights_bag_and_instance_losses():
    torch.manual_seed(1)
    model = CLAMSB(8, (6, 4), dropout=0.0, k_sample=2, bag_weight=0.7).eval()
    out = model(torch.randn(10, 8), torch.tensor(1))
    assert out["loss"].item() == pytest.approx(0.7 * out["bag_loss"].item() + 0.3 * out["instance_loss"].item(), rel=1e-5)


# ----------------------------------------------------------------------------- metrics
def test_binary_metrics_by_hand():
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.4, 0.6, 0.3, 0.7]
    m = binary_metrics(y, s)
    # pairs pos>neg: 0.9>0.3, 0.9>0.7, 0.4>0.3, 0.6>0.3 -> 4 of 6
    assert m["auc"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2) and m["acc"] == pytest.approx(3 / 5)


def test_bootstrap_ci_of_sensitivity_is_the_binomial_interval():
    # stratified resampling of 100 positives of which 80 are detected: sensitivity ~ Binomial(100, 0.8) / 100
    y = np.r_[np.ones(100), np.zeros(50)]
    s = np.r_[np.ones(80), np.zeros(20), np.zeros(50)]
    ci = bootstrap_ci(y, s, resamples=4000, seed=3)
    assert ci["sensitivity"][0] == pytest.approx(binom.ppf(0.025, 100, 0.8) / 100, abs=0.011)
    assert ci["sensitivity"][1] == pytest.approx(binom.ppf(0.975, 100, 0.8) / 100, abs=0.011)
    assert ci["specificity"] == (1.0, 1.0)


def test_bootstrap_ci_of_a_perfect_separation_is_a_point():
    ci = bootstrap_ci([0, 0, 1, 1, 1], [0.1, 0.2, 0.8, 0.9, 0.7], resamples=300)
    assert ci["auc"] == (1.0, 1.0)


# ----------------------------------------------------------------------------- labels and splits
def test_reference_csv_and_label_csv_and_annotations(tmp_path):
    ref = tmp_path / "reference.csv"
    ref.write_text("test_001,Tumor,IDC,Macro\ntest_002,Normal,None,None\nTest_003.tif,tumor,ILC,Micro\n")
    assert read_label_csv(ref, reference=True) == {"test_001": 1, "test_002": 0, "test_003": 1}
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "tumor_001.xml").write_text("<ASAP_Annotations/>")
    got = slide_labels(["tumor_001", "normal_001", "test_001", "test_002"], reference_csv=str(ref),
                       annotations=str(ann))
    assert got == {"tumor_001": 1, "normal_001": 0, "test_001": 1, "test_002": 0}


def test_label_errors_name_the_problem(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\na,1\nghost,0\n")
    with pytest.raises(DataError, match="ghost"):
        slide_labels(["a"], labels_csv=str(csv))
    csv.write_text("a,1\n")
    with pytest.raises(DataError, match="no label for 1 slide.*: b"):
        slide_labels(["a", "b"], labels_csv=str(csv))
    csv.write_text("a,maybe\n")
    with pytest.raises(DataError, match="maybe"):
        read_label_csv(csv)


def test_stratified_folds_partition_and_balance():
    labels = np.array([1] * 10 + [0] * 14)
    folds = stratified_folds(labels, 4, seed=5)
    assert sorted(np.concatenate(folds).tolist()) == list(range(24))
    for f in folds:
        assert labels[f].sum() in (2, 3) and (labels[f] == 0).sum() in (3, 4)
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(labels, 4, seed=5)]


def test_official_split_takes_test_slides_out_of_cross_validation():
    names = ["normal_001", "tumor_001", "normal_002", "tumor_002", "test_001", "test_002"]
    labels = np.array([0, 1, 0, 1, 1, 0])
    split = make_split(names, labels, "official", 2, 0)
    assert split.test.tolist() == [4, 5]
    for k in range(2):
        train, val = split.fold(k)
        assert not set(train) & set(val) and not set(val) & {4, 5}


def test_weighted_epoch_order_balances_classes_and_shares_cover_it():
    labels = np.array([1] * 5 + [0] * 45)
    draws = np.concatenate([epoch_order(labels, e, 0, weighted=True) for e in range(40)])
    assert labels[draws].mean() == pytest.approx(0.5, abs=0.05)  # unweighted would give 0.1
    order = epoch_order(labels, 3, 0, weighted=False)
    assert sorted(order.tolist()) == list(range(50))
    shares = [my_share(order[:7], r, 2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 4 and set(np.concatenate(shares)) == set(order[:7])


# ----------------------------------------------------------------------------- bags and backbones
def test_mixed_backbones_in_one_folder_are_an_error(tmp_path):
    write_bags(tmp_path, n_train=2, n_test=0, backbone="toy")
    (tmp_path / "other").mkdir()
    write_bags(tmp_path / "other", n_train=1, n_test=0, backbone="uni")
    os.replace(tmp_path / "other" / "normal_000.h5", tmp_path / "zz_other.h5")
    with pytest.raises(DataError, match="zz_other.h5.*uni.*one backbone"):
        FeatureBags(tmp_path)


def test_a_model_applied_to_features_of_another_backbone_is_an_error(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    labels = write_bags(feats, n_train=8, n_test=4)
    cfg = small_cfg(tmp_path, feats, labels_csv(tmp_path / "l.csv", labels), epochs=1)
    ctx = dist.setup("cpu")
    bags = FeatureBags(feats)
    split = make_split(bags.names, np.array([labels[n] for n in bags.names]), "official", 2, 0)
    model = train_fold(0, bags, np.array([labels[n] for n in bags.names]), split, cfg, ctx)
    with pytest.raises(DataError, match="trained on toy"):
        load_mil_weights(model, Path(cfg.output_dir) / "fold0" / "best.pt",
                         {"backbone": "uni", "weights_sha256": "ffff", "embed_dim": 32})


def test_continuing_a_run_on_features_of_another_backbone_is_an_error(tmp_path):
    for name, backbone in (("a", "toy"), ("b", "uni")):
        (tmp_path / name).mkdir()
        labels = write_bags(tmp_path / name, n_train=8, n_test=4, tiles=10, backbone=backbone)
    csv = labels_csv(tmp_path / "l.csv", labels)
    run(small_cfg(tmp_path, tmp_path / "a", csv, epochs=1, folds=2, heatmaps=0, bootstrap=0))
    with pytest.raises(DataError, match="fold0/last.pt: features from uni.*trained on toy"):
        run(small_cfg(tmp_path, tmp_path / "b", csv, epochs=2, folds=2, heatmaps=0, bootstrap=0))


# ----------------------------------------------------------------------------- training
def test_mil_learns_the_hidden_tiles_and_writes_its_report(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    labels = write_bags(feats)
    maps = tmp_path / "maps"
    maps.mkdir()
    for name, label in labels.items():  # a baseline that ranks exactly one tumour slide below a normal
        np.save(maps / f"{name}.npy", np.array([[0.2, 0.6 if label else 0.1]]))
    np.save(maps / "test_001.npy", np.array([[0.05]]))
    cfg = small_cfg(tmp_path, feats, labels_csv(tmp_path / "l.csv", labels), compare=["max-probability"],
                    maps=str(maps))
    result = run(cfg)
    assert result["ensemble_test"]["auc"] >= 0.9
    assert result["ensemble_test"]["auc_ci"][0] <= result["ensemble_test"]["auc"] <= result["ensemble_test"]["auc_ci"][1]
    # the baseline: 6 tumour x 6 normal test pairs, one tumour (test_001 at 0.05) below all 6 normals (0.1)
    assert result["max_probability_test"]["auc"] == pytest.approx(30 / 36)
    out = Path(cfg.output_dir)
    for name in ("result.json", "results.md", "roc.png", "fold0/best.pt", "fold1/last.pt", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "result.json").read_text())["ensemble_test"]["n"] == 12
    geo = json.loads((out / "heatmaps" / "test_001_top_tiles.geojson").read_text())
    assert len(geo["features"]) == 3
    atts = [f["properties"]["measurements"]["attention"] for f in geo["features"]]
    assert atts == sorted(atts, reverse=True) and atts[0] > 1 / 40
    assert (out / "heatmaps" / "test_001.png").is_file()


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    labels = write_bags(feats, n_train=10, n_test=4, tiles=20)
    csv = labels_csv(tmp_path / "l.csv", labels)
    ctx = dist.setup("cpu")
    bags = FeatureBags(feats)
    y = np.array([labels[n] for n in bags.names])
    split = make_split(bags.names, y, "official", 2, 0)

    def weights(cfg):
        torch.manual_seed(123)  # the global stream dropout draws from, as at a run's start
        train_fold(0, bags, y, split, cfg, ctx)
        return torch.load(Path(cfg.output_dir) / "fold0" / "last.pt", weights_only=True)["model"]

    kw = dict(model="clam_sb", dropout=0.25, patience=100, stop_epoch=100, k_sample=2)
    whole = weights(small_cfg(tmp_path / "a", feats, csv, epochs=6, **kw))
    weights(small_cfg(tmp_path / "b", feats, csv, epochs=3, **kw))
    resumed = weights(small_cfg(tmp_path / "b", feats, csv, epochs=6, **kw))
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_two_processes_train_and_report(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    labels = write_bags(feats, n_train=8, n_test=4, tiles=16)
    csv = labels_csv(tmp_path / "l.csv", labels)
    env = {**os.environ, "PATHMONO_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           str(REPO / "camelyon" / "mil.py"), "--features", str(feats), "--labels", str(csv), "--output-dir",
           str(tmp_path / "run"), "--folds", "2", "--epochs", "3", "--model", "clam_sb", "--k-sample", "2",
           "--hidden", "16", "8", "--bootstrap", "50", "--device", "cpu", "--heatmaps", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["ensemble_test"]["n"] == 4 and len(result["folds"]) == 2


def test_demo_preset_and_bad_flags_are_one_line_errors(tmp_path):
    env = {**os.environ, "PATHMONO_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "camelyon" / "mil.py"), "--features", str(tmp_path / "none")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert "no such features folder" in proc.stderr
