"""Throughput of the segPANDA models: training steps (forward + backward + AdamW) and sliding-window
inference of a whole tile, per model, on the configured device. Prints numbers, asserts nothing.

    python segpanda/bench.py                                  # DeepLabv3-R50 and ViT-S/16 UPerNet at 224
    python segpanda/bench.py --models deeplabv3:resnet18 --crop-size 96 --batch-size 8 --tile 256
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common.amp import MixedPrecision
from common.dist import resolve_device
from segpanda.config import ModelConfig
from segpanda.eval import predict
from segpanda.model import build_model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, cudnn autotuning)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bench(spec: str, args, device: torch.device) -> None:
    name, backbone = spec.split(":")
    cfg = ModelConfig(model=name, backbone=backbone, crop_size=args.crop_size)
    model = build_model(cfg).to(device)
    amp = MixedPrecision(device, args.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    y = torch.randint(0, 6, (args.batch_size, args.crop_size, args.crop_size), device=device)

    def train_step():
        with amp.autocast():
            out = model(x)["out"]
        amp.backward_step(F.cross_entropy(out.float(), y), opt, model.parameters(), 1.0)

    model.train()
    t_train = timed(train_step, args.repeats)
    model.eval()
    tile = torch.randn(1, 3, args.tile, args.tile, device=device)
    t_tile = timed(lambda: predict(model, tile, amp, args.crop_size, args.sw_batch_size, 0.25), args.repeats)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{spec:<32} {n_params:6.1f}M params | train {args.batch_size / t_train:7.1f} crops/s "
          f"({t_train * 1000:7.0f} ms/step) | sliding window {args.tile}px tile {t_tile * 1000:7.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deeplabv3:resnet50", "vit_upernet:vit_small_patch16_224"])
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, crop {args.crop_size}, batch {args.batch_size}")
    for spec in args.models:
        bench(spec, args, device)


if __name__ == "__main__":
    main()
