"""One mixed-precision code path: autocast with an explicit device and dtype, a GradScaler that is
enabled only for fp16, unscale-before-clip, a finite-loss check and scaler state in checkpoints.

bf16 and fp32 run with the scaler disabled, so the same calls work everywhere.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A clipping rule: (parameters, max norm) -> the norm before clipping (a float or a 0-d tensor).
ClipFn = Callable[[list, float], "float | torch.Tensor"]


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss is NaN or infinite: stop instead of training on garbage."""


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 on CPU. fp16 on CPU is refused (slow and unscaled)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(_DTYPES)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use --precision bf16 or fp32 on CPU")
    return _DTYPES[precision]


class MixedPrecision:
    """Owns autocast and the GradScaler for one training run.

    Usage::

        amp = MixedPrecision(device, cfg.precision)
        with amp.autocast():
            loss = criterion(model(x), y)
        grad_norm = amp.backward_step(loss, optimizer, params=model.parameters(), clip_norm=1.0)

    With gradient accumulation, ``amp.backward(loss, accumulation)`` per micro-batch, then
    ``amp.step(optimizer, params, clip_norm, zero_grad=True)`` once per update.
    """

    def __init__(self, device: torch.device, precision: str = "auto"):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, accumulation: int = 1) -> None:
        """Scale (fp16) and backpropagate ``loss / accumulation``; stop on a non-finite loss."""
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(f"loss is {loss.item()}; stopping (check lr, data, precision)")
        self.scaler.scale(loss / accumulation).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None,
             clip_norm: float | None = None, clip_fn: ClipFn | None = None, zero_grad: bool = False,
             set_to_none: bool = True) -> float:
        """Unscale, optionally clip, step (skipped by the scaler on inf/NaN grads), update, and
        with ``zero_grad`` clear the gradients: the end of every update, written once.

        Clipping runs when ``clip_norm`` is set (None or 0: off) and ``params`` are given, on
        unscaled gradients: ``clip_fn(params, clip_norm)``, by default the total norm
        (``clip_grad_norm_``); a recipe with its own rule passes it here (DINO clips each
        parameter's norm). Returns the norm ``clip_fn`` reports before clipping (NaN if not computed)."""
        grad_norm = float("nan")
        if clip_norm and params is not None:
            self.scaler.unscale_(optimizer)
            grad_norm = float((clip_fn or torch.nn.utils.clip_grad_norm_)(list(params), clip_norm))
        self.scaler.step(optimizer)
        self.scaler.update()
        if zero_grad:
            optimizer.zero_grad(set_to_none=set_to_none)
        return grad_norm

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      params: Iterable[torch.Tensor] | None = None, clip_norm: float | None = None,
                      set_to_none: bool = True, clip_fn: ClipFn | None = None) -> float:
        """Backward + step + zero_grad for the common no-accumulation case."""
        self.backward(loss)
        return self.step(optimizer, params, clip_norm, clip_fn, zero_grad=True, set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def grad_norm_is_finite(value: float) -> bool:
    return math.isfinite(value)
