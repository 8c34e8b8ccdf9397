"""spleen.infer on the real CT fixture: the written mask has exactly the input's grid (also for a
non-RAS copy), the sliding window equals whole-volume inference when one window covers the
volume, the preview is written, and the connected-component clean-up."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel import orientations as nio
from PIL import Image

from common.checkpoint import save_training_state
from common.dist import DistContext
from spleen.config import InferConfig
from spleen.infer import infer_all, largest_component, load_model, segment
from spleen.model import UNet, predict_logits
from spleen.transforms import preprocess_image, read_volume

TINY = dict(channels=[2, 4, 8], strides=[2, 2], num_res_units=1)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = UNet(channels=TINY["channels"], strides=TINY["strides"], num_res_units=TINY["num_res_units"])
    with torch.no_grad():  # a bias towards "spleen" for bright voxels, so masks are not empty
        model.model[2][1].conv.unit0.conv.bias.copy_(torch.tensor([0.0, 0.05]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "tiny.pt"
    save_training_state(path, model=model, epoch=1, step=1, config=TINY)
    return path


@pytest.fixture
def small_ct(fixtures_dir, tmp_path):
    """The small real CT (RAS) and a copy stored with P, S, L axes (flipped and permuted)."""
    src = fixtures_dir / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)[20:100, 10:90, 8:24]  # keep the test fast
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(("P", "S", "L")))
    moved = nib.Nifti1Image(np.ascontiguousarray(nio.apply_orientation(data, ornt)),
                            img.affine @ nio.inv_ornt_aff(ornt, data.shape))
    ras = nib.Nifti1Image(data, img.affine)
    (tmp_path / "in").mkdir()
    nib.save(ras, str(tmp_path / "in" / "ct_ras.nii.gz"))
    nib.save(moved, str(tmp_path / "in" / "ct_psl.nii.gz"))
    return tmp_path / "in", ornt


def test_infer_writes_masks_on_the_input_grid(tiny_checkpoint, small_ct, tmp_path):
    folder, ornt = small_ct
    cfg = InferConfig(images=str(folder), checkpoint=str(tiny_checkpoint), output_dir=str(tmp_path / "out"),
                      roi_size=[64, 64, 64], device="cpu")
    results = infer_all(cfg, DistContext())
    assert [r["name"] for r in results] == ["ct_psl", "ct_ras"]
    masks = {}
    for name in ("ct_ras", "ct_psl"):
        src = nib.load(str(folder / f"{name}.nii.gz"))
        out = nib.load(str(tmp_path / "out" / f"{name}_seg.nii.gz"))
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
        masks[name] = np.asarray(out.dataobj)
        assert set(np.unique(masks[name])) <= {0, 1}
        with Image.open(tmp_path / "out" / f"{name}_preview.png") as png:
            assert png.size[0] > 600 and png.size[1] > 200
    assert 0 < masks["ct_ras"].sum() < masks["ct_ras"].size  # a non-trivial mask
    # same preprocessed input -> same prediction: the non-RAS output is the RAS one, re-oriented
    np.testing.assert_array_equal(nio.apply_orientation(masks["ct_ras"], ornt), masks["ct_psl"])
    summary = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert [s["name"] for s in summary] == ["ct_psl", "ct_ras"]
    assert summary[1]["spleen_voxels"] == int(masks["ct_ras"].sum())


def test_window_covering_the_volume_equals_whole_volume_inference(tiny_checkpoint, small_ct):
    folder, _ = small_ct
    data, affine, _ = read_volume(folder / "ct_ras.nii.gz")
    image, geom = preprocess_image(data, affine)
    assert geom.shape == (159, 159, 24)  # 79 * 2 + 1; 15 * 1.5 + 1 = 23.5 -> 24
    model = load_model(str(tiny_checkpoint), torch.device("cpu"))
    x = image[None, None]
    roi = (160, 164, 24)  # >= the volume and divisible by 4: one window, zero padding
    with torch.no_grad():
        whole = model(F.pad(x, (0, 0, 2, 3, 0, 1)))[..., 0:159, 2:161, 0:24]
        windowed = predict_logits(model, x, roi, sw_batch_size=4, overlap=0.5)
        assert torch.equal(windowed, whole)
        gaussian = predict_logits(model, x, roi, sw_batch_size=4, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(gaussian, whole, rtol=1e-5, atol=1e-5)
    cfg = InferConfig(images="x", checkpoint="y", roi_size=list(roi))
    mask, _ = segment(model, data, affine, cfg, torch.device("cpu"))
    assert mask.shape == data.shape


def test_largest_component_keeps_the_biggest_blob():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:4, 1:4, 1:4] = 1  # 27 voxels
    mask[6:8, 6:8, 6:8] = 1  # 8 voxels
    mask[5, 5, 5] = 1  # touches the big blob? no: diagonal neighbour of (6, 6, 6) -> joins the small one
    kept = largest_component(mask)
    assert kept.sum() == 27 and kept[2, 2, 2] == 1 and kept[6, 6, 6] == 0
    single = np.zeros_like(mask)
    single[3, 3, 3] = 1
    assert np.array_equal(largest_component(single), single)
