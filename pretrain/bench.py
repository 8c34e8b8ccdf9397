"""Throughput of the pretraining pipeline per method: loader alone, model alone, end to end.

    python pretrain/bench.py                          # every method, demo backbones, demo data
    python pretrain/bench.py --methods dino mae --steps 20 --full   # the recipe backbones (GPU)

For each method, in one run, images/s (source images, not views) of
- ``loader``: reading + decoding HDF5 shards in the DataLoader workers, nothing else;
- ``model``: view generation + forward + backward + optimizer step on an in-memory batch;
- ``end-to-end``: the real training step fed by the loader.
Ratios end-to-end / min(loader, model) near 1 mean the two overlap well.
"""
from __future__ import annotations

import itertools
import time

import torch
from torch.utils.data import DataLoader

from common.amp import MixedPrecision
from common.augment import make_generator
from common.config import ArgumentParser, field_choices, field_comments, parse_config
from common.dist import DistContext, resolve_device, worker_init_fn
from common.errors import exit_on_user_error
from pretrain.config import PretrainConfig
from pretrain.methods import METHODS, build_method
from pretrain.shards import ShardAwareSampler, ShardedImages
from pretrain.schedule import build_optimizer, gradient_clip
from pretrain.train import packed_splits
from pretrain.views import make_views


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_method(method: str, args) -> dict[str, float]:
    flags = ["--method", method, "--device", args.device, "--num-workers", str(args.workers)]
    cfg = parse_config(PretrainConfig, flags + ([] if args.full else ["--demo"]) +
                       (["--batch-size", str(args.batch_size)] if args.batch_size else []))
    device = resolve_device(cfg.device)
    ctx = DistContext(0, 1, 0, device)  # one process
    dataset = ShardedImages(packed_splits(cfg, ctx)["train"])
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=ShardAwareSampler(dataset, 1, 0, seed=0),
                        num_workers=cfg.num_workers, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0, worker_init_fn=worker_init_fn)
    model = build_method(cfg, num_classes=int(dataset.labels.max()) + 1).to(device).train()
    optimizer = build_optimizer(model, cfg)
    amp = MixedPrecision(device, cfg.precision)
    stream = iter(_forever(loader))

    calls = itertools.count(1)

    def step(images, labels):
        i = next(calls)
        gen = make_generator(0, 0, i)
        views = make_views(method, images.to(device, non_blocking=True), gen, cfg)
        with amp.autocast():
            loss, _ = model(views, labels.to(device), 1, gen)
        amp.backward(loss)
        model.after_backward(1)
        amp.step(optimizer, [p for p in model.parameters() if p.requires_grad], cfg.clip_norm,
                 clip_fn=gradient_clip(cfg.method), zero_grad=True)
        model.after_update(i, 10 ** 6)

    fixed_images, fixed_labels = next(stream)
    per_batch = {
        "loader": _timed(lambda: next(stream), args.steps * 2, 2, device),
        "model": _timed(lambda: step(fixed_images, fixed_labels), args.steps, 1, device),
        "end-to-end": _timed(lambda: step(*next(stream)), args.steps, 1, device),
    }
    return {k: cfg.batch_size / v for k, v in per_batch.items()} | {"batch": cfg.batch_size, "arch": cfg.arch}


def _forever(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to time")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--batch-size", type=int, default=0, help="images per step (0: the method's batch size)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", default="auto", choices=field_choices(PretrainConfig)["device"],
                        help=field_comments(PretrainConfig)["device"])
    parser.add_argument("--full", action="store_true", help="recipe backbones and data_root instead of the demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    results = {m: bench_method(m, args) for m in args.methods}
    print(f"\n{'method':8s} {'arch':24s} {'batch':>5s} {'loader':>9s} {'model':>9s} {'end-to-end':>11s} "
          f"{'e2e/min':>8s}   (images/s)")
    for m, r in results.items():
        ratio = r["end-to-end"] / min(r["loader"], r["model"])
        print(f"{m:8s} {r['arch']:24s} {r['batch']:5d} {r['loader']:9.1f} {r['model']:9.1f} "
              f"{r['end-to-end']:11.1f} {ratio:8.2f}")
    return results


if __name__ == "__main__":
    with exit_on_user_error():
        main()
