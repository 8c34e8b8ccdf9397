"""A tiny but complete training script: the template every task's ``train.py`` follows.

Regression of a synthetic target with a small MLP, in the order of a real recipe: config, dist
init, seed, data, model, optimizer and schedule, resume, loop (train, evaluate, checkpoint, log).
The tests run it in every launch mode and kill it mid-epoch::

    python tests/tiny_train.py --output-dir runs/tiny --epochs 3
    torchrun --nproc_per_node 2 tests/tiny_train.py --output-dir runs/tiny --batch-size 4
    python tests/tiny_train.py --hosts $(hostname) --gpus-per-node 2 --output-dir runs/tiny

Exact resume (bit-identical to an uninterrupted run) rests on four things, all visible below:
the sampler order depends only on (seed, epoch) and ``set_epoch(epoch, skip)`` drops the
samples already consumed; the schedule is a function of the step stored in the checkpoint; every
process's RNG state is saved (``gather_rng_states``) and restored; and no DataLoader draws from
the global RNG (each gets its own generator; otherwise every new iterator consumes a number from
the global stream that the uninterrupted run drew at a different moment).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from common import dist
from common.amp import MixedPrecision
from common.config import BaseConfig, ConfigError, parse_config, save_config
from common.errors import exit_on_user_error
from common.logging import MetricLogger, git_revision
from common.optim import FunctionScheduler, Novograd, warmup_cosine
from common.training import Checkpointer, TrainState, wrap_ddp


@dataclass
class TinyConfig(BaseConfig):
    """Tiny MLP regression on synthetic data (template and test fixture)."""

    output_dir: str = "runs/tiny"
    num_workers: int = 0
    epochs: int = 3  # passes over the synthetic samples
    batch_size: int = 8  # per process; the global batch is batch_size * world size
    lr: float = 0.05  # peak learning rate after warm-up
    warmup_steps: int = 2  # linear warm-up steps before the cosine
    n_samples: int = 64  # synthetic regression samples
    n_features: int = 8  # inputs per sample
    hidden: int = 16  # width of the MLP's hidden layer
    use_dropout: bool = False  # dropout draws from the global RNG: exercises RNG save/restore
    checkpoint_every: int = 0  # optimizer steps between checkpoints of last.pt (0: only at the end)
    sleep_per_step: float = 0.0  # seconds; lets tests kill the run mid-epoch

    def validate(self) -> None:
        if self.batch_size <= 0 or self.n_samples <= 0 or self.epochs <= 0:
            raise ConfigError("batch_size, n_samples and epochs must be positive")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


# ----------------------------------------------------------------------------- builders
def build_dataset(cfg: TinyConfig) -> TensorDataset:
    """Identical on every rank: generated from ``cfg.seed`` with a private generator."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n_samples, cfg.n_features, generator=g)
    w = torch.randn(cfg.n_features, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(cfg.n_samples, 1, generator=g)
    return TensorDataset(x, y)


def make_loader(ds, sampler, cfg: TinyConfig) -> DataLoader:
    # A dedicated generator keeps the DataLoader from drawing its base seed from the global RNG.
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=dist.worker_init_fn)


def build_model(cfg: TinyConfig) -> nn.Module:
    layers = [nn.Linear(cfg.n_features, cfg.hidden), nn.ReLU()]
    if cfg.use_dropout:
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(cfg.hidden, 1))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- loops
def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, ctx, cfg: TinyConfig,
                    logger: MetricLogger, ckpt: Checkpointer, steps_per_epoch: int) -> None:
    """One (possibly partial, after a resume) epoch. Every task's ``train_one_epoch`` takes the
    same kinds of arguments in this order: model, loader, optimizer, scheduler, amp, state, ctx,
    cfg, logger, checkpointer, then what is specific to the task."""
    model.train()
    for x, y in loader:
        x, y = x.to(ctx.device), y.to(ctx.device)
        with amp.autocast():
            loss = nn.functional.mse_loss(model(x).float(), y)
        lr = scheduler.get_last_lr()[0]
        amp.backward_step(loss, optimizer, params=model.parameters(), clip_norm=10.0)
        scheduler.step()
        state.step += 1
        logger.log(state.step, {"loss": loss.item(), "lr": lr}, prefix="train", epoch=state.epoch)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 \
                and state.step < steps_per_epoch * cfg.epochs:
            ckpt.save(state)  # mid-epoch: state.epoch is the epoch in progress
        if cfg.sleep_per_step:
            time.sleep(cfg.sleep_per_step)


@torch.no_grad()
def evaluate(model, ds, cfg, ctx) -> float:
    """Exact MSE over the whole dataset: each sample once (ShardSampler), summed across ranks."""
    model.eval()
    loader = make_loader(ds, dist.ShardSampler(len(ds)), cfg)
    total, count = 0.0, 0
    for x, y in loader:
        total += float(nn.functional.mse_loss(model(x.to(ctx.device)).float(), y.to(ctx.device), reduction="sum"))
        count += len(x)
    sums = dist.reduce_sums({"se": total, "n": count}, ctx.device)
    return sums["se"] / sums["n"]


# ----------------------------------------------------------------------------- main
def main(cfg: TinyConfig) -> float:
    ctx = dist.setup(cfg.device)
    dist.seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    if ctx.is_main:
        save_config(cfg, cfg.output_dir)
    logger = MetricLogger(cfg.output_dir, tensorboard=False)
    dist.print0(f"tiny_train: world {ctx.world_size}, device {ctx.device}, git {git_revision()}")

    ds = build_dataset(cfg)
    sampler = dist.make_sampler(ds, shuffle=True, seed=cfg.seed)
    loader = make_loader(ds, sampler, cfg)
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    model = build_model(cfg).to(ctx.device)
    ddp = wrap_ddp(model, ctx)
    optimizer = Novograd(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    scheduler = FunctionScheduler(optimizer, lambda s: warmup_cosine(s, total_steps, cfg.warmup_steps, cfg.lr))
    amp = MixedPrecision(ctx.device, cfg.precision)

    state = TrainState()
    ckpt = Checkpointer(cfg.output_dir, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp)
    ckpt.resume(state)

    mse = float("nan")
    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        train_one_epoch(ddp, loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt, steps_per_epoch)
        mse = evaluate(model, ds, cfg, ctx)
        logger.log(state.step, {"mse": mse}, prefix="val", epoch=epoch)
        state.epoch = epoch + 1

    ckpt.save(state)
    logger.log(state.step, {"final_mse": mse, "world_size": ctx.world_size, "done": 1})
    logger.close()
    dist.cleanup()
    return mse


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(TinyConfig))
