"""Fixtures used by several test files, defined once.

Importable helpers (functions a test calls with its own arguments) live in modules next to this
one: ``common_testutils`` (subprocesses, free ports, process groups, checkpoint comparison) and
``pretrained_testutils`` (fake torchvision weight files).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import torch


@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch):
    """Every test runs without tqdm bars (``common.logging.progress`` and torch.hub downloads)."""
    monkeypatch.setenv("PATHMONO_NO_PROGRESS", "1")


@pytest.fixture
def fixtures_dir() -> Path:
    """The shared real-data fixtures folder (``<workspace>/shared/fixtures``).

    Skips the test when the folder is absent, except under CI (env ``CI=true``),
    where a missing folder is a failure.
    """
    path = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    if not path.is_dir():
        msg = f"{path}: fixtures folder absent"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty, private torch.hub cache with downloads failing, as on a machine without network
    access; returns its ``checkpoints`` folder (where torchvision's ImageNet files are looked up)."""
    root = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(root))
    assert Path(torch.hub.get_dir()) == root / "hub", "torch.hub.set_dir was called elsewhere: TORCH_HOME ignored"

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return root / "hub" / "checkpoints"


@pytest.fixture
def lr_per_step(monkeypatch) -> list[float]:
    """The learning rate of every optimizer update, in order: filled as the test trains (recorded
    in ``MixedPrecision.backward_step``, the one update path of every trainer)."""
    from common.amp import MixedPrecision

    lrs: list[float] = []
    real_step = MixedPrecision.backward_step

    def recording_step(self, loss, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return real_step(self, loss, optimizer, *args, **kwargs)

    monkeypatch.setattr(MixedPrecision, "backward_step", recording_step)
    return lrs


@pytest.fixture
def last_pt_by_step(tmp_path, monkeypatch) -> dict[int, Path]:
    """Copies of the ``last.pt`` files a run writes through ``common.training`` (mid-epoch ones
    included), by update: ``{step: copy}``; the first file written at a step is kept."""
    import common.training as training

    real_save = training.save_training_state_collective
    copies: dict[int, Path] = {}

    def save_and_keep(path, **kwargs):
        out = real_save(path, **kwargs)
        step = kwargs["step"]
        if Path(path).name == "last.pt" and step not in copies:
            copies[step] = tmp_path / "last_pt_by_step" / f"{step}.pt"
            copies[step].parent.mkdir(exist_ok=True)
            shutil.copy(path, copies[step])
        return out

    monkeypatch.setattr(training, "save_training_state_collective", save_and_keep)
    return copies


class CallRecorder:
    """Wraps functions of a module for one test: each call goes through to the real function and
    appends ``(name, args, kwargs, result)`` to ``calls``, in call order."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self._monkeypatch = monkeypatch

    def wrap(self, module, *names: str) -> None:
        for name in names:
            self._monkeypatch.setattr(module, name, self._recording(name, getattr(module, name)))

    def _recording(self, name: str, real):
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.append((name, args, kwargs, out))
            return out

        return wrapper


@pytest.fixture
def call_recorder(monkeypatch) -> CallRecorder:
    """A :class:`CallRecorder` whose wrappers are undone after the test."""
    return CallRecorder(monkeypatch)
