"""Camelyon16 lesion annotations: reading, writing, rasterising, point labels.

Formats
-------
* ASAP XML (the Camelyon16 originals): ``ASAP_Annotations/Annotations/Annotation``
  elements with ``PartOfGroup``; vertices in ``Coordinates/Coordinate`` with
  ``Order``, ``X`` (column) and ``Y`` (row), level-0 pixels.  Both group namings
  are understood: the original ``_0``/``_1`` (tumour) and ``_2`` (exclusion), and
  the re-exported ``metastasis``/``negative``.  See :data:`POSITIVE_GROUPS` and
  :data:`NEGATIVE_GROUPS`.
* NCRF JSON: ``{"positive": [{"name", "vertices": [[x, y], ...]}], "negative": [...]}``.
* GeoJSON (QuPath): Polygon/MultiPolygon features, class from
  ``properties.classification.name``.

Geometry convention
-------------------
Polygons are ``(N, 2)`` float64 arrays of level-0 ``(x, y)`` = (column, row),
not closed (the first vertex is not repeated).  A point is inside a polygon by
the classic even-odd crossing test (PNPOLY): an edge counts when
``min(y1, y2) <= y < max(y1, y2)`` and its crossing lies strictly right of the
point.  This is the rule of ``skimage.measure.points_in_poly`` as NCRF used it
(scikit-image < 0.19); newer scikit-image also counts exact boundary points as
inside.  The two differ only for points exactly on a polygon edge.

A point belongs to an annotation when it is inside any positive polygon and
inside no negative polygon.  :func:`rasterize` applies the same test to pixel
centres ``((c + 0.5) * ds, (r + 0.5) * ds)``, with the same arithmetic, so
``rasterize`` and :func:`points_in_annotation` agree exactly.
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.errors import UserError
from common.io import atomic_write_text

__all__ = [
    "Annotation",
    "AnnotationError",
    "AnnotationWarning",
    "POSITIVE_GROUPS",
    "NEGATIVE_GROUPS",
    "group_label",
    "read_asap_xml",
    "read_ncrf_json",
    "read_geojson",
    "read_annotation",
    "write_asap_xml",
    "write_ncrf_json",
    "write_geojson",
    "rasterize",
    "points_in_annotation",
    "points_in_polygon",
    "grid_labels",
]

#: Group / class names (lower-case) whose polygons are tumour.
POSITIVE_GROUPS = frozenset({"_0", "_1", "tumor", "metastasis"})
#: Group / class names (lower-case) whose polygons are excluded from tumour.
NEGATIVE_GROUPS = frozenset({"_2", "exclusion", "negative"})

_POLYGON_TYPES = frozenset({"polygon", "spline", "rectangle"})
_MAX_PAIRS = 20_000_000  # cap on (edge, point) pairs held in memory at once


class AnnotationError(UserError, ValueError):
    """An annotation file is readable but holds no usable polygons."""


class AnnotationWarning(UserWarning):
    """A polygon or group in an annotation file was skipped."""


def _as_polygon(vertices) -> np.ndarray:
    """Return ``vertices`` as a C-contiguous (N, 2) float64 array or raise ValueError."""
    arr = np.ascontiguousarray(vertices, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"polygon must have shape (N, 2), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("polygon has non-finite coordinates")
    return arr


@dataclass
class Annotation:
    """Positive (tumour) and negative (excluded) polygons of one slide.

    Each polygon is an (N, 2) float64 array of level-0 (x=column, y=row).
    ``positive_names``/``negative_names`` hold the original annotation names
    when the file had them (same length as the polygon lists, or empty).
    """

    positive: list[np.ndarray] = field(default_factory=list)
    negative: list[np.ndarray] = field(default_factory=list)
    source: str = ""
    positive_names: list[str] = field(default_factory=list)
    negative_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Normalise polygons to float64 (N, 2) arrays and check name lengths."""
        self.positive = [_as_polygon(p) for p in self.positive]
        self.negative = [_as_polygon(p) for p in self.negative]
        self.source = str(self.source)
        for kind in ("positive", "negative"):
            names = getattr(self, f"{kind}_names")
            if names and len(names) != len(getattr(self, kind)):
                raise ValueError(f"{kind}_names has {len(names)} entries for "
                                 f"{len(getattr(self, kind))} polygons")

    @property
    def is_empty(self) -> bool:
        """True when there is no polygon at all (positive or negative)."""
        return not self.positive and not self.negative

    @property
    def n_vertices(self) -> int:
        """Total number of vertices over all polygons."""
        return sum(len(p) for p in self.positive + self.negative)

    def names(self, kind: str) -> list[str]:
        """Names of the ``kind`` ('positive'/'negative') polygons, generated if absent."""
        stored = getattr(self, f"{kind}_names")
        n = len(getattr(self, kind))
        return list(stored) if len(stored) == n else [f"Annotation {i}" for i in range(n)]


