"""Checkpoints: a fixed training-state schema, auto-resume, safe loading, and a
loader for foreign checkpoints (released bundles, other codebases) with explicit key maps.

Training-state schema (``save_training_state``)::

    {model, optimizer, scheduler, scaler, epoch, step, best_metric, config, rng}

- ``model`` is the state_dict of the unwrapped (non-DDP, non-compiled) model.
- ``epoch`` is the number of *completed* epochs; ``step`` the number of completed optimizer
  steps. A checkpoint written mid-epoch has ``step % steps_per_epoch != 0``; resuming skips the
  batches already seen, so the resumed run equals an uninterrupted one.
- ``rng`` holds the python/numpy/torch (and CUDA) generator states: a list with one entry per
  rank when the caller passes ``rng=gather_rng_states()`` (a collective, called on every rank
  before rank 0 saves), else the states of the saving process alone. On load each rank restores
  its own entry; a single (rank-0) state is restored on rank 0 only, never copied to other ranks.

Everything is loaded with ``torch.load(..., weights_only=True)``: a file that needs arbitrary
unpickling is refused with a clear message instead of executing its code.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from common.dist import all_gather_object, barrier, get_rank, get_world_size
from common.errors import UserError
from common.io import atomic_torch_save


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------- safe loading
def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        if "GLOBAL" not in reason:  # no code reference met: random bytes, a truncated or foreign file
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from err
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled objects other than tensors and "
            f"plain containers, which could run arbitrary code ({reason}). "
            "If you trust it, convert it to a plain state_dict first.") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what the unpickler met, without the advice
    around it: "Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default",
    "Trying to load unsupported GLOBAL posix.system ..." or "Unsupported operand 20" (not a pickle)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.removeprefix("WeightsUnpickler error:").strip().split(". Please use", 1)[0]
    return lines[0] if lines else type(err).__name__


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    state = {"python": list(_py_state_to_list(random.getstate())),
             "numpy": _np_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def gather_rng_states() -> list[dict[str, Any]]:
    """Every process's generator states, ordered by rank, for ``save_training_state(rng=...)``.

    A collective: call it on every rank (then save on rank 0). Single-process: ``[rng_state()]``."""
    return all_gather_object(rng_state())


def _own_rng_state(saved: Any) -> Mapping[str, Any] | None:
    """The entry of a saved ``rng`` field that belongs to this process (None: nothing to restore)."""
    rank, world = get_rank(), get_world_size()
    if isinstance(saved, Mapping):  # one process's state: only rank 0 may continue that stream
        return saved if rank == 0 else None
    if isinstance(saved, (list, tuple)):
        if len(saved) != world:
            warnings.warn(f"checkpoint holds RNG states of {len(saved)} processes, this run has {world}; "
                          "RNG states not restored (the run stays reproducible, not identical)")
            return None
        return saved[rank]
    return None


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- training state
def save_training_state(path: str | os.PathLike, *, model: nn.Module, optimizer=None, scheduler=None,
                        scaler=None, epoch: int, step: int, best_metric: float | None = None,
                        config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                        rng: list[dict[str, Any]] | None = None) -> Path:
    """Write the fixed-schema training state atomically (call on rank 0 only).

    ``rng``: the result of :func:`gather_rng_states` (called on every rank), so that each rank
    resumes its own random stream; default: this process's state only."""
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None else float(best_metric),
        "config": dict(config) if config is not None else None,
        "rng": rng_state() if rng is None else list(rng),
    }
    if extra:
        state.update(extra)
    return atomic_torch_save(state, path)


def find_resume(run_dir: str | os.PathLike, name: str = "last.pt") -> Path | None:
    path = Path(run_dir) / name
    return path if path.is_file() else None


def load_training_state(path: str | os.PathLike, *, model: nn.Module, optimizer=None, scheduler=None,
                        scaler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore a ``save_training_state`` file into the given objects; returns the whole dict."""
    state = load_file(path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (keys: "
                              f"{sorted(state)[:10] if isinstance(state, dict) else type(state).__name__})")
    unwrap_model(model).load_state_dict(state["model"], strict=True)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    own_rng = _own_rng_state(state.get("rng")) if restore_rng else None
    if own_rng is not None:
        set_rng_state(own_rng)
    return state


# ----------------------------------------------------------------------------- foreign weights
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "weights")


def extract_state_dict(obj: Any, container_keys: Iterable[str] = CONTAINER_KEYS) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common containers and strip ``module.`` / ``_orig_mod.``."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}")
        key = next((k for k in container_keys if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(f"no state_dict found; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {_strip_prefixes(k): v for k, v in sd.items()}


def _strip_prefixes(key: str) -> str:
    """Strip wrapper prefixes in any nesting order (DDP(compile(m)) and compile(DDP(m)) alike)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


KeyMap = Callable[[str], "str | None"] | Mapping[str, str] | Iterable[tuple[str, str]]


def apply_key_map(sd: Mapping[str, torch.Tensor], key_map: KeyMap | None) -> dict[str, torch.Tensor]:
    """Rename keys: a callable (return None to drop a key), an exact dict, or (regex, repl) pairs."""
    if key_map is None:
        return dict(sd)
    if callable(key_map):
        fn = key_map
    elif isinstance(key_map, Mapping):
        fn = lambda k: key_map.get(k, k)  # noqa: E731
    else:
        rules = [(re.compile(p), r) for p, r in key_map]

        def fn(k: str) -> str:
            for pat, repl in rules:
                k = pat.sub(repl, k)
            return k
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = fn(k)
        if new is not None:
            out[new] = v
    return out


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"missing={self.missing[:10]}{'...' if len(self.missing) > 10 else ''} "
                f"unexpected={self.unexpected[:10]}{'...' if len(self.unexpected) > 10 else ''} "
                f"shape_mismatch={self.shape_mismatch[:10]}")


def _allowed(key: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], *,
                 key_map: KeyMap | None = None, allow_missing: Iterable[str] = (),
                 allow_unexpected: Iterable[str] = ()) -> LoadReport:
    """Load foreign weights into ``model`` and fail on any key or shape that does not fit.

    ``source`` is a path or an already loaded object; containers are unwrapped, ``module.``
    prefixes stripped and ``key_map`` applied. ``allow_missing`` / ``allow_unexpected`` are
    regular expressions (full match) for keys the caller accepts not to match.
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    obj = load_file(source) if isinstance(source, (str, os.PathLike)) else source
    sd = apply_key_map(extract_state_dict(obj), key_map)
    target = unwrap_model(model).state_dict()
    report = LoadReport(
        missing=[k for k in target if k not in sd and not _allowed(k, allow_missing)],
        unexpected=[k for k in sd if k not in target and not _allowed(k, allow_unexpected)],
        shape_mismatch=[f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                        for k in sd if k in target and sd[k].shape != target[k].shape])
    if report.missing or report.unexpected or report.shape_mismatch:
        raise CheckpointError(f"{name}: weights do not fit {type(unwrap_model(model)).__name__}: {report}")
    unwrap_model(model).load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    return report


def save_training_state_collective(path: str | os.PathLike, *, is_main: bool, **state: Any) -> None:
    """Call on every rank: gathers each rank's RNG state (restored per rank on resume), rank 0 writes
    ``save_training_state(path, **state)``, everyone waits for the file."""
    rng = gather_rng_states()
    if is_main:
        save_training_state(path, rng=rng, **state)
    barrier()
