"""The camelyon demo's second centre (camelyon/second_centre.py): stain vectors turned by the asked
angles, amounts scaled, no shift = the same pixels, and a small demo set re-stained into the demo's
formats with the same masks, annotations and validation labels, built once."""
from __future__ import annotations

import json
import math

import numpy as np
import openslide
import pytest
import torch

from camelyon.dataset import read_patch_list
from camelyon.demo import MPP, make_demo
from camelyon.second_centre import StainShift, make_second_centre
from common.stain import RGB_FROM_HED, hed_to_od, hed_to_rgb, od_to_hed, rgb_to_od

pytestmark = pytest.mark.usefixtures("one_thread")


def he_image(seed: int = 0, size: int = 48) -> np.ndarray:
    """(size, size, 3) uint8 tissue composed from random H and E amounts with the standard matrix."""
    g = torch.Generator().manual_seed(seed)
    amounts = 0.02 + torch.rand(2, size, size, generator=g, dtype=torch.float64) * torch.tensor([0.06, 0.04]).view(2, 1, 1)
    hed = torch.cat([amounts, torch.zeros(1, size, size, dtype=torch.float64)])
    return hed_to_rgb(hed[None])[0].round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_no_shift_gives_the_pixels_back():
    rgb = he_image()
    rgb[:4] = [241, 240, 242]  # the demo's background
    assert np.array_equal(StainShift(0.0, 0.0, 1.0, 1.0).apply(rgb), rgb)


@pytest.mark.parametrize("h_degrees, e_degrees", [(15.0, 15.0), (10.0, -20.0)])
def test_stain_vectors_turned_by_the_asked_angles_in_their_plane(h_degrees, e_degrees):
    shift = StainShift(h_degrees, e_degrees)
    matrix = shift.stain_matrix()
    assert torch.allclose(matrix.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert shift.vector_angles() == pytest.approx((abs(h_degrees), abs(e_degrees)))
    unit = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
    assert torch.equal(matrix[2], unit[2])  # DAB as it was
    normal = torch.linalg.cross(unit[0], unit[1])
    assert abs(float(matrix[0] @ normal)) < 1e-12 and abs(float(matrix[1] @ normal)) < 1e-12  # still in the H-E plane
    between = math.degrees(math.acos(float(matrix[0] @ matrix[1])))
    original = math.degrees(math.acos(float(unit[0] @ unit[1])))
    assert between == pytest.approx(original - h_degrees + e_degrees)  # + turns H towards E, E away from H


def test_shifted_pixels_are_the_scaled_amounts_in_the_new_colours():
    shift = StainShift(15.0, 15.0, 0.9, 1.1)
    rgb = he_image(1)
    hed = od_to_hed(rgb_to_od(torch.from_numpy(rgb).permute(2, 0, 1).double()))
    scaled = hed * torch.tensor([0.9, 1.1, 1.0], dtype=torch.float64).view(3, 1, 1)
    expected = hed_to_od(scaled, shift.stain_matrix() * RGB_FROM_HED.norm(dim=1, keepdim=True))
    got = rgb_to_od(torch.from_numpy(shift.apply(rgb)).permute(2, 0, 1).double())
    inside = (expected > 0.01).all(0)  # brighter than white (negative OD) is clipped to white
    assert inside.float().mean() > 0.8
    assert (got - expected).abs()[:, inside].max() < 0.02  # uint8 rounding: OD within 1/200 of a level near white
    assert not np.array_equal(shift.apply(rgb), rgb)
    assert not np.array_equal(StainShift(15.0, 15.0, 1.0, 1.0).apply(rgb), rgb)  # the turn alone changes colours
    assert not np.array_equal(StainShift(0.0, 0.0, 0.9, 1.1).apply(rgb), rgb)  # and the scaling alone


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), seed=2, n_train_tumor=1, n_train_normal=0, n_val_tumor=1,
                     n_val_normal=1, n_test_tumor=1, n_test_normal=1, size=(2048, 2048), n_coords_train=4,
                     n_coords_val=6)


def test_second_centre_in_the_demo_formats_with_the_same_labels(demo, tmp_path):
    shift = StainShift()
    shifted = make_second_centre(demo, tmp_path / "shifted", shift)
    assert shifted.generated and shifted.root == tmp_path / "shifted"
    assert shifted.test_slides == demo.test_slides and shifted.val_slides == demo.val_slides
    assert shifted.train_slides == () and not any(shifted.train_images.glob("tumor_001*"))  # train slides: not needed
    for name in demo.val_slides + demo.test_slides:
        with openslide.OpenSlide(str(demo.slide_path(name))) as a, openslide.OpenSlide(str(shifted.slide_path(name))) as b:
            assert b.level_dimensions == a.level_dimensions
            assert float(b.properties["openslide.mpp-x"]) == pytest.approx(MPP, rel=1e-4)
            before = np.asarray(a.read_region((0, 0), 2, a.level_dimensions[2]))[..., :3].astype(int)
            after = np.asarray(b.read_region((0, 0), 2, b.level_dimensions[2]))[..., :3].astype(int)
        tissue = (before < 215).any(-1)
        assert tissue.mean() > 0.1
        assert np.abs(after - before)[tissue].mean() > 8  # the tissue's colour moved
        assert np.abs(after - before)[~tissue].mean() < 4  # the near-white background stayed near-white
        for source in (demo.mask_path(name), demo.annotation_path(name)):
            if source is not None:
                assert (shifted.root / source.relative_to(demo.root)).read_bytes() == source.read_bytes()
    assert any(demo.mask_path(n) for n in demo.test_slides)
    original = read_patch_list(demo.coord_files["tumor_valid"], demo.train_images, demo.train_annotations) + \
        read_patch_list(demo.coord_files["normal_valid"], demo.train_images, demo.train_annotations)
    records = read_patch_list(shifted.root / "validation.csv", shifted.train_images)
    assert len(records) == 12 and [(r.x, r.y, r.labels) for r in records] == [(r.x, r.y, r.labels) for r in original]
    assert all(r.slide.startswith(str(shifted.train_images)) for r in records)
    info = json.loads((shifted.root / ".complete").read_text())["info"]
    assert (info["h_vector_degrees"], info["e_vector_degrees"]) == (15.0, 15.0)

    again = make_second_centre(demo, tmp_path / "shifted", shift)
    assert not again.generated  # built once
    other = make_second_centre(demo, tmp_path / "shifted", StainShift(10.0, 10.0))
    assert other.generated  # another shift is another set
