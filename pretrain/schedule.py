"""Optimizers and per-update schedules of the five pretraining recipes (reference §3, §8).

| method | optimizer | lr schedule (per update) | other schedules |
|---|---|---|---|
| SimCLR | LARS (trust 0.001, momentum 0.9; no wd/adaptation on BN and biases) | linear warm-up, cosine to 0 | |
| MoCo v2 | SGD momentum 0.9, wd on every parameter | cosine per *epoch* (``--cos``) | key momentum fixed |
| BYOL | LARS, as SimCLR | PatchTCGA: warm-up from the base lr, cosine + 1e-6 | target EMA 0.99 -> 1 |
| DINO | AdamW | linear warm-up from 0 (``np.linspace``: peak at W - 1), cosine to 1e-6 | wd 0.04 -> 0.4, teacher 0.996 -> 1 |
| MAE | AdamW (0.9, 0.95) | linear warm-up from 0, half-cosine to 0 | |

The peak lr is ``lr * global_batch / base_batch_size`` where global batch = per-process batch x
processes x accumulation. PatchTCGA's floor division (``lr * (global // base)``, 0 below 512) is
available as ``lr_scaling="floor"`` for parity, and refused when it would give lr 0.
"""
from __future__ import annotations

import math

import torch

from common.optim import LARS, cosine_annealing, cosine_ramp, split_decay_groups, warmup_cosine


def peak_lr(cfg, world_size: int) -> float:
    global_batch = cfg.batch_size * world_size * cfg.accum
    if cfg.lr_scaling == "floor":
        factor = global_batch // cfg.base_batch_size
        if factor == 0:
            raise ValueError(
                f"global batch {global_batch} (= {cfg.batch_size} per process x {world_size} processes x "
                f"{cfg.accum} accumulation) is below base_batch_size {cfg.base_batch_size}: the PatchTCGA floor "
                "rule gives lr 0. Use --lr-scaling linear, a larger batch / --accum, or a smaller --base-batch-size")
        return cfg.lr * factor
    return cfg.lr * global_batch / cfg.base_batch_size


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """Parameter groups: weights (decayed, LARS-adapted, wd-scheduled) and biases / norms /
    1-d parameters (no decay, no adaptation); MoCo decays everything as upstream."""
    if cfg.method == "moco":
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    else:
        groups = split_decay_groups(model, cfg.weight_decay)
    groups[0]["scheduled_wd"] = True
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, trust_coefficient=0.001)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    betas = (0.9, 0.95) if cfg.method == "mae" else (0.9, 0.999)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg, peak: float, updates_per_epoch: int, total: int) -> float:
    """Learning rate for update ``step`` (0-based) of ``total``."""
    warmup = int(round(cfg.warmup_epochs * updates_per_epoch))
    if cfg.method == "moco":  # MoCo --cos: lr * 0.5 * (1 + cos(pi * epoch / epochs)), constant within an epoch
        return cosine_annealing(step // max(updates_per_epoch, 1), cfg.epochs, peak, 0.0)
    if cfg.method == "byol":  # PatchTCGA: warm-up from the unscaled base lr, then cosine + 1e-6
        if step < warmup:
            return cfg.lr + (peak - cfg.lr) * step / warmup
        return peak * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) / 2 + cfg.min_lr
    if cfg.method == "dino" and 1 < warmup and step < warmup:  # np.linspace(0, peak, W): reaches peak at W - 1
        return peak * step / (warmup - 1)
    return warmup_cosine(step, total, warmup, peak, final=cfg.min_lr)


def weight_decay_at(step: int, cfg, total: int) -> float:
    """DINO's cosine weight-decay ramp (constant for the other methods)."""
    return cosine_ramp(step, total, cfg.weight_decay, cfg.weight_decay_end)


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, cfg, peak: float, updates_per_epoch: int,
                    total: int) -> float:
    """Set lr (every group) and the scheduled weight decay for update ``step``; returns the lr."""
    lr = lr_at(step, cfg, peak, updates_per_epoch, total)
    wd = weight_decay_at(step, cfg, total)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("scheduled_wd"):
            group["weight_decay"] = wd
    return lr


def clip_per_parameter(params, clip: float) -> torch.Tensor:
    """DINO's clipping: each parameter's gradient norm separately to ``clip`` (scaled by
    clip / (norm + 1e-6) when that is below 1). Stays on the device (no host sync per
    parameter); returns the largest norm before clipping as a 0-d tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    for grad, norm in zip(grads, norms):
        grad.mul_((clip / (norm + 1e-6)).clamp(max=1.0))
    return torch.stack(norms).max()


def gradient_clip(method: str):
    """The recipe's clipping rule for ``common.amp`` (``clip_fn``): DINO clips each parameter's
    gradient norm (:func:`clip_per_parameter`); the others the total norm (None: the default)."""
    return clip_per_parameter if method == "dino" else None
