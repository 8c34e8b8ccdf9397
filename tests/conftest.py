"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest
import torch


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
