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

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.config import field_group, parse_config
from common.errors import exit_on_user_error
from common.logging import AverageMeter, MetricLogger, progress, report_step, start_run
from common.stain import StainNormalizer, training_stain
from common.training import Checkpointer, TrainState, wrap_ddp, write_result
from nuclick.config import AugmentConfig, GuidanceConfig, InferConfig, TrainConfig, demo_root
from nuclick.dataset import NucleiDataset, read_datalist, train_batch
from nuclick.demo import demo_layout, prepare_demo
from nuclick.eval import evaluate, instance_scores, read_instance_map
from nuclick.infer import run as infer
from nuclick.model import build_model, count_parameters, dice_loss, load_nuclick_weights


def build_loaders(cfg: TrainConfig, ctx: dist.DistContext):
    datalist = cfg.datalist or Path(cfg.data_root) / "dataset.json"
    train_items, val_items = read_datalist(datalist, "training"), read_datalist(datalist, "validation")
    if cfg.max_val:
        val_items = val_items[:cfg.max_val]
    train_ds = NucleiDataset(train_items, cache=cfg.cache, desc="load training crops")
    val_ds = NucleiDataset(val_items, cache=cfg.cache, desc="load validation crops")
    sampler = dist.make_sampler(train_ds, shuffle=True, seed=cfg.seed)
    loader_kwargs = dict(num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                         persistent_workers=cfg.num_workers > 0, worker_init_fn=dist.worker_init_fn)
    # own generators: the loaders never draw from the global RNG (exact mid-epoch resume)
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                       generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs)
    val = DataLoader(val_ds, batch_size=cfg.val_batch_size or cfg.batch_size,
                       sampler=dist.ShardSampler(len(val_ds)), generator=torch.Generator().manual_seed(cfg.seed),
                       **loader_kwargs)
    return train, val, sampler


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


def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, ctx, cfg: TrainConfig,
                    logger: MetricLogger, ckpt: Checkpointer, steps_per_epoch: int,
                    stain: StainNormalizer = StainNormalizer()) -> dict:
    """One (possibly partial, after a resume) epoch: crops stain normalised (``--stain-normalize``),
    augmented and given their clicks on the device from a (seed, rank, step) generator. No schedule
    (``scheduler`` is None). Returns the mean training loss over every process."""
    model.train()
    aug_cfg, guide_cfg = field_group(cfg, AugmentConfig), field_group(cfg, GuidanceConfig)
    meter = AverageMeter()
    epoch = state.epoch
    bar = progress(total=steps_per_epoch, initial=state.steps_done(epoch, steps_per_epoch),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for batch in loader:
        if state.epoch_finished(epoch, steps_per_epoch):
            break
        x, target = train_batch(batch, make_generator(cfg.seed, ctx.rank, state.step), aug_cfg, guide_cfg, ctx.device,
                                stain=stain)
        if cfg.channels_last and ctx.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)
        loss = dice_loss(logits, target)
        amp.backward_step(loss, optimizer)
        state.step += 1
        value = loss.item()
        meter.update(len(x), loss=value)
        report_step(bar, logger, state.step, epoch, cfg.log_every, loss=value)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            ckpt.save(state)  # mid-epoch: state.epoch is the epoch in progress
    bar.close()
    return AverageMeter.averages(dist.reduce_sums(meter.sums(), ctx.device))


# ============================================================================= demo
def demo_inference(cfg: TrainConfig, ctx: dist.DistContext) -> dict:
    """``infer.py`` on the demo test tiles with their centroids as clicks; instance-level Dice."""
    layout, out = demo_layout(Path(demo_root())), Path(cfg.output_dir) / "inference"
    scores = []
    for image in sorted((layout.consep / "Test" / "Images").glob("*.png")):
        result = infer(InferConfig(image=str(image), clicks=str(layout.clicks / f"{image.stem}.csv"),
                                   checkpoint=str(Path(cfg.output_dir) / "best.pt"), output_dir=str(out),
                                   bb_size=cfg.demo_crop, device=cfg.device, precision=cfg.precision, num_workers=0,
                                   stain_normalize=cfg.stain_normalize))  # the target stored in best.pt
        gt = read_instance_map(layout.consep / "Test" / "Labels" / f"{image.stem}.mat")
        scores.append(instance_scores(read_instance_map(result["instances"]), gt))
    keys = ("instance_dice", "object_dice", "pixel_dice")
    summary = {f"demo_{k}": sum(s[k] for s in scores) / len(scores) for k in keys}
    summary.update(demo_nuclei=sum(s["n_ground_truth"] for s in scores),
                   demo_instances=sum(s["n_predicted"] for s in scores))
    dist.print0(f"demo inference on {len(scores)} test tiles ({summary['demo_nuclei']} clicked nuclei -> "
                f"{summary['demo_instances']} instances): instance Dice {summary['demo_instance_dice']:.4f}, "
                f"object Dice {summary['demo_object_dice']:.4f}, pixel Dice {summary['demo_pixel_dice']:.4f}; "
                f"overlays in {out}")
    return summary


# ============================================================================= main
def main(cfg: TrainConfig) -> dict:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    stain, stain_state = training_stain(cfg)  # a bad --stain-target stops the run before anything else
    if cfg.demo:
        prepare_demo(cfg)  # synthetic CoNSeP tiles and their crops, built once
    out = start_run(cfg, "nuclick train", ctx)
    train_loader, val_loader, sampler = build_loaders(cfg, ctx)
    model = build_model_for(cfg, ctx)
    dist.print0(f"BasicUNet features {list(model.features)}: {count_parameters(model)[0]:,} parameters; "
                f"{len(train_loader.dataset)} training / {len(val_loader.dataset)} validation crops")
    ddp = wrap_ddp(model, ctx)
    optimizer = build_optimizer(cfg, model)
    scheduler = None  # constant learning rate: the recipe has no schedule (nuclick.md §7)
    amp = MixedPrecision(ctx.device, cfg.precision)
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))

    state = TrainState(extra={"axis_order": model.axis_order})  # every checkpoint records it
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp,
                        extra=stain_state)
    if ckpt.resume(state):
        model.set_axis_order(state.extra["axis_order"])
    logger = MetricLogger(out)
    guide_val = field_group(cfg, GuidanceConfig, drop_rate=cfg.val_drop_rate)
    metrics: dict = {}
    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        t0 = time.time()
        train_stats = train_one_epoch(ddp, train_loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt,
                                      steps_per_epoch, stain=stain)
        metrics = evaluate(model, val_loader, amp, ctx, cfg.seed, epoch, guide_val,
                           out / "val_preview.png" if cfg.preview else None,
                           channels_last=cfg.channels_last and ctx.device.type == "cuda", stain=stain)
        state.epoch = epoch + 1
        dist.print0(f"epoch {state.epoch}/{cfg.epochs}: train loss {train_stats.get('loss', float('nan')):.4f} | "
                    f"val Dice {metrics['dice']:.4f} acc {metrics['accuracy']:.4f} loss {metrics['loss']:.4f} "
                    f"({metrics['samples']:.0f} crops) [{time.time() - t0:.0f}s]")
        logger.log(state.step, metrics, prefix="val", epoch=state.epoch)
        if state.improved(metrics["dice"]):
            ckpt.save(state, "best.pt")
        ckpt.save(state, "last.pt")
    logger.close()

    result = {"best_val_dice": state.best, "last": metrics, "run_dir": str(out)}
    if cfg.demo and ctx.is_main:  # inference needs no collectives: rank 0 alone
        result.update(demo_inference(cfg, ctx))
    write_result(out, result, ctx)
    dist.cleanup()
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(TrainConfig))
