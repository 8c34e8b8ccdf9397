"""Typed run configuration: a dataclass per task, overridable from the command line.

Each task's ``config.py`` subclasses :class:`BaseConfig`; its defaults are the reference
recipe. ``parse_config(TaskConfig)`` turns every field into a ``--flag`` (``batch_size`` is
``--batch-size`` or ``--batch_size``), rejects unknown keys with the list of valid ones and a
suggestion, and returns the resolved instance, which ``save_config`` dumps to the run folder and
the checkpoint code stores alongside the weights.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

C = TypeVar("C", bound="BaseConfig")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass
class BaseConfig:
    """Fields every task shares: run folder, reproducibility, device, precision, distribution."""

    output_dir: str = "runs/default"  # run folder: config.json, metrics.jsonl, TensorBoard, last.pt/best.pt
    seed: int = 0  # each process seeds with seed + rank
    deterministic: bool = False  # deterministic algorithms, no cudnn autotuning
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    num_workers: int = 2
    resume: bool = True  # continue from <output_dir>/last.pt when it exists
    # Multi-node launch without torchrun (PatchTCGA style): the same command on every host.
    hosts: list[str] = field(default_factory=list)  # node host names; node rank = index of this host
    node_rank: int = -1  # -1: position of this machine's host name in `hosts`
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    gpus_per_node: int = 0  # processes per node; 0 = all visible GPUs (1 on CPU)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing values
def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "y", "on"}:
        return True
    if lowered in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, optional: bool):
    base = {bool: _parse_bool, int: int, float: float, str: str}.get(tp)
    if base is None:
        raise TypeError(f"unsupported config field type {tp!r}")
    if not optional:
        return base

    def parse(text: str):
        return None if text.strip().lower() in {"none", "null"} else base(text)

    return parse


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    tp, optional = _unwrap_optional(tp)
    flags = [f"--{f.name.replace('_', '-')}"]
    if "_" in f.name:
        flags.append(f"--{f.name}")
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        kwargs.update(nargs="*", type=_scalar_parser(args[0], False))
    elif tp is bool:
        kwargs.update(nargs="?", const=True, type=_scalar_parser(bool, optional))
    else:
        kwargs.update(type=_scalar_parser(tp, optional))
    parser.add_argument(*flags, **kwargs)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(cls: type[C], description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", dest="__config_file", default=None,
                        help="JSON file of overrides (e.g. a run's config.json); flags win over it")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        _add_field(parser, f, hints[f.name])
    return parser


def _unknown_key_error(cls: type, keys: Sequence[str], source: str) -> ConfigError:
    valid = sorted(f.name for f in dataclasses.fields(cls))
    lines = [f"unknown config key(s) in {source}: {', '.join(keys)}"]
    for key in keys:
        guess = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), valid, n=1)
        if guess:
            lines.append(f"  did you mean --{guess[0].replace('_', '-')} instead of {key}?")
    lines.append("valid keys: " + ", ".join(valid))
    return ConfigError("\n".join(lines))


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "dict",
                     base: C | None = None) -> C:
    """Build ``cls`` from a dict (e.g. a checkpoint's config), rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise _unknown_key_error(cls, unknown, source)
    start = dataclasses.asdict(base) if base is not None else {}
    start.update(values)
    return cls(**start)


def parse_config(cls: type[C], argv: Sequence[str] | None = None) -> C:
    """Defaults of ``cls`` <- demo preset (``--demo``, if the class defines ``demo_preset()``)
    <- optional ``--config file.json`` <- command-line flags."""
    parser = build_parser(cls)
    args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if unknown:
        raise _unknown_key_error(cls, [u for u in unknown if u.startswith("-")] or unknown, "command line")
    overrides = vars(args)
    config_file = overrides.pop("__config_file")
    cfg = cls()
    if overrides.get("demo", getattr(cfg, "demo", False)) and hasattr(cls, "demo_preset"):
        # demo preset sits between the recipe defaults and anything the user passes explicitly
        cfg = config_from_dict(cls, {**cls.demo_preset(), "demo": True}, source="demo preset", base=cfg)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = config_from_dict(cls, json.loads(path.read_text()), source=str(path), base=cfg)
    cfg = config_from_dict(cls, overrides, source="command line", base=cfg)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


@contextlib.contextmanager
def exit_on_config_error():
    """For ``__main__`` blocks: a :class:`ConfigError` (a flag, value or file the user must fix)
    ends the program with its message on stderr and exit status 2, without a traceback."""
    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def save_config(cfg: BaseConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``<run_dir>/config.json`` atomically."""
    from common.io import atomic_write_text

    path = Path(run_dir) / "config.json"
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def default_cache_dir(name: str) -> Path:
    """Where generated demo data lives: ``$PATHMONO_CACHE/<name>`` or ``~/.cache/pathmono/<name>``."""
    root = os.environ.get("PATHMONO_CACHE") or Path.home() / ".cache" / "pathmono"
    return Path(root) / name