def group_label(name: str | None) -> bool | None:
    """Map a group/class name to True (positive), False (negative) or None (unknown)."""
    key = (name or "").strip().lower()
    if key in POSITIVE_GROUPS:
        return True
    if key in NEGATIVE_GROUPS:
        return False
    return None


def _warn(path, msg: str) -> None:
    """Emit an :class:`AnnotationWarning` naming the file."""
    warnings.warn(f"{path}: {msg}", AnnotationWarning, stacklevel=3)


def _add_polygon(ann: Annotation, is_pos: bool, verts, name: str, path) -> None:
    """Append ``verts`` to ``ann`` (positive or negative) unless it has < 3 vertices."""
    try:
        poly = _as_polygon(verts) if len(verts) else np.zeros((0, 2))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad vertices in annotation {name!r}: {exc}") from exc
    if len(poly) < 3:
        _warn(path, f"annotation {name!r} has {len(poly)} vertices (< 3); skipped")
        return
    kind = "positive" if is_pos else "negative"
    getattr(ann, kind).append(poly)
    getattr(ann, f"{kind}_names").append(str(name))


# ----------------------------------------------------------------------------
# ASAP XML
# ----------------------------------------------------------------------------

def _xml_group_parents(root: ET.Element) -> dict[str, str]:
    """Map each ``AnnotationGroups/Group`` name to its own ``PartOfGroup``."""
    return {g.get("Name", ""): g.get("PartOfGroup", "None")
            for g in root.findall("./AnnotationGroups/Group")}


def _resolve_group(group: str, parents: dict[str, str]) -> bool | None:
    """Label of ``group``, following nested ASAP groups up to a known name."""
    seen = set()
    while group not in seen:
        label = group_label(group)
        if label is not None:
            return label
        seen.add(group)
        group = parents.get(group, "")
    return None


def _xml_vertices(elem: ET.Element, path) -> np.ndarray:
    """Vertices of one ``Annotation`` element, sorted by ``Order``."""
    rows = []
    for i, c in enumerate(elem.findall("./Coordinates/Coordinate")):
        try:
            order = float(c.get("Order", i))
            rows.append((order, float(c.get("X")), float(c.get("Y"))))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad Coordinate in annotation "
                             f"{elem.get('Name')!r}: {c.attrib}") from exc
    if not rows:
        return np.zeros((0, 2))
    arr = np.asarray(rows, dtype=np.float64)
    return arr[np.argsort(arr[:, 0], kind="stable"), 1:]


