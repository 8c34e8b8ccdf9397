"""common.logging: the JSON-lines metrics log (rank 0 only) and exact epoch averages."""
from __future__ import annotations

import json

import pytest
import torch

from common.logging import AverageMeter, MetricLogger, git_revision


def test_metric_logger_writes_one_json_line_per_call(tmp_path):
    log = MetricLogger(tmp_path / "run", tensorboard=False)
    log.log(3, {"loss": torch.tensor(0.25), "acc": 1}, prefix="train", epoch=0)
    log.log(4, {"mse": float("nan"), "inf": float("inf")})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert {k: rows[0][k] for k in ("step", "epoch", "train/loss", "train/acc")} == \
        {"step": 3, "epoch": 0, "train/loss": 0.25, "train/acc": 1}
    assert rows[1]["mse"] == "nan" and rows[1]["inf"] == "inf"  # strict JSON, no NaN literal
    assert isinstance(rows[0]["time"], float)


def test_metric_logger_disabled_writes_nothing(tmp_path):
    log = MetricLogger(tmp_path / "run", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_metric_logger_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricLogger(tmp_path, tensorboard=True)
    log.log(1, {"loss": 0.5, "flag": True}, prefix="train")
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_average_meter_weights_by_count():
    m = AverageMeter()
    m.update(n=2, loss=1.0)
    m.update(n=6, loss=3.0, acc=0.5)
    sums = m.sums()
    assert sums == {"loss__sum": 20.0, "loss__n": 8.0, "acc__sum": 3.0, "acc__n": 6.0}
    assert AverageMeter.averages(sums) == {"acc": 0.5, "loss": 2.5}
    assert AverageMeter.averages({}) == {}


def test_git_revision_is_a_short_hash_or_unknown():
    rev = git_revision()
    assert rev == "unknown" or (4 <= len(rev) <= 40 and all(c in "0123456789abcdef" for c in rev))
