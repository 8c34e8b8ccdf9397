"""pretrain.knn (weighted k-NN on frozen features) and the synthetic SSL set (pretrain.synthetic, ssl_demo.py).

k-NN answers are computed by hand on 2-D unit vectors, and checked against an independent loop
implementation; extraction is checked against hand-computable features, in dataset order, and a
2-process gloo run must give the single-process result bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from common import dist
from common_testutils import run_workers
from pretrain import ssl_demo, synthetic
from pretrain.dataset import ORGAN2ID, PatchDataset, ptcga_items
from pretrain.knn import extract_features, knn_accuracy, knn_predict


def unit(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1).float()  # (N, 2)


# ============================================================================= knn_predict by hand
# train: class 0 at 0 deg (sim 1 to the query at 0 deg), class 1 at +-36.87 deg (sim 0.8), class 2 at 180 deg
TRAIN = unit(0.0, math.degrees(math.acos(0.8)), -math.degrees(math.acos(0.8)), 180.0)
TRAIN_LABELS = torch.tensor([0, 1, 1, 2])


def test_weighted_vote_beats_majority_below_the_hand_computed_temperature():
    # k=3 neighbours: one class-0 at sim 1, two class-1 at sim 0.8. Class 0 wins iff
    # exp(1/T) > 2 exp(0.8/T)  <=>  T < 0.2 / ln 2 = 0.2885; the majority vote says class 1.
    query = unit(0.0)
    assert knn_predict(TRAIN, TRAIN_LABELS, query, 3, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(TRAIN, TRAIN_LABELS, query, 3, k=3, temperature=0.28).tolist() == [0]
    assert knn_predict(TRAIN, TRAIN_LABELS, query, 3, k=3, temperature=0.30).tolist() == [1]
    assert knn_predict(TRAIN, TRAIN_LABELS, query, 3, k=1).tolist() == [0]


def test_k_larger_than_train_set_is_clamped():
    # all 4 train points vote; the query at 180 deg: class 2 sim 1, class 1 sim -0.8 (x2), class 0 sim -1
    queries = unit(180.0, 0.0)
    assert knn_predict(TRAIN, TRAIN_LABELS, queries, 3, k=50).tolist() == [2, 0]
    result = knn_accuracy(TRAIN, TRAIN_LABELS, queries, torch.tensor([2, 1]), 3, k=50)
    assert result == {"top1": 0.5, "k": 4, "n_train": 4, "n_test": 2}


def test_tied_class_scores_go_to_the_lower_class_index():
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8]])  # both at sim 0.6 from (1, 0)
    assert knn_predict(train, torch.tensor([1, 0]), torch.tensor([[1.0, 0.0]]), 2, k=2).tolist() == [0]


def reference_knn(train, labels, test, num_classes, k, temperature):
    """Plain-python DINO vote, independent of the vectorised implementation."""
    preds = []
    for q in test.double().tolist():
        sims = sorted(((sum(a * b for a, b in zip(q, t)), int(y)) for t, y in zip(train.double().tolist(), labels)),
                      reverse=True)[:k]
        scores = [0.0] * num_classes
        for sim, y in sims:
            scores[y] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return preds


def test_matches_a_plain_loop_and_chunking_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(120, 6, generator=gen), dim=1)
    test = torch.nn.functional.normalize(torch.randn(37, 6, generator=gen), dim=1)
    labels = torch.randint(0, 4, (120,), generator=gen)
    full = knn_predict(train, labels, test, 4, k=7, temperature=0.1, chunk=10_000)
    assert full.tolist() == reference_knn(train, labels, test, 4, 7, 0.1)
    for chunk in (1, 5, 36, 37):
        assert torch.equal(knn_predict(train, labels, test, 4, k=7, temperature=0.1, chunk=chunk), full)


def test_bad_inputs_are_refused_with_the_problem_named():
    with pytest.raises(ValueError, match="equal D"):
        knn_predict(TRAIN, TRAIN_LABELS, torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match=r"outside \[0, num_classes=2\)"):
        knn_predict(TRAIN, TRAIN_LABELS, unit(0.0), 2)
    with pytest.raises(ValueError, match=r"\(3,\) train labels for 4 train features"):
        knn_predict(TRAIN, TRAIN_LABELS[:3], unit(0.0), 3)


# ============================================================================= extract_features
class ConstantImages(Dataset):
    """Item i: a 4x4 uint8 image whose channels are the constants (i + 1, 2, 3 * (i % 3)), label 10 + i."""

    def __init__(self, n: int, with_index: bool = False):
        self.n, self.with_index = n, with_index

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        image = torch.tensor([i + 1, 2, 3 * (i % 3)], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).clone()
        return (image, 10 + i, i) if self.with_index else (image, 10 + i)


def expected_features(n: int) -> torch.Tensor:
    raw = torch.tensor([[i + 1, 2, 3 * (i % 3)] for i in range(n)], dtype=torch.float32)
    return raw / raw.norm(dim=1, keepdim=True)


class ChannelMeans(nn.Module):
    """Features = per-channel means (hand-computable); records the mode it ran in."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return x.mean((2, 3)) * self.scale  # (B, 3)