def read_asap_xml(path: str | os.PathLike) -> Annotation:
    """Read an ASAP XML annotation (either group naming).

    Polygon, Spline and Rectangle annotations are taken as polygons (spline
    vertices are used as-is, no interpolation).  Other types (Dot, PointSet),
    annotations with < 3 vertices and annotations in an unknown group (including
    ungrouped ones, ``PartOfGroup="None"``) are skipped with an
    :class:`AnnotationWarning`.  Raises ValueError naming the file when the XML
    is malformed.  May return an empty Annotation (see :func:`read_annotation`).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: malformed XML: {exc}") from exc
    if root.tag != "ASAP_Annotations":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <ASAP_Annotations>")
    parents = _xml_group_parents(root)
    ann = Annotation(source=str(path))
    for elem in root.findall("./Annotations/Annotation"):
        name, group = elem.get("Name", ""), elem.get("PartOfGroup", "None")
        label = _resolve_group(group, parents)
        if label is None:
            _warn(path, f"annotation {name!r} in unknown group {group!r}; skipped")
            continue
        kind = elem.get("Type", "Polygon").strip().lower()
        if kind not in _POLYGON_TYPES:
            _warn(path, f"annotation {name!r} of type {elem.get('Type')!r} is not a region; skipped")
            continue
        _add_polygon(ann, label, _xml_vertices(elem, path), name, path)
    return ann


def write_asap_xml(ann: Annotation, path: str | os.PathLike) -> None:
    """Write ``ann`` as ASAP XML in the original naming (positive ``_0``, negative ``_2``).

    Coordinates are written with Python's shortest round-trip float repr, so
    reading the file back gives identical arrays.  The write is atomic.
    """
    root = ET.Element("ASAP_Annotations")
    annots = ET.SubElement(root, "Annotations")
    for kind, group, color in (("positive", "_0", "#F4FA58"), ("negative", "_2", "#64FE2E")):
        for name, poly in zip(ann.names(kind), getattr(ann, kind)):
            a = ET.SubElement(annots, "Annotation", Name=name, Type="Polygon",
                              PartOfGroup=group, Color=color)
            coords = ET.SubElement(a, "Coordinates")
            for i, (x, y) in enumerate(poly):
                ET.SubElement(coords, "Coordinate", Order=str(i), X=repr(float(x)), Y=repr(float(y)))
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, color in (("_0", "#FF0000"), ("_1", "#FF0000"), ("_2", "#00FF00")):
        g = ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color=color)
        ET.SubElement(g, "Attributes")
    ET.indent(root, space="\t")
    atomic_write_text(path, '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n")


# ----------------------------------------------------------------------------
# NCRF JSON
# ----------------------------------------------------------------------------

def _load_json(path) -> object:
    """json.load ``path``, raising ValueError naming the file when malformed."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: malformed JSON: {exc}") from exc


