"""pretrain.dataset: PCam200 folders, PCam HDF5, PTCGA200 split pickle, real PCam patches, transforms."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from common.augment import make_generator
from pretrain.dataset import (PatchDataset, PCamH5, build_dataset, eval_transform, image_items, load_split_file, pcam_folder_items,
                              ptcga_items, sample_resized_crop, train_transform)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _png(path, value, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_pcam_folder_layout_labels_and_order(tmp_path):
    _png(tmp_path / "val/tumor/case2/b.png", 200)
    _png(tmp_path / "val/normal/case1/a.v2.png", 10)  # extra dots are not skipped (upstream bug 14)
    _png(tmp_path / "val/normal/case0/z.jpg", 20)
    items = pcam_folder_items(tmp_path, "val")
    assert [(p.split("/")[-1], y) for p, y in items] == [("z.jpg", 0), ("a.v2.png", 0), ("b.png", 1)]
    x, y = PatchDataset(items)[2]
    assert x.dtype == torch.uint8 and x.shape == (3, 40, 40) and int(x[0, 0, 0]) == 200 and y == 1
    with pytest.raises(FileNotFoundError, match="test"):
        pcam_folder_items(tmp_path, "test")


def test_pcam_h5_reader(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], np.uint8).reshape(5, 1, 1, 1)
    with h5py.File(tmp_path / "valid_x.h5", "w") as fh:
        fh["x"] = x
    with h5py.File(tmp_path / "valid_y.h5", "w") as fh:
        fh["y"] = y
    ds = build_dataset("pcam_h5", str(tmp_path), "val")
    assert len(ds) == 5
    img, label = ds[3]
    assert torch.equal(img, torch.from_numpy(x[3]).permute(2, 0, 1)) and label == 0 and ds[4][1] == 1
    with pytest.raises(FileNotFoundError, match="test_x.h5"):
        PCamH5(tmp_path, "test")


def test_real_pcam_patches_load_for_inference(fixtures_dir):
    items = image_items(fixtures_dir / "patches" / "pcam_kaggle")
    assert len(items) == 2 and all(y == -1 for _, y in items)
    ds = PatchDataset(items)
    batch = torch.stack([ds[i][0] for i in range(2)])
    assert batch.shape == (2, 3, 96, 96) and batch.dtype == torch.uint8
    assert 20 < batch.float().mean() < 250 and batch.float().std() > 5  # real tissue, not blank
    x = eval_transform(batch, 224, 287, MEAN, STD)  # 96 px patches: no crop, resize (PCam h5 eval)
    assert x.shape == (2, 3, 224, 224)
    ref = (batch.float().mean((2, 3)) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x.mean((2, 3)), ref, atol=0.02, rtol=0)  # resizing keeps the mean colour


def test_eval_transform_centre_crop():
    img = torch.zeros(1, 3, 10, 10, dtype=torch.uint8)
    img[..., 3:7, 3:7] = 255
    x = eval_transform(img, size=4, crop=4, mean=[0, 0, 0], std=[1, 1, 1])
    assert torch.equal(x, torch.ones(1, 3, 4, 4))
    x = eval_transform(img, size=4, crop=6, mean=[0.5] * 3, std=[0.5] * 3)  # crop 6, then resize to 4
    assert x.shape == (1, 3, 4, 4) and x[0, 0, 1:3, 1:3].min() > 0.9 and x[0, 0, 0, 0] < -0.5


def test_resized_crop_boxes_respect_scale_and_bounds():
    boxes = sample_resized_crop(2000, 100, 100, (0.8, 1.0), make_generator(0))
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 99 and boxes[:, 3].max() <= 99
    area = w * h / 1e4
    assert area.max() <= 1.0 and area.min() >= 0.6 and 0.8 < area.median() < 0.95
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.0 / 0.7


def test_train_transform_reproducible_per_step():
    cfg = SimpleNamespace(image_size=32, crop_scale=[0.8, 1.0], jitter=[0.4, 0.4, 0.4, 0.1], blur_sigma=[0.1, 2.0],
                          mean=MEAN, std=STD)
    img = torch.randint(0, 256, (6, 3, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = train_transform(img, make_generator(1, 0, 5), cfg)
    b = train_transform(img, make_generator(1, 0, 5), cfg)
    c = train_transform(img, make_generator(1, 0, 6), cfg)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = (0 - torch.tensor(MEAN)) / torch.tensor(STD), (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = a.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()


def test_ptcga_split_by_basename(tmp_path):
    root = tmp_path / "PTCGA200"
    for organ, name in [("liver", "l1.jpg"), ("bile_liver", "b1.jpg"), ("thyroid", "t1.png"), ("thyroid", "t2.png")]:
        _png(root / organ / name, 50)
    (root / "thumbnail_position_map").mkdir()
    split = {"0": {"train": {"idx": [9, 9], "imgs": ["t2.png", "b1.jpg", "l1.jpg"]}, "val": {"idx": [], "imgs": ["t1.png"]}}}
    split_file = tmp_path / "3fold_dict_idx_filenames.pickle"
    split_file.write_bytes(pickle.dumps(split))
    items = ptcga_items(root, "train", split_file)
    assert [(p.split("/")[-1], y) for p, y in items] == [("b1.jpg", 1), ("l1.jpg", 1), ("t2.png", 19)]
    split_file.write_bytes(pickle.dumps({"0": {"train": {"imgs": ["t2.png", "gone.jpg"]}}}))
    with pytest.raises(ValueError, match="1 of 2 train images not found"):
        ptcga_items(root, "train", split_file)
    split_file.write_bytes(pickle.dumps({"0": SimpleNamespace()}))
    with pytest.raises(pickle.UnpicklingError, match="plain containers"):
        ptcga_items(root, "train", split_file)


def test_demo_generators_write_the_real_layouts(tmp_path):
    from common.cache import MANIFEST
    from pretrain.synthetic import make_organ_like, make_pcam_like
    root = make_pcam_like(tmp_path / "PCam200", splits={"train": 1, "val": 1}).root
    items = pcam_folder_items(root, "train")
    assert len(items) == 80 and sum(y for _, y in items) == 40 and (root / MANIFEST).is_file()
    stamp = (root / MANIFEST).stat().st_mtime_ns
    assert not make_pcam_like(root, splits={"train": 1, "val": 1}).built and (root / MANIFEST).stat().st_mtime_ns == stamp
    tumour = torch.stack([PatchDataset(items)[i][0] for i in range(40, 80)]).float()
    normal = torch.stack([PatchDataset(items)[i][0] for i in range(40)]).float()
    assert tumour.mean() < normal.mean() - 5  # tumour patches carry more (dark) nuclei
    organ = make_organ_like(tmp_path / "organs", per_organ=10).root
    train = ptcga_items(organ / "PTCGA200", "train", organ / "3fold_dict_idx_filenames.pickle")
    assert len(train) == 28 and {y for _, y in train} == {1, 10, 15, 19}


class _Payload:
    """Unpickling this runs os.system: the classic crafted pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_split_file_unpickler_refuses_code_and_non_plain_values(tmp_path):
    marker = tmp_path / "pwned"
    split_file = tmp_path / "3fold_dict_idx_filenames.pickle"
    split_file.write_bytes(pickle.dumps({"0": {"train": {"idx": [0], "imgs": [_Payload(marker)]}}}))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_split_file(split_file)
    assert not marker.exists()  # nothing ran
    for bad, where in (({"0": {"train": {"imgs": ["a.png", 1.5]}}}, "float"), ({"0": ("a",)}, "tuple"),
                       ({1: []}, "non-string key")):
        split_file.write_bytes(pickle.dumps(bad))
        with pytest.raises(pickle.UnpicklingError, match=where):
            load_split_file(split_file)
    good = {"0": {"train": {"idx": [0, 1], "imgs": ["a.png", "b.png"]}}}
    split_file.write_bytes(pickle.dumps(good))
    assert load_split_file(split_file) == good
