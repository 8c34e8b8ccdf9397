"""Slide labels, splits and feature bags for attention MIL (camelyon/mil.py).

Labels (../shared/reference/foundation-mil.md B6): Camelyon16's ``testing/reference.csv`` (no
header; ``name, Tumor|Normal[, histotype, Macro|Micro|None]``), the presence of a lesion
annotation (``<slide>.xml/.json/.geojson``: Camelyon16's training tumour slides have one, normal
slides none), or a CSV ``slide,label`` (header optional; 1/0, tumor/normal, positive/negative).
Names are slide stems, case-insensitive. Splits: ``official`` keeps Camelyon16's 270/129 split
(slides named ``test_*`` are the test set) and cross-validates on the rest; ``folds`` uses every
slide for k-fold cross-validation only. Folds are stratified and fixed by the seed.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from common.errors import DataError

POSITIVE = {"1", "tumor", "tumour", "positive", "true"}
NEGATIVE = {"0", "normal", "negative", "false"}
ANNOTATION_SUFFIXES = (".xml", ".json", ".geojson")
HEADER_NAMES = {"slide", "slide_id", "slide_name", "name", "image", "case_id", "filename"}  # a header row's
HEADER_LABELS = {"label", "labels", "class", "target", "diagnosis"}  # first two cells


def _label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in POSITIVE:
        return 1
    if v in NEGATIVE:
        return 0
    raise DataError(f"{where}: label {value!r} is neither tumour (1, tumor, positive) nor normal (0, normal, negative)")


def read_label_csv(path: str | Path, reference: bool = False) -> dict[str, int]:
    """``slide -> 0/1`` from a ``slide,label`` CSV (a header row such as ``slide,label`` is skipped) or, with ``reference``,
    from Camelyon16's header-less ``reference.csv`` (columns after the second are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such label file")
    labels: dict[str, int] = {}
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            row = [c.strip() for c in row]
            if not row or not any(row):
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{i + 1}: expected slide,label, got {','.join(row)!r}")
            if i == 0 and not reference and (row[0].lower() in HEADER_NAMES or row[1].lower() in HEADER_LABELS):
                continue
            name = Path(row[0]).stem.lower()
            if name in labels:
                raise DataError(f"{path}:{i + 1}: slide {name} listed twice")
            labels[name] = _label(row[1], f"{path}:{i + 1}")
    if not labels:
        raise DataError(f"{path}: no labelled slides")
    return labels


def labels_from_annotations(folder: str | Path, slides: list[str]) -> dict[str, int]:
    """1 for each slide with a lesion annotation file in ``folder``, 0 for the others."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such annotation folder")
    present = {p.stem.lower() for p in folder.iterdir() if p.suffix.lower() in ANNOTATION_SUFFIXES}
    return {s: int(s in present) for s in slides}


def slide_labels(slides: list[str], labels_csv: str = "", reference_csv: str = "",
                 annotations: str = "") -> dict[str, int]:
    """The label of every slide with a feature file. A CSV naming slides that have no feature file,
    or a slide left without a label, is an error naming them."""
    labels: dict[str, int] = {}
    for source, reference in ((reference_csv, True), (labels_csv, False)):
        if source:
            read = read_label_csv(source, reference)
            absent = sorted(set(read) - set(slides))
            if absent and not reference:  # reference.csv lists the whole test set; subsets are fine
                raise DataError(f"{source}: names slides with no feature file: {', '.join(absent[:8])}"
                                f"{' ...' if len(absent) > 8 else ''} ({len(absent)})")
            labels.update({k: v for k, v in read.items() if k in slides})
    if annotations:
        rest = [s for s in slides if s not in labels]
        labels.update(labels_from_annotations(annotations, rest))
    missing = [s for s in slides if s not in labels]
    if missing:
        raise DataError(f"no label for {len(missing)} slide(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
                        " (give --labels, --reference-csv and/or --annotations)")
    return labels


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index sets covering ``range(len(labels))`` with each class spread evenly."""
    rng = np.random.default_rng([seed, 7919])
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in (1, 0):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for j, i in enumerate(idx):
            folds[(offset + j) % k].append(int(i))
        offset += len(idx)
    if min(len(f) for f in folds) == 0:
        raise DataError(f"{len(labels)} training slides cannot fill {k} folds (use fewer --folds)")
    return [np.sort(np.asarray(f)) for f in folds]


