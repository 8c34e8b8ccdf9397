"""common.checkpoint: atomic writes (also under SIGKILL), the training-state schema and RNG
restore (per rank), safe loading that refuses code-running pickles, foreign-weight key mapping."""
from __future__ import annotations

import os
import pickle
import random
import stat
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from common import dist
from common.amp import MixedPrecision
from common.checkpoint import (CheckpointError, apply_key_map, extract_state_dict, find_resume, gather_rng_states, load_file, load_training_state, load_weights, rng_state, save_training_state, set_rng_state, unwrap_model)
from common.io import atomic_torch_save, atomic_write
from common.optim import FunctionScheduler, Novograd, warmup_cosine
from common_testutils import REPO_ROOT, finish, kill_group, run_workers, start, wait_for


def tiny(seed=0, hidden=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"v": torch.tensor([1])}, path)

    def broken(fh):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert load_file(path)["v"].tolist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_atomic_write_gives_normal_permissions(tmp_path):
    path = atomic_torch_save({"v": torch.ones(1)}, tmp_path / "sub" / "a.pt")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask  # not mkstemp's 0600


KILL_DURING_SAVE = textwrap.dedent("""
    import io, sys, time, pathlib, torch
    from common.checkpoint import save_training_state
    run_dir = pathlib.Path(sys.argv[1])
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    save_training_state(run_dir / "last.pt", model=model, epoch=0, step=5)
    real_save = torch.save

    def slow_save(obj, fh):  # the next save stalls half-way through writing
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        fh.write(data[: len(data) // 2])
        fh.flush()
        (run_dir / "writing").touch()
        time.sleep(60)
        fh.write(data[len(data) // 2:])

    torch.save = slow_save
    with torch.no_grad():
        model.weight.fill_(2.0)
    save_training_state(run_dir / "last.pt", model=model, epoch=0, step=10)
""")


def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    proc = start([sys.executable, "-c", KILL_DURING_SAVE, tmp_path], cwd=REPO_ROOT)
    wait_for(lambda: (tmp_path / "writing").exists(), timeout=60, proc=proc)
    kill_group(proc)
    res = finish(proc, timeout=30)
    assert res.returncode == -9
    path = find_resume(tmp_path)
    assert path == tmp_path / "last.pt"
    model = nn.Linear(3, 2)
    state = load_training_state(path, model=model)
    assert state["step"] == 5 and model.weight.eq(1.0).all()
    # the kill really hit mid-write: a torn temp file is left beside it, unreadable, and ignored
    torn = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.") and p.name.endswith(".tmp")]
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_file(torn[0])


# ----------------------------------------------------------------------------- training state
def _train_objects(seed=0):
    model = tiny(seed)
    opt = Novograd(model.parameters(), lr=0.01)
    sched = FunctionScheduler(opt, lambda s: warmup_cosine(s, 20, 3, 0.01))
    amp = MixedPrecision(torch.device("cpu"), "fp32")
    return model, opt, sched, amp


def _steps(model, opt, sched, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 3, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_training_state_round_trip_restores_everything(tmp_path):
    model, opt, sched, amp = _train_objects()
    _steps(model, opt, sched, 4, seed=1)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_training_state(tmp_path / "last.pt", model=model, optimizer=opt, scheduler=sched, scaler=amp,
                        epoch=1, step=4, best_metric=0.5, config={"lr": 0.01, "hosts": ["a"]})
    expected_draws = (random.random(), np.random.rand(), torch.rand(2))
    _steps(model, opt, sched, 3, seed=2)
    expected_after = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2, amp2 = _train_objects(seed=9)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = load_training_state(tmp_path / "last.pt", model=model2, optimizer=opt2, scheduler=sched2, scaler=amp2)
    assert (state["epoch"], state["step"], state["best_metric"], state["config"]) == (1, 4, 0.5, {"lr": 0.01, "hosts": ["a"]})
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_metric", "config", "rng"}
    assert sched2.last_step == 4 and opt2.param_groups[0]["lr"] == sched.fn(4)
    draws = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1] and torch.equal(draws[2], expected_draws[2])
    _steps(model2, opt2, sched2, 3, seed=2)
    assert _equal_state(model2.state_dict(), expected_after)  # optimizer state continued exactly


def test_restore_rng_false_leaves_the_generators(tmp_path):
    model = tiny()
    save_training_state(tmp_path / "c.pt", model=model, epoch=0, step=0)
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    load_training_state(tmp_path / "c.pt", model=model, restore_rng=False)
    assert torch.equal(torch.rand(3), expect)


