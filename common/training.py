"""The pieces every trainer repeats, written once — not a framework: no callbacks, no hidden loop.

A training script keeps its recipe in view and uses these as plain objects::

    state = TrainState()                                   # epoch, step, best metric
    ckpt = Checkpointer(out, ctx, cfg, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp)
    ckpt.resume(state)                                     # <out>/last.pt when cfg.resume
    ddp = wrap_ddp(model, ctx)
    for epoch in range(state.epoch, cfg.epochs):
        sampler.set_epoch(epoch, skip=state.samples_done(epoch, steps_per_epoch, cfg.batch_size))
        train_one_epoch(ddp, loader, optimizer, scheduler, amp, state, ctx, cfg, logger, ckpt)
        metrics = evaluate(model, val_loader, amp, ctx)
        state.epoch = epoch + 1
        if state.improved(metrics["acc"]):
            ckpt.save(state, "best.pt")
        ckpt.save(state, "last.pt")
    write_result(out, result, ctx)

``state.step`` counts optimizer updates and ``state.epoch`` completed epochs; a save in the middle
of an epoch keeps ``epoch`` at the epoch in progress and ``step`` beyond it, and a resumed run
skips the samples of that epoch already consumed (``samples_done``). Checkpoints keep the fixed
schema of :func:`common.checkpoint.save_training_state` (``epoch``, ``step``, ``best_metric``,
``config``, ``rng``, ...), so files written before this module load unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from common import dist
from common.checkpoint import find_resume, load_training_state, save_training_state_collective
from common.io import atomic_write_text


@dataclass
class TrainState:
    """Where a run is: completed epochs, completed optimizer updates, the best validation metric
    (higher is better) and whatever else a task must carry across a resume (``extra``, stored in
    the checkpoint under its own keys)."""

    epoch: int = 0
    step: int = 0
    best: float | None = -1.0  # below every metric the tasks select on (accuracy, Dice, mIoU are >= 0);
    # None: the task selects no best checkpoint (self-supervised pretraining), stored as such
    extra: dict[str, Any] = field(default_factory=dict)

    def steps_done(self, epoch: int, steps_per_epoch: int) -> int:
        """Updates of ``epoch`` already made (0 unless resumed mid-epoch): where its progress bar starts."""
        return max(self.step - epoch * steps_per_epoch, 0)

    def samples_done(self, epoch: int, steps_per_epoch: int, samples_per_step: int) -> int:
        """Samples of this process's share of ``epoch`` already consumed (0 unless resumed mid-epoch):
        what ``ResumableSampler.set_epoch(epoch, skip=...)`` drops."""
        return self.steps_done(epoch, steps_per_epoch) * samples_per_step

    def epoch_finished(self, epoch: int, steps_per_epoch: int) -> bool:
        return self.step >= (epoch + 1) * steps_per_epoch

    def improved(self, value: float) -> bool:
        """Record ``value`` as the best if it beats it; True when it did."""
        if value > self.best:
            self.best = float(value)
            return True
        return False


class Checkpointer:
    """The run's one checkpoint writer: ``save(state, "last.pt" | "best.pt")`` on every process
    (each gathers its RNG state; rank 0 writes atomically; all wait) and ``resume(state)``.

    ``extra`` gives additional top-level entries for the file: a mapping of constants (e.g.
    pretraining's ``backbone_prefix``) or a function of the state returning them;
    ``on_best`` is called on rank 0 after ``best.pt`` is written (spleen also exports the bundle's
    flat ``model.pt``)."""

    def __init__(self, run_dir: str | os.PathLike, ctx: dist.DistContext, config, *, model: nn.Module,
                 optimizer=None, scheduler=None, amp=None,
                 extra: Mapping | Callable[[TrainState], Mapping] | None = None,
                 on_best: Callable[[], None] | None = None):
        self.run_dir, self.ctx, self.config = Path(run_dir), ctx, config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler = amp.scaler if amp is not None else None
        self.extra, self.on_best = extra, on_best

    def save(self, state: TrainState, name: str = "last.pt") -> Path:
        path = self.run_dir / name
        extra = {**state.extra, **(self.extra(state) if callable(self.extra) else self.extra or {})}
        save_training_state_collective(path, is_main=self.ctx.is_main, model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, scaler=self.scaler, epoch=state.epoch,
                                       step=state.step, best_metric=state.best, config=self.config.to_dict(),
                                       extra=extra or None)
        if name == "best.pt" and self.on_best is not None and self.ctx.is_main:
            self.on_best()
        return path

    def resume(self, state: TrainState, enabled: bool | None = None) -> bool:
        """Restore ``<run_dir>/last.pt`` into the model, optimizer, scheduler, scaler, RNG and
        ``state`` (keys of ``state.extra`` are read back from the file). False when there is none."""
        enabled = getattr(self.config, "resume", True) if enabled is None else enabled
        path = find_resume(self.run_dir) if enabled else None
        if path is None:
            return False
        saved = load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                    scaler=self.scaler)
        state.epoch, state.step = int(saved["epoch"]), int(saved["step"])
        if saved.get("best_metric") is not None:
            state.best = float(saved["best_metric"])
        for key in state.extra:
            if key in saved:
                state.extra[key] = saved[key]
        dist.print0(f"resumed from {path} at epoch {state.epoch}, update {state.step}")
        return True


def wrap_ddp(model: nn.Module, ctx: dist.DistContext, **kwargs) -> nn.Module:
    """DistributedDataParallel on the process's device when distributed, else the model itself."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def write_result(run_dir: str | os.PathLike, result: Mapping[str, Any], ctx: dist.DistContext) -> None:
    """The end-of-run summary ``<run_dir>/result.json`` (rank 0, atomic)."""
    if ctx.is_main:
        atomic_write_text(Path(run_dir) / "result.json", json.dumps(result, indent=2) + "\n")
