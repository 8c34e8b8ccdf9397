"""Test-time augmentation over the dihedral group D4: the 8 flips and right-angle rotations of an image.

Histology has no preferred orientation, so averaging a network's outputs over the 8 orientations
of its input is the usual test-time augmentation (NCRF's 8-fold flip/rotation averaging). For a
fully convolutional network whose output grid maps onto the input by a stride, applying a
transform to a whole tile and the inverse transform to the output grid gives, at every output,
the network's value on the transformed window -- exact as long as the tile's sides are the
window plus whole strides (then every transformed window lies on the output grid again)::

    from common.tta import parse_tta, dihedral, undo_dihedral
    names = parse_tta("flips")                                   # all 8
    prob = sum(undo_dihedral(net(dihedral(x, n)).sigmoid(), n) for n in names) / len(names)

A transform ``flip_rotK`` mirrors the last axis (left-right) and then rotates by K x 90 degrees
counter-clockwise in the last two axes (``torch.rot90`` with k = K).
"""
from __future__ import annotations

import torch

#: name -> (mirror the last axis first, quarter turns)
DIHEDRAL = {"id": (False, 0), "rot90": (False, 1), "rot180": (False, 2), "rot270": (False, 3),
            "flip": (True, 0), "flip_rot90": (True, 1), "flip_rot180": (True, 2), "flip_rot270": (True, 3)}
ALIASES = {"none": ["id"], "flips": list(DIHEDRAL), "hflip": ["id", "flip"], "flips4": ["id", "flip", "rot180", "flip_rot180"]}


def parse_tta(spec: str | list[str]) -> list[str]:
    """``none`` (no augmentation), ``flips`` (all 8), ``hflip`` (identity and left-right), ``flips4``
    (identity and the three mirrorings that keep the axes: left-right, up-down, 180 degrees) or a
    comma-separated subset of :data:`DIHEDRAL` names. Raises ValueError naming what is unknown."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    names: list[str] = []
    for part in parts or ["none"]:
        if part in ALIASES:
            names += ALIASES[part]
        elif part in DIHEDRAL:
            names.append(part)
        else:
            raise ValueError(f"unknown test-time augmentation {part!r}: use none, flips, hflip, flips4 or "
                             f"a comma-separated subset of {', '.join(DIHEDRAL)}")
    return list(dict.fromkeys(names))  # each once, in the order given


def dihedral(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` (..., H, W) transformed by ``name``."""
    mirror, turns = DIHEDRAL[name]
    if mirror:
        x = x.flip(-1)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def undo_dihedral(y: torch.Tensor, name: str) -> torch.Tensor:
    """The inverse of :func:`dihedral`: ``undo_dihedral(dihedral(x, n), n) == x``."""
    mirror, turns = DIHEDRAL[name]
    if turns:
        y = torch.rot90(y, -turns, dims=(-2, -1))
    return y.flip(-1) if mirror else y
