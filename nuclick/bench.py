"""Throughput numbers (no assertions): the on-device batch pipeline (augmentation + guidance), a
training step of the BasicUNet (forward, Dice loss, backward, Adam) and click inference.

    python nuclick/bench.py                                   # bundle width, batch 16, 128 crops
    python nuclick/bench.py --features 16 32 64 128 256 16    # the demo's reduced width
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common import dist
from common.amp import MixedPrecision
from common.augment import make_generator
from common.config import parse_config
from common.errors import exit_on_user_error
from nuclick.config import AugmentConfig, BenchConfig, GuidanceConfig, InferConfig
from nuclick.dataset import train_batch
from nuclick.infer import ArrayImage, segment_clicks
from nuclick.model import build_model, count_parameters, dice_loss


def _timed(fn, steps: int) -> float:
    """Seconds per call (mean over ``steps`` after one warm-up call)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def synthetic_batch(n: int, size: int, seed: int = 0):
    """uint8 crops with a disc target and two other nuclei, in the loader's format."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = size // 2
    mask = ((yy - c) ** 2 + (xx - c) ** 2 <= (size // 10) ** 2).to(torch.uint8)[None, None].repeat(n, 1, 1, 1)
    others = torch.zeros(n, 1, size, size, dtype=torch.int16)
    others[:, :, 2:10, 2:10], others[:, :, -10:-2, -10:-2] = 1, 2
    return image, mask, others, torch.arange(n)


def main(cfg: BenchConfig) -> dict:
    ctx = dist.setup(cfg.device)
    amp = MixedPrecision(ctx.device, cfg.precision)
    model = build_model(cfg.features).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = synthetic_batch(cfg.batch_size, cfg.crop_size)
    step = {"i": 0}

    def pipeline():
        step["i"] += 1
        return train_batch(batch, make_generator(0, 0, step["i"]), AugmentConfig(), GuidanceConfig(), ctx.device)

    def train_step():
        x, y = pipeline()
        with amp.autocast():
            logits = model(x)
        amp.backward_step(dice_loss(logits, y), optimizer)

    t_pipe, t_step = _timed(pipeline, cfg.steps), _timed(train_step, cfg.steps)
    model.eval()
    rng = np.random.default_rng(0)
    image = ArrayImage(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    xy = rng.integers(0, 512, (cfg.clicks, 2))
    t_infer = _timed(lambda: segment_clicks(model, image, xy, InferConfig(batch_size=cfg.batch_size),
                                            ctx.device, amp), max(cfg.steps // 2, 1))
    result = {"device": str(ctx.device), "threads": torch.get_num_threads(), "dtype": str(amp.dtype),
              "parameters": count_parameters(model)[0], "batch": cfg.batch_size, "crop": cfg.crop_size,
              "pipeline_ms_per_batch": 1e3 * t_pipe, "train_samples_per_s": cfg.batch_size / t_step,
              "infer_clicks_per_s": cfg.clicks / t_infer}
    for k, v in result.items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(BenchConfig))