def _ncrf_from_obj(obj: object, path) -> Annotation:
    """Build an Annotation from a parsed NCRF JSON object."""
    if not isinstance(obj, dict) or not ({"positive", "negative"} & obj.keys()):
        raise ValueError(f"{path}: not an NCRF annotation (expected keys 'positive'/'negative')")
    ann = Annotation(source=str(path))
    for key, is_pos in (("positive", True), ("negative", False)):
        items = obj.get(key, [])
        if not isinstance(items, list):
            raise ValueError(f"{path}: '{key}' must be a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "vertices" not in item:
                raise ValueError(f"{path}: {key}[{i}] has no 'vertices'")
            _add_polygon(ann, is_pos, item["vertices"], item.get("name", f"Annotation {i}"), path)
    return ann


def read_ncrf_json(path: str | os.PathLike) -> Annotation:
    """Read an NCRF annotation JSON. Raises ValueError naming the file when malformed."""
    return _ncrf_from_obj(_load_json(path), path)


def write_ncrf_json(ann: Annotation, path: str | os.PathLike, round_vertices: bool = True) -> None:
    """Write ``ann`` as NCRF JSON (atomic).

    With ``round_vertices`` (default, as NCRF's own conversion) vertices are
    rounded to integers with ``np.round``; otherwise floats are kept exactly.
    """
    def items(kind: str) -> list[dict]:
        out = []
        for name, poly in zip(ann.names(kind), getattr(ann, kind)):
            verts = np.round(poly).astype(np.int64) if round_vertices else poly
            out.append({"name": name, "vertices": verts.tolist()})
        return out

    obj = {"positive": items("positive"), "negative": items("negative")}
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ----------------------------------------------------------------------------
# GeoJSON (QuPath)
# ----------------------------------------------------------------------------

def _feature_class(feature: dict) -> str | None:
    """QuPath classification name of a GeoJSON feature (None when absent)."""
    props = feature.get("properties") or {}
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    return cls if isinstance(cls, str) else None


def _geojson_features(obj: object, path) -> list[dict]:
    """Features of a FeatureCollection, a single Feature or a list of Features."""
    if isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    else:
        raise ValueError(f"{path}: not GeoJSON (expected a FeatureCollection, Feature or list)")
    if not isinstance(feats, list) or not all(isinstance(f, dict) for f in feats):
        raise ValueError(f"{path}: GeoJSON features must be a list of objects")
    return feats


def _open_ring(ring) -> np.ndarray:
    """A GeoJSON ring as an (N, 2) array without the repeated closing vertex."""
    arr = np.asarray(ring, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] > 2:
        arr = arr[:, :2]  # drop z
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    return arr


def _geojson_from_obj(obj: object, path) -> Annotation:
    """Build an Annotation from parsed GeoJSON; Point features are ignored."""
    ann = Annotation(source=str(path))
    for i, feat in enumerate(_geojson_features(obj, path)):
        geom = feat.get("geometry") or {}
        gtype = geom.get("type")
        if gtype in ("Point", "MultiPoint"):
            continue
        cls = _feature_class(feat)
        label = True if cls is None else group_label(cls)
        name = (feat.get("properties") or {}).get("name") or f"Annotation {i}"
        if label is None:
            _warn(path, f"feature {i} has unknown classification {cls!r}; skipped")
            continue
        if gtype not in ("Polygon", "MultiPolygon"):
            _warn(path, f"feature {i} has geometry {gtype!r}, not a polygon; skipped")
            continue
        polys = [geom.get("coordinates")] if gtype == "Polygon" else geom.get("coordinates")
        try:
            for rings in polys:
                _add_polygon(ann, label, _open_ring(rings[0]), name, path)
                for hole in rings[1:]:
                    if label:  # a hole in a tumour polygon is an excluded region
                        _add_polygon(ann, False, _open_ring(hole), f"{name} hole", path)
                    else:
                        _warn(path, f"feature {i}: hole in a negative polygon ignored")
        except (TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"{path}: bad coordinates in feature {i}: {exc}") from exc
    return ann


def read_geojson(path: str | os.PathLike) -> Annotation:
    """Read Polygon/MultiPolygon features of a GeoJSON file (e.g. QuPath export).

    The classification name decides the side like the XML groups (``Tumor`` →
    positive, ``Exclusion``/``negative`` → negative); features with no
    classification are positive, unknown classes are skipped with a warning.
    Holes of positive polygons become negative polygons.  Point features are
    ignored.  Raises ValueError naming the file when malformed.
    """
    return _geojson_from_obj(_load_json(path), path)


def write_geojson(path: str | os.PathLike, points=None, polygons=None, probabilities=None,
                  classification: str = "Tumor", color: Sequence[int] = (200, 0, 0),
                  measurements: Sequence[dict] | None = None) -> None:
    """Write points and/or polygons as a QuPath-readable GeoJSON FeatureCollection (atomic).

    ``points``: (N, 2) level-0 (x, y), written as Point features; with
    ``probabilities`` (N,) each gets ``measurements: {"probability": p}``.
    ``polygons``: a sequence of (N, 2) arrays (classified ``classification``) or
    an :class:`Annotation` (positives as ``classification``, negatives as
    ``Exclusion``), written as Polygon features with closed rings; ``measurements`` (one dict per
    polygon of a sequence) become each polygon's QuPath measurements.
    """
    def props(name: str, rgb) -> dict:
        return {"objectType": "annotation",
                "classification": {"name": name, "color": [int(v) for v in rgb]}}

    feats = []
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        probs = None if probabilities is None else np.asarray(probabilities, dtype=np.float64).ravel()
        if probs is not None and len(probs) != len(pts):
            raise ValueError(f"{len(probs)} probabilities for {len(pts)} points")
        for i, (x, y) in enumerate(pts):
            p = props(classification, color)
            if probs is not None:
                p["measurements"] = {"probability": float(probs[i])}
            feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
                          "properties": p})
    if isinstance(polygons, Annotation):
        groups = [(polygons.positive, classification, color), (polygons.negative, "Exclusion", (0, 0, 180))]
    else:
        groups = [(list(polygons or []), classification, color)]
        if measurements is not None and len(measurements) != len(groups[0][0]):
            raise ValueError(f"{len(measurements)} measurements for {len(groups[0][0])} polygons")
    for g, (polys, name, rgb) in enumerate(groups):
        for k, poly in enumerate(polys):
            ring = _as_polygon(poly)
            ring = np.vstack([ring, ring[:1]]) if not np.array_equal(ring[0], ring[-1]) else ring
            p = props(name, rgb)
            if measurements is not None and g == 0:
                p["measurements"] = {key: float(v) for key, v in measurements[k].items()}
            feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                          "properties": p})
    atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": feats}) + "\n")


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------

