"""The dihedral test-time transforms: the group of 8, their inverses, the names users type."""
from __future__ import annotations

import pytest
import torch

from common.tta import DIHEDRAL, dihedral, parse_tta, undo_dihedral


def test_the_eight_transforms_are_distinct_and_undone():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)  # no symmetry: every transform gives another array
    seen = set()
    for name in DIHEDRAL:
        y = dihedral(x, name)
        seen.add((tuple(y.shape), tuple(y.flatten().tolist())))
        assert torch.equal(undo_dihedral(y, name), x)
    assert len(seen) == 8


def test_transforms_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert dihedral(x, "flip").tolist() == [[2.0, 1.0], [4.0, 3.0]]  # left-right
    assert dihedral(x, "rot90").tolist() == [[2.0, 4.0], [1.0, 3.0]]  # counter-clockwise
    assert dihedral(x, "flip_rot180").tolist() == [[3.0, 4.0], [1.0, 2.0]]  # up-down
    assert dihedral(x, "flip_rot90").tolist() == [[1.0, 3.0], [2.0, 4.0]]  # transpose


def test_names():
    assert parse_tta("none") == ["id"] and parse_tta("") == ["id"]
    assert len(parse_tta("flips")) == 8
    assert parse_tta("flips4") == ["id", "flip", "rot180", "flip_rot180"]
    assert parse_tta("rot90, id,rot90") == ["rot90", "id"]
    with pytest.raises(ValueError, match="'spin'"):
        parse_tta("id,spin")
