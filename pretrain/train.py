"""Self-supervised pretraining on pathology patches: SimCLR, MoCo v2, BYOL, DINO, MAE.

    python pretrain/train.py --method simclr --data-root datasets/PTCGA200      # packs, then trains
    python pretrain/train.py --method dino --data-root packed/PTCGA200          # a pretrain/pack.py root
    python pretrain/train.py --method mae --demo                                # synthetic patches, CPU, minutes
    torchrun --nnodes 2 --nproc_per_node 4 ... pretrain/train.py --method byol  # or --hosts a b --gpus-per-node 4

Images are read from HDF5 shards (``pretrain/pack.py``; an image folder is packed first), decoded
in the loader workers, and augmented on the training device per view (``pretrain/views.py``).
Each process reads its own shards. Updates follow the method's recipe (``pretrain/schedule.py``)
with gradient accumulation, AMP, SyncBatchNorm where the recipe uses it (CUDA), per-rank seeds
and auto-resume from ``last.pt`` (also mid-epoch). A weighted k-NN on a held-out labelled split
(organ labels) is the running quality signal: before training (random init), every
``knn_every`` epochs and at the end. ``pretrain/export.py`` turns the run into a backbone file.
"""
from __future__ import annotations

import contextlib
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.config import parse_config
from common.logging import AverageMeter, MetricLogger, progress, report_step, start_run
from common.training import Checkpointer, TrainState, wrap_ddp, write_result
from common.errors import exit_on_user_error
from pretrain.config import PretrainConfig
from pretrain.dataset import eval_transform
from pretrain.knn import extract_features, knn_accuracy
from pretrain.methods import build_method
from pretrain.pack import pack_folder
from pretrain.shards import ShardAwareSampler, ShardedImages
from pretrain.schedule import apply_schedules, build_optimizer, gradient_clip, peak_lr
from pretrain.views import make_views


# ============================================================================= data
def packed_splits(cfg: PretrainConfig, ctx: dist.DistContext) -> dict[str, Path]:
    """``{split: pack folder}``: ``data_root`` itself when it is a pack root, else the image
    folder packed once into ``pack_dir`` (rank 0 packs, the others wait)."""
    root = Path(cfg.data_root)
    if (root / "train" / "index.json").is_file():
        return {s: root / s for s in ("train", "val") if (root / s / "index.json").is_file()}
    if cfg.demo:
        from pretrain.synthetic import prepare_pretrain_demo
        prepare_pretrain_demo(cfg)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data_root is neither a pack root (<root>/train/index.json) nor an image folder")
    pack_root = Path(cfg.pack_dir or Path(cfg.output_dir) / "packed")
    split_file = cfg.split_file or root.parent / "3fold_dict_idx_filenames.pickle"
    if cfg.layout == "ptcga200" and not Path(split_file).is_file():
        if cfg.split_file:
            raise FileNotFoundError(f"{split_file}: split file not found")
        dist.print0(f"note: no {split_file}; every image is used for training and the k-NN probe is off")
        split_file, splits = "", ("train",)
    else:
        splits = ("train", "val") if cfg.layout != "folder" else ("train",)

    def pack_missing() -> None:
        for split in splits:
            if not (pack_root / split / "index.json").is_file():
                report = pack_folder(root, pack_root / split, layout=cfg.layout, split=split,
                                     split_file=str(split_file) if cfg.layout == "ptcga200" else "",
                                     fold=cfg.fold, shard_size=cfg.shard_size, on_error=cfg.on_error,
                                     workers=cfg.num_workers)
                print(report.summary())

    dist.run_on_main(pack_missing)  # a bad source stops every process, not only rank 0
    return {s: pack_root / s for s in splits}


def evenly_spaced(n: int, k: int) -> list[int]:
    return list(range(n)) if k <= 0 or k >= n else np.linspace(0, n - 1, k).round().astype(int).tolist()