def read_annotation(path: str | os.PathLike, allow_empty: bool = False) -> Annotation:
    """Read an annotation file by suffix: ``.xml`` (ASAP), ``.json`` (NCRF, or GeoJSON
    when the content is GeoJSON) or ``.geojson``.

    Raises ValueError naming the file when it is malformed or of unknown type,
    and :class:`AnnotationError` when it has no usable polygon at all, unless
    ``allow_empty`` (e.g. for normal slides).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        ann = read_asap_xml(path)
    elif suffix in (".json", ".geojson"):
        obj = _load_json(path)
        is_geo = isinstance(obj, list) or (isinstance(obj, dict) and "type" in obj)
        ann = _geojson_from_obj(obj, path) if suffix == ".geojson" or is_geo else _ncrf_from_obj(obj, path)
    else:
        raise ValueError(f"{path}: unknown annotation file type {suffix!r} (expected .xml, .json, .geojson)")
    if ann.is_empty and not allow_empty:
        raise AnnotationError(f"{path}: no usable polygons")
    return ann


# ----------------------------------------------------------------------------
# Geometry: point tests and rasterisation (one shared crossing kernel)
# ----------------------------------------------------------------------------

def _crossings(poly: np.ndarray, ys_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (y index, x crossing) pairs of the polygon's edges with horizontal lines.

    For each edge (vertex i and previous vertex j) and each ``ys_sorted[k]`` with
    ``min(yi, yj) <= y < max(yi, yj)``, return ``k`` and the crossing
    ``(xj - xi) * (y - yi) / (yj - yi) + xi`` (PNPOLY's expression).
    ``ys_sorted`` must be ascending.
    """
    xi, yi = poly[:, 0], poly[:, 1]
    xj, yj = np.roll(xi, 1), np.roll(yi, 1)
    lo = np.searchsorted(ys_sorted, np.minimum(yi, yj), side="left")
    hi = np.searchsorted(ys_sorted, np.maximum(yi, yj), side="left")
    counts = hi - lo
    edge = np.repeat(np.arange(len(poly)), counts)
    start = np.cumsum(counts) - counts
    k = lo[edge] + (np.arange(len(edge)) - start[edge])
    y = ys_sorted[k]
    xc = (xj[edge] - xi[edge]) * (y - yi[edge]) / (yj[edge] - yi[edge]) + xi[edge]
    return k, xc


def _n_pairs(poly: np.ndarray, ys_sorted: np.ndarray) -> int:
    """Number of pairs :func:`_crossings` would return (cheap)."""
    yi = poly[:, 1]
    yj = np.roll(yi, 1)
    lo = np.searchsorted(ys_sorted, np.minimum(yi, yj), side="left")
    hi = np.searchsorted(ys_sorted, np.maximum(yi, yj), side="left")
    return int((hi - lo).sum())


