"""Tests for camelyon.annotations on real Camelyon16 / NCRF fixtures and hand-built shapes.

Real-data comparisons documented here:
* ASAP XML counts (polygons per side, vertices) equal the numbers in the
  shared reference (camelyon.md §1.4 and the fixtures README §2).
* XML vs NCRF JSON of the same slide (tumor_009/036/085): same polygon counts,
  same order, the stated number of polygons identical after rounding the XML
  floats to integers (4/6, 104/105, 50/50), and level-0/32 masks with Dice > 0.99.
* Our PNPOLY point test equals skimage.measure.points_in_poly (NCRF's test) on
  random non-boundary points.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import points_in_poly

from camelyon.annotations import (
    Annotation,
    AnnotationError,
    AnnotationWarning,
    grid_labels,
    points_in_annotation,
    rasterize,
    read_annotation,
    read_asap_xml,
    read_geojson,
    read_ncrf_json,
    write_asap_xml,
    write_geojson,
    write_ncrf_json,
)

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]
HOLE = [[2, 2], [5, 2], [5, 5], [2, 5]]


def _c16(fixtures_dir: Path, *parts: str) -> Path:
    """Path of a Camelyon16 fixture file."""
    return fixtures_dir.joinpath("camelyon16", *parts)


def _xml(annotations: str, groups: str = "") -> str:
    """A minimal ASAP XML document with the given Annotation and Group elements."""
    return (f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{annotations}</Annotations>'
            f"<AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>")


def _xml_polygon(group: str, verts, kind: str = "Polygon", name: str = "a") -> str:
    """One ASAP Annotation element."""
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(verts))
    return (f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks."""
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _shape_for(anns, ds: float) -> tuple[int, int]:
    """A raster shape covering every vertex of ``anns`` at downsample ``ds``."""
    top = np.vstack([p for a in anns for p in a.positive + a.negative]).max(0)
    return int(top[1] // ds) + 2, int(top[0] // ds) + 2


def _centres(shape, ds: float) -> np.ndarray:
    """Level-0 (x, y) of all pixel centres of a (H, W) raster, row-major."""
    r, c = np.mgrid[0:shape[0], 0:shape[1]]
    return np.stack([(c.ravel() + 0.5) * ds, (r.ravel() + 0.5) * ds], axis=1)


# ---------------------------------------------------------------- reading real files

def test_xml_original_naming_counts(fixtures_dir):
    """test_040.xml (_0/_1/_2 naming): 34 positive, 44 negative, 66,697 vertices."""
    ann = read_annotation(_c16(fixtures_dir, "xml", "test_040.xml"))
    assert (len(ann.positive), len(ann.negative), ann.n_vertices) == (34, 44, 66_697)
    assert all(p.dtype == np.float64 and p.shape[1] == 2 for p in ann.positive + ann.negative)
    assert ann.source.endswith("test_040.xml")
    assert ann.positive[0][0].tolist() == [71992.1, 84248.3]


@pytest.mark.parametrize("name, n_pos, n_neg, n_vert", [
    ("tumor_009.xml", 6, 0, 10_778),   # all Type="Spline", group metastasis
    ("tumor_036.xml", 103, 2, None),   # metastasis + negative
    ("tumor_085.xml", 50, 0, 7_220),
])
def test_xml_alternative_naming_counts(fixtures_dir, name, n_pos, n_neg, n_vert):
    """Re-exported metastasis/negative naming parses with the reference counts."""
    ann = read_annotation(_c16(fixtures_dir, "xml", name))
    assert (len(ann.positive), len(ann.negative)) == (n_pos, n_neg)
    if n_vert is not None:
        assert ann.n_vertices == n_vert


@pytest.mark.parametrize("slide, n_identical", [("009", 4), ("036", 104), ("085", 50)])
def test_xml_matches_ncrf_json(fixtures_dir, slide, n_identical):
    """XML and NCRF JSON of one slide: same counts, rounded polygons equal, Dice > 0.99 at ds 32."""
    xml = read_annotation(_c16(fixtures_dir, "xml", f"tumor_{slide}.xml"))
    js = read_annotation(_c16(fixtures_dir, "ncrf_jsons", f"Tumor_{slide}.json"))
    assert (len(xml.positive), len(xml.negative)) == (len(js.positive), len(js.negative))
    pairs = zip(xml.positive + xml.negative, js.positive + js.negative)
    assert sum(np.array_equal(np.round(a), b) for a, b in pairs) == n_identical
    shape = _shape_for([xml, js], 32)
    mx, mj = rasterize(xml, shape, 32), rasterize(js, shape, 32)
    assert mx.sum() > 100
    assert _dice(mx, mj) > 0.99


def test_ncrf_json_small_and_normal(fixtures_dir):
    """Tumor_081: 1 polygon of 87 vertices; Normal_017: 0 positive, 2 negative (not empty)."""
    t81 = read_ncrf_json(_c16(fixtures_dir, "ncrf_jsons", "Tumor_081.json"))
    assert len(t81.positive) == 1 and len(t81.positive[0]) == 87 and not t81.negative
    n17 = read_annotation(_c16(fixtures_dir, "ncrf_jsons", "Normal_017.json"))
    assert (len(n17.positive), len(n17.negative), n17.n_vertices) == (0, 2, 384)
    assert not points_in_annotation(n17, np.vstack(n17.negative)).any()


def test_point_test_matches_skimage(fixtures_dir):
    """points_in_annotation equals skimage.measure.points_in_poly (NCRF) on random points."""
    ann = read_ncrf_json(_c16(fixtures_dir, "ncrf_jsons", "Tumor_081.json"))
    poly = ann.positive[0]
    rng = np.random.default_rng(0)
    pts = rng.uniform(poly.min(0) - 50, poly.max(0) + 50, size=(20_000, 2))
    ours = points_in_annotation(ann, pts)
    assert 0 < ours.sum() < len(pts)
    np.testing.assert_array_equal(ours, points_in_poly(pts, poly))


def test_negative_hole_in_real_slide(fixtures_dir):
    """tumor_036: points inside a negative polygon are excluded even though inside a positive."""
    ann = read_annotation(_c16(fixtures_dir, "xml", "tumor_036.xml"))
    rng = np.random.default_rng(1)
    neg = ann.negative[0]
    pts = rng.uniform(neg.min(0), neg.max(0), size=(5_000, 2))
    in_neg = points_in_poly(pts, neg)
    in_pos = np.any([points_in_poly(pts, p) for p in ann.positive[:3]], axis=0)
    assert (in_neg & in_pos).sum() > 100
    ours = points_in_annotation(ann, pts)
    assert not ours[in_neg].any()
    np.testing.assert_array_equal(ours[~in_neg], in_pos[~in_neg])


# ---------------------------------------------------------------- rasterisation

def test_rasterize_hand_counts():
    """Square, square with a negative hole and triangle give hand-computed pixel counts."""
    square = Annotation(positive=[SQUARE])
    assert rasterize(square, (12, 12), 1).sum() == 100          # centres 0.5..9.5
    assert rasterize(square, (6, 6), 2).sum() == 25             # centres 1,3,5,7,9
    holed = Annotation(positive=[SQUARE], negative=[HOLE])
    assert rasterize(holed, (12, 12), 1).sum() == 100 - 9      # hole centres 2.5..4.5
    assert rasterize(holed, (6, 6), 2).sum() == 25 - 1         # hole centre 3 only (5 is on the edge)
    tri = Annotation(positive=[[[0, 0], [8, 0], [0, 8]]])
    mask = rasterize(tri, (10, 10), 1)
    assert mask.sum() == 28                                     # c + r < 7: 7+6+...+1
    assert mask[0, 6] and not mask[0, 7] and not mask[6, 1]


def test_rasterize_layout_and_clipping():
    """Rows are y, columns are x; polygons off the image are clipped; ds > 0 required."""
    ann = Annotation(positive=[[[40, 0], [80, 0], [80, 20], [40, 20]], [[-50, -50], [-10, -50], [-10, -10]]])
    mask = rasterize(ann, (4, 10), 10)
    expected = np.zeros((4, 10), bool)
    expected[0:2, 4:8] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError):
        rasterize(ann, (4, 10), 0)


