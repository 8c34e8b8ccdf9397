"""Throughput of the segPANDA models: training steps (forward + backward + AdamW) and sliding-window
inference of a whole tile, per model, on the configured device. Prints numbers, asserts nothing.

    python segpanda/bench.py                                  # DeepLabv3-R50 and ViT-S/16 UPerNet at 224
    python segpanda/bench.py --models deeplabv3:resnet18 --crop-size 96 --batch-size 8 --tile 256
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common.amp import MixedPrecision
from common.config import ArgumentParser, ConfigError, field_choices, field_comments, validated
from common.dist import resolve_device
from common.errors import exit_on_user_error
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
    name, sep, backbone = spec.partition(":")
    if not sep:
        raise ConfigError(f"--models: expected MODEL:BACKBONE, got {spec!r}")
    cfg = validated(ModelConfig(model=name, backbone=backbone, crop_size=args.crop_size))
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


def main(argv: list[str] | None = None) -> None:
    choices, comments = field_choices(ModelConfig), field_comments(ModelConfig)
    p = ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["deeplabv3:resnet50", "vit_upernet:vit_small_patch16_224"],
                   help="MODEL:BACKBONE pairs, e.g. deeplabv3:resnet18 or vit_upernet:vit_small_patch16_224")
    p.add_argument("--crop-size", type=int, default=224, help="training crop side in pixels")
    p.add_argument("--batch-size", type=int, default=4, help="crops per training step")
    p.add_argument("--tile", type=int, default=512, help="side of the tile inferred by sliding window")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up (averaged)")
    p.add_argument("--device", default="auto", choices=choices["device"], help=comments["device"])
    p.add_argument("--precision", default="auto", choices=choices["precision"], help=comments["precision"])
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, crop {args.crop_size}, batch {args.batch_size}")
    for spec in args.models:
        bench(spec, args, device)


if __name__ == "__main__":
    with exit_on_user_error():
        main()
