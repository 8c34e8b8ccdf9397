"""camelyon/: network key layout and weight loading, patch lists, region split, transforms,
tissue masks, whole-slide inference (dense vs patch), evaluation, and bad input."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from camelyon import dataset as ds
from camelyon.config import EvalConfig, InferConfig
from camelyon.eval import evaluate_froc, read_detections
from camelyon.infer import (cell_top_left, dense_mode_map, detections_from_map, patch_mode_map, plan_tiles,
                            run as run_inference)
from camelyon.model import (TumorDetectionNet, build_model, load_detector_weights, load_imagenet_backbone,
                            torchvision_to_bundle_key)
from camelyon.prepare import compute_tissue_mask, tissue_mask_from_rgb
from common.amp import MixedPrecision
from common.checkpoint import CheckpointError, save_training_state
from common.pyramidal_tiff import write_pyramidal_tiff
from common_testutils import assert_same_weights

CPU = torch.device("cpu")
FP32 = MixedPrecision(CPU, "fp32")


# ============================================================================= model
def test_state_dict_matches_bundle_layout():
    sd = TumorDetectionNet().state_dict()
    assert len(sd) == 122
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 11_177_025
    expected = {"features.0.weight": (64, 3, 7, 7), "features.4.0.conv1.weight": (64, 64, 3, 3),
                "features.5.0.downsample.0.weight": (128, 64, 1, 1),
                "features.6.0.downsample.0.weight": (256, 128, 1, 1), "features.7.1.bn2.running_var": (512,),
                "fc.weight": (1, 512, 1, 1), "fc.bias": (1,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("features.2", "features.3")) for k in sd)


def test_output_grid_is_fully_convolutional():
    model = build_model().eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1, 1, 1)
        assert model(torch.zeros(2, 3, 224 + 32 * 3, 224 + 32 * 5)).shape == (2, 1, 4, 6)


def test_bundle_state_dict_and_project_checkpoint_load_strictly(tmp_path):
    src = build_model()
    torch.nn.init.normal_(src.fc.weight)
    flat = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP-saved bundle file
    torch.save(flat, tmp_path / "model.pt")
    dst = build_model()
    info = load_detector_weights(dst, tmp_path / "model.pt")
    assert info["kind"] == "bundle state_dict"
    assert torch.equal(dst.fc.weight, src.fc.weight)
    save_training_state(tmp_path / "best.pt", model=src, epoch=2, step=10, config={"lr": 1e-3})
    dst2 = build_model()
    assert load_detector_weights(dst2, tmp_path / "best.pt")["kind"] == "project checkpoint"
    assert torch.equal(dst2.features[7][1].bn2.running_var, src.features[7][1].bn2.running_var)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    sd = build_model().state_dict()
    sd.pop("features.5.0.downsample.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="features.5.0.downsample.0.weight") as err:
        load_detector_weights(build_model(), tmp_path / "bad.pt")
    assert "extra.weight" in str(err.value)


def test_torchvision_resnet18_maps_onto_the_body(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = build_model()
    load_imagenet_backbone(model, tmp_path / "resnet18.pth")
    assert torch.equal(model.features[0].weight, tv.conv1.weight)
    assert torch.equal(model.features[6][1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torchvision_to_bundle_key("layer4.1.bn2.weight") == "features.7.1.bn2.weight"
    assert torchvision_to_bundle_key("fc.weight") is None


# ============================================================================= patch lists
def test_bundle_csv_label_order_round_trip(tmp_path):
    # label[r][c] = CSV column 3 + r + 3c: a single tumour patch at row 0, column 2 is column 9
    (tmp_path / "training.csv").write_text("tumor_001,1000,2000,0,0,0,0,0,0,1,0,0\n")
    rec = ds.read_patch_list(tmp_path / "training.csv", image_dir=tmp_path)[0]
    grid = np.asarray(rec.labels).reshape(3, 3)
    assert grid[0, 2] == 1 and grid.sum() == 1
    assert (rec.x, rec.y) == (1000, 2000) and rec.slide == str(tmp_path / "tumor_001.tif")
    ds.write_bundle_csv([rec], tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_text() == "tumor_001,1000,2000,0,0,0,0,0,0,1,0,0\n"


def test_json_data_list_location_is_row_col(tmp_path):
    items = {"training": [{"image": "a.tif", "location": [2000, 1000], "label": [0, 1, 0, 0, 0, 0, 0, 0, 0]}]}
    (tmp_path / "list.json").write_text(json.dumps(items))
    rec = ds.read_patch_list(tmp_path / "list.json", image_dir=tmp_path)[0]
    assert (rec.x, rec.y) == (1000, 2000) and rec.labels[1] == 1


def test_ncrf_coords_fixture_loads(fixtures_dir):
    path = fixtures_dir / "camelyon16/ncrf_coords/tumor_valid.txt"
    with pytest.warns(UserWarning, match="no annotation folder"):
        records = ds.read_patch_list(path, image_dir="/slides")
    assert len(records) == 20_000
    assert records[0].slide.startswith("/slides/tumor_1") and records[0].slide.endswith(".tif")
    assert all(r.labels == (1.0,) * 9 for r in records[:100])


def test_ncrf_coords_with_annotations_label_grid(fixtures_dir, tmp_path):
    ann_dir = fixtures_dir / "camelyon16/ncrf_jsons"
    from camelyon.annotations import points_in_annotation, read_annotation
    ann = read_annotation(ann_dir / "Tumor_081.json")
    x, y = ann.positive[0].mean(axis=0).astype(int)
    (tmp_path / "tumor.txt").write_text(f"Tumor_081,{x},{y}\nNormal_017,5000,5000\n")
    shutil_dir = tmp_path / "ann"
    shutil_dir.mkdir()
    (shutil_dir / "tumor_081.json").write_text((ann_dir / "Tumor_081.json").read_text())
    recs = ds.read_patch_list(tmp_path / "tumor.txt", image_dir=tmp_path, annotation_dir=shutil_dir)
    centres = np.array([[x - 384 + 272 * c + 112, y - 384 + 272 * r + 112] for r in range(3) for c in range(3)])
    assert recs[0].labels == tuple(points_in_annotation(ann, centres).astype(float))
    assert recs[1].labels == (0.0,) * 9  # no annotation file: a normal slide


# ============================================================================= regions and transforms
def test_split_grid_offsets_and_label_pairing():
    rows, cols = torch.meshgrid(torch.arange(768), torch.arange(768), indexing="ij")
    region = torch.stack([rows, cols, rows * 0]).float()[None]  # pixel encodes its (row, col)
    labels = torch.arange(9, dtype=torch.float32).view(1, 3, 3)
    patches, flat = ds.split_grid(region, labels)
    assert patches.shape == (9, 3, 224, 224)
    for k in range(9):
        r, c = divmod(k, 3)
        assert patches[k, 0, 0, 0] == 272 * r and patches[k, 1, 0, 0] == 272 * c
        assert flat[k] == labels[0, r, c]


def test_train_transform_only_rotates_and_is_reproducible():
    from common.augment import make_generator
    gen_img = torch.rand(8, 3, 224, 224) * 255
    no_colour = ds.AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, zoom_prob=0)
    out = ds.train_transform(gen_img.floor(), make_generator(1, 0, 5), no_colour)
    base = gen_img.floor() / 127.5 - 1
    for b in range(8):
        candidates = [torch.rot90(base[b], k, dims=(-2, -1)) for k in range(4)]
        assert any(torch.allclose(out[b], cand, atol=1e-4) for cand in candidates)
    full = ds.AugmentConfig()
    a = ds.train_transform(gen_img, make_generator(1, 0, 5), full)
    b = ds.train_transform(gen_img, make_generator(1, 0, 5), full)
    c = ds.train_transform(gen_img, make_generator(1, 0, 6), full)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6


# ============================================================================= slides and tissue masks
@pytest.fixture(scope="module")
def small_slides(tmp_path_factory):
    """A 1536x1280 slide: white background, pink tissue in rows [256, 1088) x cols [320, 1216),
    a purple 'lesion' inside; plus an empty (all white) slide."""
    root = tmp_path_factory.mktemp("slides")
    img = np.full((1280, 1536, 3), 240, np.uint8)
    img[256:1088, 320:1216] = (230, 150, 200)
    img[500:800, 600:900] = (90, 50, 150)
    write_pyramidal_tiff(root / "tissue.tif", img, compression="deflate")
    write_pyramidal_tiff(root / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), compression="deflate")
    return root


def test_tissue_mask_rule_on_hand_built_image():
    rgb = np.full((40, 60, 3), 240, np.uint8)
    rgb[10:30, 20:50] = (220, 120, 180)
    mask = tissue_mask_from_rgb(rgb)
    expected = np.zeros((40, 60), bool)
    expected[10:30, 20:50] = True
    assert np.array_equal(mask, expected)


def test_tissue_mask_of_slide_uses_the_64x_level(small_slides):
    tm = compute_tissue_mask(small_slides / "tissue.tif")
    assert tm.ratio == 64.0 and tm.mask.shape == (20, 24)
    expected = np.zeros((20, 24), bool)
    expected[4:17, 5:19] = True  # [256, 1088) / 64 = [4, 17), [320, 1216) / 64 = [5, 19)
    assert np.array_equal(tm.mask, expected)


def test_outside_and_transparent_pixels_are_white(small_slides):
    with ds.open_slide(small_slides / "tissue.tif") as slide:
        rgb = ds.read_rgb(slide, -100, -50, 200, 100)
    assert (rgb[:50, :] == 255).all() and (rgb[:, :100] == 255).all()
    assert (rgb[50:, 100:] == 240).all()  # slide background inside


def test_fixture_slides_open_tile_and_mask(fixtures_dir):
    for name, levels in (("CMU-1-Small-Region.svs", 1), ("tcga-cr-7395-01a-01-ts1.svs", 2)):
        path = fixtures_dir / "wsi" / name
        with ds.open_slide(path) as slide:
            assert slide.level_count == levels
            tile = ds.read_rgb(slide, 512, 512, 256, 256)
            assert tile.shape == (256, 256, 3) and 60 < tile.mean() < 250
        tm = compute_tissue_mask(path, downsample=64)
        w, h = tm.level0_size
        assert tm.mask.shape == (int(np.ceil(h / 64)), int(np.ceil(w / 64)))
        assert 0.1 < tm.mask.mean() < 0.9


def test_fixture_slides_run_through_inference(fixtures_dir, tmp_path):
    model = build_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cfg = InferConfig(slides=str(fixtures_dir / "wsi"), checkpoint=str(tmp_path / "model.pt"),
                      output_dir=str(tmp_path / "out"), mask_downsample=512, num_workers=0, export=["geojson"],
                      mode="patch")
    summaries = run_inference(cfg)
    assert sorted(s["slide"] for s in summaries) == ["CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs"]
    for s in summaries:
        stem = Path(s["slide"]).stem
        prob = np.load(tmp_path / "out" / f"{stem}.npy")
        # the grid is 512 network px: 512 * 0.243 / 0.499 level-0 px on the 20x slide (common.wsi)
        tm = compute_tissue_mask(fixtures_dir / "wsi" / s["slide"], downsample=s["ratio"])
        assert prob.shape == tm.mask.shape and prob.dtype == np.float64
        assert (prob[~tm.mask] == 0).all() and (prob[tm.mask] > 0).all()
        assert (tmp_path / "out" / f"{stem}_heatmap.png").stat().st_size > 0
        probs, xs, ys = read_detections(tmp_path / "out" / f"{stem}.csv")
        assert len(probs) == s["detections"] and (probs > 0.5).all()
        assert json.loads((tmp_path / "out" / f"{stem}.geojson").read_text())["type"] == "FeatureCollection"


# ============================================================================= dense vs patch
def test_cell_geometry_matches_bundle_formula():
    top, left = cell_top_left(np.array([0, 3]), np.array([2, 5]), 64.0)
    assert top.tolist() == [-80, 64 * 3 - 80] and left.tolist() == [64 * 2 - 80, 64 * 5 - 80]
    mask = np.zeros((70, 40), bool)
    mask[65, 3] = True
    mask[2, 39] = True
    tiles = plan_tiles(mask, 32)
    # two lone cells far apart: one 1-cell tile each, not the 64 x 37 box around both
    assert sorted((t.r0, t.c0, t.rows, t.cols) for t in tiles) == [(2, 39, 1, 1), (65, 3, 1, 1)]


def test_dense_equals_patch_on_single_cells_and_agrees_on_a_slide(small_slides):
    torch.manual_seed(0)
    model = build_model().eval()
    tm = compute_tissue_mask(small_slides / "tissue.tif")
    path = str(small_slides / "tissue.tif")
    patch = patch_mode_map(model, path, tm, CPU, FP32, batch_size=64, workers=0)
    # a 224 tile is exactly a patch: check on a 4x5 block of cells across the tissue border
    block = copy.copy(tm)
    block.mask = np.zeros_like(tm.mask)
    block.mask[2:6, 3:8] = tm.mask[2:6, 3:8]
    # without the halo (zero padding around the tile) a 1-cell tile is exactly a patch
    one_cell = dense_mode_map(model, path, block, CPU, FP32, tile_cells=1, workers=0, halo=False)
    on_block = block.mask
    assert on_block.sum() == 6  # tissue rows 4-5 x cols 5-7 of the block
    np.testing.assert_allclose(one_cell[on_block], patch[on_block], rtol=0, atol=1e-5)
    dense = dense_mode_map(model, path, tm, CPU, FP32, tile_cells=16, workers=0)
    on = tm.mask
    assert (dense[~on] == 0).all() and (dense[on] > 0).all()
    # random weights: real neighbours instead of zero padding shift the logits a little
    # (camelyon.md §11); with a trained network the agreement is measured by bench/demo
    assert np.abs(dense - patch).max() < 0.05
    assert np.corrcoef(dense[on], patch[on])[0, 1] > 0.5


def test_detections_from_map_are_official_level0():
    prob = np.zeros((100, 80))
    prob[10, 20] = 0.9
    prob[12, 22] = 0.8  # inside the 48-cell box of the first: suppressed
    prob[70, 60] = 0.7
    prob[90, 5] = 0.5  # not strictly above the threshold
    dets = detections_from_map(prob, 64.0)
    assert dets == [(0.9, int(20.5 * 64), int(10.5 * 64)), (0.7, int(60.5 * 64), int(70.5 * 64))]


# ============================================================================= evaluation
def _write_mask_tiff(path: Path, size_hw: tuple[int, int], boxes: list[tuple[int, int, int, int]]):
    mask = np.zeros(size_hw, np.uint8)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = 255
    write_pyramidal_tiff(path, mask)


def test_froc_end_to_end_from_csv_and_mask(tmp_path):
    """Two lesions and one ITC on a tumour slide, plus a normal slide, scored by hand.

    Level-5 mask pixels are 32 level-0 px. Lesion A: rows [320, 1600) x cols [320, 1600) (40 px
    across at level 5 > 35.37: a lesion); lesion B: [2560, 3840) x [2560, 3840); ITC: 320-px square
    at [4800, 5120) (10 px: ITC). Detections: A hit at 0.9 and 0.6 (counts once, 0.9), ITC hit at
    0.95 (ignored), an FP at 0.7 on the tumour slide, an FP at 0.8 on the normal slide; B missed.
    FP probs {0.7, 0.8}, TP slots {0.9, 0 (B), 0 (ITC)}; 2 slides, 2 targets.
    thresholds = sorted({0, 0.7, 0.8, 0.9})[1:] = [0.7, 0.8, 0.9]:
    t=0.7: fp 2, tp 1; t=0.8: fp 1, tp 1; t=0.9: fp 0, tp 1; then (0, 0).
    fps/slide = [1, 0.5, 0, 0], sens = [0.5, 0.5, 0.5, 0]. Interpolating on the reversed curve,
    every rate in (0.25 .. 8) gives 0.5, so FROC = 0.5."""
    gt, det = tmp_path / "gt", tmp_path / "det"
    gt.mkdir()
    det.mkdir()
    _write_mask_tiff(gt / "test_001.tif", (6144, 6144),
                     [(320, 1600, 320, 1600), (2560, 3840, 2560, 3840), (4800, 5120, 4800, 5120)])
    (det / "test_001.csv").write_text("0.9,960,960\n0.6,1200,1000\n0.95,4960,4960\n0.7,5600,300\n")
    (det / "test_002.csv").write_text("0.8,100,100\n")
    result = evaluate_froc(EvalConfig(detections=str(det), ground_truth=str(gt), output_dir=str(tmp_path / "out")))
    assert result["num_images"] == 2 and result["num_targets"] == 2
    assert result["froc"] == pytest.approx(0.5)
    info = {s["slide"]: s for s in result["slides"]}
    assert info["test_001"]["lesions"] == 3 and info["test_001"]["itc"] == 1
    assert info["test_001"]["false_positives"] == 1 and info["test_002"]["false_positives"] == 1
    assert result["slide_auc"] == pytest.approx(1.0)  # 0.95 on the tumour slide vs 0.8
    assert (tmp_path / "out" / "froc.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "froc.json").read_text())
    assert saved["froc"] == pytest.approx(0.5)


def test_froc_with_annotation_ground_truth_equals_mask(tmp_path):
    from camelyon.annotations import Annotation, write_asap_xml
    gt_mask, gt_xml, det = tmp_path / "m", tmp_path / "x", tmp_path / "d"
    for d in (gt_mask, gt_xml, det):
        d.mkdir()
    _write_mask_tiff(gt_mask / "test_001.tif", (4096, 4096), [(320, 1600, 320, 1600)])
    square = np.array([[320, 320], [1600, 320], [1600, 1600], [320, 1600]], float)
    write_asap_xml(Annotation([square], []), gt_xml / "test_001.xml")
    (det / "test_001.csv").write_text("0.9,960,960\n0.4,3000,3000\n")
    a = evaluate_froc(EvalConfig(detections=str(det), ground_truth=str(gt_mask), output_dir=str(tmp_path / "o1")))
    b = evaluate_froc(EvalConfig(detections=str(det), ground_truth=str(gt_xml), output_dir=str(tmp_path / "o2")))
    assert a["froc"] == b["froc"] and a["num_targets"] == b["num_targets"] == 1


def test_official_name_matching_quirk(tmp_path):
    gt, det = tmp_path / "gt", tmp_path / "det"
    gt.mkdir()
    det.mkdir()
    _write_mask_tiff(gt / "tumor_001.tif", (2048, 2048), [(320, 1600, 320, 1600)])
    (det / "tumor_001.csv").write_text("0.9,960,960\n")
    full = evaluate_froc(EvalConfig(detections=str(det), ground_truth=str(gt), output_dir=str(tmp_path / "a")))
    quirk = evaluate_froc(EvalConfig(detections=str(det), ground_truth=str(gt), output_dir=str(tmp_path / "b"),
                                     stem_chars=8))
    assert full["num_targets"] == 1 and quirk["num_targets"] == 0  # 9-character stem: "normal" officially


# ============================================================================= bad input
def test_patch_list_with_absent_slides_and_outside_coordinates(small_slides, tmp_path):
    good = str(small_slides / "tissue.tif")
    records = [ds.PatchRecord(good, 1000, 1000, (0.0,) * 9), ds.PatchRecord(good, 9000, 100, (0.0,) * 9),
               ds.PatchRecord(str(tmp_path / "absent.tif"), 10, 10, (0.0,) * 9)]
    with pytest.raises(ds.SlideError) as err:
        ds.validate_records(records, source="list.csv")
    message = str(err.value)
    assert "list.csv" in message and "absent.tif" in message and "(9000, 100)" in message


def test_malformed_csv_names_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("tumor_001,1,2,0,0,0,0,0,0,0,0,0\ntumor_001,1,2,0\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected 12 columns"):
        ds.read_patch_list(tmp_path / "bad.csv")


def test_slide_without_tissue_gives_empty_map_and_warning(small_slides, tmp_path):
    torch.save(build_model().state_dict(), tmp_path / "model.pt")
    cfg = InferConfig(slides=str(small_slides / "blank.tif"), checkpoint=str(tmp_path / "model.pt"),
                      output_dir=str(tmp_path / "out"), num_workers=0)
    with pytest.warns(UserWarning, match="no tissue"):
        summary = run_inference(cfg)[0]
    assert summary["tissue_cells"] == 0 and summary["detections"] == 0
    assert not np.load(tmp_path / "out" / "blank.npy").any()
    assert (tmp_path / "out" / "blank.csv").read_text() == ""


def test_patch_accuracy_of_a_checkpoint(small_slides, tmp_path):
    """A model whose head bias is -100 predicts 'normal' everywhere: accuracy = fraction of 0 labels."""
    model = build_model()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "valid.csv").write_text("tissue,700,650,1,0,0,0,0,0,0,0,0\ntissue,800,700,1,1,1,0,0,0,0,0,0\n")
    from camelyon.eval import evaluate_patches
    metrics = evaluate_patches(EvalConfig(patch_list=str(tmp_path / "valid.csv"), image_dir=str(small_slides),
                                          checkpoint=str(tmp_path / "model.pt"), num_workers=0, batch_size=2))
    assert metrics["patches"] == 18 and metrics["acc"] == pytest.approx(14 / 18)
    assert metrics["positive_fraction"] == pytest.approx(4 / 18)


def _train_cfg(small_slides, tmp_path, out, **kw):
    from camelyon.config import TrainConfig
    rows = "".join(f"tissue,{x},{y},{lab}\n" for x, y, lab in
                   [(700, 650, "1,1,1,0,0,0,0,0,0"), (800, 700, "0,0,0,0,0,0,0,0,0"),
                    (760, 680, "0,1,0,1,0,1,0,1,0"), (720, 660, "1,0,0,0,0,0,0,0,0")])
    (tmp_path / "train.csv").write_text(rows)
    return TrainConfig(output_dir=str(out), train_list=str(tmp_path / "train.csv"),
                       val_list=str(tmp_path / "train.csv"), image_dir=str(small_slides), epochs=1,
                       batch_size=1, num_workers=0, max_val_regions=1, log_every=1, pretrained="none",
                       **kw)


def test_training_smoke_and_mid_epoch_resume_is_exact(small_slides, tmp_path, last_pt_by_step):
    """The last.pt written after step 2 of a 4-step epoch, resumed in a fresh folder, ends on the
    same weights as the uninterrupted run (sampler skip, per-step augmentation seeds, RNG state)."""
    import shutil
    import camelyon.train as train_module
    from common.checkpoint import load_file

    straight = train_module.main(_train_cfg(small_slides, tmp_path, tmp_path / "a", checkpoint_every=2))
    assert 0.0 <= straight["best_val_acc"] <= 1.0
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert any('"train/loss"' in line for line in lines) and any('"val/acc"' in line for line in lines)
    assert (tmp_path / "a" / "best.pt").is_file() and (tmp_path / "a" / "config.json").is_file()
    mid = load_file(last_pt_by_step[2])
    assert (mid["epoch"], mid["step"]) == (0, 2)
    (tmp_path / "b").mkdir()
    shutil.copy(last_pt_by_step[2], tmp_path / "b" / "last.pt")
    train_module.main(_train_cfg(small_slides, tmp_path, tmp_path / "b", checkpoint_every=2))
    a, b = load_file(tmp_path / "a" / "last.pt"), load_file(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 4
    assert_same_weights(a, b)
