"""Exact resume: a training run (tests/tiny_train.py, with dropout so RNG state matters) killed with
SIGKILL mid-epoch and restarted finishes with bit-identical weights, optimizer and schedule state
to an uninterrupted run, with 1 process and with 2 (gloo, host-list launch)."""
from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from common_testutils import (assert_same_weights, finish, free_port, kill_group, load_state, read_jsonl, run_ok,
                              start, tiny_cmd, wait_for)

STEPS_PER_EPOCH, EPOCHS, CKPT_EVERY, KILL_AT = 8, 3, 3, 10


def _args(world: int) -> list[str]:
    args = ["--epochs", str(EPOCHS), "--n-samples", "64", "--batch-size", str(8 // world), "--use-dropout",
            "--checkpoint-every", str(CKPT_EVERY), "--seed", "11"]
    if world > 1:
        args += ["--hosts", socket.gethostname(), "--gpus-per-node", str(world)]
    return args


def _port() -> list[str]:
    return ["--master-port", str(free_port())]


def _train_losses(rows):
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}  # last occurrence wins


def _assert_same_final_state(a, b):
    assert a["step"] == b["step"] == STEPS_PER_EPOCH * EPOCHS
    assert_same_weights(a, b)
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, name)
    assert a["scheduler"] == b["scheduler"]


@pytest.fixture
def launch():
    """Start a command in the background; whatever is still running at teardown is killed."""
    procs = []

    def _start(cmd):
        procs.append(start(cmd))
        return procs[-1]

    yield _start
    for proc in procs:
        if proc.poll() is None:
            kill_group(proc)
            proc.communicate()


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, world, launch):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = launch(tiny_cmd(ref_dir, *_args(world), *_port()))
    victim = launch(tiny_cmd(run_dir, *_args(world), *_port(), "--sleep-per-step", "0.3"))

    def reached_kill_step():
        return any(r.get("step", 0) >= KILL_AT and "train/loss" in r for r in read_jsonl(run_dir / "metrics.jsonl"))

    wait_for(reached_kill_step, timeout=120, proc=victim)
    kill_group(victim)
    killed = finish(victim, timeout=30)
    assert killed.returncode == -9
    ref = finish(reference, timeout=150)
    assert ref.returncode == 0, ref.stderr[-4000:]
    a = load_state(ref_dir / "last.pt")
    if world == 1:  # resuming a finished run must change nothing (checked below)
        again = launch(tiny_cmd(ref_dir, *_args(world)))

    saved = load_state(run_dir / "last.pt")
    logged = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r)
    # a mid-epoch checkpoint (9 unless the machine stalled us past the next one), work after it lost
    assert saved["step"] >= 9 and saved["step"] % CKPT_EVERY == 0 and saved["step"] % STEPS_PER_EPOCH != 0
    assert logged >= saved["step"] >= logged - CKPT_EVERY
    assert len(saved["rng"]) == world
    if world == 1:  # control: the same checkpoint with another RNG state must NOT reproduce the run
        tampered = tmp_path / "tampered"
        tampered.mkdir()
        torch.manual_seed(12345)
        saved["rng"][0]["torch"] = torch.get_rng_state()
        torch.save(saved, tampered / "last.pt")
        tampered_run = launch(tiny_cmd(tampered, *_args(world)))

    resumed = run_ok(tiny_cmd(run_dir, *_args(world), *_port()), timeout=150)
    assert f"resumed from {run_dir / 'last.pt'} at epoch {saved['epoch']}, update {saved['step']}" in resumed.stdout

    b = load_state(run_dir / "last.pt")
    _assert_same_final_state(a, b)
    # every logged training loss (including the replayed steps) equals the uninterrupted run's
    ref_losses = _train_losses(read_jsonl(ref_dir / "metrics.jsonl"))
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == STEPS_PER_EPOCH * EPOCHS + (logged - saved["step"])
    for r in rows:
        assert r["train/loss"] == ref_losses[r["step"]], r["step"]

    if world == 1:
        assert finish(tampered_run, timeout=150).returncode == 0
        c = load_state(tampered / "last.pt")
        assert c["step"] == a["step"] and not torch.equal(c["model"]["0.weight"], a["model"]["0.weight"])
        again = finish(again, timeout=150)
        assert again.returncode == 0 and "update 24" in again.stdout
        _assert_same_final_state(a, load_state(ref_dir / "last.pt"))


def test_resume_into_a_different_model_names_the_mismatch(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    import tiny_train

    cfg = tiny_train.TinyConfig(output_dir=str(tmp_path), device="cpu", epochs=1, n_samples=16)
    assert tiny_train.main(cfg) > 0  # in-process single run: writes last.pt
    with pytest.raises(RuntimeError, match=r"size mismatch for 0.weight.*torch.Size\(\[16, 8\]\).*torch.Size\(\[8, 8\]\)"):
        tiny_train.main(dataclasses.replace(cfg, hidden=8))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "2.weight", "2.bias"'):
        tiny_train.main(dataclasses.replace(cfg, use_dropout=True))  # dropout shifts the layer index