def test_rasterize_agrees_with_points_on_lattice_polygons():
    """Random polygons with vertices on pixel centres (many exact-boundary cases) and holes."""
    rng = np.random.default_rng(2)
    ds, shape = 4.0, (60, 70)
    lattice = lambda n: (rng.integers(0, 75, size=(n, 2)) + 0.5) * ds  # noqa: E731
    ann = Annotation(positive=[lattice(k) for k in (3, 5, 9, 20)], negative=[lattice(k) for k in (4, 7)])
    mask = rasterize(ann, shape, ds)
    pts = _centres(shape, ds)
    np.testing.assert_array_equal(mask.ravel(), points_in_annotation(ann, pts))
    assert 0 < mask.sum() < mask.size


def test_rasterize_agrees_with_points_real_slide(fixtures_dir):
    """tumor_036 at ds 16: mask equals the point test at random pixel centres."""
    ann = read_annotation(_c16(fixtures_dir, "xml", "tumor_036.xml"))
    ds = 16
    shape = _shape_for([ann], ds)
    mask = rasterize(ann, shape, ds)
    rng = np.random.default_rng(3)
    rows, cols = np.nonzero(mask)
    pick = rng.integers(0, len(rows), 20_000)
    r = np.concatenate([rows[pick], rng.integers(0, shape[0], 20_000)])
    c = np.concatenate([cols[pick], rng.integers(0, shape[1], 20_000)])
    pts = np.stack([(c + 0.5) * ds, (r + 0.5) * ds], axis=1)
    np.testing.assert_array_equal(mask[r, c], points_in_annotation(ann, pts))


