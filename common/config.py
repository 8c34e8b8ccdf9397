"""Typed run configuration: a dataclass per task, overridable from the command line.

Each task's ``config.py`` subclasses :class:`BaseConfig`; its defaults are the reference
recipe. ``parse_config(TaskConfig)`` turns every field into a ``--flag`` (``batch_size`` is
``--batch-size`` or ``--batch_size``), rejects unknown keys with a suggestion for each mistyped
one, and returns the resolved instance, which ``save_config`` dumps to the run folder and
the checkpoint code stores alongside the weights.

The dataclass is the single source of the command line's documentation: the comment written after
a field is its ``--help`` line (comments of inherited fields come from the class that declares
them), followed by its default; a ``typing.Literal[...]`` annotation (``mode: Literal["dense",
"patch"] = "dense"``, also inside ``list[...]`` or ``Optional[...]``) declares the field's choices,
which ``--help`` shows as ``{dense,patch}`` and every construction of the config checks, so a
``validate()`` method does not repeat them. Errors are :class:`ConfigError`, a
:class:`common.errors.UserError`: scripts report them as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from common.errors import UserError

C = TypeVar("C", bound="BaseConfig")
G = TypeVar("G")


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used; the message starts with the flag or file."""


@dataclass
class BaseConfig:
    """Fields every task shares: run folder, reproducibility, device, precision, distribution."""

    output_dir: str = "runs/default"  # run folder: config.json, metrics.jsonl, TensorBoard, last.pt/best.pt
    seed: int = 0  # each process seeds with seed + rank
    deterministic: bool = False  # deterministic algorithms, no cudnn autotuning
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    num_workers: int = 2  # data-loader worker processes per training process
    resume: bool = True  # continue from <output_dir>/last.pt when it exists
    # Multi-node launch without torchrun (PatchTCGA style): the same command on every host.
    hosts: list[str] = field(default_factory=list)  # node host names; node rank = index of this host
    node_rank: int = -1  # -1: position of this machine's host name in `hosts`
    master_addr: str = "127.0.0.1"  # host list launch: address of the node with rank 0
    master_port: int = 29500  # host list launch: free TCP port on that node
    gpus_per_node: int = 0  # processes per node; 0 = all visible GPUs (1 on CPU)

    def __post_init__(self) -> None:
        check_choices(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- stain mix-ins
# Declared once for every pathology task (common/stain.py does the work). Keyword-only, so a task's
# AugmentConfig that inherits them keeps its own fields' positional order.
@dataclass(kw_only=True)
class StainAugmentConfig:
    """HED stain augmentation of the training batches (Tellez et al.), off by default."""

    stain_augment: Literal["none", "hed"] = "none"  # none: the reference recipe | hed: HED jitter of every image
    hed_sigma: float = 0.05  # hed: each stain amount scaled by U(1 - sigma, 1 + sigma)
    hed_bias: float = 0.05  # hed: each stain amount shifted by U(-bias, bias)


@dataclass(kw_only=True)
class StainNormalizeConfig:
    """Stain normalisation of the network's input to a target's statistics."""

    stain_normalize: Literal["none", "macenko", "reinhard"] = "none"  # normalise each image's stain to the target
    # inference and evaluation: empty = the target stored in the checkpoint by a run trained with one
    stain_target: list[str] = field(default_factory=list)  # target image file(s), fitted together


@dataclass(kw_only=True)
class StainTrainConfig(StainNormalizeConfig):
    """Stain normalisation of a training run, whose checkpoints store the fitted target."""

    stain_statistics: str = ""  # written by the run (config.json): the fitted target's statistics; not an input


def field_group(cfg: Any, group: type[G], **changes: Any) -> G:
    """The ``group`` dataclass (a set of fields ``cfg``'s class inherits, e.g. nuclick's
    ``GuidanceConfig``) with ``cfg``'s values, some of them replaced by ``changes``::

        guide_val = field_group(cfg, GuidanceConfig, drop_rate=cfg.val_drop_rate)
    """
    return group(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(group)} | changes)