def to_float(x: torch.Tensor) -> torch.Tensor:
    assert x.dtype == torch.uint8  # the transform gets the raw batch
    return x.float()


def test_extract_features_in_dataset_order_normalised_and_mode_restored():
    model = ChannelMeans().train()
    feats, labels = extract_features(model, DataLoader(ConstantImages(7), batch_size=3), "cpu", to_float)
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(feats, expected_features(7))
    assert labels.tolist() == list(range(10, 17))
    assert model.modes == [False] * 3 and model.training


def test_extract_features_reorders_shuffled_batches_by_their_indices():
    loader = DataLoader(ConstantImages(9, with_index=True), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    assert [int(i) for b in loader for i in b[2]] != list(range(9))  # really shuffled
    feats, labels = extract_features(ChannelMeans(), loader, "cpu", to_float)
    torch.testing.assert_close(feats, expected_features(9))
    assert labels.tolist() == list(range(10, 19))
    with pytest.raises(ValueError, match="neither sequential nor a ShardSampler"):
        extract_features(ChannelMeans(), DataLoader(ConstantImages(4), sampler=RandomSampler(range(4))), "cpu", to_float)


def test_extract_features_casts_autocast_output_to_float32():
    feats, _ = extract_features(ChannelMeans(), DataLoader(ConstantImages(5), batch_size=2), "cpu", to_float,
                                autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, expected_features(5), atol=1e-2, rtol=1e-2)


def _two_process_worker(ctx, out_dir):
    results = {}
    for n in (7, 1):  # 7: shares of 4 and 3; 1: rank 1 extracts nothing
        loader = DataLoader(ConstantImages(n), batch_size=2, sampler=dist.ShardSampler(n))
        results[n] = extract_features(ChannelMeans(), loader, ctx.device, to_float)
    torch.save(results, f"{out_dir}/rank{ctx.rank}.pt")


def test_two_processes_give_the_single_process_features(tmp_path):
    run_workers(_two_process_worker, 2, str(tmp_path))
    for n in (7, 1):
        single = extract_features(ChannelMeans(), DataLoader(ConstantImages(n), batch_size=2), "cpu", to_float)
        for rank in (0, 1):
            feats, labels = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[n]
            assert torch.equal(feats, single[0]) and torch.equal(labels, single[1])


# ============================================================================= synthetic SSL set
def test_ssl_demo_layout_labels_splits_and_regeneration(tmp_path, capsys):
    root = synthetic.make_ssl_demo(tmp_path, per_class=7, size=48, seed=3).root
    split_file = root / synthetic.SPLIT_FILE
    parts = {s: ptcga_items(root / "PTCGA200", s, split_file) for s in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [5 * 6, 1 * 6, 1 * 6]  # i < 4.9 train, i < 5.95 val, rest test
    assert {label for items in parts.values() for _, label in items} == {ORGAN2ID[o] for o in synthetic.PAINTERS}
    assert len({ORGAN2ID[o] for o in synthetic.PAINTERS}) == len(synthetic.PAINTERS) >= 5
    image, label = PatchDataset(parts["train"])[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and image.float().std() > 10

    first = root / "PTCGA200" / "colon" / "colon_0.png"
    stamp = first.stat().st_mtime_ns
    assert not synthetic.make_ssl_demo(tmp_path, per_class=7, size=48, seed=3).built
    assert first.stat().st_mtime_ns == stamp  # same parameters: reused as it is

    ssl_demo.main(["--root", str(tmp_path), "--per-class", "6", "--size", "48", "--seed", "3"])
    assert "total 36 images" in capsys.readouterr().out
    assert not (root / "PTCGA200" / "colon" / "colon_6.png").exists()  # other parameters: regenerated


def test_ssl_patches_are_reproducible_and_colour_is_drawn_per_image():
    a = synthetic.ssl_patch(np.random.default_rng(0), "thyroid", 64)
    assert np.array_equal(a, synthetic.ssl_patch(np.random.default_rng(0), "thyroid", 64))
    # one fixed morphology rendered twice: the appearance differs although the class is the same
    rng = np.random.default_rng(1)
    haematoxylin, eosin = synthetic.paint_liver(rng, 64, 64 / 96)
    one, two = synthetic.render(rng, haematoxylin, eosin), synthetic.render(rng, haematoxylin, eosin)
    assert np.abs(one.reshape(-1, 3).mean(0) - two.reshape(-1, 3).mean(0)).max() > 3
    with pytest.raises(ValueError, match="unknown synthetic organ 'kidney'"):
        synthetic.ssl_patch(rng, "kidney")
