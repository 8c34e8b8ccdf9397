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

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from camelyon.config import TrainConfig
from camelyon.dataset import (RegionDataset, eval_transform, read_patch_list, split_grid, train_transform,
                              training_mpp, validate_records)
from camelyon.model import build_model, load_detector_weights, load_imagenet_backbone
from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.checkpoint import find_resume, load_training_state, save_training_state_collective
from common.io import atomic_write_text
from common.config import exit_on_config_error, parse_config, save_config
from common.logging import AverageMeter, MetricLogger, progress, report_step, start_run
from common.optim import FunctionScheduler, Novograd, cosine_annealing
from common.pretrained import apply_initialisation, resolve_initialisation


def build_loaders(cfg: TrainConfig, ctx: dist.DistContext):
    root = Path(cfg.data_root)
    image_dir = cfg.image_dir or root / "training" / "images"
    lists = {"train": cfg.train_list or root / "training.csv", "valid": cfg.valid_list or root / "validation.csv"}
    records = {k: read_patch_list(v, image_dir, cfg.annotation_dir or None, suffix=cfg.slide_suffix)
               for k, v in lists.items()}
    if cfg.max_valid_regions:
        records["valid"] = records["valid"][:cfg.max_valid_regions]
    if ctx.is_main:  # fail now, not hours into an epoch
        for k, recs in records.items():
            validate_records(recs, source=str(lists[k]))
    dist.barrier()
    train_ds, valid_ds = RegionDataset(records["train"]), RegionDataset(records["valid"])
    # the bundle keeps the last partial batch (DataLoader default); its multi-GPU sampler pads
    sampler = dist.make_sampler(train_ds, shuffle=cfg.shuffle, seed=cfg.seed, drop_last=False)
    # a private generator: iterator creation must not consume the global RNG (exact resume)
    common = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn,
                  generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=False, **common)
    valid = DataLoader(valid_ds, batch_size=cfg.valid_batch_size or cfg.batch_size,
                       sampler=dist.ShardSampler(len(valid_ds)), **common)
    return train, valid, sampler


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


def to_patches(regions: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """uint8 regions (B, 3, 768, 768) + labels (B, 3, 3) -> patches (B*9, 3, 224, 224), targets (B*9, 1, 1, 1)."""
    patches, targets = split_grid(regions.to(device, non_blocking=True), labels.to(device, non_blocking=True))
    return patches, targets.view(-1, 1, 1, 1)


def train_one_epoch(model, loader, optimizer, amp, ctx, cfg: TrainConfig, epoch: int, step: int,
                    steps_per_epoch: int, logger: MetricLogger, save_last) -> int:
    model.train()
    meter = AverageMeter()
    first = step - epoch * steps_per_epoch
    bar = progress(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for regions, labels in loader:
        if step >= (epoch + 1) * steps_per_epoch:
            break
        patches, targets = to_patches(regions, labels, ctx.device)
        x = train_transform(patches, make_generator(cfg.seed, ctx.rank, step), cfg)  # cfg is an AugmentConfig
        if cfg.channels_last and ctx.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)  # (B*9, 1, 1, 1)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        amp.backward_step(loss, optimizer)
        step += 1
        acc = ((logits.detach() >= 0).float() == targets).float().mean().item()
        meter.update(len(targets), loss=loss.item(), acc=acc)
        report_step(bar, logger, step, epoch, cfg.log_every, loss=loss.item(), acc=acc,
                    lr=optimizer.param_groups[0]["lr"])
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_last(epoch, step)
    bar.close()
    return step


@torch.no_grad()
def evaluate(model, loader, amp, ctx) -> dict[str, float]:
    """Patch accuracy (sigmoid >= 0.5) and mean BCE over all validation patches, summed exactly."""
    model.eval()
    sums = {"correct": 0.0, "loss": 0.0, "n": 0.0, "positives": 0.0}
    for regions, labels in progress(loader, desc="validate"):
        patches, targets = to_patches(regions, labels, ctx.device)
        with amp.autocast():
            logits = model(eval_transform(patches)).float()
        sums["correct"] += float(((logits >= 0).float() == targets).sum())
        sums["loss"] += float(F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))
        sums["n"] += targets.numel()
        sums["positives"] += float(targets.sum())
    total = dist.reduce_sums(sums, ctx.device)
    n = max(total["n"], 1.0)
    return {"acc": total["correct"] / n, "loss": total["loss"] / n, "patches": total["n"],
            "positive_fraction": total["positives"] / n}