# ----------------------------------------------------------------------------- field types
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _element_type(tp: Any) -> tuple[Any, bool, bool]:
    """A field's annotation -> (scalar type or Literal, is a list, accepts None)."""
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        return args[0], True, optional
    return tp, False, optional


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


@functools.cache
def _choice_fields(cls: type) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """``{field name: (allowed values, None allowed too)}`` for the ``Literal[...]`` fields."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        element, _, optional = _element_type(hints[f.name])
        values = _literal_choices(element)
        if values is not None:
            found[f.name] = (values, optional)
    return found


def field_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """``{field name: allowed values}`` for the fields annotated with ``Literal[...]``."""
    return {name: values for name, (values, _) in _choice_fields(cls).items()}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _either(values: Sequence[Any]) -> str:
    """('a', 'b', 'c') -> 'a, b or c' (the empty string shown as '')."""
    shown = [str(v) if v != "" else "''" for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def check_choices(cfg: Any) -> None:
    """Raise :class:`ConfigError` when a ``Literal`` field holds a value outside its choices
    (``None`` passes where the annotation is optional: a default filled in later)."""
    for name, (allowed, optional) in _choice_fields(type(cfg)).items():
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in allowed]
        if bad:
            got = bad[0] if len(bad) == 1 else bad
            raise ConfigError(f"{_flag(name)} must be {_either(allowed)}, got {got!r}")


# ----------------------------------------------------------------------------- help text
@functools.cache
def _own_field_comments(klass: type) -> dict[str, str]:
    """The comments on the lines of each field declared in ``klass``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (interactive, frozen): no help text
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = [comments[line] for line in range(node.lineno, node.end_lineno + 1) if line in comments]
            if text:
                found[node.target.id] = " ".join(text)
    return found


def field_comments(cls: type) -> dict[str, str]:
    """``{field name: the comment written after it}``, read from the source of ``cls`` and of the
    dataclasses it inherits from: a redeclared field keeps its base's comment unless it has its own."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_own_field_comments(klass))
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: text for name, text in comments.items() if name in names}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value) if value else "empty"
    if value is None:
        return "none"
    return str(value) if value != "" else "empty"


def _metavar(values: Sequence[Any]) -> str:
    return "{" + ",".join(str(v) if v != "" else "''" for v in values) + "}"


# ----------------------------------------------------------------------------- the parser
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; each flag's default appended to its help (config fields
    carry theirs already)."""


class ArgumentParser(argparse.ArgumentParser):
    """The project's argparse: no abbreviated flags, defaults shown in ``--help``, and a bad
    command line raised as a one-line :class:`ConfigError` instead of usage text and exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(_flag_first(message))


def _flag_first(message: str) -> str:
    """argparse's messages with the flag first, as the project's: "argument --mode: invalid choice:
    'x' (choose from 'a', 'b')" -> "--mode must be a or b, got 'x'"; "argument --lr: invalid float
    value: 'x'" -> "--lr: invalid float value: 'x'"."""
    if message.startswith("argument ") and ": " in message:
        flag, _, rest = message.removeprefix("argument ").partition(": ")
        flag = flag.split("/")[0]
        choice = re.fullmatch(r"invalid choice: (.*) \(choose from (.*)\)", rest)
        if choice:
            allowed = [c.strip().strip("'") for c in choice.group(2).split(",")]
            return f"{flag} must be {_either(allowed)}, got {choice.group(1)}"
        return f"{flag}: {rest}"
    for prefix, what in (("unrecognized arguments: ", "unknown argument(s); --help lists them all"),
                         ("the following arguments are required: ", "required, missing")):
        if message.startswith(prefix):
            return f"{message.removeprefix(prefix)}: {what}"
    return message


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "y", "on"}:
        return True
    if lowered in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _scalar_parser(tp: Any, optional: bool):
    choices = _literal_choices(tp)
    if choices is not None:
        tp = type(choices[0])
    base = {bool: _parse_bool, int: int, float: float, str: str}.get(tp)
    if base is None:
        raise TypeError(f"unsupported config field type {tp!r}")
    if not optional:
        return base

    def parse(text: str):
        return None if text.strip().lower() in {"none", "null"} else base(text)

    parse.__name__ = base.__name__  # argparse names the type in "invalid <type> value"
    return parse


