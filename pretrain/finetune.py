"""Fine-tune a (self-supervised) backbone on PCam200 or PTCGA200 classification (PatchTCGA recipe).

    python pretrain/finetune.py --data-root datasets/PCam200 --backbone simclr/checkpoint.pth.tar
    python pretrain/finetune.py --data-root ... --backbone backbone.pt --linear-probe
    python pretrain/finetune.py --demo                       # synthetic PCam-like set, ResNet18, CPU
    torchrun --nproc_per_node 4 pretrain/finetune.py ...     # DDP (or --hosts a b --gpus-per-node 4)

ResNet50 (or a timm ViT) + Dropout(0.4) + Linear, cross-entropy, AdamW (no decay on biases and
norms), peak lr 1e-4 x global batch / 512; per update: the first at 1e-4, linear to the peak over 1
epoch, then cosine + 1e-6 planned over the 5 epochs (PatchTCGA's scheduler); clip 1.0, AMP; the run
stops after 1000 updates. Training crops are antialiased like the evaluation resize. Validation
every 200 updates and each epoch (accuracy, balanced accuracy, AUC, confusion matrix); ``best.pt``
by validation accuracy, ``last.pt`` (auto-resume, also mid-epoch); the test split is evaluated with
``best.pt`` at the end.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.checkpoint import find_resume, load_training_state, save_training_state_collective
from common.io import atomic_write_text
from common.config import parse_config
from common.logging import MetricLogger, progress, start_run
from common.metrics.classification import roc_auc
from common.optim import patchtcga_scheduler, scaled_lr, split_decay_groups
from pretrain.config import FinetuneConfig
from pretrain.dataset import build_dataset, eval_transform, train_transform, validate_dataset
from pretrain.model import assert_unchanged, backbone_snapshot, build_classifier, freeze_backbone, set_train_mode


def build_loaders(cfg: FinetuneConfig, ctx: dist.DistContext):
    sets = {s: build_dataset(cfg.dataset, cfg.data_root, s, cfg.split_file, cfg.fold) for s in ("train", "val", "test")}
    if cfg.max_eval_samples:
        sets.update({s: Subset(sets[s], range(min(cfg.max_eval_samples, len(sets[s])))) for s in ("val", "test")})
    for name, ds in sets.items():  # unreadable files fail now, not mid-epoch
        dist.print0(f"{name}: {len(ds)} patches, first {validate_dataset(ds, f'{cfg.data_root} [{name}]')}")
    sampler = dist.make_sampler(sets["train"], shuffle=True, seed=cfg.seed, drop_last=True)
    common = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn,
                  generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))
    train = DataLoader(sets["train"], batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    evals = {s: DataLoader(sets[s], batch_size=cfg.batch_size, sampler=dist.ShardSampler(len(sets[s])), **common)
             for s in ("val", "test")}
    return train, evals, sampler


def build_optimizer(cfg: FinetuneConfig, model, steps_per_epoch: int, world_size: int):
    """AdamW (betas 0.9/0.999, eps 1e-8; no decay on biases and norms) and PatchTCGA's schedule:
    update 1 at the unscaled lr, linear to the peak lr over ``warmup_epochs``, then cosine + min_lr
    planned over all ``epochs`` (common.optim.patchtcga_lr). Returns (optimizer, scheduler,
    last_step): the run stops after ``max_updates`` updates, wherever the cosine then is."""
    if cfg.linear_probe:
        freeze_backbone(model)
    groups = split_decay_groups(model, cfg.weight_decay)  # frozen parameters are skipped
    peak = scaled_lr(cfg.lr, cfg.batch_size * world_size, cfg.base_batch_size)
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-8)
    scheduler = patchtcga_scheduler(optimizer, cfg.lr, peak, steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                                    floor=cfg.min_lr)
    total = steps_per_epoch * cfg.epochs
    return optimizer, scheduler, min(total, cfg.max_updates) if cfg.max_updates else total


def train_step(model, images, labels, optimizer, scheduler, amp, cfg, ctx, step: int) -> float:
    x = train_transform(images.to(ctx.device, non_blocking=True), make_generator(cfg.seed, ctx.rank, step), cfg)
    if cfg.channels_last and ctx.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with amp.autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels.to(ctx.device, non_blocking=True))
    amp.backward_step(loss, optimizer, [p for p in model.parameters() if p.requires_grad], cfg.clip_norm)
    scheduler.step()
    return loss.item()


@torch.no_grad()
def predict(model, loader, amp, ctx, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and labels (N,) of the whole split, gathered from all ranks."""
    model.eval()
    probs, labels = [], []
    for images, y in progress(loader, desc="evaluate"):
        x = eval_transform(images.to(ctx.device, non_blocking=True), cfg.image_size, cfg.eval_crop, cfg.mean, cfg.std)
        with amp.autocast():
            probs.append(model(x).float().softmax(1).cpu())
        labels.append(torch.as_tensor(y))
    local = (torch.cat(probs).numpy(), torch.cat(labels).numpy()) if probs else (np.zeros((0, cfg.num_classes)), np.zeros(0))
    parts = dist.all_gather_object(local)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (mean recall over present classes), AUC (binary: tumour
    probability; multi-class: mean one-vs-rest) and the confusion matrix (rows = truth)."""
    c = probs.shape[1]
    pred = probs.argmax(1)
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    support = cm.sum(1)
    recall = np.diag(cm)[support > 0] / support[support > 0]
    aucs = [roc_auc(labels == k, probs[:, k]) for k in (range(c) if c > 2 else [1])]
    return {"acc": float((pred == labels).mean()) if len(labels) else float("nan"),
            "balanced_acc": float(recall.mean()) if len(recall) else float("nan"),
            "auc": float(np.nanmean(aucs)) if not all(np.isnan(aucs)) else float("nan"),
            "n": int(len(labels)), "confusion_matrix": cm.tolist()}


def evaluate(model, loader, amp, ctx, cfg) -> dict:
    return classification_metrics(*predict(model, loader, amp, ctx, cfg))


def demo_data(cfg: FinetuneConfig, ctx: dist.DistContext) -> None:
    from pretrain.demo import make_organ_like, make_pcam_like
    if ctx.is_main:
        (make_organ_like if cfg.dataset == "ptcga200" else make_pcam_like)(Path(cfg.data_root))
    dist.barrier()


def main(cfg: FinetuneConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    if cfg.demo:
        demo_data(cfg, ctx)
    out = start_run(cfg, "pretrain finetune", ctx)
    train_loader, eval_loaders, sampler = build_loaders(cfg, ctx)
    model, imported = build_classifier(cfg.arch, cfg.num_classes, cfg.dropout, cfg.backbone)
    if imported is not None:
        dist.print0(f"backbone {cfg.backbone}:\n{imported.report()}")
    steps_per_epoch = len(train_loader)
    optimizer, scheduler, total = build_optimizer(cfg, model, steps_per_epoch, ctx.world_size)
    frozen = backbone_snapshot(model) if cfg.linear_probe else None
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model
    amp = MixedPrecision(ctx.device, cfg.precision)
    state = {"step": 0, "best": -1.0}

    def save(epoch: int, name: str = "last.pt") -> None:
        save_training_state_collective(out / name, is_main=ctx.is_main, model=model, optimizer=optimizer,
                                       scheduler=scheduler, scaler=amp.scaler, epoch=epoch, step=state["step"],
                                       best_metric=state["best"], config=cfg.to_dict())

    def validate(epoch: int) -> dict:
        metrics = evaluate(model, eval_loaders["val"], amp, ctx, cfg)
        logger.log(state["step"], {k: v for k, v in metrics.items() if k != "confusion_matrix"}, prefix="val", epoch=epoch)
        dist.print0(f"step {state['step']}: val acc {metrics['acc']:.4f} bal {metrics['balanced_acc']:.4f} "
                    f"auc {metrics['auc']:.4f}")
        if metrics["acc"] > state["best"]:
            state["best"] = metrics["acc"]
            save(epoch, "best.pt")
        return metrics

    start_epoch = 0
    resume_path = find_resume(out) if cfg.resume else None
    if resume_path is not None:
        saved = load_training_state(resume_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=amp.scaler)
        state.update(step=saved["step"], best=saved["best_metric"] if saved["best_metric"] is not None else -1.0)
        start_epoch = saved["epoch"]
        dist.print0(f"resumed from {resume_path} at epoch {start_epoch}, step {state['step']}")
    logger = MetricLogger(out)
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        if state["step"] >= total:
            break
        sampler.set_epoch(epoch, skip=(state["step"] - epoch * steps_per_epoch) * cfg.batch_size)
        train_one_epoch(ddp, train_loader, optimizer, scheduler, amp, cfg, ctx, epoch, steps_per_epoch, total,
                        state, logger, save, validate)
        validate(epoch + 1)
        save(epoch + 1)
    if frozen is not None:
        assert_unchanged(model, frozen)
        dist.print0("linear probe: backbone weights and BN statistics unchanged")
    load_training_state(out / "best.pt", model=model, restore_rng=False)
    test = evaluate(model, eval_loaders["test"], amp, ctx, cfg)
    logger.log(state["step"], {k: v for k, v in test.items() if k != "confusion_matrix"}, prefix="test")
    logger.close()
    result = {"best_val_acc": state["best"], "test": test, "steps": state["step"], "seconds": time.time() - t0,
              "backbone": cfg.backbone or "random init", "run_dir": str(out)}
    if ctx.is_main:
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
        confusion = f" confusion {test['confusion_matrix']}" if cfg.num_classes <= 4 else ""
        print(f"test (best.pt): acc {test['acc']:.4f} balanced acc {test['balanced_acc']:.4f} "
              f"auc {test['auc']:.4f}{confusion}")
    dist.cleanup()
    return result


def train_one_epoch(model, loader, optimizer, scheduler, amp, cfg, ctx, epoch, steps_per_epoch, total,
                    state, logger, save, validate) -> None:
    set_train_mode(model, cfg.linear_probe)
    bar = progress(total=steps_per_epoch, initial=state["step"] - epoch * steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for images, labels in loader:
        if state["step"] >= min((epoch + 1) * steps_per_epoch, total):
            break
        loss = train_step(model, images, labels, optimizer, scheduler, amp, cfg, ctx, state["step"])
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if state["step"] % cfg.log_every == 0:
            logger.log(state["step"], {"loss": loss, "lr": optimizer.param_groups[0]["lr"]}, prefix="train", epoch=epoch)
        if cfg.eval_every and state["step"] % cfg.eval_every == 0:
            validate(epoch)
            set_train_mode(model, cfg.linear_probe)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            save(epoch)
    bar.close()


if __name__ == "__main__":
    dist.launch(main, parse_config(FinetuneConfig))
