"""Records of finished work, so that inference over a folder can be killed and restarted.

An inference command over many inputs writes each input's outputs atomically, then a small
record ``<output_dir>/.finished/<name>.json``. Restarted with the same command it skips every
input whose record matches::

    finished = FinishedWork(out, key={"checkpoint_sha256": sha, "config": settings})
    for path in inputs:
        if (summary := finished.lookup(name, path, outputs)) is not None and not overwrite:
            continue                                   # done before, same model, same settings
        ...                                            # compute and write the outputs atomically
        finished.record(name, path, summary)

A record matches when it was written under the same key (the checkpoint's hash and every setting
that shapes the outputs), for the same input file (size and modification time), and all its
outputs still exist. Anything else (a changed checkpoint or setting, a replaced input, a deleted
output, a record from a killed write) redoes the input. Records are written last and atomically,
so a kill at any moment loses at most the input in progress. ``work_key(path)`` names the work on
one input under the key, for partial results that let even the input in progress resume.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from common.errors import UserError
from common.io import atomic_write_text

RECORDS = ".finished"


def _input_identity(path: str | os.PathLike) -> dict:
    stat = Path(path).stat()
    return {"input": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class FinishedWork:
    """The finished inputs of one output folder under one key (see module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, key: dict[str, Any]):
        self.folder = Path(output_dir) / RECORDS
        self.key = json.loads(json.dumps(key, sort_keys=True))  # as it reads back from JSON
        self.key_hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def lookup(self, name: str, input_path: str | os.PathLike, outputs: Sequence[str | os.PathLike]) -> dict | None:
        """The stored summary when ``name`` was finished under this key from this very input and its
        ``outputs`` all exist; None otherwise (to be done, or redone)."""
        try:
            record = json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return None
        if record.get("key_hash") != self.key_hash or record.get("input") != _input_identity(input_path):
            return None
        if not all(Path(p).is_file() for p in outputs):
            return None
        return record.get("summary")

    def work_key(self, input_path: str | os.PathLike) -> str:
        """A name for work on this very input under this key: partial results saved with it are
        valid to continue from exactly when both the key and the input file are unchanged."""
        text = json.dumps({"key_hash": self.key_hash, "input": _input_identity(input_path)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def forget(self, name: str) -> None:
        """Remove ``name``'s record (its outputs are about to be rewritten)."""
        self._path(name).unlink(missing_ok=True)

    def record(self, name: str, input_path: str | os.PathLike, summary: dict) -> Path:
        """Mark ``name`` finished (call after its outputs are written)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"key_hash": self.key_hash, "key": self.key, "input": _input_identity(input_path), "summary": summary}
        path = self._path(name)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        return path


def append_summary(path: str | os.PathLike, record: dict) -> None:
    """One JSON line per input in a run summary (``inference.jsonl``, ``features.jsonl``), appended in
    one write: whole lines even when several processes append, or one is killed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def failure_line(summaries: Sequence[dict], what: str = "slides") -> str:
    failed = [s for s in summaries if s["status"] == "failed"]
    return f"{len(failed)} of {len(summaries)} {what} failed: " + "; ".join(s["error"] for s in failed)


class InputsFailed(UserError):
    """Some inputs of a folder run failed (each reported in its summary file); ``status`` is the
    command's exit status: the number that failed, at most 100. The ``__main__`` block turns it
    into that status (the failures were printed already)."""

    def __init__(self, summaries: Sequence[dict], what: str = "slides"):
        super().__init__(failure_line(summaries, what))
        self.status = min(sum(s["status"] == "failed" for s in summaries), 100)
