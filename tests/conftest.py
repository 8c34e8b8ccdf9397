"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


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
