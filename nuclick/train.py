"""Train NuClick (MONAI pathology_nuclick_annotation recipe) on per-nucleus crops.

    python nuclick/prepare.py --input /data/CoNSeP --output /data/CoNSePNuclei
    python nuclick/train.py --data-root /data/CoNSePNuclei
    torchrun --nproc_per_node 8 nuclick/train.py --data-root ...     # DDP (or --hosts a b --gpus-per-node 8)
    python nuclick/train.py --demo                                    # synthetic CoNSeP, ~5 min on 2 CPU cores

Workers read crops and split the labels; on the device each batch is augmented (colour jitter,
180-degree flip, rot90), scaled to [-1, 1] and given its click channels (positive click drawn with
weight exp(chessboard distance) - 1 inside the nucleus, negative clicks at other nuclei with drop
rate 0.5), all from a (seed, rank, step) generator. BasicUNet, sigmoid Dice loss (squared
prediction), Adam 1e-4, batch 64, 50 epochs, AMP. Validation Dice every epoch (no negative
clicks); ``best.pt`` keeps the best, ``last.pt`` the latest (auto-resume, also mid-epoch). Both
record the axis order of the weights (``axis_order``, see nuclick/model.py).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.checkpoint import find_resume, load_training_state, save_training_state_collective
from common.io import atomic_write_text
from common.config import parse_config
from common.logging import AverageMeter, MetricLogger, progress, report_step, start_run
from nuclick.config import TrainConfig
from nuclick.dataset import AugmentConfig, GuidanceConfig, NucleiDataset, read_datalist, train_batch
from nuclick.eval import evaluate
from nuclick.model import build_model, count_parameters, dice_loss, load_nuclick_weights


def build_loaders(cfg: TrainConfig, ctx: dist.DistContext):
    datalist = cfg.datalist or Path(cfg.data_root) / "dataset.json"
    train_items, valid_items = read_datalist(datalist, "training"), read_datalist(datalist, "validation")
    if cfg.max_valid:
        valid_items = valid_items[:cfg.max_valid]
    train_ds = NucleiDataset(train_items, cache=cfg.cache, desc="load training crops")
    valid_ds = NucleiDataset(valid_items, cache=cfg.cache, desc="load validation crops")
    sampler = dist.make_sampler(train_ds, shuffle=True, seed=cfg.seed)
    kwargs = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn)
    # own generators: the loaders never draw from the global RNG (exact mid-epoch resume)
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                       generator=torch.Generator().manual_seed(cfg.seed), **kwargs)
    valid = DataLoader(valid_ds, batch_size=cfg.valid_batch_size or cfg.batch_size,
                       sampler=dist.ShardSampler(len(valid_ds)), generator=torch.Generator().manual_seed(cfg.seed),
                       **kwargs)
    return train, valid, sampler


def build_model_for(cfg: TrainConfig, ctx: dist.DistContext) -> torch.nn.Module:
    """The bundle network at ``cfg.features``; ``init_checkpoint`` (bundle model.pt or a project
    checkpoint) brings its own widths and axis order."""
    if cfg.init_checkpoint:
        model, info = load_nuclick_weights(cfg.init_checkpoint)
        model.train()
        dist.print0(f"initialised from {info['kind']} {info['path']} (axis order {info['axis_order']})")
    else:
        model = build_model(cfg.features, axis_order=cfg.axis_order)
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Adam:
    """Adam at ``cfg.lr`` with torch's defaults otherwise and no schedule (nuclick.md §7)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def train_one_epoch(model, loader, optimizer, amp, ctx, cfg: TrainConfig, run: dict, logger: MetricLogger,
                    save_last) -> dict:
    """One (possibly partial, after a resume) epoch; ``run`` holds epoch, step and steps_per_epoch."""
    model.train()
    aug_cfg = AugmentConfig(**{k: getattr(cfg, k) for k in AugmentConfig.__dataclass_fields__})
    guide_cfg = GuidanceConfig(cfg.drop_rate, cfg.use_distance, cfg.gaussian, cfg.sigma, cfg.truncated)
    meter = AverageMeter()
    epoch, end = run["epoch"], (run["epoch"] + 1) * run["steps_per_epoch"]
    bar = progress(total=run["steps_per_epoch"], initial=run["step"] - epoch * run["steps_per_epoch"],
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for batch in loader:
        if run["step"] >= end:
            break
        x, target = train_batch(batch, make_generator(cfg.seed, ctx.rank, run["step"]), aug_cfg, guide_cfg, ctx.device)
        if cfg.channels_last and ctx.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)
        loss = dice_loss(logits, target)
        amp.backward_step(loss, optimizer)
        run["step"] += 1
        value = loss.item()
        meter.update(len(x), loss=value)
        report_step(bar, logger, run["step"], epoch, cfg.log_every, loss=value)
        if cfg.checkpoint_every and run["step"] % cfg.checkpoint_every == 0 and run["step"] < end:
            save_last(run["step"] // run["steps_per_epoch"], run["step"])
    bar.close()
    return AverageMeter.averages(dist.reduce_sums(meter.sums(), ctx.device))


# ============================================================================= demo
def prepare_demo_data(cfg: TrainConfig, ctx: dist.DistContext) -> None:
    """Synthetic CoNSeP-format tiles (once, cached), then ``prepare.py``'s code path (rank 0)."""
    from nuclick.config import PrepareConfig, demo_root
    from nuclick.demo import make_demo
    from nuclick.prepare import run as prepare

    if ctx.is_main:
        layout = make_demo(Path(demo_root()), n_train=cfg.demo_images, size=cfg.demo_size, seed=0)
        print(f"demo data in {layout.consep} ({'generated in %.0fs' % layout.seconds if layout.generated else 'cached'})")
        prep = PrepareConfig(input=str(layout.consep), output=str(cfg.data_root), crop_size=cfg.demo_crop)
        marker, params = Path(cfg.data_root) / "demo_prepare.json", {"crop_size": cfg.demo_crop}
        if layout.generated or not marker.is_file() or json.loads(marker.read_text()) != params:
            prepare(prep)
            atomic_write_text(marker, json.dumps(params) + "\n")  # after dataset.json: preparation complete
    dist.barrier()


def demo_inference(cfg: TrainConfig, ctx: dist.DistContext) -> dict:
    """``infer.py`` on the demo test tiles with their centroids as clicks; instance-level Dice."""
    from nuclick.config import InferConfig, demo_root
    from nuclick.demo import demo_layout
    from nuclick.eval import instance_scores, read_instance_map
    from nuclick.infer import run as infer

    layout, out = demo_layout(Path(demo_root())), Path(cfg.output_dir) / "inference"
    scores = []
    for image in sorted((layout.consep / "Test" / "Images").glob("*.png")):
        result = infer(InferConfig(image=str(image), clicks=str(layout.clicks / f"{image.stem}.csv"),
                                   checkpoint=str(Path(cfg.output_dir) / "best.pt"), output_dir=str(out),
                                   bb_size=cfg.demo_crop, device=cfg.device, precision=cfg.precision, num_workers=0))
        gt = read_instance_map(layout.consep / "Test" / "Labels" / f"{image.stem}.mat")
        scores.append(instance_scores(read_instance_map(result["instances"]), gt))
    keys = ("instance_dice", "object_dice", "pixel_dice")
    summary = {f"demo_{k}": sum(s[k] for s in scores) / len(scores) for k in keys}
    summary.update(demo_nuclei=sum(s["n_ground_truth"] for s in scores), demo_instances=sum(s["n_predicted"] for s in scores))
    dist.print0(f"demo inference on {len(scores)} test tiles ({summary['demo_nuclei']} clicked nuclei -> "
                f"{summary['demo_instances']} instances): instance Dice {summary['demo_instance_dice']:.4f}, "
                f"object Dice {summary['demo_object_dice']:.4f}, pixel Dice {summary['demo_pixel_dice']:.4f}; "
                f"overlays in {out}")
    return summary


# ============================================================================= main
def main(cfg: TrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    if cfg.demo:
        prepare_demo_data(cfg, ctx)
    out = start_run(cfg, "nuclick train", ctx)
    train_loader, valid_loader, sampler = build_loaders(cfg, ctx)
    model = build_model_for(cfg, ctx)
    dist.print0(f"BasicUNet features {list(model.features)}: {count_parameters(model)[0]:,} parameters; "
                f"{len(train_loader.dataset)} training / {len(valid_loader.dataset)} validation crops")
    ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model
    optimizer = build_optimizer(cfg, model)
    amp = MixedPrecision(ctx.device, cfg.precision)
    steps_per_epoch = min(math.ceil(sampler.num_samples / cfg.batch_size), cfg.max_steps_per_epoch or 1 << 62)
    run = {"epoch": 0, "step": 0, "steps_per_epoch": steps_per_epoch}
    best = -1.0

    def save_last(epoch: int, at_step: int, name: str = "last.pt") -> None:
        save_training_state_collective(out / name, is_main=ctx.is_main, model=model, optimizer=optimizer,
                                       scaler=amp.scaler, epoch=epoch, step=at_step, best_metric=best,
                                       config=cfg.to_dict(), extra={"axis_order": model.axis_order})

    resume_path = find_resume(out) if cfg.resume else None
    if resume_path is not None:
        state = load_training_state(resume_path, model=model, optimizer=optimizer, scaler=amp.scaler)
        model.set_axis_order(state.get("axis_order") or "hw")
        run["step"], best = state["step"], state["best_metric"] if state["best_metric"] is not None else -1.0
        dist.print0(f"resumed from {resume_path} at epoch {state['epoch']}, step {run['step']}")
    logger = MetricLogger(out)
    guide_valid = GuidanceConfig(cfg.valid_drop_rate, cfg.use_distance, cfg.gaussian, cfg.sigma, cfg.truncated)
    metrics: dict = {}
    for epoch in range(run["step"] // steps_per_epoch, cfg.epochs):
        run["epoch"] = epoch
        sampler.set_epoch(epoch, skip=(run["step"] - epoch * steps_per_epoch) * cfg.batch_size)
        t0 = time.time()
        train_stats = train_one_epoch(ddp, train_loader, optimizer, amp, ctx, cfg, run, logger, save_last)
        metrics = evaluate(model, valid_loader, amp, ctx, cfg.seed, epoch, guide_valid,
                           out / "valid_preview.png" if cfg.preview else None,
                           channels_last=cfg.channels_last and ctx.device.type == "cuda")
        dist.print0(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_stats.get('loss', float('nan')):.4f} | "
                    f"valid Dice {metrics['dice']:.4f} acc {metrics['accuracy']:.4f} loss {metrics['loss']:.4f} "
                    f"({metrics['samples']:.0f} crops) [{time.time() - t0:.0f}s]")
        logger.log(run["step"], metrics, prefix="valid", epoch=epoch + 1)
        if metrics["dice"] > best:
            best = metrics["dice"]
            save_last(epoch + 1, run["step"], "best.pt")
        save_last(epoch + 1, run["step"])
    logger.close()
    result = {"best_valid_dice": best, "last": metrics, "run_dir": str(out)}
    if cfg.demo and ctx.is_main:  # inference needs no collectives: rank 0 alone
        result.update(demo_inference(cfg, ctx))
    if ctx.is_main:
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    dist.cleanup()
    return result


if __name__ == "__main__":
    dist.launch(main, parse_config(TrainConfig))
