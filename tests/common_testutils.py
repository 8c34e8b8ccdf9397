"""Helpers that tests import: free ports, bounded-time process launches, in-test process groups,
run folders (metrics.jsonl, checkpoints) and the comparison of two checkpoints' weights.

Every launch has a timeout, so a hung collective fails the test instead of blocking CI; on timeout
the whole process group the test started is killed (never anything else).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TINY_TRAIN = TESTS_DIR / "tiny_train.py"

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without any launcher variables, one thread per process, no tqdm."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PATHMONO_NO_PROGRESS="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- subprocesses
def start(cmd: list[str], cwd: Path = REPO_ROOT, **env: str) -> subprocess.Popen:
    """Start a command in its own session (so its whole process tree can be killed)."""
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=child_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a process this test started (its pgid is its pid)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_ok(cmd: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    res = finish(start(cmd, **env), timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr[-4000:]}"
    return res


def tiny_cmd(out_dir: Path, *args) -> list[str]:
    return [sys.executable, TINY_TRAIN, "--output-dir", out_dir, "--device", "cpu", *args]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while we read
            pass
    return rows


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before the condition\n{out}\n{err[-4000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                kill_group(proc)
            raise AssertionError("condition not reached in time")
        time.sleep(poll)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    """Two training checkpoints (``load_state`` dicts) hold the same model keys, every tensor equal
    to the bit (e.g. a resumed run and the uninterrupted one)."""
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, f"{len(differing)} tensors differ: {differing[:5]}"


# ----------------------------------------------------------------------------- in-test process groups
def _entry(local_rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from common import dist

    ctx = dist.setup("cpu")
    try:
        fn(ctx, *args)
    finally:
        dist.cleanup()


def run_workers(fn, world: int, *args, timeout: float = 90) -> None:
    """Run ``fn(ctx, *args)`` in ``world`` spawned processes joined into a gloo group.

    ``fn`` must be importable (a module-level function); an exception in any worker fails the
    test with the worker's traceback; a hang is killed after ``timeout`` seconds."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{fn.__name__} workers did not finish in {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
