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
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.checkpoint import find_resume, load_training_state, save_training_state_collective
from common.io import atomic_write_text
from common.config import parse_config
from common.logging import AverageMeter, MetricLogger, progress, start_run
from pretrain.config import PretrainConfig
from pretrain.dataset import eval_transform
from pretrain.knn import extract_features, knn_accuracy
from pretrain.methods import build_method
from pretrain.pack import ShardAwareSampler, ShardedImages, pack_folder
from pretrain.schedule import apply_schedules, build_optimizer, clip_per_parameter, peak_lr
from pretrain.views import make_views


# ============================================================================= data
def packed_splits(cfg: PretrainConfig, ctx: dist.DistContext) -> dict[str, Path]:
    """``{split: pack folder}``: ``data_root`` itself when it is a pack root, else the image
    folder packed once into ``pack_dir`` (rank 0 packs, the others wait)."""
    root = Path(cfg.data_root)
    if (root / "train" / "index.json").is_file():
        return {s: root / s for s in ("train", "val") if (root / s / "index.json").is_file()}
    if cfg.demo:
        from pretrain.ssl_demo import make_ssl_demo
        dist.run_on_main(make_ssl_demo, root.parent)
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
    common = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn,
                  generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))  # keeps the global RNG untouched
    train = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    knn = None
    if "val" in packs and (train_set.labels >= 0).all():
        val_set = ShardedImages(packs["val"])
        bank = Subset(train_set, evenly_spaced(len(train_set), cfg.knn_bank_size))
        query = Subset(val_set, evenly_spaced(len(val_set), cfg.knn_query_size))
        knn = {name: DataLoader(ds, batch_size=max(cfg.batch_size, 64), sampler=dist.ShardSampler(len(ds)), **common)
               for name, ds in (("bank", bank), ("query", query))}
        dist.print0(f"k-NN: {len(bank)} bank / {len(query)} held-out images, "
                    f"{len(np.unique(train_set.labels))} classes present")
    return train, sampler, knn


# ============================================================================= model
def wrap_model(method: torch.nn.Module, cfg: PretrainConfig, ctx: dist.DistContext):
    if cfg.sync_bn and ctx.distributed:
        if ctx.device.type == "cuda":
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # assign: not in place
        else:
            dist.print0("note: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process on CPU")
    method = method.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    if not ctx.distributed:
        return method, method
    # Buffers (MoCo queue, DINO centre, BN statistics of EMA targets) are kept consistent by the
    # methods themselves; broadcasting them every step would cost 32 MB for MoCo's queue.
    ddp = DistributedDataParallel(method, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                  broadcast_buffers=False)
    return method, ddp


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


