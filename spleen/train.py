"""Train the spleen CT segmentation UNet (MONAI spleen_ct_segmentation recipe).

    python spleen/train.py --data-root /data/Task09_Spleen            # MSD layout, bundle split 32/9
    python spleen/train.py --demo                                      # synthetic CT, ~10 min on 2 CPU cores
    torchrun --nproc_per_node 8 spleen/train.py --data-root ...        # DDP (or --hosts a b --gpus-per-node 8)

Volumes are preprocessed once into a cache (RAS, 1.5 x 1.5 x 2 mm, HU window); every step takes
4 random 96^3 crops from each of 2 volumes (foreground/background centres 1:1), i.e. 8 patches,
through the residual UNet with DiceCE loss, Novograd lr 2e-3 and AMP. Validation every epoch:
sliding-window inference (96^3, overlap 0.5) on the whole volumes and mean spleen Dice in the
resampled space. ``best.pt`` / ``model.pt`` (bundle format) keep the best, ``last.pt`` the latest
(auto-resume, also mid-epoch).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator, sample_flags
from common.config import parse_config
from common.errors import exit_on_user_error
from common.io import atomic_torch_save
from common.logging import AverageMeter, MetricLogger, progress, report_step, start_run
from common.metrics.dice import DiceAccumulator
from common.optim import FunctionScheduler, Novograd
from common.training import Checkpointer, TrainState, wrap_ddp, write_result
from spleen.config import EvalConfig, InferConfig, TrainConfig
from spleen.dataset import (CropDataset, EpochSampler, VolumeDataset, build_cache, check_crop_fits, split_cases,
                            validate_cases)
from spleen.demo import prepare_demo
from spleen.eval import evaluate_predictions, print_report
from spleen.infer import infer_all
from spleen.model import DiceCELoss, build_model, load_unet_weights, predict_logits


def build_loaders(cfg: TrainConfig, ctx: dist.DistContext):
    train_cases, val_cases = split_cases(cfg.data_root, cfg.data_list, cfg.val_count)
    if ctx.is_main:  # fail now, naming the file, not hours into an epoch
        validate_cases(train_cases + val_cases)
    dist.barrier()
    cache_dir = cfg.cache_dir or Path(cfg.output_dir) / "cache"
    cached = build_cache(train_cases + val_cases, cache_dir, cfg.pixdim, cfg.hu_range)
    check_crop_fits(cached[:len(train_cases)], cfg.roi_size)
    train_ds = CropDataset(cached[:len(train_cases)], cfg.roi_size, cfg.num_samples, cfg.pos, cfg.neg, cfg.seed)
    val_ds = VolumeDataset(cached[len(train_cases):])
    sampler = EpochSampler(dist.make_sampler(train_ds, shuffle=True, seed=cfg.seed))
    loader_kwargs = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                         worker_init_fn=dist.worker_init_fn)
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                       persistent_workers=cfg.num_workers > 0, **loader_kwargs)
    val = DataLoader(val_ds, batch_size=1, sampler=dist.ShardSampler(len(val_ds)), **loader_kwargs)
    return train, val, sampler


def build_model_for(cfg: TrainConfig, ctx: dist.DistContext) -> torch.nn.Module:
    model = build_model(cfg.channels, cfg.strides, cfg.num_res_units)
    if cfg.init_checkpoint:
        load_unet_weights(model, cfg.init_checkpoint)
    if cfg.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    return model.to(memory_format=torch.channels_last_3d) if cfg.channels_last else model


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> tuple[Novograd, FunctionScheduler]:
    """Novograd and StepLR(step_size, gamma) stepped once per epoch (spleen.md §6; constant 2e-3
    within the bundle's 800 epochs)."""
    optimizer = Novograd(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = FunctionScheduler(optimizer, lambda e: cfg.lr * cfg.lr_gamma ** (e // cfg.lr_step_size))
    return optimizer, scheduler


def shift_intensity(x: torch.Tensor, offset: float, prob: float, gen: torch.Generator) -> torch.Tensor:
    """RandShiftIntensity per crop: add U(-offset, offset) with probability ``prob``."""
    if offset <= 0:
        return x
    flags = sample_flags(x.shape[0], prob, gen)
    shifts = (torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * offset
    shifts = torch.where(flags, shifts, torch.zeros_like(shifts)).to(x.device, x.dtype)
    return x + shifts.view(-1, *[1] * (x.ndim - 1))


def to_device(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, device: torch.device):
    """(B, n, 1, *roi) crops of B volumes -> (B * n, 1, *roi) on the device (crops flattened into the batch)."""
    x = images.flatten(0, 1).to(device, non_blocking=True)
    y = labels.flatten(0, 1).to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x, y


def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, ctx, cfg: TrainConfig,
                    logger: MetricLogger, ckpt: Checkpointer, steps_per_epoch: int, criterion) -> dict:
    """One (possibly partial, after a resume) epoch of random crops, intensity-shifted on the device
    from a (seed, rank, step) generator; the schedule steps once, at the end. Returns the mean
    training loss and voxel accuracy over every process."""
    model.train()
    meter = AverageMeter()
    epoch = state.epoch
    bar = progress(total=steps_per_epoch, initial=state.steps_done(epoch, steps_per_epoch),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for images, labels in loader:
        if state.epoch_finished(epoch, steps_per_epoch):
            break
        x, y = to_device(images, labels, cfg, ctx.device)
        x = shift_intensity(x, cfg.intensity_shift, cfg.intensity_shift_prob,
                            make_generator(cfg.seed, ctx.rank, state.step))
        with amp.autocast():
            logits = model(x)  # (B * n, 2, *roi)
        loss = criterion(logits, y)
        amp.backward_step(loss, optimizer)
        state.step += 1
        acc = (logits.detach().argmax(1, keepdim=True) == y).float().mean().item()
        meter.update(len(x), loss=loss.item(), acc=acc)
        report_step(bar, logger, state.step, epoch, cfg.log_every, loss=loss.item(), acc=acc,
                    lr=optimizer.param_groups[0]["lr"])
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            ckpt.save(state)  # mid-epoch: state.epoch is the epoch in progress
    bar.close()
    scheduler.step()  # per epoch
    return AverageMeter.averages(dist.reduce_sums(meter.sums(), ctx.device))


@torch.no_grad()
def validation_dice(model, loader, amp, ctx, cfg: TrainConfig) -> dict:
    """Validation in the resampled (training) space: mean spleen Dice over the validation volumes
    (argmax, one-hot, background excluded; MONAI DiceMetric), each volume by sliding-window
    inference, and the Dice of every case by name. (``spleen/eval.py`` scores prediction files on
    the original grid instead.)"""
    model.eval()
    dice = DiceAccumulator(include_background=False)
    names = []
    for image, label, index in progress(loader, desc="validate"):
        logits = predict_logits(model, image.to(ctx.device, non_blocking=True), cfg.roi_size, cfg.sw_batch_size,
                                cfg.sw_overlap, cfg.sw_mode, autocast=amp.autocast, channels_last=cfg.channels_last)
        pred = F.one_hot(logits.argmax(1), 2).movedim(-1, 1)  # (1, 2, *spatial)
        target = F.one_hot(label.to(ctx.device).long()[:, 0], 2).movedim(-1, 1)
        dice.update(pred, target)
        names.append(loader.dataset.cases[int(index)].name)
    values = dice.values()[:, 0].tolist()
    all_names = [n for part in dist.all_gather_object(names) for n in part]
    return {"dice": dice.compute(), "cases": dict(zip(all_names, values))}


def export_bundle_weights(model: torch.nn.Module, path: Path) -> None:
    """The bundle's ``model.pt`` format: the flat state_dict (written next to every new best.pt)."""
    atomic_torch_save(model.state_dict(), path)


# ============================================================================= demo
def demo_inference_and_eval(cfg: TrainConfig, ctx: dist.DistContext) -> dict:
    """infer.py on the demo test volumes with best.pt, then eval.py in the original space."""
    root, out = Path(cfg.data_root), Path(cfg.output_dir)
    infer_all(InferConfig(images=str(root / "imagesTs"), checkpoint=str(out / "best.pt"),
                          output_dir=str(out / "inference"), roi_size=cfg.roi_size, sw_batch_size=cfg.sw_batch_size,
                          sw_overlap=cfg.sw_overlap, sw_mode=cfg.sw_mode, device=cfg.device, precision=cfg.precision),
              ctx)
    if not ctx.is_main:
        return {}
    report = evaluate_predictions(EvalConfig(predictions=str(out / "inference"), labels=str(root / "labelsTs")))
    print_report(report)
    print(f"segmentations and previews: {out / 'inference'}/*_seg.nii.gz, *_preview.png")
    return {"demo_test_dice": report["mean_dice"], "demo_test_hd95_mm": report["mean_hd95_mm"]}


# ============================================================================= main
def main(cfg: TrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    if cfg.demo:
        prepare_demo(cfg)  # synthetic CT volumes, built once
    out = start_run(cfg, "spleen train", ctx)
    train_loader, val_loader, sampler = build_loaders(cfg, ctx)
    model = build_model_for(cfg, ctx)
    ddp = wrap_ddp(model, ctx)
    optimizer, scheduler = build_optimizer(cfg, model)
    amp = MixedPrecision(ctx.device, cfg.precision)
    criterion = DiceCELoss()
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))

    state = TrainState()
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp,
                        on_best=lambda: export_bundle_weights(model, out / "model.pt"))
    ckpt.resume(state)
    logger = MetricLogger(out)
    metrics: dict = {}
    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        t0 = time.time()
        train_avg = train_one_epoch(ddp, train_loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt,
                                    steps_per_epoch, criterion)
        state.epoch = epoch + 1
        logger.log(state.step, train_avg, prefix="train_epoch", epoch=state.epoch)
        line = (f"epoch {state.epoch}/{cfg.epochs}: loss {train_avg.get('loss', float('nan')):.4f} "
                f"acc {train_avg.get('acc', float('nan')):.4f}")  # nan: resumed after the epoch's last update
        if state.epoch % cfg.val_every == 0 or state.epoch == cfg.epochs:
            metrics = validation_dice(model, val_loader, amp, ctx, cfg)
            logger.log(state.step, {"dice": metrics["dice"]}, prefix="val", epoch=state.epoch, cases=metrics["cases"])
            line += f" | val dice {metrics['dice']:.4f}"
            if state.improved(metrics["dice"]):
                ckpt.save(state, "best.pt")  # and model.pt (on_best)
        dist.print0(f"{line} [{time.time() - t0:.0f}s]")
        ckpt.save(state, "last.pt")
    logger.close()

    result = {"best_val_dice": state.best, "last": metrics, "run_dir": str(out)}
    if cfg.demo:
        result.update(demo_inference_and_eval(cfg, ctx))
    write_result(out, result, ctx)
    dist.print0(json.dumps({k: v for k, v in result.items() if k != "last"}))
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(TrainConfig))
