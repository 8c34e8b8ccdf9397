"""CoNSeP -> one 128x128 crop per nucleus + ``dataset.json`` (bundle ``scripts/data_process.py``).

    python nuclick/prepare.py --input /data/CoNSeP --output /data/CoNSePNuclei

Input ``<input>/{Train,Test}/Images/<stem>.png|jpg|tif`` with labels in ``<input>/<Split>/Labels/``:

- CoNSeP ``<stem>.mat``: ``inst_map`` (H, W ids, 0 background), ``inst_type`` (N, 1) and
  ``inst_centroid`` (N, 2) in HoVer-Net order (x = col, y = row);
- HoVer-Net-style maps: ``<stem>.npz`` (arrays ``inst_map`` and ``type_map``), or an instance map and
  a type map in two files ``<stem>_inst*.npz|png`` + ``<stem>_type*.npz|png`` (an ``.npz`` holding a
  single array, any key, e.g. histolytics' ``nuc_raster``), or an instance-map ``<stem>.png`` alone
  (all nuclei class 1). The type of an instance is the majority of its type-map pixels, its
  centroid the mean of its pixels.

Per nucleus k (nuclick.md §1): classes 3,4 -> 3 and 5,6,7 -> 4; a 128 box around the truncated
centroid, shifted to stay inside the image; skipped when fewer than 80 of its pixels fall in the
box or its centroid is closer than 20 px to a border. Output, per split (Train -> ``training``,
Test -> ``validation``)::

    <output>/<Split>/Images/<stem>_<class>_<k:04d>.png     RGB crop
    <output>/<Split>/Labels/<stem>_<class>_<k:04d>.png     uint8 {0 background, class, 255 other nuclei}
    <output>/<Split>/Centroids/<stem>_<class>_<k:04d>.txt  JSON [[row, col]] in the crop
    <output>/dataset.json                                  {"training": [...], "validation": [...]}

Items are ``{image, label, nuclei_id, mask_value, centroid}`` with paths relative to the output
folder. ``dataset.json`` is written last and atomically: its presence marks a finished run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from common.io import atomic_write_text
from common.config import parse_config
from common.errors import UserError, exit_on_user_error
from common.image import read_image
from common.logging import progress
from nuclick.config import PrepareConfig
from nuclick.dataset import OTHERS_VALUE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAT_KEYS = ("inst_map", "inst_type", "inst_centroid")
SPLIT_KEYS = {"Train": "training", "Test": "validation"}


class LabelError(UserError, ValueError):
    """A label file that is missing, unreadable or inconsistent."""


@dataclass
class Nuclei:
    """Instances of one image: ids (file order), types and centroids (x = col, y = row)."""
    inst_map: np.ndarray  # (H, W) int
    ids: np.ndarray  # (N,) instance ids in inst_map
    types: np.ndarray  # (N,) class per instance (CoNSeP numbering)
    centroids: np.ndarray  # (N, 2) x, y
    source: str = ""


@dataclass
class PrepareStats:
    kept: int = 0
    small: int = 0  # fewer than min_area pixels in the crop
    border: int = 0  # centroid within min_distance of the border
    untyped: int = 0  # class 0: no target pixels (skipped like upstream)
    per_class: dict[int, int] = field(default_factory=dict)

    def add(self, other: "PrepareStats") -> None:
        self.kept, self.small, self.border = self.kept + other.kept, self.small + other.small, self.border + other.border
        self.untyped += other.untyped
        for k, v in other.per_class.items():
            self.per_class[k] = self.per_class.get(k, 0) + v


# ============================================================================= labels
def merge_class(class_id: int) -> int:
    """CoNSeP 7 types -> 4: 3,4 -> 3 (epithelial); 5,6,7 -> 4 (spindle); 1, 2 unchanged."""
    return 3 if class_id in (3, 4) else 4 if class_id in (5, 6, 7) else class_id


def read_mat(path: Path) -> Nuclei:
    """A CoNSeP ``.mat`` (inst_map, inst_type, inst_centroid); instance k = 1..N in file order."""
    from scipy.io import loadmat

    try:
        m = loadmat(str(path))
    except Exception as err:  # scipy raises several types for corrupt files
        raise LabelError(f"{path}: not a readable .mat file ({err})") from err
    for key in MAT_KEYS:
        if key not in m:
            raise LabelError(f"{path}: key {key!r} missing (a CoNSeP label needs {', '.join(MAT_KEYS)}; "
                             f"found {sorted(k for k in m if not k.startswith('__'))})")
    inst_map = np.asarray(m["inst_map"])
    types = np.asarray(m["inst_type"]).reshape(-1)
    centroids = np.asarray(m["inst_centroid"], dtype=np.float64).reshape(-1, 2) if np.size(m["inst_centroid"]) \
        else np.zeros((0, 2))
    if inst_map.ndim != 2:
        raise LabelError(f"{path}: inst_map must be 2-D, got shape {inst_map.shape}")
    if len(types) != len(centroids):
        raise LabelError(f"{path}: inst_type has {len(types)} entries but inst_centroid {len(centroids)}")
    if inst_map.max(initial=0) > len(types):
        raise LabelError(f"{path}: inst_map holds id {int(inst_map.max())} but only {len(types)} types are listed")
    return Nuclei(inst_map.astype(np.int32), np.arange(1, len(types) + 1), types.astype(np.int64), centroids, str(path))


def _read_map(path: Path, keys: tuple[str, ...]) -> np.ndarray:
    """A 2-D map from an .npz (first of ``keys`` present, else its only array) or a PNG."""
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            key = next((k for k in keys if k in z.files), z.files[0] if len(z.files) == 1 else None)
            if key is None:
                raise LabelError(f"{path}: expected an array named {' or '.join(keys)} (found {z.files})")
            array = z[key]
    else:
        with Image.open(path) as im:
            array = np.asarray(im)
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # (H, W, 1) or HoVer-Net (H, W, [inst, type])
        array = array[..., 0]
    if array.ndim != 2:
        raise LabelError(f"{path}: expected a 2-D map, got shape {array.shape}")
    return array.astype(np.int64)


def nuclei_from_maps(inst_map: np.ndarray, type_map: np.ndarray | None, source: str) -> Nuclei:
    """Instances of a map (ids in increasing order), majority type and pixel-mean centroid."""
    if type_map is not None and type_map.shape != inst_map.shape:
        raise LabelError(f"{source}: instance map {inst_map.shape} and type map {type_map.shape} differ in size")
    ids = np.unique(inst_map)
    ids = ids[ids > 0]
    centroids = np.zeros((len(ids), 2))
    types = np.ones(len(ids), dtype=np.int64)
    boxes = ndi.find_objects(inst_map.astype(np.int64))
    for i, k in enumerate(ids):
        sl = boxes[k - 1]
        rows, cols = np.nonzero(inst_map[sl] == k)
        centroids[i] = (cols.mean() + sl[1].start, rows.mean() + sl[0].start)
        if type_map is not None:
            values = type_map[sl][rows, cols]
            types[i] = np.bincount(values[values >= 0]).argmax() if values.size else 0
    return Nuclei(inst_map.astype(np.int32), ids, types, centroids, source)


def find_label(stem: str, label_dir: Path) -> list[Path]:
    """The label file(s) of an image stem, in order of preference (see module docstring)."""
    for suffix in (".mat", ".npz"):
        if (label_dir / f"{stem}{suffix}").is_file():
            return [label_dir / f"{stem}{suffix}"]
    inst = sorted(p for p in label_dir.glob(f"{stem}_inst*") if p.suffix.lower() in (".npz", ".png"))
    types = sorted(p for p in label_dir.glob(f"{stem}_type*") if p.suffix.lower() in (".npz", ".png"))
    if inst:
        return [inst[0], *types[:1]]
    if (label_dir / f"{stem}.png").is_file():
        return [label_dir / f"{stem}.png"]
    raise LabelError(f"no label for image {stem!r} in {label_dir} (expected {stem}.mat, {stem}.npz, "
                     f"{stem}_inst*.npz|png [+ {stem}_type*.npz|png] or {stem}.png)")


def read_nuclei(paths: list[Path]) -> Nuclei:
    first = paths[0]
    if first.suffix.lower() == ".mat":
        return read_mat(first)
    if first.suffix.lower() == ".npz" and len(paths) == 1:
        with np.load(first) as z:
            if "inst_map" not in z.files:
                raise LabelError(f"{first}: key 'inst_map' missing (found {z.files})")
            inst = z["inst_map"].astype(np.int64)
            types = z["type_map"].astype(np.int64) if "type_map" in z.files else None
        return nuclei_from_maps(inst, types, str(first))
    inst = _read_map(first, ("inst_map", "nuc_raster"))
    types = _read_map(paths[1], ("type_map", "nuc_raster")) if len(paths) > 1 else None
    return nuclei_from_maps(inst, types, " + ".join(map(str, paths)))


# ============================================================================= crops
def crop_start(centre: int, size: int, crop: int) -> int:
    """First index of a ``crop`` window around ``centre`` shifted to stay inside [0, size)."""
    start = int(max(centre - crop / 2, 0))
    return size - crop if start + crop > size else start


def nucleus_crop(inst_map: np.ndarray, k: int, class_id: int, row: int, col: int, crop: int,
                 min_area: int, min_distance: int) -> tuple[str, np.ndarray | None, tuple[int, int]]:
    """("kept" | "small" | "border", label crop {0, class, 255} or None, crop origin (r0, c0))."""
    H, W = inst_map.shape
    r0, c0 = crop_start(row, H, crop), crop_start(col, W, crop)
    window = inst_map[r0:r0 + crop, c0:c0 + crop]
    this = window == k
    if class_id == 0 or this.sum() < min_area:
        return "small", None, (r0, c0)
    if row < min_distance or col < min_distance or H - row < min_distance or W - col < min_distance:
        return "border", None, (r0, c0)
    label = np.where(this, class_id, np.where(window > 0, OTHERS_VALUE, 0)).astype(np.uint8)
    return "kept", label, (r0, c0)


def prepare_image(image_path: Path, label_paths: list[Path], out_split: Path, rel_root: Path,
                  cfg: PrepareConfig, budget: int | None = None) -> tuple[list[dict], PrepareStats]:
    """Crops of every usable nucleus of one image; returns the data-list items and counts."""
    image = read_image(image_path)
    nuclei = read_nuclei(label_paths)
    H, W = nuclei.inst_map.shape
    if image.shape[:2] != (H, W):
        raise LabelError(f"{image_path}: image {image.shape[:2]} and labels {(H, W)} ({nuclei.source}) differ in size")
    if H < cfg.crop_size or W < cfg.crop_size:
        raise LabelError(f"{image_path}: image {H}x{W} is smaller than the {cfg.crop_size} crop")
    dirs = {name: out_split / name for name in ("Images", "Labels", "Centroids")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    items, stats = [], PrepareStats()
    for k, raw_type, (x, y) in zip(nuclei.ids, nuclei.types, nuclei.centroids):
        if budget is not None and len(items) >= budget:
            break
        class_id = merge_class(int(raw_type))
        row, col = int(y), int(x)
        status, label, (r0, c0) = nucleus_crop(nuclei.inst_map, int(k), class_id, row, col, cfg.crop_size,
                                               cfg.min_area, cfg.min_distance)
        if status != "kept":
            if class_id == 0:
                stats.untyped += 1
            elif status == "small":
                stats.small += 1
            else:
                stats.border += 1
            continue
        prefix = f"{image_path.stem}_{class_id}_{int(k):04d}"
        centroid = [row - r0, col - c0]
        Image.fromarray(image[r0:r0 + cfg.crop_size, c0:c0 + cfg.crop_size]).save(dirs["Images"] / f"{prefix}.png")
        Image.fromarray(label, mode="L").save(dirs["Labels"] / f"{prefix}.png")
        (dirs["Centroids"] / f"{prefix}.txt").write_text(json.dumps([centroid]))
        items.append({"image": str((dirs["Images"] / f"{prefix}.png").relative_to(rel_root)),
                      "label": str((dirs["Labels"] / f"{prefix}.png").relative_to(rel_root)),
                      "nuclei_id": int(k), "mask_value": class_id, "centroid": centroid})
        stats.kept += 1
        stats.per_class[class_id] = stats.per_class.get(class_id, 0) + 1
    return items, stats


def list_pairs(split_dir: Path) -> list[tuple[Path, list[Path]]]:
    """(image, label files) of a split, sorted by image name; every image needs a label."""
    image_dir, label_dir = split_dir / "Images", split_dir / "Labels"
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: folder not found (expected <input>/<Split>/Images and Labels)")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(p, find_label(p.stem, label_dir)) for p in images]


def prepare_split(in_dir: Path, out_dir: Path, split: str, cfg: PrepareConfig) -> tuple[list[dict], PrepareStats]:
    pairs = list_pairs(in_dir / split)
    items, stats = [], PrepareStats()
    for image_path, label_paths in progress(pairs, desc=f"prepare {split}"):
        budget = cfg.limit - len(items) if cfg.limit else None
        if budget is not None and budget <= 0:
            break
        new, s = prepare_image(image_path, label_paths, out_dir / split, out_dir, cfg, budget)
        items += new
        stats.add(s)
    return items, stats


def run(cfg: PrepareConfig) -> dict:
    """Prepare every split; writes ``<output>/dataset.json`` last. Returns counts per split."""
    in_dir, out_dir = Path(cfg.input), Path(cfg.output)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: input folder not found")
    unknown = [s for s in cfg.splits if s not in SPLIT_KEYS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected {list(SPLIT_KEYS)}")
    datalist, summary = {}, {}
    for split in cfg.splits:
        items, stats = prepare_split(in_dir, out_dir, split, cfg)
        datalist[SPLIT_KEYS[split]] = items
        summary[split] = {"kept": stats.kept, "skipped_small": stats.small, "skipped_border": stats.border,
                          "skipped_untyped": stats.untyped, "per_class": dict(sorted(stats.per_class.items()))}
        print(f"{split}: {stats.kept} crops ({dict(sorted(stats.per_class.items()))} per class); skipped "
              f"{stats.small} under {cfg.min_area} px, {stats.border} within {cfg.min_distance} px of the border, "
              f"{stats.untyped} untyped", flush=True)
    atomic_write_text(out_dir / "dataset.json", json.dumps(datalist, indent=1) + "\n")
    print(f"wrote {out_dir / 'dataset.json'}")
    return summary


if __name__ == "__main__":
    with exit_on_user_error():
        run(parse_config(PrepareConfig))
