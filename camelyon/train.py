"""Train the Camelyon16 patch classifier (MONAI pathology_tumor_detection recipe).

    python camelyon/train.py --data-root /data/camelyon16          # bundle layout + CSVs, ImageNet init
    python camelyon/train.py --data-root ... --pretrained none      # from scratch (or --pretrained FILE)
    python camelyon/train.py --demo                                 # synthetic slides, ~10 min on CPU
    torchrun --nproc_per_node 8 camelyon/train.py --data-root ...   # DDP (or --hosts a b --gpus-per-node 8)

768-px level-0 regions centred on the list's coordinates are read by the workers; on the device
each is split 3x3 into 224-px patches with their nine labels, augmented (kornia/torch, per-patch
parameters from a (seed, rank, step) generator) and classified by ResNet18 + 1x1 conv, starting
from torchvision's ImageNet ResNet18 like the bundle, with BCEWithLogits, Novograd lr 1e-3 and a
per-epoch cosine over 4 epochs. Validation accuracy every epoch; ``best.pt`` keeps the best,
``last.pt`` the latest (auto-resume, also mid-epoch).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from camelyon.config import EvalConfig, InferConfig, TrainConfig
from camelyon.dataset import RegionDataset, read_patch_list, train_transform, training_mpp, validate_records
from camelyon.demo import prepare_demo
from camelyon.eval import evaluate_froc, patch_accuracy, print_froc, to_patches
from camelyon.infer import run as run_inference
from camelyon.model import build_model, load_detector_weights, load_imagenet_backbone
from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.config import parse_config, save_config
from common.errors import exit_on_user_error
from common.logging import MetricLogger, progress, report_step, start_run
from common.optim import FunctionScheduler, Novograd, cosine_annealing
from common.pretrained import apply_initialisation, resolve_initialisation
from common.stain import StainNormalizer, training_stain
from common.training import Checkpointer, TrainState, wrap_ddp, write_result


def build_loaders(cfg: TrainConfig, ctx: dist.DistContext):
    root = Path(cfg.data_root)
    image_dir = cfg.image_dir or root / "training" / "images"
    lists = {"train": cfg.train_list or root / "training.csv", "val": cfg.val_list or root / "validation.csv"}
    records = {k: read_patch_list(v, image_dir, cfg.annotation_dir or None, suffix=cfg.slide_suffix)
               for k, v in lists.items()}
    if cfg.max_val_regions:
        records["val"] = records["val"][:cfg.max_val_regions]
    if ctx.is_main:  # fail now, not hours into an epoch
        for k, recs in records.items():
            validate_records(recs, source=str(lists[k]))
    dist.barrier()
    train_ds, val_ds = RegionDataset(records["train"]), RegionDataset(records["val"])
    # the bundle keeps the last partial batch (DataLoader default); its multi-GPU sampler pads
    sampler = dist.make_sampler(train_ds, shuffle=cfg.shuffle, seed=cfg.seed, drop_last=False)
    # a private generator: iterator creation must not consume the global RNG (exact resume)
    loader_kwargs = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                         persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn,
                         generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=False, **loader_kwargs)
    val = DataLoader(val_ds, batch_size=cfg.val_batch_size or cfg.batch_size,
                       sampler=dist.ShardSampler(len(val_ds)), **loader_kwargs)
    return train, val, sampler


def build_model_for(cfg: TrainConfig, ctx: dist.DistContext) -> tuple[torch.nn.Module, str]:
    """The network with its initial weights (``--pretrained imagenet|none|PATH``, ``--init-checkpoint``)
    and a one-line record of them. Called before any data is read: a weights file that is missing,
    cannot be downloaded or does not fit stops the run with one line (common.pretrained)."""
    init = resolve_initialisation(cfg.pretrained, cfg.init_checkpoint, "resnet18", ctx.local_rank)
    model = build_model()
    report = apply_initialisation(init, model, load_imagenet_backbone, load_detector_weights)
    if init.kind == "file":
        dist.print0(report)
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, init.description


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> tuple[Novograd, FunctionScheduler]:
    """Novograd and CosineAnnealingLR(T_max=epochs, eta_min=0), stepped once per epoch (camelyon.md §5)."""
    optimizer = Novograd(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = FunctionScheduler(optimizer, lambda e: cosine_annealing(e, cfg.epochs, cfg.lr))  # per epoch
    return optimizer, scheduler


def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, ctx, cfg: TrainConfig,
                    logger: MetricLogger, ckpt: Checkpointer, steps_per_epoch: int,
                    stain: StainNormalizer = StainNormalizer()) -> None:
    """One (possibly partial, after a resume) epoch: each region split into its 9 patches, stain
    normalised (``--stain-normalize``), augmented on the device from a (seed, rank, step) generator;
    the schedule steps once, at the end."""
    model.train()
    epoch = state.epoch
    bar = progress(total=steps_per_epoch, initial=state.steps_done(epoch, steps_per_epoch),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for regions, labels in loader:
        if state.epoch_finished(epoch, steps_per_epoch):
            break
        patches, targets = to_patches(regions, labels, ctx.device)
        gen = make_generator(cfg.seed, ctx.rank, state.step)
        x = train_transform(stain(patches), gen, cfg)  # cfg is an AugmentConfig
        if cfg.channels_last and ctx.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)  # (B*9, 1, 1, 1)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        amp.backward_step(loss, optimizer)
        state.step += 1
        acc = ((logits.detach() >= 0).float() == targets).float().mean().item()
        report_step(bar, logger, state.step, epoch, cfg.log_every, loss=loss.item(), acc=acc,
                    lr=optimizer.param_groups[0]["lr"])
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            ckpt.save(state)  # mid-epoch: state.epoch is the epoch in progress
    bar.close()
    scheduler.step()  # per epoch


# ============================================================================= demo
def demo_inference_and_froc(cfg: TrainConfig, ctx: dist.DistContext) -> dict:
    """Whole-slide inference (dense) with best.pt on the demo test slides, then the official FROC."""
    root, out = Path(cfg.data_root), Path(cfg.output_dir)
    run_inference(InferConfig(slides=str(root / "testing" / "images"), checkpoint=str(out / "best.pt"),
                              output_dir=str(out / "inference"), num_workers=cfg.num_workers,
                              device=cfg.device, precision=cfg.precision,
                              stain_normalize=cfg.stain_normalize))  # the target stored in best.pt
    result = evaluate_froc(EvalConfig(detections=str(out / "inference"),
                                      ground_truth=str(root / "testing" / "ground_truths"),
                                      output_dir=str(out / "inference")))
    if ctx.is_main:
        print_froc(result)
        print(f"heatmaps: {out / 'inference'}/*_heatmap.png, FROC curve: {out / 'inference' / 'froc.png'}")
    return {"demo_froc": result["froc"], "demo_slide_auc": result["slide_auc"],
            "demo_sensitivities": {str(k): v for k, v in result["sensitivities"].items()}}


# ============================================================================= main
def main(cfg: TrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    stain, stain_state = training_stain(cfg)  # a bad --stain-target stops the run before anything else
    model, cfg.initialisation = build_model_for(cfg, ctx)  # first: a weights problem stops the run before any data
    if cfg.demo:
        prepare_demo(cfg)  # synthetic slides and their patch lists, built once
    out = start_run(cfg, "camelyon train", ctx)
    dist.print0(f"initialisation: {cfg.initialisation}")
    train_loader, val_loader, sampler = build_loaders(cfg, ctx)
    cfg.mpp, mpp_note = training_mpp(train_loader.dataset.records, cfg.mpp)  # the slides' level-0 µm/px
    dist.print0(f"training resolution: {cfg.mpp:g} µm/px ({mpp_note})")
    if ctx.is_main:
        save_config(cfg, out)  # config.json (and every checkpoint's config) records it for infer.py
    ddp = wrap_ddp(model, ctx)
    optimizer, scheduler = build_optimizer(cfg, model)
    amp = MixedPrecision(ctx.device, cfg.precision)
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))

    state = TrainState()
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp,
                        extra=stain_state)
    ckpt.resume(state)
    logger = MetricLogger(out)
    metrics: dict[str, float] = {}
    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        t0 = time.time()
        train_one_epoch(ddp, train_loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt, steps_per_epoch,
                        stain=stain)
        metrics = patch_accuracy(model, val_loader, amp, ctx, stain=stain)
        state.epoch = epoch + 1
        dist.print0(f"epoch {state.epoch}/{cfg.epochs}: val acc {metrics['acc']:.4f} loss {metrics['loss']:.4f} "
                    f"({metrics['patches']:.0f} patches) lr {optimizer.param_groups[0]['lr']:.3g} "
                    f"[{time.time() - t0:.0f}s]")
        logger.log(state.step, metrics, prefix="val", epoch=state.epoch)
        if state.improved(metrics["acc"]):
            ckpt.save(state, "best.pt")
        ckpt.save(state, "last.pt")
    logger.close()

    result = {"best_val_acc": state.best, "last": metrics, "run_dir": str(out)}
    if cfg.demo:
        result.update(demo_inference_and_froc(cfg, ctx))
    write_result(out, result, ctx)
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(TrainConfig))