# ---------------------------------------------------------------- grid labels

def test_grid_labels_patterns():
    """Right-column, top-row and single-patch polygons give the expected 3×3 patterns."""
    centres = [[1000, 2000], [10_000, 10_000]]
    right_col = Annotation(positive=[[[1200, 1000], [1400, 1000], [1400, 3000], [1200, 3000]]])
    labels = grid_labels(right_col, centres)
    assert labels.shape == (2, 3, 3) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[0], [[0, 0, 1]] * 3)
    assert not labels[1].any()
    top_row = Annotation(positive=[[[0, 1700], [3000, 1700], [3000, 1800], [0, 1800]]])
    np.testing.assert_array_equal(grid_labels(top_row, centres)[0], [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    # patch (r=0, c=2) centre is (1000 + 272, 2000 - 272)
    corner = Annotation(positive=[[[1262, 1718], [1282, 1718], [1282, 1738], [1262, 1738]]])
    np.testing.assert_array_equal(grid_labels(corner, centres)[0], [[0, 0, 1], [0, 0, 0], [0, 0, 0]])


def test_grid_labels_other_geometry():
    """region/patch parameters move the patch centres: step (512-128)//2 = 192."""
    ann = Annotation(positive=[[[1190, 0], [1194, 0], [1194, 4000], [1190, 4000]]])
    # region 512, patch 128: centre x offsets -192, 0, +192 -> right column at x = 1192
    np.testing.assert_array_equal(grid_labels(ann, [[1000, 2000]], region=512, patch=128)[0],
                                  [[0, 0, 1]] * 3)


# ---------------------------------------------------------------- writing / round trips

def _sample_annotation() -> Annotation:
    """A float annotation with two positives and one negative."""
    return Annotation(positive=[np.array(SQUARE, float) + 0.1, np.array([[20.25, 20], [30, 20.5], [25, 31]])],
                      negative=[np.array(HOLE, float) + 0.3], source="mem")


def _assert_same_polygons(a: Annotation, b: Annotation) -> None:
    """Polygons of ``a`` and ``b`` are identical, side by side."""
    for kind in ("positive", "negative"):
        pa, pb = getattr(a, kind), getattr(b, kind)
        assert len(pa) == len(pb)
        for x, y in zip(pa, pb):
            np.testing.assert_array_equal(x, y)


def test_xml_round_trip(tmp_path):
    """write_asap_xml → read_asap_xml returns identical float polygons in groups _0/_2."""
    ann = _sample_annotation()
    path = tmp_path / "out.xml"
    write_asap_xml(ann, path)
    back = read_annotation(path)
    _assert_same_polygons(ann, back)
    text = path.read_text()
    assert 'PartOfGroup="_0"' in text and 'PartOfGroup="_2"' in text and "<AnnotationGroups>" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.xml"]  # no temp file left


def test_json_round_trip(tmp_path):
    """write_ncrf_json rounds to integers like NCRF by default, exact with round_vertices=False."""
    ann = _sample_annotation()
    write_ncrf_json(ann, tmp_path / "a.json")
    raw = json.loads((tmp_path / "a.json").read_text())
    assert isinstance(raw["positive"][0]["vertices"][0][0], int)
    rounded = read_annotation(tmp_path / "a.json")
    np.testing.assert_array_equal(rounded.positive[1], np.round(ann.positive[1]))
    write_ncrf_json(ann, tmp_path / "b.json", round_vertices=False)
    _assert_same_polygons(ann, read_ncrf_json(tmp_path / "b.json"))


def test_geojson_round_trip(tmp_path):
    """GeoJSON: Points carry probabilities; polygons are closed rings and read back exactly."""
    ann = _sample_annotation()
    path = tmp_path / "a.geojson"
    write_geojson(path, points=[[1, 2], [3.5, 4]], polygons=ann, probabilities=[0.9, 0.25])
    obj = json.loads(path.read_text())
    assert obj["type"] == "FeatureCollection" and len(obj["features"]) == 5
    point = obj["features"][1]
    assert point["geometry"] == {"type": "Point", "coordinates": [3.5, 4.0]}
    assert point["properties"]["objectType"] == "annotation"
    assert point["properties"]["classification"]["name"] == "Tumor"
    assert point["properties"]["measurements"] == {"probability": 0.25}
    ring = obj["features"][2]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    _assert_same_polygons(ann, read_geojson(path))
    # a plain polygon list defaults to the given class -> positive; .json GeoJSON is sniffed
    write_geojson(tmp_path / "b.json", polygons=[SQUARE])
    assert len(read_annotation(tmp_path / "b.json").positive) == 1


def test_geojson_rejects_mismatched_probabilities(tmp_path):
    """probabilities must have one value per point."""
    with pytest.raises(ValueError):
        write_geojson(tmp_path / "x.geojson", points=[[0, 0]], probabilities=[0.1, 0.2])


# ---------------------------------------------------------------- errors and warnings

def test_empty_xml_raises_annotation_error(tmp_path):
    """An XML with no usable polygons raises AnnotationError naming the file, unless allow_empty."""
    path = tmp_path / "empty_slide.xml"
    path.write_text(_xml(_xml_polygon("_0", [[0, 0], [1, 1]])))  # only 2 vertices
    with pytest.warns(AnnotationWarning), pytest.raises(AnnotationError, match="empty_slide.xml"):
        read_annotation(path)
    with pytest.warns(AnnotationWarning):
        assert read_annotation(path, allow_empty=True).is_empty
    assert issubclass(AnnotationError, ValueError)


def test_empty_json_raises_annotation_error(tmp_path):
    """An NCRF JSON with empty lists is an AnnotationError; allowed for normal slides."""
    path = tmp_path / "Normal_000.json"
    path.write_text('{"positive": [], "negative": []}')
    with pytest.raises(AnnotationError, match="Normal_000.json"):
        read_annotation(path)
    assert read_annotation(path, allow_empty=True).is_empty


def test_unknown_group_warns_and_is_skipped(tmp_path):
    """Unknown groups (and ungrouped 'None') warn naming file and group; known ones are kept."""
    path = tmp_path / "mixed.xml"
    path.write_text(_xml(_xml_polygon("Lymphocytes", SQUARE) + _xml_polygon("None", SQUARE)
                         + _xml_polygon("Tumor", SQUARE) + _xml_polygon("Exclusion", HOLE)
                         + _xml_polygon("_1", SQUARE, kind="PointSet"),
                         '<Group Name="Lymphocytes" PartOfGroup="None"><Attributes /></Group>'))
    with pytest.warns(AnnotationWarning) as record:
        ann = read_asap_xml(path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and all("mixed.xml" in m for m in messages)
    assert any("'Lymphocytes'" in m for m in messages) and any("'None'" in m for m in messages)
    assert any("PointSet" in m for m in messages)
    assert (len(ann.positive), len(ann.negative)) == (1, 1)


def test_xml_order_and_nested_groups(tmp_path):
    """Coordinates are sorted by Order; a sub-group of _0 counts as positive."""
    coords = ('<Coordinate Order="2" X="10" Y="10" /><Coordinate Order="0" X="0" Y="0" />'
              '<Coordinate Order="1" X="10" Y="0" />')
    elem = f'<Annotation Name="t" Type="Spline" PartOfGroup="sub"><Coordinates>{coords}</Coordinates></Annotation>'
    path = tmp_path / "nested.xml"
    path.write_text(_xml(elem, '<Group Name="sub" PartOfGroup="_0" />'))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ann = read_asap_xml(path)
    np.testing.assert_array_equal(ann.positive[0], [[0, 0], [10, 0], [10, 10]])


@pytest.mark.parametrize("name, text", [
    ("broken.xml", "<ASAP_Annotations><Annotations><Annotation"),
    ("wrongroot.xml", "<Foo/>"),
    ("badcoord.xml", _xml('<Annotation PartOfGroup="_0"><Coordinates>'
                          '<Coordinate Order="0" X="a" Y="1" /></Coordinates></Annotation>')),
    ("broken.json", '{"positive": [ '),
    ("notncrf.json", '{"foo": 1}'),
    ("badverts.json", '{"positive": [{"name": "a", "vertices": [[1, 2, 3]]}]}'),
    ("bad.geojson", '{"type": "Topology"}'),
    ("slide.txt", "x"),
])
def test_malformed_files_raise_value_error(tmp_path, name, text):
    """Malformed or unsupported files raise ValueError naming the file."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as info:
        read_annotation(path)
    assert not isinstance(info.value, AnnotationError)
