"""Optimizers the recipes use that torch does not ship (Novograd, LARS) and learning-rate /
momentum schedules written as pure functions of the step, plus a tiny scheduler that applies one.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import Optimizer


# ============================================================================= Novograd
class Novograd(Optimizer):
    """Novograd (Ginsburg et al. 2019, arXiv:1905.11286) with MONAI's exact algorithm.

    Layer-wise second moment (one scalar per parameter tensor), gradient normalised by it,
    weight decay added *after* normalisation, momentum without (1 - beta1) unless
    ``grad_averaging``, no bias correction. As in MONAI, ``p.grad`` is modified in place.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                 weight_decay: float = 0.0, grad_averaging: bool = False, amsgrad: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, amsgrad=amsgrad)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Novograd does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros([], device=p.device, dtype=p.dtype)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros([], device=p.device, dtype=p.dtype)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1  # counted, not used: no bias correction

                norm = torch.sum(torch.pow(grad, 2))
                if exp_avg_sq == 0:
                    exp_avg_sq.copy_(norm)
                else:
                    exp_avg_sq.mul_(beta2).add_(norm, alpha=1 - beta2)
                if group["amsgrad"]:
                    max_exp_avg_sq = state["max_exp_avg_sq"]
                    torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                    denom = max_exp_avg_sq.sqrt().add_(group["eps"])
                else:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])

                grad.div_(denom)
                if group["weight_decay"] != 0:
                    grad.add_(p, alpha=group["weight_decay"])
                if group["grad_averaging"]:
                    grad.mul_(1 - beta1)
                exp_avg.mul_(beta1).add_(grad)
                p.add_(exp_avg, alpha=-group["lr"])
        return loss


# ============================================================================= LARS
class LARS(Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017, arXiv:1708.03888).

    For groups with ``lars_adaptation=True`` (the default): g <- g + wd*w, then
    g <- g * trust * ||w|| / ||g|| (1 when either norm is 0). Groups with
    ``lars_adaptation=False`` (biases, norm layers: see ``split_decay_groups``) get plain
    momentum SGD with their own weight decay (normally 0).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, nesterov: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, nesterov=nesterov, lars_adaptation=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"] != 0:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if group["lars_adaptation"]:
                    w_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                    d_p = d_p.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d_p.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                buf = state["momentum_buffer"]
                update = d_p.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(update, alpha=-group["lr"])
        return loss


def split_decay_groups(model: torch.nn.Module, weight_decay: float,
                       skip: Callable[[str, torch.Tensor], bool] | None = None) -> list[dict]:
    """Two parameter groups: decayed (weights) and not decayed (biases, norm layers, 1-d params,
    plus anything ``skip`` selects, e.g. position embeddings). The second group also turns LARS
    adaptation off."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or (skip is not None and skip(name, p))
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False}]


# ============================================================================= schedules
def cosine_annealing(t: float, total: float, base: float, final: float = 0.0) -> float:
    """Closed form of CosineAnnealingLR: final + (base - final) * (1 + cos(pi t / total)) / 2."""
    t = min(max(t, 0.0), total)
    return final + (base - final) * (1 + math.cos(math.pi * t / total)) / 2


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0,
                  warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to
    ``final`` at ``total_steps``. ``step`` counts from 0 (the value used for the first update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return cosine_annealing(step - warmup_steps, span, base, final)


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (step total): EMA momentum and weight-decay
    schedules of BYOL/DINO, e.g. 0.996 -> 1."""
    return end - (end - start) * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))) / 2


def patchtcga_steps(batches_per_epoch: int, epochs: float, warmup_epochs: float, cold_epochs: float = 0,
                    accum: int = 1) -> tuple[int, int, int]:
    """PatchTCGA's (cold, peak, max) update counts, with its floor divisions:
    cold = len(loader) * cold_epochs // accum, peak = cold + len(loader) * warmup_epochs // accum,
    max = len(loader) * epochs // accum."""
    cold = int(batches_per_epoch * cold_epochs // accum)
    return cold, cold + int(batches_per_epoch * warmup_epochs // accum), int(batches_per_epoch * epochs // accum)


def patchtcga_lr(s: int, base: float, peak: float, cold_steps: int, peak_step: int, max_steps: int,
                 floor: float = 1e-6) -> float:
    """PatchTCGA ``GradualWarmupWithCosineLR``: the lr of update ``s``, counted from 1 (the
    scheduler's ``_step_count``). Update 1 and updates before ``cold_steps`` use the unscaled
    ``base`` lr; then linear from ``base`` (at ``cold_steps``) to ``peak`` (at ``peak_step``);
    from ``peak_step`` on ``peak * (1 + cos(pi (s - peak_step) / (max_steps - peak_step))) / 2 + floor``,
    which is ``floor`` at ``max_steps``, the last update of the planned epochs (later s are held there)."""
    if s <= 1 or s < cold_steps:
        return base
    if s < peak_step:
        return base + (s - cold_steps) / (peak_step - cold_steps) * (peak - base)
    s = min(s, max_steps)
    return peak * (1 + math.cos(math.pi * (s - peak_step) / max(max_steps - peak_step, 1))) / 2 + floor


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule lr = base * batch / reference (real division: never rounds to 0)."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return base_lr * global_batch / reference_batch


class FunctionScheduler:
    """Sets every group's lr to ``fn(step) * group.get('lr_scale', 1)``; its state is the step.

    ``fn(0)`` is applied at construction, so the first update uses it; call ``step()`` after each
    optimizer step (or each epoch for per-epoch schedules)."""

    def __init__(self, optimizer: Optimizer, fn: Callable[[int], float]):
        self.optimizer, self.fn, self.last_step = optimizer, fn, 0
        self._apply()

    def _apply(self) -> None:
        lr = self.fn(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def patchtcga_scheduler(optimizer: Optimizer, base_lr: float, peak_lr: float, batches_per_epoch: int, epochs: float,
                        warmup_epochs: float, cold_epochs: float = 0, accum: int = 1,
                        floor: float = 1e-6) -> FunctionScheduler:
    """PatchTCGA's per-update schedule (:func:`patchtcga_lr`) planned over ``epochs`` of
    ``batches_per_epoch`` loader batches (:func:`patchtcga_steps`), however early the run stops.
    The scheduler's step counts completed updates, so update s = step + 1."""
    cold, peak, last = patchtcga_steps(batches_per_epoch, epochs, warmup_epochs, cold_epochs, accum)
    return FunctionScheduler(optimizer, lambda step: patchtcga_lr(step + 1, base_lr, peak_lr, cold, peak, last, floor))
