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

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.checkpoint import load_training_state, unwrap_model
from common.config import parse_config
from common.logging import MetricLogger, progress, report_step, start_run
from common.optim import patchtcga_scheduler, scaled_lr, split_decay_groups
from common.stain import HEDAugment, StainNormalizer, training_stain
from common.training import Checkpointer, TrainState, wrap_ddp, write_result
from common.errors import exit_on_user_error
from pretrain.config import FinetuneConfig
from pretrain.dataset import build_dataset, train_transform, validate_dataset
from pretrain.eval import evaluate
from pretrain.model import assert_unchanged, backbone_snapshot, build_classifier, freeze_backbone, set_train_mode


# ============================================================================= builders
def build_loaders(cfg: FinetuneConfig, ctx: dist.DistContext):
    sets = {s: build_dataset(cfg.dataset, cfg.data_root, s, cfg.split_file, cfg.fold) for s in ("train", "val", "test")}
    if cfg.max_eval_samples:
        sets.update({s: Subset(sets[s], range(min(cfg.max_eval_samples, len(sets[s])))) for s in ("val", "test")})
    for name, ds in sets.items():  # unreadable files fail now, not mid-epoch
        dist.print0(f"{name}: {len(ds)} patches, first {validate_dataset(ds, f'{cfg.data_root} [{name}]')}")
    sampler = dist.make_sampler(sets["train"], shuffle=True, seed=cfg.seed, drop_last=True)
    loader_args = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                       persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn,
                       generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))
    train = DataLoader(sets["train"], batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **loader_args)
    evals = {s: DataLoader(sets[s], batch_size=cfg.batch_size, sampler=dist.ShardSampler(len(sets[s])), **loader_args)
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


def demo_data(cfg: FinetuneConfig, ctx: dist.DistContext) -> None:
    from pretrain.synthetic import prepare_finetune_demo
    prepare_finetune_demo(cfg)


# ============================================================================= loops
def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, ctx, cfg: FinetuneConfig,
                    logger: MetricLogger, ckpt: Checkpointer, val_loader, steps_per_epoch: int,
                    last_step: int, stain: StainNormalizer = StainNormalizer()) -> None:
    """One pass (or up to ``last_step``) over patches stain normalised (``--stain-normalize``) and
    augmented; validates every ``eval_every`` updates and saves ``last.pt`` every ``checkpoint_every``."""
    set_train_mode(model, cfg.linear_probe)
    epoch = state.epoch
    end = min((epoch + 1) * steps_per_epoch, last_step)
    trained = [p for p in model.parameters() if p.requires_grad]
    hed = HEDAugment.from_config(cfg)
    bar = progress(total=steps_per_epoch, initial=state.steps_done(epoch, steps_per_epoch),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for images, labels in loader:
        if state.step >= end:
            break
        images = stain(images.to(ctx.device, non_blocking=True))
        x = train_transform(images, make_generator(cfg.seed, ctx.rank, state.step), cfg, hed)
        if cfg.channels_last and ctx.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels.to(ctx.device, non_blocking=True))
        amp.backward_step(loss, optimizer, trained, cfg.clip_norm)
        scheduler.step()
        state.step += 1
        report_step(bar, logger, state.step, epoch, cfg.log_every, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            # not DDP: uneven shards
            validate(unwrap_model(model), val_loader, amp, state, ctx, cfg, logger, ckpt, stain)
            set_train_mode(model, cfg.linear_probe)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            ckpt.save(state)
    bar.close()


def validate(model, loader, amp, state: TrainState, ctx, cfg: FinetuneConfig, logger: MetricLogger,
             ckpt: Checkpointer, stain: StainNormalizer = StainNormalizer()) -> dict:
    """Validation metrics, logged; ``best.pt`` when the accuracy beats the best so far."""
    metrics = evaluate(model, loader, amp, ctx, cfg, stain)
    logger.log(state.step, {k: v for k, v in metrics.items() if k != "confusion_matrix"}, prefix="val",
               epoch=state.epoch)
    dist.print0(f"step {state.step}: val acc {metrics['acc']:.4f} bal {metrics['balanced_acc']:.4f} "
                f"auc {metrics['auc']:.4f}")
    if state.improved(metrics["acc"]):
        ckpt.save(state, "best.pt")
    return metrics


def final_test(model, loader, amp, state: TrainState, ctx, cfg: FinetuneConfig, logger: MetricLogger,
              out: Path, stain: StainNormalizer = StainNormalizer()) -> dict:
    """The test split with the weights of ``best.pt``."""
    load_training_state(out / "best.pt", model=model, restore_rng=False)
    test = evaluate(model, loader, amp, ctx, cfg, stain)
    logger.log(state.step, {k: v for k, v in test.items() if k != "confusion_matrix"}, prefix="test")
    if ctx.is_main:
        confusion = f" confusion {test['confusion_matrix']}" if cfg.num_classes <= 4 else ""
        print(f"test (best.pt): acc {test['acc']:.4f} balanced acc {test['balanced_acc']:.4f} "
              f"auc {test['auc']:.4f}{confusion}")
    return test


# ============================================================================= main
def main(cfg: FinetuneConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    stain, stain_state = training_stain(cfg)  # a bad --stain-target stops the run before anything else
    if cfg.demo:
        demo_data(cfg, ctx)
    out = start_run(cfg, "pretrain finetune", ctx)
    train_loader, eval_loaders, sampler = build_loaders(cfg, ctx)
    model, imported = build_classifier(cfg.arch, cfg.num_classes, cfg.dropout, cfg.backbone)
    if imported is not None:
        dist.print0(f"backbone {cfg.backbone}:\n{imported.report()}")
    steps_per_epoch = len(train_loader)
    optimizer, scheduler, last_step = build_optimizer(cfg, model, steps_per_epoch, ctx.world_size)
    frozen = backbone_snapshot(model) if cfg.linear_probe else None
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = wrap_ddp(model, ctx)
    amp = MixedPrecision(ctx.device, cfg.precision)

    state = TrainState()
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp,
                        extra=stain_state)
    ckpt.resume(state)
    logger = MetricLogger(out)
    t0 = time.time()
    for epoch in range(state.epoch, cfg.epochs):
        if state.step >= last_step:
            break
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        train_one_epoch(ddp, train_loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt,
                        eval_loaders["val"], steps_per_epoch, last_step, stain)
        state.epoch = epoch + int(state.epoch_finished(epoch, steps_per_epoch))  # not when max_updates stopped it
        validate(model, eval_loaders["val"], amp, state, ctx, cfg, logger, ckpt, stain)
        ckpt.save(state)
    if frozen is not None:
        assert_unchanged(model, frozen)
        dist.print0("linear probe: backbone weights and BN statistics unchanged")
    test = final_test(model, eval_loaders["test"], amp, state, ctx, cfg, logger, out, stain)
    logger.close()
    result = {"best_val_acc": state.best, "test": test, "steps": state.step, "seconds": time.time() - t0,
              "backbone": cfg.backbone or "random init", "run_dir": str(out)}
    write_result(out, result, ctx)
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(FinetuneConfig))