# ============================================================================= training
def main(cfg: PretrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    out = start_run(cfg, f"pretrain {cfg.method} ({cfg.arch})", ctx)
    loader, sampler, knn = build_loaders(cfg, ctx)
    updates_per_epoch = len(loader) // cfg.accum
    if updates_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch cannot fill one update of {cfg.accum} micro-batches")
    total = updates_per_epoch * cfg.epochs
    peak = peak_lr(cfg, ctx.world_size)  # refuses a batch too small for the floor rule
    method = build_method(cfg, num_classes=int(loader.dataset.labels.max()) + 1)
    method, model = wrap_model(method, cfg, ctx)
    optimizer = build_optimizer(method, cfg)
    amp = MixedPrecision(ctx.device, cfg.precision)
    dist.print0(f"{sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6:.2f}M trained parameters; "
                f"global batch {cfg.batch_size * ctx.world_size * cfg.accum}, peak lr {peak:.4g}, "
                f"{updates_per_epoch} updates/epoch")
    if cfg.warmup_epochs >= cfg.epochs:
        dist.print0(f"note: warm-up {cfg.warmup_epochs:g} epochs >= {cfg.epochs} epochs: the lr rises for the whole "
                    "run and never decays (MAE's upstream 40 warm-up epochs with PatchTCGA's 40 epochs; "
                    "pass --epochs above the warm-up for the half-cosine)")
    state = {"step": 0, "epoch": 0, "knn": [], "epoch_loss": []}

    def save(epoch: int) -> None:
        save_training_state_collective(out / "last.pt", is_main=ctx.is_main, model=method, optimizer=optimizer,
                                       scaler=amp.scaler, epoch=epoch, step=state["step"], config=cfg.to_dict(),
                                       extra={"backbone_prefix": "backbone.", "knn": state["knn"],
                                              "epoch_loss": state["epoch_loss"], "method": cfg.method})

    def evaluate_knn(epoch: int) -> None:
        if knn is None:
            return
        result = run_knn(method, knn, cfg, ctx, amp)
        state["knn"].append({"epoch": epoch, "step": state["step"], **result})
        logger.log(state["step"], {"top1": result["top1"]}, prefix="knn", epoch=epoch)
        dist.print0(f"update {state['step']} (epoch {epoch}): k-NN top-1 {result['top1']:.4f} (k={result['k']})")

    resume_path = find_resume(out) if cfg.resume else None
    logger = MetricLogger(out)
    if resume_path is not None:
        saved = load_training_state(resume_path, model=method, optimizer=optimizer, scaler=amp.scaler)
        state.update(step=saved["step"], epoch=saved["epoch"], knn=saved["knn"], epoch_loss=saved["epoch_loss"])
        dist.print0(f"resumed from {resume_path} at epoch {state['epoch']}, update {state['step']}")
    else:
        evaluate_knn(0)  # the randomly initialised backbone: the baseline to beat
    t0 = time.time()
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    for epoch in range(state["epoch"], cfg.epochs):
        if state["step"] >= stop:
            break
        done = state["step"] - epoch * updates_per_epoch
        sampler.set_epoch(epoch, skip=done * cfg.accum * cfg.batch_size)
        meter = train_one_epoch(model, method, loader, optimizer, amp, cfg, ctx, epoch, updates_per_epoch,
                                total, stop, peak, state, logger, save)
        state["epoch_loss"].append(meter)
        dist.print0(f"epoch {epoch + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in meter.items()))
        if state["step"] >= (epoch + 1) * updates_per_epoch:  # the epoch is complete
            if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and epoch + 1 < cfg.epochs:
                evaluate_knn(epoch + 1)
            save(epoch + 1)
    if not state["knn"] or state["knn"][-1]["step"] != state["step"]:
        evaluate_knn(state["step"] // updates_per_epoch)
    save(state["step"] // updates_per_epoch)
    logger.close()
    result = {"method": cfg.method, "arch": cfg.arch, "steps": state["step"], "seconds": time.time() - t0,
              "epoch_loss": [e["loss"] for e in state["epoch_loss"]], "epoch_metrics": state["epoch_loss"],
              "knn": state["knn"], "run_dir": str(out)}
    if ctx.is_main:
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
        if state["knn"]:
            print(f"k-NN top-1: random init {state['knn'][0]['top1']:.4f} -> {state['knn'][-1]['top1']:.4f}")
    dist.cleanup()
    return result


def train_one_epoch(model, method, loader, optimizer, amp, cfg, ctx, epoch, updates_per_epoch, total, stop,
                    peak, state, logger, save) -> dict:
    """One pass over this process's shards; returns the epoch's mean losses over all processes."""
    model.train()
    meter = AverageMeter()
    bar = progress(total=updates_per_epoch, initial=state["step"] - epoch * updates_per_epoch,
                   desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}")
    micro = 0
    for images, labels in loader:
        if state["step"] >= min((epoch + 1) * updates_per_epoch, stop):
            break
        step_index = state["step"] * cfg.accum + micro  # global micro-batch index: the random stream's key
        gen = make_generator(cfg.seed, ctx.rank, step_index)
        views = make_views(cfg.method, images.to(ctx.device, non_blocking=True), gen, cfg)
        if cfg.channels_last and ctx.device.type == "cuda":
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        micro += 1
        last = micro == cfg.accum
        with (model.no_sync() if ctx.distributed and not last else contextlib.nullcontext()):
            with amp.autocast():
                loss, logs = model(views, labels.to(ctx.device, non_blocking=True), epoch, gen)
            amp.backward(loss, cfg.accum)
        meter.update(loss=loss.item(), **{k: float(v) for k, v in logs.items()})
        if not last:
            continue
        micro = 0
        lr = apply_schedules(optimizer, state["step"], cfg, peak, updates_per_epoch, total)
        method.after_backward(epoch)
        update(method, optimizer, amp, cfg)
        state["step"] += 1
        extra = method.after_update(state["step"], total)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.log_every and state["step"] % cfg.log_every == 0:
            logger.log(state["step"], {"loss": loss.item(), "lr": lr, **{k: float(v) for k, v in logs.items()},
                                       **extra}, prefix="train", epoch=epoch)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            save(epoch)
    bar.close()
    return AverageMeter.averages(dist.reduce_sums(meter.sums(), ctx.device))


def update(method, optimizer, amp: MixedPrecision, cfg: PretrainConfig) -> None:
    """Unscale, clip (DINO: each parameter's norm; others: the global norm), step, zero."""
    if cfg.clip_norm:
        amp.scaler.unscale_(optimizer)
        params = [p for p in method.parameters() if p.requires_grad]
        if cfg.method == "dino":
            clip_per_parameter(params, cfg.clip_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
    amp.scaler.step(optimizer)
    amp.scaler.update()
    optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    dist.launch(main, parse_config(PretrainConfig))
