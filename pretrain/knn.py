"""Weighted k-NN evaluation of frozen features: the running quality signal of self-supervised
pretraining (DINO's ``eval_knn``, Wu et al. 2018 / Caron et al. 2021).

1. :func:`extract_features` runs a backbone over a loader and returns L2-normalised float32
   features with their labels, in dataset order. In a distributed run every process extracts
   its share (a :class:`common.dist.ShardSampler` loader, no padding) and the shares are gathered
   on every process, so the result equals the single-process one.
2. :func:`knn_predict` lets each test feature's ``k`` most cosine-similar train features vote
   for their class with weight ``exp(similarity / T)``; the class with the largest summed
   weight wins. :func:`knn_accuracy` wraps it into a top-1 accuracy (a fraction in [0, 1]).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler

from common import dist
from common.logging import progress


# ============================================================================= feature extraction
def _loader_indices(loader: DataLoader) -> list[int] | None:
    """Dataset indices in the order a deterministic loader yields them, or None when unknown."""
    sampler = loader.sampler
    if isinstance(sampler, (dist.ShardSampler, SequentialSampler)) and loader.batch_sampler is not None:
        return [i for batch in loader.batch_sampler for i in batch]
    return None


def _split_batch(batch, position: int, sampler_indices: list[int] | None) -> tuple:
    """``(images, labels)`` or ``(images, labels, indices)`` -> ``(images, labels, indices)``."""
    if len(batch) == 3:
        images, labels, indices = batch
        return images, torch.as_tensor(labels), torch.as_tensor(indices)
    if len(batch) != 2:
        raise ValueError(f"extract_features: a batch must be (images, labels[, indices]); got {len(batch)} items")
    images, labels = batch
    if sampler_indices is None:
        raise ValueError("extract_features: the loader's sampler is neither sequential nor a ShardSampler and "
                         "its batches carry no indices; yield (images, labels, indices) or use ShardSampler")
    return images, torch.as_tensor(labels), torch.tensor(sampler_indices[position:position + len(images)])


def _gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate each process's rows (``counts[r]`` of them) in rank order: pad to the largest
    share, one ``all_gather`` on the tensor's device, drop the padding."""
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = dist.all_gather_tensor(padded)  # (world * longest, ...)
    return torch.cat([gathered[r * longest:r * longest + n] for r, n in enumerate(counts)])


def _gather_shares(feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, device: torch.device):
    """Every process's (features, labels, indices) -> all of them, sorted by dataset index."""
    shapes = dist.all_gather_object((len(feats), feats.shape[1] if feats.ndim == 2 else -1))
    counts, dim = [n for n, _ in shapes], max(d for _, d in shapes)
    if sum(counts) == 0:
        raise ValueError("extract_features: the loader yielded no samples on any process")
    if feats.ndim != 2:  # this process had nothing to extract
        feats = torch.zeros((0, dim), device=device)
    distributed = dist.get_world_size() > 1
    if distributed:
        feats = _gather_rows(feats.to(device), counts)
        labels = _gather_rows(labels.to(device), counts)
        indices = _gather_rows(indices.to(device), counts)
    order = indices.argsort()
    indices = indices[order]
    if len(indices) > 1 and bool((indices[1:] == indices[:-1]).any()):
        where = "over processes " if distributed else ""
        raise ValueError(f"extract_features: some dataset indices were extracted twice {where}(a padding "
                         "DistributedSampler?); use common.dist.ShardSampler for evaluation")
    return feats[order], labels[order]


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device | str,
                     transform: Callable[[torch.Tensor], torch.Tensor], *,
                     autocast: Callable[[], ContextManager] | None = None,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 features (N, D) and int64 labels (N,) of the loader's dataset, on
    ``device``, ordered by dataset index and identical on every process.

    The loader yields ``(uint8 (B, 3, H, W), labels)`` (sequential or ShardSampler order) or
    ``(images, labels, indices)``. ``transform(x_uint8_on_device)`` returns the float batch;
    ``autocast`` (e.g. ``MixedPrecision.autocast``) wraps the forward pass, whose output is cast
    to float32 before normalising. The backbone runs in eval mode and gets its mode back after.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    sampler_indices = _loader_indices(loader)
    feats, labels, indices, seen = [], [], [], 0
    try:
        for batch in progress(loader, desc=desc):
            images, y, idx = _split_batch(batch, seen, sampler_indices)
            seen += len(images)
            with (autocast or contextlib.nullcontext)():
                out = backbone(transform(images.to(device, non_blocking=True)))
            feats.append(F.normalize(out.float().flatten(1), dim=1))  # (B, D)
            labels.append(y.to(device, torch.int64, non_blocking=True))
            indices.append(idx.to(device, torch.int64, non_blocking=True))
    finally:
        backbone.train(was_training)
    if feats:
        local = torch.cat(feats), torch.cat(labels), torch.cat(indices)
    else:
        local = (torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device),
                 torch.zeros(0, dtype=torch.int64, device=device))
    return _gather_shares(*local, device)


# ============================================================================= weighted vote
def _check_knn_inputs(train_feats, train_labels, test_feats, num_classes: int, k: int, temperature: float) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"knn: features must be (N, D) with equal D; got train {tuple(train_feats.shape)}, "
                         f"test {tuple(test_feats.shape)}")
    if len(train_feats) == 0:
        raise ValueError("knn: the train memory bank is empty")
    if train_labels.shape != (len(train_feats),):
        raise ValueError(f"knn: {tuple(train_labels.shape)} train labels for {len(train_feats)} train features")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: k must be >= 1 and temperature > 0; got k={k}, temperature={temperature}")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"knn: train labels span [{int(train_labels.min())}, {int(train_labels.max())}], "
                         f"outside [0, num_classes={num_classes})")


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN class predictions (int64 (N_test,), on the train features' device).

    Features are assumed L2-normalised, so the dot product is the cosine similarity. Each test
    feature's ``k`` nearest train features (``k`` clamped to the train-set size) vote with
    weight ``exp(sim / T)``; per-class weights are summed and the argmax (lowest class index on
    a tie) is the prediction. The weights are computed as ``exp((sim - max_sim) / T)``, which
    scales every class score of a row by the same factor (same argmax, no overflow at small T).
    The test set is processed ``chunk`` rows at a time: memory O(chunk * N_train).
    """
    _check_knn_inputs(train_feats, train_labels, test_feats, num_classes, k, temperature)
    k = min(k, len(train_feats))
    device = train_feats.device
    train_labels = train_labels.to(device, torch.int64)
    preds = []
    for start in range(0, len(test_feats), max(int(chunk), 1)):
        queries = test_feats[start:start + chunk].to(device, train_feats.dtype)
        sims, neighbours = (queries @ train_feats.T).topk(k, dim=1)  # (B, k) each, most similar first
        weights = ((sims - sims[:, :1]) / temperature).exp()
        scores = torch.zeros(len(queries), num_classes, device=device, dtype=weights.dtype)
        scores.scatter_add_(1, train_labels[neighbours], weights)  # (B, num_classes)
        preds.append(scores.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=device)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> dict:
    """``{'top1': fraction correct in [0, 1], 'k': k used (clamped), 'n_train', 'n_test'}``."""
    if test_labels.shape != (len(test_feats),):
        raise ValueError(f"knn: {tuple(test_labels.shape)} test labels for {len(test_feats)} test features")
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk)
    correct = (pred.cpu() == test_labels.cpu().to(torch.int64)).sum().item()
    return {"top1": correct / len(test_feats) if len(test_feats) else float("nan"),
            "k": min(k, len(train_feats)), "n_train": len(train_feats), "n_test": len(test_feats)}