def _inside_sorted(poly: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd test of points already sorted by ``ys``; splits big batches."""
    if len(xs) > 1 and _n_pairs(poly, ys) > _MAX_PAIRS:
        h = len(xs) // 2
        return np.concatenate([_inside_sorted(poly, xs[:h], ys[:h]),
                               _inside_sorted(poly, xs[h:], ys[h:])])
    k, xc = _crossings(poly, ys)
    hits = np.bincount(k[xs[k] < xc], minlength=len(xs))
    return (hits & 1).astype(bool)


def points_in_polygon(poly, xy) -> np.ndarray:
    """Even-odd (PNPOLY) test of points ``xy`` (N, 2) against one polygon (M, 2)."""
    poly = _as_polygon(poly)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    out = np.zeros(len(xy), dtype=bool)
    if len(poly) < 3 or len(xy) == 0:
        return out
    (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
    cand = np.flatnonzero((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1))
    if len(cand):
        sub = xy[cand]
        order = np.argsort(sub[:, 1], kind="stable")
        out[cand[order]] = _inside_sorted(poly, sub[order, 0], sub[order, 1])
    return out


def _any_inside(polys: Iterable[np.ndarray], xy: np.ndarray) -> np.ndarray:
    """True where a point is inside at least one of ``polys``."""
    out = np.zeros(len(xy), dtype=bool)
    for poly in polys:
        out |= points_in_polygon(poly, xy)
    return out


def points_in_annotation(ann: Annotation, xy) -> np.ndarray:
    """Bool (N,): inside any positive polygon and inside no negative polygon.

    ``xy`` is (N, 2) level-0 (x, y).  Each polygon is tested only on the points
    in its bounding box; cost is O(N log N + crossings) per polygon.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    inside = _any_inside(ann.positive, xy)
    if inside.any() and ann.negative:
        idx = np.flatnonzero(inside)
        inside[idx[_any_inside(ann.negative, xy[idx])]] = False
    return inside


def _pixel_range(lo: float, hi: float, ds: float, n: int) -> tuple[int, int]:
    """Index range [a, b) (clipped to [0, n)) covering pixel centres in [lo, hi]."""
    a = max(0, int(np.floor(lo / ds - 0.5)))
    b = min(n, int(np.ceil(hi / ds - 0.5)) + 1)
    return a, b


def _raster_polygon(poly: np.ndarray, shape: tuple[int, int], ds: float):
    """Even-odd mask of one polygon over its (clipped) bounding box.

    Returns ``(row_slice, col_slice, mask)`` or None when the box is empty.
    Pixel (r, c) is tested at ((c + 0.5) * ds, (r + 0.5) * ds), exactly as
    :func:`points_in_polygon` would test that point.
    """
    (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
    r0, r1 = _pixel_range(y0, y1, ds, shape[0])
    c0, c1 = _pixel_range(x0, x1, ds, shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    ys = (np.arange(r0, r1) + 0.5) * ds
    xs = (np.arange(c0, c1) + 0.5) * ds
    k, xc = _crossings(poly, ys)
    w = c1 - c0
    ncols = np.searchsorted(xs, xc, side="left")  # pixels with centre < crossing
    diff = np.bincount(k * (w + 1) + ncols, minlength=(r1 - r0) * (w + 1)).reshape(r1 - r0, w + 1)
    right = np.cumsum(diff[:, ::-1], axis=1)[:, ::-1]  # right[:, c] = #crossings with ncols >= c
    mask = (right[:, 1:] & 1).astype(bool)  # crossings strictly right of pixel c
    return slice(r0, r1), slice(c0, c1), mask


def rasterize(ann: Annotation, shape: tuple[int, int], downsample: float = 1.0) -> np.ndarray:
    """Bool (H, W) mask of ``ann`` at ``downsample`` (level-0 px per pixel).

    Pixel (r, c) is set when its centre ((c + 0.5) * ds, (r + 0.5) * ds) is in
    the annotation (same rule and arithmetic as :func:`points_in_annotation`).
    Positive polygons are OR-ed, then negative polygons removed.  Each polygon
    is rasterised with a scanline fill over its own bounding box only.
    """
    h, w = (int(v) for v in shape)
    ds = float(downsample)
    if ds <= 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    out = np.zeros((h, w), dtype=bool)
    for polys, value in ((ann.positive, True), (ann.negative, False)):
        for poly in polys:
            res = _raster_polygon(poly, (h, w), ds)
            if res is not None:
                rs, cs, mask = res
                if value:
                    out[rs, cs] |= mask
                else:
                    out[rs, cs] &= ~mask
    return out


def grid_labels(ann: Annotation, centers_xy, region: int = 768, patch: int = 224) -> np.ndarray:
    """Labels (N, 3, 3) uint8 of the 3×3 patch grid of a region centred on each (x, y).

    Patch offsets are 0, s, 2s with s = (region - patch) // 2 from the region's
    top-left (x - region/2, y - region/2).  ``label[n, r, c]`` is the point test
    of patch (r, c)'s centre: (x - region/2 + s*c + patch/2, y - region/2 + s*r + patch/2);
    r indexes rows (y), c columns (x).
    """
    if patch > region:
        raise ValueError(f"patch ({patch}) larger than region ({region})")
    centers = np.asarray(centers_xy, dtype=np.float64).reshape(-1, 2)
    step = (region - patch) // 2
    shift = np.arange(3) * step + patch / 2 - region / 2
    px = centers[:, 0, None, None] + shift[None, None, :]  # varies along c
    py = centers[:, 1, None, None] + shift[None, :, None]  # varies along r
    px, py = np.broadcast_arrays(px, py)
    pts = np.stack([px.ravel(), py.ravel()], axis=1)
    return points_in_annotation(ann, pts).reshape(-1, 3, 3).astype(np.uint8)
