"""nuclick/prepare.py: CoNSeP .mat written from the real histolytics maps, crop and skip rules, class
merge, label values, HoVer-Net-style maps, bad input; label splitting and image conversion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.io import savemat

from common.image import read_image, to_rgb
from nuclick.config import PrepareConfig
from nuclick.dataset import split_label
from nuclick.prepare import LabelError, crop_start, merge_class, read_mat, run

HGSC = "nuclei/histolytics_hgsc_nest"
# histolytics types (1 connective, 2 inflammatory, 3 neoplastic) -> CoNSeP types
# (5 fibroblast, 2 inflammatory, 4 malignant epithelial), which merge to 4, 2, 3
TO_CONSEP = np.array([0, 5, 2, 4])


def _hgsc_maps(fixtures_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inst = np.load(fixtures_dir / HGSC / "hgsc_nest_inst_mask.npz")["nuc_raster"]
    types = np.load(fixtures_dir / HGSC / "hgsc_nest_type_mask.npz")["nuc_raster"]
    rgb = np.asarray(Image.open(fixtures_dir / HGSC / "hgsc_nest.jpg").convert("RGB"))
    return inst, types, rgb


def _consep_mat(inst: np.ndarray, types: np.ndarray, path: Path, remap: np.ndarray = TO_CONSEP):
    """Write a CoNSeP-format .mat (ids 1..N, majority type remapped, centroid x then y);
    returns (types, centroids)."""
    n = int(inst.max())
    ids = np.arange(1, n + 1)
    cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(inst), inst, ids)).T
    pairs = np.bincount(inst.ravel().astype(np.int64) * 4 + types.ravel(), minlength=(n + 1) * 4).reshape(n + 1, 4)
    majority = pairs[1:].argmax(1)  # majority type of each instance
    inst_type = remap[majority]
    savemat(str(path), {"inst_map": inst.astype(np.float64), "inst_type": inst_type[:, None].astype(np.float64),
                        "inst_centroid": np.stack([cx, cy], 1)})
    return inst_type, np.stack([cx, cy], 1)


def _layout(tmp_path: Path, split: str, image: Path, labels: list[Path]) -> Path:
    root = tmp_path / "in"
    (root / split / "Images").mkdir(parents=True, exist_ok=True)
    (root / split / "Labels").mkdir(parents=True, exist_ok=True)
    (root / split / "Images" / image.name).symlink_to(image)
    for label in labels:
        target = root / split / "Labels" / label.name
        if label.parent != target.parent:
            target.symlink_to(label)
    return root


def test_crop_start_and_class_merge_hand_cases():
    assert crop_start(10, 1000, 128) == 0  # clipped at the top
    assert crop_start(100, 1000, 128) == 36  # centred
    assert crop_start(990, 1000, 128) == 872  # shifted back inside
    assert crop_start(64, 128, 128) == 0 and crop_start(127, 128, 128) == 0
    assert [merge_class(k) for k in range(8)] == [0, 1, 2, 3, 3, 4, 4, 4]


def test_prepare_consep_mat_from_real_maps(fixtures_dir, tmp_path):
    inst, types, rgb = _hgsc_maps(fixtures_dir)
    mat = tmp_path / "hgsc_nest.mat"
    inst_type, centroids = _consep_mat(inst, types, mat)
    root = _layout(tmp_path, "Train", fixtures_dir / HGSC / "hgsc_nest.jpg", [])
    (root / "Train" / "Labels" / "hgsc_nest.mat").symlink_to(mat)
    summary = run(PrepareConfig(input=str(root), output=str(tmp_path / "out"), splits=["Train"]))
    items = json.loads((tmp_path / "out" / "dataset.json").read_text())["training"]

    # independent restatement of the rules for every nucleus
    H, W = inst.shape
    expected = {}
    for k in range(1, int(inst.max()) + 1):
        row, col = int(centroids[k - 1, 1]), int(centroids[k - 1, 0])
        r0 = min(max(int(row - 64), 0), H - 128)
        c0 = min(max(int(col - 64), 0), W - 128)
        area = int((inst[r0:r0 + 128, c0:c0 + 128] == k).sum())
        if area >= 80 and min(row, col, H - row, W - col) >= 20:
            expected[k] = (r0, c0, row, col)
    assert sorted(it["nuclei_id"] for it in items) == sorted(expected)
    assert summary["Train"]["kept"] == len(expected)
    assert summary["Train"]["skipped_small"] + summary["Train"]["skipped_border"] == inst.max() - len(expected)
    assert summary["Train"]["skipped_border"] > 0 and summary["Train"]["skipped_small"] > 0

    shifted = 0
    for item in items:
        k = item["nuclei_id"]
        r0, c0, row, col = expected[k]
        class_id = merge_class(int(inst_type[k - 1]))
        assert item["mask_value"] == class_id and class_id in (2, 3, 4)
        assert Path(item["image"]).name == f"hgsc_nest_{class_id}_{k:04d}.png"
        assert item["centroid"] == [row - r0, col - c0]
        shifted += item["centroid"] != [64, 64]
        if k % 25:  # check the pixel content of a sample of crops
            continue
        label = np.asarray(Image.open(tmp_path / "out" / item["label"]))
        window = inst[r0:r0 + 128, c0:c0 + 128]
        assert label.dtype == np.uint8 and label.shape == (128, 128)
        assert set(np.unique(label)) <= {0, class_id, 255}
        np.testing.assert_array_equal(label == class_id, window == k)
        np.testing.assert_array_equal(label == 255, (window > 0) & (window != k))
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / item["image"])),
                                      rgb[r0:r0 + 128, c0:c0 + 128])
        saved = json.loads((tmp_path / "out" / "Train" / "Centroids" / f"{Path(item['image']).stem}.txt").read_text())
        assert saved == [item["centroid"]]
    assert shifted > 0  # nuclei near the image edge got boxes shifted inside the image


def test_hovernet_maps_match_consep_mat(fixtures_dir, tmp_path):
    """Two .npz maps (histolytics layout) and a .mat written from them give the same crops."""
    inst, types, _ = _hgsc_maps(fixtures_dir)
    root = _layout(tmp_path, "Train", fixtures_dir / HGSC / "hgsc_nest.jpg",
                   [fixtures_dir / HGSC / "hgsc_nest_inst_mask.npz", fixtures_dir / HGSC / "hgsc_nest_type_mask.npz"])
    (root / "Test" / "Images").mkdir(parents=True)
    (root / "Test" / "Labels").mkdir(parents=True)
    (root / "Test" / "Images" / "hgsc_nest.jpg").symlink_to(fixtures_dir / HGSC / "hgsc_nest.jpg")
    _consep_mat(inst, types, root / "Test" / "Labels" / "hgsc_nest.mat", remap=np.arange(4))  # types as in the maps
    run(PrepareConfig(input=str(root), output=str(tmp_path / "out"), limit=40))
    data = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert len(data["training"]) == len(data["validation"]) == 40
    for a, b in zip(data["training"], data["validation"]):
        assert Path(a["image"]).name == Path(b["image"]).name and a["centroid"] == b["centroid"]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / a[key])),
                                          np.asarray(Image.open(tmp_path / "out" / b[key])))


def test_mat_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "img.mat"
    savemat(str(path), {"inst_map": np.zeros((8, 8)), "inst_type": np.zeros((0, 1))})
    with pytest.raises(LabelError, match=r"img\.mat: key 'inst_centroid' missing"):
        read_mat(path)


def test_image_without_label_is_an_error(tmp_path):
    (tmp_path / "Train" / "Images").mkdir(parents=True)
    (tmp_path / "Train" / "Labels").mkdir(parents=True)
    Image.fromarray(np.zeros((130, 130, 3), np.uint8)).save(tmp_path / "Train" / "Images" / "a.png")
    with pytest.raises(LabelError, match="no label for image 'a'"):
        run(PrepareConfig(input=str(tmp_path), output=str(tmp_path / "out"), splits=["Train"]))


def test_split_label_hand_case():
    label = np.zeros((6, 7), np.uint8)
    label[1:3, 1:3] = 3  # target
    label[0, 5] = label[1, 6] = 255  # diagonal neighbours: two 4-connected instances
    label[4:6, 0:3] = 255  # a third other nucleus
    mask, others, class_id = split_label(label)
    assert class_id == 3
    np.testing.assert_array_equal(mask, (label == 3).astype(np.uint8))
    assert others.max() == 3 and len(np.unique(others[others > 0])) == 3
    assert others[0, 5] != others[1, 6]
    np.testing.assert_array_equal(others > 0, label == 255)


def test_split_label_without_others_or_target():
    label = np.zeros((4, 4), np.uint8)
    label[1, 1] = 2
    mask, others, class_id = split_label(label)
    assert class_id == 2 and mask.sum() == 1 and others.max() == 0
    mask, others, class_id = split_label(np.full((3, 3), 255, np.uint8))
    assert class_id == 0 and mask.sum() == 0 and (others == 1).all()


def test_to_rgb_converts_alpha_and_grey(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(to_rgb(grey), np.repeat(grey[..., None], 3, -1))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[..., 3] = [[255, 0], [128, 255]]
    out = to_rgb(rgba)
    assert out[0, 0].tolist() == [100] * 3 and out[0, 1].tolist() == [255] * 3  # transparent -> white
    assert out[1, 0].tolist() == [(100 * 128 + 255 * 127 + 127) // 255] * 3
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[..., 0], grey)
    wide = (grey.astype(np.uint16) * 257)
    np.testing.assert_array_equal(to_rgb(wide)[..., 1], grey)
