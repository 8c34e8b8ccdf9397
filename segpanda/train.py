"""Fine-tune a segmentation model on segPANDA200 (PatchTCGA's segPANDA branch).

    python segpanda/train.py --data-root datasets/segPANDA200                  # ImageNet ResNet50 backbone
    python segpanda/train.py --data-root datasets/segPANDA200 --pretrained moco_v2_ptcga.pth.tar
    python segpanda/train.py --model vit_upernet --backbone vit_large_patch16_224 --pretrained mae.pth
    python segpanda/train.py --demo                                       # synthetic tiles, ~10 min on CPU
    torchrun --nproc_per_node 4 segpanda/train.py --data-root ...         # DDP (or --hosts a b --gpus-per-node 4)

Workers decode whole tiles; on the device each tile is colour-jittered and blurred (image only),
then randomly cropped and flipped (replayed on the mask), normalised (PatchTCGA's order). Cross-entropy
(no ignore index by default), AdamW at lr * global_batch / 512: update 1 at lr, linear to the peak over
one epoch, then cosine + 1e-6 planned over all epochs (PatchTCGA's scheduler), clip 1.0, AMP; the run
stops after ``max_updates``. Validation every ``eval_every`` updates and at each epoch
end; ``best.pt`` keeps the best ``best_metric``, ``last.pt`` the latest (auto-resume, also mid-epoch);
at the end the test split is evaluated with ``best.pt`` and overlays are written.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.checkpoint import load_file, unwrap_model
from common.config import parse_config
from common.logging import MetricLogger, progress, report_step, start_run
from common.optim import patchtcga_scheduler, scaled_lr, split_decay_groups
from common.pretrained import IMAGENET, PretrainedError, apply_initialisation, resolve_initialisation
from common.stain import StainNormalizer, training_stain
from common.training import Checkpointer, TrainState, wrap_ddp, write_result
from common.errors import exit_on_user_error
from segpanda.config import TrainConfig
from segpanda.dataset import (SegPandaDataset, find_samples, sample_augment, train_transform,
                              validate_samples)
from segpanda.eval import evaluate, format_metrics, make_eval_loader
from segpanda.model import build_model, load_pretrained_backbone, load_segmentation_weights


# ============================================================================= builders
def build_train_loader(cfg: TrainConfig, ctx: dist.DistContext):
    samples = find_samples(cfg.data_root, "train")
    tile = None
    if ctx.is_main:  # fail now, not hours into an epoch
        tile = validate_samples(samples, cfg.num_classes, min_size=cfg.crop_size, uniform=True,
                                check_values=cfg.validate_values, workers=max(cfg.num_workers, 1))
    tile = dist.broadcast_object(tile)
    ds = SegPandaDataset(samples, cfg.num_classes)
    sampler = dist.make_sampler(ds, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
                        pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                        worker_init_fn=dist.worker_init_fn, generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))
    if len(loader) == 0:
        raise ValueError(f"{cfg.data_root}/train: {len(ds)} tiles give no full batch of {cfg.batch_size} per process")
    return loader, sampler, tuple(tile)


def build_model_for(cfg: TrainConfig, ctx: dist.DistContext) -> tuple[torch.nn.Module, str]:
    """The network with its initial weights (``--pretrained imagenet|none|PATH`` for the backbone,
    ``--init-checkpoint`` for the whole model) and a one-line record of them. Called before any data
    is read: a weights file that is missing, cannot be downloaded or does not fit stops the run with
    one line (common.pretrained)."""
    if cfg.pretrained == IMAGENET and cfg.backbone_layers and not cfg.init_checkpoint:
        raise PretrainedError(f"--pretrained imagenet: backbone {cfg.backbone} with --backbone-layers "
                              f"{cfg.backbone_layers} is not a standard ResNet; pass --pretrained none or PATH")
    init = resolve_initialisation(cfg.pretrained, cfg.init_checkpoint, cfg.backbone, ctx.local_rank)
    model = build_model(cfg)
    report = apply_initialisation(init, model, load_pretrained_backbone, load_segmentation_weights)
    if init.kind == "file":
        dist.print0(report)
    if ctx.distributed and ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, init.description


def segmentation_loss(out: dict[str, torch.Tensor], target: torch.Tensor, cfg: TrainConfig,
                      weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy on ``out`` (+ ``aux_weight`` x the auxiliary head's, torchvision references)."""
    kw = dict(weight=weight, ignore_index=cfg.ignore_index if cfg.ignore_index >= 0 else -100)
    loss = F.cross_entropy(out["out"].float(), target, **kw)
    if "aux" in out:
        loss = loss + cfg.aux_weight * F.cross_entropy(out["aux"].float(), target, **kw)
    return loss


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int, world_size: int):
    """AdamW (betas 0.9/0.999, eps 1e-8; no decay on biases and norms) at the peak lr
    lr * global batch / base_batch_size, with PatchTCGA's schedule (common.optim.patchtcga_lr): update 1
    at the unscaled lr, linear to the peak over ``warmup_epochs``, cosine + min_lr planned over all
    ``epochs``. Returns (optimizer, scheduler, last_step): the run stops after ``max_updates``."""
    peak = scaled_lr(cfg.lr, cfg.batch_size * world_size, cfg.base_batch_size)
    optimizer = torch.optim.AdamW(split_decay_groups(model, cfg.weight_decay), lr=peak, betas=(0.9, 0.999), eps=1e-8)
    scheduler = patchtcga_scheduler(optimizer, cfg.lr, peak, steps_per_epoch, cfg.epochs, cfg.warmup_epochs,
                                    floor=cfg.min_lr)
    total = steps_per_epoch * cfg.epochs
    return optimizer, scheduler, min(total, cfg.max_updates) if cfg.max_updates else total