# ============================================================================= demo
def prepare_demo_data(cfg: TrainConfig, ctx: dist.DistContext) -> None:
    """Generate the synthetic slides once (rank 0) and build the bundle CSVs from the NCRF-style
    coordinates and XML annotations with ``prepare.py``'s code path."""
    from camelyon.demo import make_demo
    from camelyon.prepare import build_patch_list
    from camelyon.dataset import write_bundle_csv

    root = Path(cfg.data_root)
    if ctx.is_main:
        layout = make_demo(root)
        print(f"demo data in {root} ({'generated in %.0fs' % layout.seconds if layout.generated else 'cached'})")
        for split in ("train", "valid"):
            target = Path(cfg.train_list if split == "train" else cfg.valid_list)
            if layout.generated or not target.is_file():
                coords = [str(layout.coords / f"{kind}_{split}.txt") for kind in ("tumor", "normal")]
                write_bundle_csv(build_patch_list(coords, str(layout.train_images), str(layout.train_annotations)), target)
    dist.barrier()


def demo_inference_and_froc(cfg: TrainConfig, ctx: dist.DistContext) -> dict:
    """Whole-slide inference (dense) with best.pt on the demo test slides, then the official FROC."""
    from camelyon.config import EvalConfig, InferConfig
    from camelyon.eval import evaluate_froc, print_froc
    from camelyon.infer import run as run_inference

    root, out = Path(cfg.data_root), Path(cfg.output_dir)
    run_inference(InferConfig(slides=str(root / "testing" / "images"), checkpoint=str(out / "best.pt"),
                              output_dir=str(out / "inference"), num_workers=cfg.num_workers,
                              device=cfg.device, precision=cfg.precision))
    result = evaluate_froc(EvalConfig(detections=str(out / "inference"),
                                      ground_truth=str(root / "testing" / "ground_truths"),
                                      output_dir=str(out / "inference")))
    if ctx.is_main:
        print_froc(result)
        print(f"heatmaps: {out / 'inference'}/*_heatmap.png, FROC curve: {out / 'inference' / 'froc.png'}")
    return {"demo_froc": result["froc"], "demo_slide_auc": result["slide_auc"],
            "demo_sensitivities": {str(k): v for k, v in result["sensitivities"].items()}}


def main(cfg: TrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    model, cfg.initialisation = build_model_for(cfg, ctx)  # first: a weights problem stops the run before any data
    if cfg.demo:
        prepare_demo_data(cfg, ctx)
    out = start_run(cfg, "camelyon train", ctx)
    dist.print0(f"initialisation: {cfg.initialisation}")
    train_loader, valid_loader, sampler = build_loaders(cfg, ctx)
    cfg.mpp, mpp_note = training_mpp(train_loader.dataset.records, cfg.mpp)  # the slides' level-0 µm/px
    dist.print0(f"training resolution: {cfg.mpp:g} µm/px ({mpp_note})")
    if ctx.is_main:
        save_config(cfg, out)  # config.json (and every checkpoint's config) records it for infer.py
    ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model
    optimizer, scheduler = build_optimizer(cfg, model)
    amp = MixedPrecision(ctx.device, cfg.precision)
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    step, best, start_epoch = 0, -1.0, 0

    def save_last(epoch: int, at_step: int, name: str = "last.pt") -> None:  # collective
        save_training_state_collective(out / name, is_main=ctx.is_main, model=model, optimizer=optimizer,
                                       scheduler=scheduler, scaler=amp.scaler, epoch=epoch, step=at_step,
                                       best_metric=best, config=cfg.to_dict())

    resume_path = find_resume(out) if cfg.resume else None
    if resume_path is not None:
        state = load_training_state(resume_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=amp.scaler)
        step, best = state["step"], state["best_metric"] if state["best_metric"] is not None else -1.0
        start_epoch = state["epoch"]  # completed epochs; a mid-epoch save has step beyond them
        dist.print0(f"resumed from {resume_path} at epoch {start_epoch}, step {step}")
    logger = MetricLogger(out)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * cfg.batch_size)
        t0 = time.time()
        step = train_one_epoch(ddp, train_loader, optimizer, amp, ctx, cfg, epoch, step, steps_per_epoch,
                               logger, save_last)
        metrics = evaluate(model, valid_loader, amp, ctx)
        scheduler.step()
        dist.print0(f"epoch {epoch + 1}/{cfg.epochs}: valid acc {metrics['acc']:.4f} loss {metrics['loss']:.4f} "
                    f"({metrics['patches']:.0f} patches) lr {optimizer.param_groups[0]['lr']:.3g} "
                    f"[{time.time() - t0:.0f}s]")
        logger.log(step, metrics, prefix="valid", epoch=epoch + 1)
        if metrics["acc"] > best:
            best = metrics["acc"]
            save_last(epoch + 1, step, "best.pt")
        save_last(epoch + 1, step)
    logger.close()
    result = {"best_valid_acc": best, "last": metrics, "run_dir": str(out)}
    if cfg.demo:
        result.update(demo_inference_and_froc(cfg, ctx))
    if ctx.is_main:
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_config_error():
        dist.launch(main, parse_config(TrainConfig))