def build_loaders(cfg: PretrainConfig, ctx: dist.DistContext):
    packs = packed_splits(cfg, ctx)
    train_set = ShardedImages(packs["train"])
    index = json.loads((packs["train"] / "index.json").read_text())
    dist.print0(f"train: {len(train_set)} images in {len(train_set.shard_ranges)} shards "
                f"({index.get('skipped_count', 0)} unreadable skipped while packing)")
    first, _ = train_set[0]  # decode now: a bad pack fails at start-up
    if min(first.shape[-2:]) < cfg.image_size:
        dist.print0(f"note: {tuple(first.shape)} patches are upsampled to {cfg.image_size}-px crops")
    sampler = ShardAwareSampler(train_set, shuffle=True, seed=cfg.seed)
    loader_args = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                       persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn,
                       generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))  # keeps the global RNG untouched
    train = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **loader_args)
    knn = None
    if "val" in packs and (train_set.labels >= 0).all():
        val_set = ShardedImages(packs["val"])
        bank = Subset(train_set, evenly_spaced(len(train_set), cfg.knn_bank_size))
        query = Subset(val_set, evenly_spaced(len(val_set), cfg.knn_query_size))
        knn = {name: DataLoader(ds, batch_size=max(cfg.batch_size, 64), sampler=dist.ShardSampler(len(ds)),
                                **loader_args)
               for name, ds in (("bank", bank), ("query", query))}
        dist.print0(f"k-NN: {len(bank)} bank / {len(query)} held-out images, "
                    f"{len(np.unique(train_set.labels))} classes present")
    return train, sampler, knn


# ============================================================================= model
def place_model(method: torch.nn.Module, cfg: PretrainConfig, ctx: dist.DistContext) -> torch.nn.Module:
    """SyncBatchNorm where the recipe uses it (CUDA), the device, channels-last (CUDA)."""
    if cfg.sync_bn and ctx.distributed:
        if ctx.device.type == "cuda":
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # assign: not in place
        else:
            dist.print0("note: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process on CPU")
    method = method.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    return method


class FeatureExtractor(torch.nn.Module):
    """The method's k-NN features as a module (eval mode switches the whole method)."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, x):
        return self.method.features(x)


@torch.no_grad()
def run_knn(method, knn, cfg: PretrainConfig, ctx: dist.DistContext, amp: MixedPrecision) -> dict:
    def transform(x):
        return eval_transform(x, cfg.image_size, cfg.eval_crop, cfg.mean, cfg.std)

    features = FeatureExtractor(method)
    with amp.autocast():
        bank_x, bank_y = extract_features(features, knn["bank"], ctx.device, transform)
        query_x, query_y = extract_features(features, knn["query"], ctx.device, transform)
    num_classes = int(max(bank_y.max(), query_y.max())) + 1
    return knn_accuracy(bank_x, bank_y, query_x, query_y, num_classes, k=cfg.knn_k, temperature=cfg.knn_temperature)


def record_knn(method, knn, amp: MixedPrecision, state: TrainState, ctx: dist.DistContext, cfg: PretrainConfig,
               logger: MetricLogger) -> None:
    """k-NN accuracy of the backbone now, appended to ``state.extra["knn"]`` (kept across a resume)."""
    if knn is None:
        return
    result = run_knn(method, knn, cfg, ctx, amp)
    state.extra["knn"].append({"epoch": state.epoch, "step": state.step, **result})
    logger.log(state.step, {"top1": result["top1"]}, prefix="knn", epoch=state.epoch)
    dist.print0(f"update {state.step} (epoch {state.epoch}): k-NN top-1 {result['top1']:.4f} (k={result['k']})")


# ============================================================================= training
def train_one_epoch(model, loader, optimizer, schedule, amp: MixedPrecision, state: TrainState, ctx,
                    cfg: PretrainConfig, logger: MetricLogger, ckpt: Checkpointer, method,
                    updates_per_epoch: int, total: int, stop: int) -> dict:
    """One pass over this process's shards (or up to update ``stop``), ``cfg.accum`` micro-batches
    per update; ``schedule(step)`` sets the update's lr and weight decay. ``method`` is the
    unwrapped ``model``. Returns the epoch's mean losses over all processes."""
    model.train()
    meter = AverageMeter()
    epoch = state.epoch
    end = min((epoch + 1) * updates_per_epoch, stop)
    bar = progress(total=updates_per_epoch, initial=state.steps_done(epoch, updates_per_epoch),
                   desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}")
    micro = 0
    for images, labels in loader:
        if state.step >= end:
            break
        gen = make_generator(cfg.seed, ctx.rank, state.step * cfg.accum + micro)  # keyed on the global micro-batch
        views = make_views(cfg.method, images.to(ctx.device, non_blocking=True), gen, cfg)
        if cfg.channels_last and ctx.device.type == "cuda":
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        micro += 1
        last = micro == cfg.accum
        with (model.no_sync() if ctx.distributed and not last else contextlib.nullcontext()):
            with amp.autocast():
                loss, logs = model(views, labels.to(ctx.device, non_blocking=True), epoch, gen)
            amp.backward(loss, cfg.accum)
        logs = {k: float(v) for k, v in logs.items()}
        meter.update(loss=loss.item(), **logs)
        if not last:
            continue
        micro = 0
        lr = schedule(state.step)
        method.after_backward(epoch)
        amp.step(optimizer, [p for p in method.parameters() if p.requires_grad], cfg.clip_norm,
                 clip_fn=gradient_clip(cfg.method), zero_grad=True)
        state.step += 1
        extra = method.after_update(state.step, total)
        report_step(bar, logger, state.step, epoch, cfg.log_every, loss=loss.item(), lr=lr, **logs, **extra)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            ckpt.save(state)  # mid-epoch: state.epoch is the epoch in progress
    bar.close()
    return AverageMeter.averages(dist.reduce_sums(meter.sums(), ctx.device))