@dataclass
class Split:
    """Indices into the slide list: ``folds[i]`` validates fold i, the rest of ``pool`` trains it."""

    pool: np.ndarray  # training + validation slides
    test: np.ndarray  # empty for --split folds
    folds: list[np.ndarray]

    def fold(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        val = self.folds[i]
        return np.setdiff1d(self.pool, val), val


def make_split(names: list[str], labels: np.ndarray, kind: str, k: int, seed: int) -> Split:
    is_test = np.array([n.startswith("test") for n in names]) if kind == "official" else np.zeros(len(names), bool)
    pool, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if kind == "official" and not len(test):
        raise DataError("--split official: no test_* slide among the feature files (use --split folds)")
    for part, what in ((pool, "training"), (test, "test")):
        if len(part) and len(set(labels[part].tolist())) < 2:
            raise DataError(f"the {what} slides are all of one class; slide-level AUC needs both")
    return Split(pool, test, [pool[f] for f in stratified_folds(labels[pool], k, seed)])


class FeatureBags:
    """The slides' feature files: ``bag(i)`` reads one (N, D) float32 tensor; all files must come
    from one backbone (same name, weights hash and width). When all bags together take less than
    ``memory_limit`` bytes (as float16) they are kept in memory after the first read."""

    def __init__(self, folder: str | Path, memory_limit: float = 4e9):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such features folder")
        self.paths = sorted(folder.glob("*.h5"))
        if not self.paths:
            raise DataError(f"{folder}: no <slide>.h5 feature files (camelyon/features.py writes them)")
        self.names = [p.stem.lower() for p in self.paths]
        self.attrs = [self._attrs(p) for p in self.paths]
        first = self.backbone_of(0)
        for i in range(1, len(self.paths)):
            if self.backbone_of(i) != first:
                raise DataError(f"{self.paths[i]}: features from {self.backbone_of(i)}, but "
                                f"{self.paths[0].name} has {first}; one backbone per folder")
        self.backbone = first
        self.keep = sum(a["tiles"] * a["dim"] * 2 for a in self.attrs) < memory_limit
        self._kept: dict[int, torch.Tensor] = {}

    @staticmethod
    def _attrs(path: Path) -> dict:
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f or "coords" not in f:
                    raise DataError(f"{path}: no features/coords datasets (not a camelyon/features.py file)")
                return {**dict(f.attrs), "tiles": int(f["features"].shape[0]), "dim": int(f["features"].shape[1])}
        except OSError as err:
            raise DataError(f"{path}: unreadable features file ({err})") from None

    def backbone_of(self, i: int) -> dict:
        a = self.attrs[i]
        return {"backbone": str(a.get("backbone", "?")), "weights_sha256": str(a.get("weights_sha256", "?")),
                "embed_dim": a["dim"]}

    def __len__(self) -> int:
        return len(self.paths)

    def bag(self, i: int) -> torch.Tensor:
        if i in self._kept:
            return self._kept[i].float()
        with h5py.File(self.paths[i], "r") as f:
            x = torch.from_numpy(f["features"][()])  # float16 as stored
        if self.keep:
            self._kept[i] = x
        return x.float()

    def coords(self, i: int) -> np.ndarray:
        with h5py.File(self.paths[i], "r") as f:
            return f["coords"][()]

    def thumbnail(self, i: int) -> np.ndarray | None:
        with h5py.File(self.paths[i], "r") as f:
            return f["thumbnail"][()] if "thumbnail" in f else None


def check_backbone_matches(expected: dict, found: dict, where: str) -> None:
    """A MIL checkpoint applied to features of another backbone is an error naming both."""
    if {k: expected.get(k) for k in found} != found:
        raise DataError(f"{where}: features from {found['backbone']} (weights {found['weights_sha256']}, "
                        f"{found['embed_dim']}-d) but the MIL model was trained on {expected.get('backbone')} "
                        f"(weights {expected.get('weights_sha256')}, {expected.get('embed_dim')}-d)")