def build_eval_loader(cfg: TrainConfig, ctx: dist.DistContext, split: str):
    return make_eval_loader(cfg.data_root, split, cfg.num_classes, cfg.val_crop_size,
                            cfg.val_batch_size or cfg.batch_size, cfg.num_workers, ctx, cfg.validate_values)


def prepare_demo_data(cfg: TrainConfig, ctx: dist.DistContext) -> None:
    from segpanda.demo import prepare_demo
    prepare_demo(cfg)


# ============================================================================= loops
def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, ctx, cfg: TrainConfig,
                    logger: MetricLogger, ckpt: Checkpointer, val_loader, tile: tuple[int, int],
                    steps_per_epoch: int, last_step: int, stain: StainNormalizer = StainNormalizer()) -> None:
    """One pass (or up to ``last_step``) over tiles stain normalised (``--stain-normalize``) and
    augmented; validates every ``eval_every`` updates and saves ``last.pt`` every ``checkpoint_every``."""
    model.train()
    weight = torch.tensor(cfg.class_weights, device=ctx.device) if cfg.class_weights else None
    epoch = state.epoch
    end = min((epoch + 1) * steps_per_epoch, last_step)
    bar = progress(total=end - epoch * steps_per_epoch, initial=state.steps_done(epoch, steps_per_epoch),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for images, masks in loader:
        if state.step >= end:
            break
        images, masks = stain(images.to(ctx.device, non_blocking=True)), masks.to(ctx.device, non_blocking=True)
        params = sample_augment(len(images), tile, cfg, make_generator(cfg.seed, ctx.rank, state.step))
        x, y = train_transform(images, masks, params, cfg, cfg.image_mean, cfg.image_std)
        if cfg.channels_last and ctx.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            out = model(x)
        loss = segmentation_loss(out, y, cfg, weight)
        grad_norm = amp.backward_step(loss, optimizer, model.parameters(), cfg.clip_norm)
        scheduler.step()
        state.step += 1
        report_step(bar, logger, state.step, epoch, cfg.log_every, loss=loss.item(), grad_norm=grad_norm,
                    lr=optimizer.param_groups[0]["lr"])
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            # not DDP: uneven shards
            validate(unwrap_model(model), val_loader, amp, state, ctx, cfg, logger, ckpt, stain)
            model.train()
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            ckpt.save(state)
    bar.close()


def validate(model, loader, amp, state: TrainState, ctx, cfg: TrainConfig, logger: MetricLogger,
             ckpt: Checkpointer, stain: StainNormalizer = StainNormalizer()) -> dict:
    """Validation metrics, logged; ``best.pt`` when ``best_metric`` beats the best so far."""
    metrics = evaluate(model, loader, amp, ctx, cfg.num_classes, cfg.crop_size, cfg.image_mean, cfg.image_std,
                       cfg.ignore_index, cfg.sw_batch_size, cfg.sw_overlap, desc="validate", stain=stain)
    logger.log(state.step, {k: v for k, v in metrics.items() if k != "confusion_matrix"}, prefix="val",
               epoch=state.epoch)
    dist.print0(f"step {state.step}: val mIoU {metrics['patchtcga_miou_macro']:.4f} (PatchTCGA macro) "
                f"{metrics['miou_macro_nan']:.4f} (nan-macro) pixel acc {metrics['pixel_accuracy']:.4f}")
    if state.improved(metrics[cfg.best_metric]):
        ckpt.save(state, "best.pt")
    return metrics


def final_test(model, loader, amp, state: TrainState, ctx, cfg: TrainConfig, logger: MetricLogger,
               out: Path, stain: StainNormalizer = StainNormalizer()) -> dict:
    """Evaluate ``best.pt`` (else the current weights) on the test split; overlays in ``out/overlays``."""
    best_path = out / "best.pt"
    if best_path.is_file():
        model.load_state_dict(load_file(best_path)["model"])
    metrics = evaluate(model, loader, amp, ctx, cfg.num_classes, cfg.crop_size, cfg.image_mean, cfg.image_std,
                       cfg.ignore_index, cfg.sw_batch_size, cfg.sw_overlap, overlay_dir=out / "overlays",
                       num_overlays=cfg.num_overlays, desc="test", stain=stain)
    logger.log(state.step, {k: v for k, v in metrics.items() if k != "confusion_matrix"}, prefix="test")
    if ctx.is_main:
        print(f"test ({len(loader.dataset)} tiles, {'best.pt' if best_path.is_file() else 'last weights'}):\n"
              f"{format_metrics(metrics)}\noverlays: {out / 'overlays'}")
    return {"test": metrics}


# ============================================================================= main
def main(cfg: TrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    stain, stain_state = training_stain(cfg)  # a bad --stain-target stops the run before anything else
    model, cfg.initialisation = build_model_for(cfg, ctx)  # first: a weights problem stops the run before any data
    if cfg.demo:
        prepare_demo_data(cfg, ctx)
    out = start_run(cfg, "segpanda train", ctx)
    dist.print0(f"initialisation: {cfg.initialisation}")
    train_loader, sampler, tile = build_train_loader(cfg, ctx)
    val_loader = build_eval_loader(cfg, ctx, "val")
    ddp = wrap_ddp(model, ctx)
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    optimizer, scheduler, last_step = build_optimizer(cfg, model, steps_per_epoch, ctx.world_size)
    amp = MixedPrecision(ctx.device, cfg.precision)

    state = TrainState()
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp,
                        extra=stain_state)
    ckpt.resume(state)
    logger = MetricLogger(out)
    for epoch in range(state.epoch, cfg.epochs):
        if state.step >= last_step:
            break
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        t0 = time.time()
        train_one_epoch(ddp, train_loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt, val_loader,
                        tile, steps_per_epoch, last_step, stain)
        just_validated = cfg.eval_every and state.step % cfg.eval_every == 0
        state.epoch = epoch + int(state.epoch_finished(epoch, steps_per_epoch))  # not when max_updates stopped it
        if not just_validated:
            validate(model, val_loader, amp, state, ctx, cfg, logger, ckpt, stain)
        ckpt.save(state)
        dist.print0(f"epoch {epoch + 1}/{cfg.epochs} done at step {state.step} [{time.time() - t0:.0f}s]")
    result = final_test(model, build_eval_loader(cfg, ctx, "test"), amp, state, ctx, cfg, logger, out, stain)
    result.update(best_val=state.best, run_dir=str(out))
    logger.close()
    write_result(out, result, ctx)
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(TrainConfig))
