"""Tests of the synthetic Camelyon16 demo set (camelyon.demo).

One small demo set is generated once per module; the checks read it back
through the same libraries the pipeline uses (OpenSlide, ElementTree) and
re-derive geometry independently (skimage.draw, skimage.measure).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage as ndi
from scipy.spatial.distance import pdist
from skimage.draw import polygon as draw_polygon
from skimage.measure import label as cc_label
from skimage.measure import points_in_poly, regionprops

from camelyon.demo import MPP, _place_lesions, demo_cache_root, make_demo
from common.pyramidal_tiff import downsample2

SIZE = (3072, 4096)  # (H, W)
PARAMS = dict(seed=1, n_train_tumor=2, n_train_normal=1, n_val_tumor=1, n_val_normal=1,
              n_test_tumor=2, n_test_normal=1, size=SIZE, n_coords_train=40, n_coords_val=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo set, generated once for this module."""
    return make_demo(tmp_path_factory.mktemp("camelyon_demo"), **PARAMS)


# ----------------------------------------------------------------------------
# helpers (independent of camelyon.annotations)
# ----------------------------------------------------------------------------

def parse_xml(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(positive, negative) polygons (N, 2) of level-0 (x, y) from an ASAP XML in original naming."""
    root = ET.parse(path).getroot()
    pos, neg = [], []
    for ann in root.iter("Annotation"):
        coords = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        poly = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords])
        group = ann.get("PartOfGroup")
        assert group in ("_0", "_1", "_2"), group
        (neg if group == "_2" else pos).append(poly)
    return pos, neg


def raster(polys_pos, polys_neg, shape, ds) -> np.ndarray:
    """Rasterise polygons at downsample ``ds`` with skimage (pixel centres at (i + 0.5) * ds)."""
    out = np.zeros(shape, bool)
    for polys, value in ((polys_pos, True), (polys_neg, False)):
        for p in polys:
            rr, cc = draw_polygon(p[:, 1] / ds - 0.5, p[:, 0] / ds - 0.5, shape=shape)
            out[rr, cc] = value
    return out


def in_tumour(pos, neg, xy) -> np.ndarray:
    """Point test: inside any positive polygon and no negative one."""
    xy = np.asarray(xy, float)
    inside = np.zeros(len(xy), bool)
    for p in pos:
        inside |= points_in_poly(xy, p)
    for p in neg:
        inside &= ~points_in_poly(xy, p)
    return inside


def read_coords(path: Path) -> list[tuple[str, int, int]]:
    """NCRF coordinate list rows (slide id, x, y); checks the line format."""
    rows = []
    for line in path.read_text().splitlines():
        assert re.fullmatch(r"(Tumor|Normal)_\d{3},\d+,\d+", line), line
        sid, x, y = line.split(",")
        rows.append((sid, int(x), int(y)))
    return rows


def patch(slide: openslide.OpenSlide, x: int, y: int, size: int = 224) -> np.ndarray:
    """Level-0 RGB patch centred on (x, y)."""
    return np.asarray(slide.read_region((x - size // 2, y - size // 2), 0, (size, size)))[..., :3]


# ----------------------------------------------------------------------------
# the generated demo set
# ----------------------------------------------------------------------------

def test_layout_files(demo):
    assert demo.generated
    assert demo.train_slides == ("tumor_001", "tumor_002", "normal_001")
    assert demo.val_slides == ("tumor_003", "normal_002")
    assert len(demo.test_slides) == 3 and len(demo.test_tumor_slides) == 2
    for name in demo.train_slides + demo.val_slides + demo.test_slides:
        assert demo.slide_path(name).is_file()
        if not name.startswith("test_"):
            assert (demo.train_annotations / f"{name}.xml").is_file() == name.startswith("tumor_")
    for name in demo.test_slides:
        assert len(name) == 8  # the official FROC script keys tumour slides on 8 characters
        tumour = name in demo.test_tumor_slides
        assert (demo.test_masks / f"{name}.tif").is_file() == tumour
        assert (demo.test_annotations / f"{name}.xml").is_file() == tumour
    marker = json.loads((demo.root / ".complete").read_text())
    assert marker["params"]["seed"] == PARAMS["seed"]


def test_slide_opens_in_openslide(demo):
    name = demo.train_slides[0]
    s = openslide.OpenSlide(demo.slide_path(name))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.dimensions == (SIZE[1], SIZE[0])
    assert s.level_count >= 6
    for k, ds in enumerate(s.level_downsamples):
        assert ds == pytest.approx(2 ** k, rel=1e-3)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP, rel=1e-6)
    # level 0 as OpenSlide reads it == the stored level 0 (tifffile decode), up to decoder rounding
    with tifffile.TiffFile(demo.slide_path(name)) as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == tifffile.COMPRESSION.JPEG
        stored = page.asarray()
    x0, y0 = 1000, 700
    got = np.asarray(s.read_region((x0, y0), 0, (600, 500)))[..., :3].astype(int)
    assert np.abs(got - stored[y0:y0 + 500, x0:x0 + 600]).max() <= 2
    # level 2 ~ area downsampling of level 0 (compared after smoothing away the JPEG-coded grain)
    lv2 = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]))[..., :3]
    ref = stored
    for _ in range(5):
        ref = downsample2(ref)
    for _ in range(3):
        lv2 = downsample2(lv2)
    assert np.abs(lv2.astype(int) - ref).mean() < 1.5


def test_masks_match_xml(demo):
    for name in demo.test_tumor_slides:
        pos, neg = parse_xml(demo.test_annotations / f"{name}.xml")
        assert 1 <= len(pos) <= 4 and not neg  # 2-3 lesions (+ ITC) at full size; fewer may fit here
        s = openslide.OpenSlide(demo.mask_path(name))
        assert s.dimensions == (SIZE[1], SIZE[0])
        assert s.level_count >= 6
        m5 = np.asarray(s.read_region((0, 0), 5, s.level_dimensions[5]))[..., 0]
        assert set(np.unique(m5)) <= {0, 255}
        ref = raster(pos, neg, m5.shape, 32)
        got = m5 == 255
        dice = 2 * (got & ref).sum() / (got.sum() + ref.sum())
        assert dice > 0.98, (name, dice)
        with tifffile.TiffFile(demo.mask_path(name)) as tf:
            m0 = tf.pages[0].asarray()
        assert m0.dtype == np.uint8 and m0.ndim == 2 and set(np.unique(m0)) == {0, 255}


def test_lesion_placement_full_size():
    """At the default slide size, tumour test slides get 2-3 lesions 1,500-3,000 px across (+ ITC)."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 4))
        lesions = _place_lesions(rng, (6144, 8192), n, itc=True)
        sizes = [pdist(p).max() for *_, p in lesions]  # largest vertex-to-vertex distance
        assert len(lesions) == n + 1
        assert all(1499 <= d <= 3001 for d in sizes[:-1]) and 399 <= sizes[-1] <= 401, sizes


def test_xml_structure_and_exclusion(demo):
    root = ET.parse(demo.train_annotations / "tumor_001.xml").getroot()
    assert root.tag == "ASAP_Annotations"
    assert {g.get("Name") for g in root.findall("./AnnotationGroups/Group")} == {"_0", "_1", "_2"}
    anns = root.findall("./Annotations/Annotation")
    assert all(a.get("Type") == "Polygon" and a.get("Color") and a.get("Name") for a in anns)
    pos, neg = parse_xml(demo.train_annotations / "tumor_001.xml")
    assert len(pos) >= 1 and len(neg) == 1  # one "_2" exclusion polygon...
    assert any(points_in_poly(neg[0], p).all() for p in pos)  # ...inside a lesion
    for p in pos:  # lesions are bigger than the ITC bound (275 µm)
        assert (p.max(0) - p.min(0)).max() > 275 / MPP


def test_one_itc_under_official_rule(demo):
    """Level-5 evaluation mask as in Evaluation_FROC.py: exactly one ITC over the test set."""
    n_itc = n_lesions = 0
    for name in demo.test_tumor_slides:
        s = openslide.OpenSlide(demo.mask_path(name))
        m5 = np.asarray(s.read_region((0, 0), 5, s.level_dimensions[5]))[..., 0]
        dist = ndi.distance_transform_edt(255 - m5)
        grown = ndi.binary_fill_holes(dist < 75 / (MPP * 2 ** 5 * 2))
        labels = cc_label(grown, connectivity=2)
        props = regionprops(labels)
        n_itc += sum(p.axis_major_length < 275 / (MPP * 2 ** 5) for p in props)
        n_lesions += len(props)
        assert len(props) == len(parse_xml(demo.test_annotations / f"{name}.xml")[0])  # lesions stay apart
    assert n_itc == 1 and n_lesions >= 3


def test_coordinates(demo):
    files = demo.coord_files
    n = {"tumor_train": 40, "normal_train": 40, "tumor_valid": 16, "normal_valid": 16}
    slides = {"train": demo.train_slides, "valid": demo.val_slides}
    h, w = SIZE
    polys = {}
    for key, path in files.items():
        kind, split = key.split("_")
        rows = read_coords(path)
        assert len(rows) == n[key]
        for sid, x, y in rows:
            assert sid[0].isupper() and sid.lower() in slides[split]
            assert 384 <= x <= w - 384 and 384 <= y <= h - 384  # the 768 region is inside the slide
        by_slide: dict[str, list] = {}
        for sid, x, y in rows:
            by_slide.setdefault(sid, []).append((x, y))
        for sid, xy in by_slide.items():
            if sid.startswith("Normal"):
                assert kind == "normal"
                continue
            if sid not in polys:
                polys[sid] = parse_xml(demo.train_annotations / f"{sid.lower()}.xml")
            pos, neg = polys[sid]
            if kind == "tumor":
                assert in_tumour(pos, neg, xy).all()
            else:
                assert not in_tumour(pos, [], xy).any()  # outside every lesion polygon
        if kind == "normal":  # hard negatives from tumour slides and true normals
            assert any(s.startswith("Tumor") for s in by_slide) and any(s.startswith("Normal") for s in by_slide)
        else:
            assert all(s.startswith("Tumor") for s in by_slide)


def test_tumour_patches_look_different(demo):
    """Tumour, normal tissue and background differ clearly in colour statistics."""
    def blue_red(rows, k=12):
        out = []
        for sid, x, y in rows[:: max(1, len(rows) // k)][:k]:
            p = patch(openslide.OpenSlide(demo.slide_path(sid.lower())), x, y).reshape(-1, 3).astype(float)
            out.append(p[:, 2].mean() / p[:, 0].mean())
        return np.array(out)

    tumour = blue_red(read_coords(demo.coord_files["tumor_train"]))
    normal = blue_red([r for r in read_coords(demo.coord_files["normal_train"])])
    assert tumour.mean() - normal.mean() > 0.15
    assert tumour.min() > normal.max()
    # background: a level-6 pixel far from tissue, read as a level-0 patch
    s = openslide.OpenSlide(demo.slide_path("normal_001"))
    thumb = np.asarray(s.read_region((0, 0), 6, s.level_dimensions[6]))[..., :3].astype(int)
    bg = ndi.binary_erosion(thumb.min(-1) > 225, iterations=3)
    r, c = np.argwhere(bg)[0]
    bgp = patch(s, int(c) * 64 + 32, int(r) * 64 + 32).astype(float)
    assert bgp.mean() > 230 and bgp.std() < 6
    row = read_coords(demo.coord_files["normal_train"])[0]
    tissue = patch(openslide.OpenSlide(demo.slide_path(row[0].lower())), row[1], row[2]).astype(float)
    assert bgp[..., 1].mean() - tissue[..., 1].mean() > 40  # eosin pink is far from white


def test_idempotent_and_seed_regenerates(tmp_path):
    small = dict(n_train_tumor=1, n_train_normal=1, n_val_tumor=0, n_val_normal=0, n_test_tumor=1,
                 n_test_normal=0, size=(2048, 2560), n_coords_train=8, n_coords_val=0)
    a = make_demo(tmp_path, seed=0, **small)
    assert a.generated
    slide = a.slide_path("tumor_001")
    mtime, content = slide.stat().st_mtime_ns, slide.read_bytes()
    marker_mtime = (tmp_path / ".complete").stat().st_mtime_ns

    b = make_demo(tmp_path, seed=0, **small)
    assert not b.generated and b.root == a.root and b.test_slides == a.test_slides
    assert slide.stat().st_mtime_ns == mtime and (tmp_path / ".complete").stat().st_mtime_ns == marker_mtime

    c = make_demo(tmp_path, seed=5, **small)
    assert c.generated and slide.read_bytes() != content
    assert json.loads((tmp_path / ".complete").read_text())["params"]["seed"] == 5
    # fewer slides: files of the previous generation are removed
    d = make_demo(tmp_path, seed=5, **{**small, "n_train_normal": 0})
    assert d.generated and not (tmp_path / "training" / "images" / "normal_001.tif").exists()
    assert not list(tmp_path.rglob(".*.tmp"))


def test_deterministic(tmp_path):
    small = dict(n_train_tumor=1, n_train_normal=0, n_val_tumor=0, n_val_normal=0, n_test_tumor=0,
                 n_test_normal=0, size=(2048, 2048), n_coords_train=8, n_coords_val=0)
    a = make_demo(tmp_path / "a", seed=3, **small)
    b = make_demo(tmp_path / "b", seed=3, **small)
    for rel in ("training/images/tumor_001.tif", "training/annotations/tumor_001.xml", "coords/tumor_train.txt"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PATHMONO_CACHE", str(tmp_path))
    assert demo_cache_root() == tmp_path / "camelyon_demo"
    monkeypatch.delenv("PATHMONO_CACHE")
    assert demo_cache_root() == Path.home() / ".cache" / "pathmono" / "camelyon_demo"
