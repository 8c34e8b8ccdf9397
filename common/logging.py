"""Run logging: tqdm progress on rank 0, a JSON-lines metrics log, TensorBoard scalars.

Only the main process writes; on other ranks every method is a no-op, so training code calls them
unconditionally. ``metrics.jsonl`` gets one JSON object per ``log`` call (with ``step`` and any
``epoch``); TensorBoard gets the same numbers under ``<prefix>/<name>``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from common.dist import is_main_process


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
             leave: bool = False, **kwargs: Any):
    """tqdm on rank 0 only (disabled elsewhere and when stderr is not a terminal in CI logs)."""
    disable = not is_main_process() or os.environ.get("PATHMONO_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True,
                mininterval=1.0, **kwargs)


def git_revision() -> str:
    """Current commit of the repository this file lives in, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricLogger:
    """Append metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = is_main_process() if enabled is None else enabled
        self._writer = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
                except ImportError:  # tensorboard is in requirements; tolerate its absence
                    self._writer = None

    @property
    def path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "", **context: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "step": int(step), **context}
        record.update({(f"{prefix}/{k}" if prefix else k): _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in metrics.items():
                v = _jsonable(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(f"{prefix}/{k}" if prefix else k, v, step)

    def add_image(self, tag: str, image_hwc, step: int) -> None:
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class AverageMeter:
    """Running sums for one epoch; ``global_avg`` after ``dist.reduce_sums`` of ``sums()``."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.count: dict[str, float] = {}

    def update(self, n: int = 1, **values: float) -> None:
        for k, v in values.items():
            self.total[k] = self.total.get(k, 0.0) + float(v) * n
            self.count[k] = self.count.get(k, 0.0) + n

    def sums(self) -> dict[str, float]:
        out = {f"{k}__sum": v for k, v in self.total.items()}
        out.update({f"{k}__n": v for k, v in self.count.items()})
        return out

    @staticmethod
    def averages(sums: Mapping[str, float]) -> dict[str, float]:
        keys = {k[:-5] for k in sums if k.endswith("__sum")}
        return {k: sums[f"{k}__sum"] / max(sums[f"{k}__n"], 1.0) for k in sorted(keys)}


def report_step(bar, logger: MetricLogger, step: int, epoch: int, log_every: int, **scalars: float) -> None:
    """After an optimizer step: advance the progress bar, show the scalars, and every ``log_every``
    steps append them (plus lr, if given) to the metrics log under ``train/``."""
    bar.update(1)
    bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items() if k != "lr"})
    if log_every and step % log_every == 0:
        logger.log(step, scalars, prefix="train", epoch=epoch)


def start_run(cfg, name: str, ctx) -> Path:
    """Rank 0: create the run folder, write the resolved ``config.json``, print a banner with the
    git revision, world size and device. Returns the run folder on every rank."""
    from common.config import save_config

    out = Path(cfg.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        print(f"{name} | git {git_revision()} | world {ctx.world_size} | device {ctx.device}", flush=True)
    return out