def main(cfg: PretrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    out = start_run(cfg, f"pretrain {cfg.method} ({cfg.arch})", ctx)
    loader, sampler, knn = build_loaders(cfg, ctx)
    updates_per_epoch = len(loader) // cfg.accum
    if updates_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch cannot fill one update of {cfg.accum} micro-batches")
    total = updates_per_epoch * cfg.epochs
    stop = min(total, cfg.max_updates) if cfg.max_updates else total
    peak = peak_lr(cfg, ctx.world_size)  # refuses a batch too small for the floor rule
    method = place_model(build_method(cfg, num_classes=int(loader.dataset.labels.max()) + 1), cfg, ctx)
    # Buffers (MoCo queue, DINO centre, BN statistics of EMA targets) are kept consistent by the
    # methods themselves; broadcasting them every step would cost 32 MB for MoCo's queue.
    model = wrap_ddp(method, ctx, broadcast_buffers=False)
    optimizer = build_optimizer(method, cfg)
    schedule = partial(apply_schedules, optimizer, cfg=cfg, peak=peak, updates_per_epoch=updates_per_epoch,
                       total=total)
    amp = MixedPrecision(ctx.device, cfg.precision)
    dist.print0(f"{sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6:.2f}M trained parameters; "
                f"global batch {cfg.batch_size * ctx.world_size * cfg.accum}, peak lr {peak:.4g}, "
                f"{updates_per_epoch} updates/epoch")
    if cfg.warmup_epochs >= cfg.epochs:
        dist.print0(f"note: warm-up {cfg.warmup_epochs:g} epochs >= {cfg.epochs} epochs: the lr rises for the whole "
                    "run and never decays (MAE's upstream 40 warm-up epochs with PatchTCGA's 40 epochs; "
                    "pass --epochs above the warm-up for the half-cosine)")

    state = TrainState(best=None, extra={"knn": [], "epoch_loss": []})  # no best checkpoint: k-NN is a signal
    ckpt = Checkpointer(out, ctx, cfg, model=method, optimizer=optimizer, amp=amp,
                        extra={"backbone_prefix": "backbone.", "method": cfg.method})
    logger = MetricLogger(out)
    if not ckpt.resume(state):
        record_knn(method, knn, amp, state, ctx, cfg, logger)  # the randomly initialised backbone: the baseline
    t0 = time.time()
    for epoch in range(state.epoch, cfg.epochs):
        if state.step >= stop:
            break
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, updates_per_epoch, cfg.accum * cfg.batch_size))
        losses = train_one_epoch(model, loader, optimizer, schedule, amp, state, ctx, cfg, logger, ckpt,
                                 method, updates_per_epoch, total, stop)
        state.extra["epoch_loss"].append(losses)
        dist.print0(f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if state.epoch_finished(epoch, updates_per_epoch):
            state.epoch = epoch + 1
            if cfg.knn_every and state.epoch % cfg.knn_every == 0 and state.epoch < cfg.epochs:
                record_knn(method, knn, amp, state, ctx, cfg, logger)
            ckpt.save(state)
    state.epoch = state.step // updates_per_epoch  # completed epochs
    if not state.extra["knn"] or state.extra["knn"][-1]["step"] != state.step:
        record_knn(method, knn, amp, state, ctx, cfg, logger)
    ckpt.save(state)
    logger.close()
    knn_history, epoch_loss = state.extra["knn"], state.extra["epoch_loss"]
    result = {"method": cfg.method, "arch": cfg.arch, "steps": state.step, "seconds": time.time() - t0,
              "epoch_loss": [e["loss"] for e in epoch_loss], "epoch_metrics": epoch_loss, "knn": knn_history,
              "run_dir": str(out)}
    write_result(out, result, ctx)
    if ctx.is_main and knn_history:
        print(f"k-NN top-1: random init {knn_history[0]['top1']:.4f} -> {knn_history[-1]['top1']:.4f}")
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(PretrainConfig))