def test_rng_state_helpers_round_trip():
    state = rng_state()
    a = (random.random(), np.random.randn(), torch.randn(3))  # randn: numpy caches a gaussian
    set_rng_state(state)
    b = (random.random(), np.random.randn(), torch.randn(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert len(gather_rng_states()) == 1  # single process


def _rng_worker(ctx, run_dir):
    dist.seed_everything(100 + ctx.rank)
    model = tiny()
    torch.rand(ctx.rank + 1)  # streams at different positions
    rng = gather_rng_states()
    assert len(rng) == 2
    if ctx.is_main:
        save_training_state(f"{run_dir}/multi.pt", model=model, epoch=0, step=0, rng=rng)
        save_training_state(f"{run_dir}/single.pt", model=model, epoch=0, step=0)  # rank 0's state only
    dist.barrier()
    expect = torch.rand(4)
    torch.manual_seed(7)
    load_training_state(f"{run_dir}/multi.pt", model=model)
    got = torch.rand(4)
    torch.manual_seed(7)
    load_training_state(f"{run_dir}/single.pt", model=model)
    after_single = torch.rand(4)
    torch.save({"expect": expect, "got": got, "after_single": after_single}, f"{run_dir}/rng{ctx.rank}.pt")


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    run_workers(_rng_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rng{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["got"], r0["expect"]) and torch.equal(r1["got"], r1["expect"])
    assert not torch.equal(r0["got"], r1["got"])
    # a single saved state is rank 0's: rank 0 continues it, rank 1 is not given rank 0's stream
    assert torch.equal(r0["after_single"], r0["expect"])
    assert not torch.equal(r1["after_single"], r0["expect"])
    torch.manual_seed(7)
    assert torch.equal(r1["after_single"], torch.rand(4))


def test_rng_states_of_another_world_size_are_not_applied(tmp_path):
    model = tiny()
    save_training_state(tmp_path / "c.pt", model=model, epoch=0, step=0, rng=[rng_state(), rng_state()])
    torch.manual_seed(1)
    expect = torch.rand(2)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="RNG states of 2 processes, this run has 1"):
        load_training_state(tmp_path / "c.pt", model=model)
    assert torch.equal(torch.rand(2), expect)


# ----------------------------------------------------------------------------- bad input
def test_mismatched_keys_are_named(tmp_path):
    save_training_state(tmp_path / "c.pt", model=tiny(hidden=4), epoch=0, step=0)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "3.weight", "3.bias"'):
        load_training_state(tmp_path / "c.pt", model=other)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0.weight"):
        load_training_state(tmp_path / "c.pt", model=tiny(hidden=5))


def test_load_weights_reports_missing_unexpected_and_shapes(tmp_path):
    sd = tiny().state_dict()
    sd["extra.weight"] = torch.ones(1)
    del sd["2.bias"]
    sd["0.weight"] = torch.ones(7, 3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(), tmp_path / "foreign.pt")
    msg = str(err.value)
    assert str(tmp_path / "foreign.pt") in msg and "Sequential" in msg
    assert "missing=['2.bias']" in msg and "unexpected=['extra.weight']" in msg
    assert "0.weight: checkpoint (7, 3) vs model (4, 3)" in msg


def test_not_a_training_checkpoint(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_training_state(tmp_path / "weights.pt", model=tiny())


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_file(tmp_path / "nope.pt")
    assert find_resume(tmp_path) is None
    atomic_torch_save({"model": tiny().state_dict(), "step": 1}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"torn.pt: not a readable PyTorch checkpoint"):
        load_file(tmp_path / "torn.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    payload = {"model": tiny().state_dict(), "step": 0, "x": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for attempt in (lambda: load_file(path), lambda: load_training_state(path, model=tiny()),
                    lambda: load_weights(tiny(), path)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        assert "refused to load" in str(err.value) and "arbitrary code" in str(err.value)
        assert str(path) in str(err.value)
    assert not marker.exists()
    # control: the payload is live -- an unsafe load does run it
    live_marker = tmp_path / "LIVE"
    pickle.loads(pickle.dumps(_RunsCode(live_marker)))
    assert live_marker.exists()


def test_pickled_namespace_like_upstream_ssl_checkpoints_is_refused(tmp_path):
    import argparse

    torch.save({"model": tiny().state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "ssl.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_file(tmp_path / "ssl.pt")


# ----------------------------------------------------------------------------- foreign weights
def test_extract_state_dict_containers_and_prefixes():
    sd = tiny().state_dict()
    for wrapped in (sd, {"state_dict": sd}, {"model": {f"module.{k}": v for k, v in sd.items()}},
                    {"net": {"state_dict": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}}):
        out = extract_state_dict(wrapped)
        assert _equal_state(out, sd)
    with pytest.raises(CheckpointError, match="no state_dict found; top-level keys: \\['epoch', 'optim'\\]"):
        extract_state_dict({"epoch": 3, "optim": {"lr": 1}})
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        extract_state_dict([1, 2])


def test_key_maps_and_allowed_patterns():
    sd = {"enc.0.weight": torch.ones(4, 3), "enc.0.bias": torch.ones(4), "head.weight": torch.ones(2, 4),
          "head.bias": torch.ones(2), "proj.weight": torch.ones(1)}
    regex = apply_key_map(sd, [(r"^enc\.", ""), (r"^head\.", "2.")])
    assert set(regex) == {"0.weight", "0.bias", "2.weight", "2.bias", "proj.weight"}
    assert set(apply_key_map(sd, {"head.bias": "b"})) == {"enc.0.weight", "enc.0.bias", "head.weight", "b", "proj.weight"}
    assert set(apply_key_map(sd, lambda k: None if k.startswith("proj") else k)) == set(sd) - {"proj.weight"}
    model = tiny()
    with pytest.raises(CheckpointError, match="unexpected=\\['proj.weight'\\]"):
        load_weights(model, sd, key_map=[(r"^enc\.", ""), (r"^head\.", "2.")])
    report = load_weights(model, sd, key_map=[(r"^enc\.", ""), (r"^head\.", "2.")], allow_unexpected=[r"proj\..*"])
    assert report.unexpected == [] and model[0].weight.eq(1).all() and model[2].bias.eq(1).all()
    partial = {k: v for k, v in sd.items() if k.startswith("enc")}
    model = tiny()
    head_before = model[2].weight.clone()
    load_weights(model, partial, key_map=[(r"^enc\.", "")], allow_missing=[r"2\..*"])
    assert model[0].weight.eq(1).all() and torch.equal(model[2].weight, head_before)


def test_unwrap_model():
    inner = tiny()

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap_model(nn.DataParallel(Compiled(inner))) is inner
    assert unwrap_model(inner) is inner
