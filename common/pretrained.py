"""Initial weights of a training run: ``--pretrained imagenet | none | PATH`` and ``--init-checkpoint``.

- ``imagenet``: torchvision's ``<Arch>_Weights.IMAGENET1K_V1`` for the configured ResNet (what the
  reference recipes start from), i.e. the file torch.hub caches at
  ``<torch.hub.get_dir()>/checkpoints/<file name of the url>`` (``$TORCH_HOME/hub/checkpoints``).
  A cached file is used as it is (torch.hub's own rule: the hash prefix in the name is verified when
  the file is downloaded). A missing file is downloaded by the first process of each node while
  the others wait; when it cannot be had (offline, no cache) every process stops, before any data
  is read, with one line naming the file, where to put it and the flags that avoid it. There is no
  silent fall-back to random weights. ViT backbones have no torchvision file here: pass a PATH.
- ``none``: random initialisation, on purpose (the demos, tests).
- ``PATH``: a local weights file; the task's loader decides which layouts it takes
  (``common.backbones.import_backbone``: torchvision / timm state dicts, SimCLR, MoCo, BYOL, DINO,
  MAE, this project's runs).
- ``--init-checkpoint``: whole-model weights replace the backbone initialisation. ``imagenet`` (the
  default) is then not loaded (said in the record); ``PATH`` together with it is an error.

:func:`resolve_initialisation` checks all this and returns an :class:`Initialisation`; its
``description`` is what the run prints under its banner and stores in ``config.json`` and in its
checkpoints (the ``initialisation`` field of the task's config). The errors are
:class:`PretrainedError`, a :class:`common.config.ConfigError`: command-line entry points print
them as one line (``common.errors.exit_on_user_error``).
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torch.nn as nn

from common import dist
from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.io import file_sha256

IMAGENET, NONE = "imagenet", "none"
DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout while downloading (a firewalled machine fails instead of hanging)
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")  # torch.hub's convention: resnet18-f37072fd.pth


class PretrainedError(ConfigError):
    """Initial weights that cannot be used; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class Initialisation:
    kind: str  # "imagenet" | "none" | "file" (a backbone) | "checkpoint" (the whole model)
    path: str  # the file to load ("" for none)
    description: str  # one line for the banner, config.json and checkpoints

    @property
    def flag(self) -> str:
        return "--init-checkpoint" if self.kind == "checkpoint" else "--pretrained"


# ----------------------------------------------------------------------------- ImageNet (torchvision)
def imagenet_weights(arch: str):
    """torchvision's ``IMAGENET1K_V1`` weights entry of a ResNet (``ResNet50_Weights.IMAGENET1K_V1``)."""
    import torchvision

    if re.fullmatch(r"resnet\d+", arch):
        try:
            return torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        except (ValueError, AttributeError):
            pass
    hint = " (e.g. MAE or DINO weights, or a timm state_dict)" if arch.startswith("vit_") else ""
    raise PretrainedError(f"--pretrained imagenet: torchvision has no ImageNet file for backbone {arch!r}; "
                          f"pass --pretrained PATH{hint} or --pretrained none (random initialisation)")


def weights_label(weights) -> str:
    return f"torchvision {type(weights).__name__}.{weights.name}"


def cache_path(weights) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _download(url: str, path: Path) -> str | None:
    """Fetch ``url`` to ``path`` (sha256 checked against the hash prefix of the file name).
    Returns None, or why it failed (one line)."""
    match = _HASH_IN_NAME.search(path.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} to {path}", flush=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None,
                                       progress=os.environ.get("PATHMONO_NO_PROGRESS") != "1")
    except Exception as err:  # offline, refused, timed out, bad hash, read-only cache: reported, never hidden
        return " ".join(f"{type(err).__name__}: {err}".split())
    finally:
        socket.setdefaulttimeout(previous)
    return None


def fetch_imagenet(weights, local_rank: int = 0) -> Path:
    """The cached file of ``weights``, downloaded when absent. Collective: every process calls it;
    the first process of each node downloads (nodes need not share a file system), the others wait."""
    path = cache_path(weights)
    problem = _download(weights.url, path) if local_rank == 0 and not path.is_file() else None
    problems = [p for p in dist.all_gather_object(problem) if p]
    if problems or not path.is_file():
        reason = problems[0] if problems else "not found after the download"
        raise PretrainedError(
            f"--pretrained imagenet: {path.name} ({weights_label(weights)}) is not in torch.hub's cache and could "
            f"not be downloaded ({reason}); put {weights.url} at {path}, or pass --pretrained PATH (a local copy) "
            "or --pretrained none (random initialisation)")
    return path


# ----------------------------------------------------------------------------- resolution
def sha256_prefix(path: str | os.PathLike, n: int = 12) -> str:
    return file_sha256(path)[:n]


def _existing_file(value: str, flag: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        expected = "imagenet, none or the path of a weights file" if flag == "--pretrained" else "a checkpoint file"
        old = " (an empty value used to mean random weights: pass --pretrained none)" if not value else ""
        raise PretrainedError(f"{flag} {value!r}: no such file; expected {expected}{old}")
    return path.resolve()


def resolve_initialisation(pretrained: str, init_checkpoint: str, arch: str, local_rank: int = 0) -> Initialisation:
    """What a run starts from (see the module docstring). Call it on every process before reading
    any data: ``imagenet`` may download (a collective); every problem is a one-line PretrainedError."""
    choice = pretrained.strip()
    if init_checkpoint:
        if choice not in (IMAGENET, NONE):
            raise PretrainedError(f"--pretrained {choice} and --init-checkpoint {init_checkpoint} are both set: the "
                                  "whole-model checkpoint replaces every backbone weight; pass only one")
        path = _existing_file(init_checkpoint, "--init-checkpoint")
        note = "; --pretrained imagenet not loaded: the checkpoint sets the whole network" if choice == IMAGENET else ""
        return Initialisation("checkpoint", str(path), f"init_checkpoint {path} (sha256 {sha256_prefix(path)}){note}")
    if choice == NONE:
        return Initialisation(NONE, "", "none (random init)")
    if choice == IMAGENET:
        weights = imagenet_weights(arch)
        path = fetch_imagenet(weights, local_rank)
        return Initialisation(IMAGENET, str(path), f"imagenet ({weights_label(weights)}, {path})")
    path = _existing_file(choice, "--pretrained")
    return Initialisation("file", str(path), f"file {path} (sha256 {sha256_prefix(path)})")


def apply_initialisation(init: Initialisation, model: nn.Module, load_backbone: Callable[[nn.Module, str], Any],
                         load_model: Callable[[nn.Module, str], Any]) -> Any:
    """Load ``init`` into ``model`` with the task's loaders (backbone file / whole-model checkpoint);
    returns the loader's result (None for ``none``). Weights that do not fit become a PretrainedError
    naming the flag and the file."""
    if init.kind == NONE:
        return None
    load = load_model if init.kind == "checkpoint" else load_backbone
    try:
        return load(model, init.path)
    except CheckpointError as err:
        raise PretrainedError(f"{init.flag}: {' '.join(str(err).split())}") from None