def _add_field(group: Any, f: dataclasses.Field, tp: Any, comment: str) -> None:
    """``f`` as a ``--flag`` of the parser or argument group ``group``; its help is ``comment``."""
    element, is_list, optional = _element_type(tp)
    default = f"(default: {_shown(_default_of(f))})"
    help_text = f"{comment} {default}" if comment else default
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    choices = _literal_choices(element)
    kwargs["metavar"] = _metavar(choices) if choices is not None else getattr(element, "__name__", "value").upper()
    if is_list:
        kwargs.update(nargs="*", type=_scalar_parser(element, False))
    elif element is bool:
        kwargs.update(nargs="?", const=True, type=_scalar_parser(bool, optional), metavar="{true,false}")
    else:
        kwargs.update(type=_scalar_parser(element, optional))
    group.add_argument(_flag(f.name), **kwargs)  # --batch_size works too: parse_config rewrites it


def _dashed(arg: str) -> str:
    """``--batch_size=8`` -> ``--batch-size=8``: both spellings of a flag are accepted."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return f"--{name.replace('_', '-')}{eq}{value}"


def build_parser(cls: type[C], description: str | None = None, prog: str | None = None) -> ArgumentParser:
    """Every field of ``cls`` as a ``--flag`` whose help is the field's comment and default."""
    parser = ArgumentParser(prog=prog, usage="%(prog)s [-h] [--config FILE] [--flag VALUE ...]",
                            description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", dest="__config_file", default=argparse.SUPPRESS, metavar="FILE",
                        help="JSON file of overrides (e.g. a run's config.json); flags win over it")
    own = parser.add_argument_group("flags")
    shared = parser.add_argument_group("flags every script shares (run folder, device, distribution)")
    shared_names = {f.name for f in dataclasses.fields(BaseConfig)}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        group = shared if f.name in shared_names else own
        _add_field(group, f, hints[f.name], comments.get(f.name, ""))
    return parser


# ----------------------------------------------------------------------------- building configs
def _unknown_key_error(cls: type, keys: Sequence[str], source: str) -> ConfigError:
    """One line naming the unknown keys (and the source, unless the command line), with a
    suggestion for each mistyped one."""
    valid = sorted(f.name for f in dataclasses.fields(cls))
    on_command_line = source == "command line"
    parts = [f"{', '.join(keys)}: unknown flag{'s' if len(keys) > 1 else ''}" if on_command_line
             else f"{source}: unknown config key(s) {', '.join(keys)}"]
    for key in keys:
        guess = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), valid, n=1)
        if guess:
            parts.append(f"did you mean {_flag(guess[0])} instead of {key}?")
    parts.append("--help lists the valid flags" if on_command_line else "valid keys: " + ", ".join(valid))
    return ConfigError("; ".join(parts))


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


def validated(cfg: C) -> C:
    """Run the config's ``validate()`` and return the config; a ``ValueError`` it raises is a bad
    value, raised again as a :class:`ConfigError`."""
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return cfg


def parse_config(cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None) -> C:
    """Defaults of ``cls`` <- demo preset (``--demo``, if the class defines ``demo_preset()``)
    <- optional ``--config file.json`` <- command-line flags."""
    parser = build_parser(cls, prog=prog)
    args, unknown = parser.parse_known_args([_dashed(a) for a in (sys.argv[1:] if argv is None else argv)])
    if unknown:
        raise _unknown_key_error(cls, [u for u in unknown if u.startswith("-")] or unknown, "command line")
    overrides = vars(args)
    config_file = overrides.pop("__config_file", None)
    cfg = cls()
    if overrides.get("demo", getattr(cfg, "demo", False)) and hasattr(cls, "demo_preset"):
        # demo preset sits between the recipe defaults and anything the user passes explicitly
        cfg = config_from_dict(cls, {**cls.demo_preset(), "demo": True}, source="demo preset", base=cfg)
    if config_file:
        cfg = config_from_dict(cls, _read_json(Path(config_file)), source=str(config_file), base=cfg)
    cfg = config_from_dict(cls, overrides, source="command line", base=cfg)
    return validated(cfg)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys")
    return values


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
