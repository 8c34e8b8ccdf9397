"""Evaluate a fine-tuned checkpoint on one split: metrics JSON and ROC-curve PNG.

    python pretrain/eval.py --checkpoint runs/pcam200_finetune/best.pt --split test

The checkpoint's stored config gives the architecture, dataset and transforms. Writes
``metrics.json`` (accuracy, balanced accuracy, AUC, confusion matrix) and ``roc.png``.
``pretrain/finetune.py`` validates with :func:`evaluate` from here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.checkpoint import CheckpointError, load_file
from common.io import atomic_write_text
from common.config import config_from_dict, parse_config
from common.logging import progress
from common.metrics.classification import classification_metrics, roc_curve
from common.errors import exit_on_user_error
from common.stain import StainNormalizer, inference_stain, target_from_files
from pretrain.config import EvalConfig, FinetuneConfig
from pretrain.dataset import build_dataset, eval_transform, validate_dataset
from pretrain.model import build_classifier


@torch.no_grad()
def predict(model, loader, amp, ctx, cfg, stain: StainNormalizer = StainNormalizer()) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and labels (N,) of the whole split, gathered from all ranks;
    patches stain normalised when ``stain`` has a target."""
    model.eval()
    probs, labels = [], []
    for images, y in progress(loader, desc="evaluate"):
        x = eval_transform(stain(images.to(ctx.device, non_blocking=True)), cfg.image_size, cfg.eval_crop, cfg.mean,
                           cfg.std)
        with amp.autocast():
            probs.append(model(x).float().softmax(1).cpu())
        labels.append(torch.as_tensor(y))
    if probs:
        local = (torch.cat(probs).numpy(), torch.cat(labels).numpy())
    else:  # an empty shard
        local = (np.zeros((0, cfg.num_classes)), np.zeros(0))
    parts = dist.all_gather_object(local)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def evaluate(model, loader, amp, ctx, cfg, stain: StainNormalizer = StainNormalizer()) -> dict:
    """:func:`common.metrics.classification.classification_metrics` of the model on ``loader``."""
    return classification_metrics(*predict(model, loader, amp, ctx, cfg, stain))


def load_run(path: str) -> tuple[torch.nn.Module, FinetuneConfig]:
    state = load_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint of this project (needs 'model' and 'config')")
    run_cfg = config_from_dict(FinetuneConfig, {k: v for k, v in state["config"].items()
                                                if k in FinetuneConfig.__dataclass_fields__}, source=path)
    model, _ = build_classifier(run_cfg.arch, run_cfg.num_classes, run_cfg.dropout)
    model.load_state_dict(state["model"], strict=True)
    return model, run_cfg


def save_roc_png(probs: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for k in classes:
        if 0 < (labels == k).sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
            ax.plot(fpr, tpr, lw=1.5, label="tumor" if probs.shape[1] == 2 else f"class {k}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: EvalConfig) -> dict:
    ctx = dist.setup(cfg.device)
    target = target_from_files(cfg)  # a bad --stain-target stops here
    model, run_cfg = load_run(cfg.checkpoint)
    stain = inference_stain(cfg, target, cfg.checkpoint)
    model = model.to(ctx.device)
    ds = build_dataset(run_cfg.dataset, cfg.data_root or run_cfg.data_root, cfg.split, run_cfg.split_file, run_cfg.fold)
    validate_dataset(ds, f"{cfg.data_root or run_cfg.data_root} [{cfg.split}]")
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=dist.ShardSampler(len(ds)), num_workers=cfg.num_workers,
                        pin_memory=ctx.device.type == "cuda")
    probs, labels = predict(model, loader, MixedPrecision(ctx.device, cfg.precision), ctx, run_cfg, stain)
    metrics = classification_metrics(probs, labels)
    metrics.update(checkpoint=str(cfg.checkpoint), split=cfg.split)
    out = Path(cfg.output_dir or Path(cfg.checkpoint).parent / f"eval_{cfg.split}")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        save_roc_png(probs, labels, out / "roc.png", f"{cfg.split}: AUC {metrics['auc']:.3f}")
        print(f"{cfg.split}: acc {metrics['acc']:.4f} balanced acc {metrics['balanced_acc']:.4f} auc {metrics['auc']:.4f} "
              f"n {metrics['n']} -> {out}/metrics.json, roc.png")
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(run, parse_config(EvalConfig))
