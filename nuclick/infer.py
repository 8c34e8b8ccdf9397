"""Interactive inference: one nucleus per click, merged into an instance map (bundle ``inference.json``).

    python nuclick/infer.py --image IMG --clicks FILE --checkpoint FILE --output-dir DIR

Clicks (``read_clicks``): a CSV of ``x,y`` rows (the NuClick demo format; a header row and extra
columns are tolerated), a JSON list of ``[x, y]`` pairs or ``{"x", "y"}`` objects (or the bundle's
``{"foreground": [[row, col], ...]}``), or a GeoJSON of Point/MultiPoint features (QuPath export).
Coordinates are pixels, x = column, truncated to integers; clicks outside the image are skipped
with a warning.

Per click (``AddClickSignalsd``, nuclick.md §8): a ``bb_size`` box around it, shifted to stay inside
the image; input = RGB / 127.5 - 1, a one-pixel map of this click, and a map of every other click
inside the box (negative signal); all clicks are batched. Each output: sigmoid >= threshold, the
largest 8-connected component, optionally small objects (< min_size) removed and holes
(< min_hole) filled. Overlaps are resolved pixel-wise in favour of the higher probability, after
which every instance keeps its largest component.

Outputs in ``--output-dir``: ``<stem>_instances.png`` (uint16 ids 1..N, 0 background),
``<stem>_overlay.png`` (contours and clicks over the image) and ``<stem>.geojson`` (one polygon per
nucleus, QuPath-compatible detections, full-image pixel coordinates). Whole-slide images and
TIFFs that OpenSlide opens are read box by box, never whole; for them the instance map and overlay
cover the bounding box of all click boxes (its origin is in the GeoJSON's ``properties``).

Stain normalisation (``--stain-normalize macenko|reinhard``, off by default): each batch of click
boxes is normalised on the device (each box fitted on its own) to the target (``--stain-target
FILE...``, else the one the checkpoint stores) before the scaling to [-1, 1]; the click maps are
not touched. A bad target stops the script at start-up with one line.

Slide resolution: a whole-slide image is read so that the network sees its training µm/px
(``model_mpp``: the checkpoint's config, 0.25 for the bundle's ``model.pt``, CoNSeP being 40x).
With scale = model_mpp / slide_mpp level-0 pixels per network pixel, clicks (level-0 pixels) are
mapped to network pixels, the click boxes are read through ``common.wsi.read_rgb_scaled`` and the
instance map, overlay and polygons are brought back to level-0 pixels. A slide within
``mpp_tolerance`` of model_mpp is read at level 0 as it is; one without a resolution is assumed to
be at model_mpp (with a warning) unless ``--slide-mpp`` is given. Decoded images (PNG, JPEG, small
TIFF) are taken as they are.
"""
from __future__ import annotations

import csv
import json
import math
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.measure import approximate_polygon, find_contours, label as label_components
from skimage.segmentation import find_boundaries
from torch.utils.data import DataLoader, Dataset

from common import dist
from common.amp import MixedPrecision
from common.augment import scale_intensity
from common.checkpoint import load_file
from common.io import atomic_write, atomic_write_text
from common.config import parse_config
from common.errors import UserError, exit_on_user_error
from common.image import read_image
from common.logging import progress
from common.stain import StainNormalizer, inference_stain, target_from_files
from common.wsi import (SLIDE_SUFFIXES, SlideError, best_level, open_slide, read_rgb, read_rgb_scaled, recorded_mpp,
                        resolve_scale, slide_mpp)
from nuclick.config import CONSEP_MPP, InferConfig
from nuclick.guidance import smooth_points
from nuclick.model import load_nuclick_weights


class ClickError(UserError, ValueError):
    """A click file that cannot be used."""


# ============================================================================= clicks
def _csv_clicks(path: Path) -> list[tuple[float, float]]:
    points = []
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            try:
                points.append((float(cells[0]), float(cells[1])))
            except (ValueError, IndexError):
                if lineno == 1 and not points:  # header row
                    continue
                raise ClickError(f"{path}:{lineno}: expected 'x,y', got {row}") from None
    return points


def _json_clicks(obj, path: Path) -> list[tuple[float, float]]:
    if isinstance(obj, dict) and obj.get("type") in ("FeatureCollection", "Feature"):
        return _geojson_clicks(obj, path)
    if isinstance(obj, dict) and "foreground" in obj:  # bundle item: [[row, col], ...]
        return [(float(c), float(r)) for r, c in obj["foreground"]]
    if not isinstance(obj, list):
        raise ClickError(f"{path}: expected a list of [x, y] or {{'x', 'y'}} clicks, a GeoJSON, or "
                         f"{{'foreground': [[row, col]]}}")
    points = []
    for i, p in enumerate(obj):
        try:
            points.append((float(p["x"]), float(p["y"])) if isinstance(p, dict) else (float(p[0]), float(p[1])))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ClickError(f"{path}: click {i} is not [x, y] or {{'x': .., 'y': ..}}: {p!r}") from None
    return points


def _geojson_clicks(obj, path: Path) -> list[tuple[float, float]]:
    features = obj.get("features", []) if obj.get("type") == "FeatureCollection" else [obj]
    points, ignored = [], 0
    for feature in features:
        geom = (feature or {}).get("geometry") or {}
        if geom.get("type") == "Point":
            points.append(tuple(map(float, geom["coordinates"][:2])))
        elif geom.get("type") == "MultiPoint":
            points += [tuple(map(float, c[:2])) for c in geom["coordinates"]]
        else:
            ignored += 1
    if ignored:
        warnings.warn(f"{path}: {ignored} non-point feature(s) ignored")
    return points


def read_clicks(path: str | Path) -> np.ndarray:
    """(N, 2) float array of (x, y) clicks from CSV, JSON or GeoJSON (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: click file not found")
    if path.suffix.lower() in (".json", ".geojson"):
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ClickError(f"{path}: not valid JSON ({err})") from err
        points = _json_clicks(obj, path)
    else:
        points = _csv_clicks(path)
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def usable_clicks(xy: np.ndarray, height: int, width: int, source: str = "clicks") -> np.ndarray:
    """Integer (x, y) clicks inside the image (others skipped with a warning); error when none is left."""
    if len(xy) == 0:
        raise ClickError(f"{source}: the click list is empty")
    if not np.isfinite(xy).all():
        raise ClickError(f"{source}: clicks must be finite numbers")
    ixy = np.trunc(xy).astype(np.int64)
    inside = (ixy[:, 0] >= 0) & (ixy[:, 0] < width) & (ixy[:, 1] >= 0) & (ixy[:, 1] < height)
    if not inside.all():
        bad = [tuple(map(float, p)) for p in xy[~inside][:5]]
        warnings.warn(f"{source}: {int((~inside).sum())} click(s) outside the {width}x{height} image skipped, e.g. {bad}")
    if not inside.any():
        raise ClickError(f"{source}: none of the {len(xy)} clicks lies inside the {width}x{height} image")
    return ixy[inside]


def click_boxes(xy: np.ndarray, height: int, width: int, bb: int) -> np.ndarray:
    """(N, 4) boxes [r0, c0, r1, c1] of side ``bb`` around each click, shifted inside the image."""
    if height < bb or width < bb:
        raise ClickError(f"the image ({width}x{height}) is smaller than the {bb}-px click box")
    r0 = np.clip(xy[:, 1] - bb // 2, 0, height - bb)
    c0 = np.clip(xy[:, 0] - bb // 2, 0, width - bb)
    return np.stack([r0, c0, r0 + bb, c0 + bb], axis=1)


# ============================================================================= image sources
class ArrayImage:
    """An image decoded whole (PNG, JPEG, small TIFF); its pixels are the network's (scale 1)."""

    scale = 1.0

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]
        self.level0_shape = (self.height, self.width)

    def read(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        return self.rgb[r0:r0 + h, c0:c0 + w]

    def to_network(self, xy: np.ndarray) -> np.ndarray:
        return xy


class SlideImage:
    """A whole-slide or tiled TIFF read region by region (``common.wsi``) in network pixels, each
    ``scale`` level-0 pixels (1: level 0 as it is). ``height``/``width`` count the network pixels
    that lie wholly inside the slide."""

    def __init__(self, path: Path, scale: float = 1.0):
        self.path = Path(path)
        self.slide = open_slide(self.path)
        w0, h0 = self.slide.dimensions
        self.level0_shape = (h0, w0)
        self.set_scale(scale)

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)
        self.height, self.width = int(self.level0_shape[0] / self.scale), int(self.level0_shape[1] / self.scale)

    def read(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        return read_rgb_scaled(self.slide, c0, r0, w, h, self.scale)

    def read_level0(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        return read_rgb(self.slide, c0, r0, w, h)

    def to_network(self, xy: np.ndarray) -> np.ndarray:
        """Integer level-0 (x, y) -> the network pixel that holds each pixel's centre."""
        if self.scale == 1.0:
            return xy
        net = np.floor((xy + 0.5) / self.scale).astype(np.int64)
        return np.minimum(net, [self.width - 1, self.height - 1])

    def __getstate__(self):  # data-loader workers reopen the slide
        return {"path": self.path, "scale": self.scale}

    def __setstate__(self, state):
        self.__init__(state["path"], state["scale"])


def _tiff_pixels(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shape = tif.pages[0].shape
    return int(shape[0]) * int(shape[1]) if len(shape) >= 2 else 0


def open_image(path: str | Path, max_pixels: int) -> ArrayImage | SlideImage:
    """Slide formats, and TIFFs larger than ``max_pixels``, are opened with OpenSlide and read as
    needed; everything else is decoded whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES and (suffix not in (".tif", ".tiff") or _tiff_pixels(path) > max_pixels):
        try:
            return SlideImage(path)
        except SlideError as err:
            raise ValueError(f"{path}: too large to decode whole and OpenSlide cannot read it ({err}); "
                             "save it as a tiled pyramidal TIFF") from err
    return ArrayImage(read_image(path))


def model_resolution(checkpoint: dict, override: float = 0.0) -> tuple[float, str]:
    """(µm/px the network was trained at, where that comes from): ``override`` (> 0), else the
    config of ``checkpoint`` (loaded), else CoNSeP's (the bundle's ``model.pt`` carries no config)."""
    if override > 0:
        return override, "--model-mpp"
    recorded = recorded_mpp(checkpoint)
    return (recorded, "checkpoint config") if recorded else (CONSEP_MPP, "not recorded; CoNSeP's")


def use_slide_resolution(image: SlideImage, model_mpp: float, cfg: InferConfig) -> dict:
    """Set the slide's scale so that the network sees ``model_mpp``; returns what was decided."""
    res = resolve_scale(slide_mpp(image.slide, str(image.path)), model_mpp, cfg.slide_mpp, cfg.mpp_tolerance,
                        str(image.path))
    image.set_scale(res.scale)
    level = 0 if res.identity else best_level(image.slide, res.scale)
    return {"slide_mpp": res.slide_mpp, "mpp_source": res.source, "model_mpp": model_mpp, "scale": res.scale,
            "level": level, "resampling": float(image.slide.level_downsamples[level]) / res.scale}


# ============================================================================= patches
class ClickPatches(Dataset):
    """Item i: (float32 (5, bb, bb), i) for click i. Channels: the box's RGB in [0, 255] (made the
    network's input on the device by :func:`network_input`), this click, the other clicks inside
    the box (pixel set; a click on the same pixel is not negative)."""

    def __init__(self, image, xy: np.ndarray, boxes: np.ndarray, bb: int):
        self.image, self.xy, self.boxes, self.bb = image, xy, boxes, bb

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int):
        r0, c0, _, _ = (int(v) for v in self.boxes[i])
        rgb = self.image.read(r0, c0, self.bb, self.bb).astype(np.float32)
        maps = np.zeros((2, self.bb, self.bb), dtype=np.float32)
        x, y = self.xy[i]
        maps[0, y - r0, x - c0] = 1.0
        rel = self.xy - [c0, r0]
        inside = (rel[:, 0] >= 0) & (rel[:, 0] < self.bb) & (rel[:, 1] >= 0) & (rel[:, 1] < self.bb)
        inside &= (self.xy[:, 0] != x) | (self.xy[:, 1] != y)
        maps[1, rel[inside, 1], rel[inside, 0]] = 1.0
        return torch.from_numpy(np.concatenate([rgb.transpose(2, 0, 1), maps])), i


def network_input(x: torch.Tensor, stain: StainNormalizer = StainNormalizer()) -> torch.Tensor:
    """A batch of :class:`ClickPatches` items on the device -> the network's input: RGB stain
    normalised (when ``stain`` has a target; batched) and scaled to [-1, 1], click maps unchanged."""
    return torch.cat([scale_intensity(stain(x[:, :3])), x[:, 3:]], dim=1)


# ============================================================================= post-processing
def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a binary mask (empty stays empty)."""
    labels = label_components(mask, connectivity=2)
    if labels.max() == 0:
        return mask.astype(bool)
    return labels == np.bincount(labels.ravel())[1:].argmax() + 1


def post_filter(mask: np.ndarray, min_size: int, min_hole: int) -> np.ndarray:
    """Remove 8-connected objects smaller than ``min_size`` px and fill 4-connected holes smaller than
    ``min_hole`` px (MONAI ``PostFilterLabeld`` morphology)."""
    mask = mask.astype(bool)
    if min_size > 0 and mask.any():
        labels = label_components(mask, connectivity=2)
        sizes = np.bincount(labels.ravel())
        mask = (sizes >= min_size)[labels] & mask
    if min_hole > 0:
        holes = label_components(~mask, connectivity=1)
        sizes = np.bincount(holes.ravel())
        mask = mask | ((sizes < min_hole)[holes] & (holes > 0))
    return mask


def postprocess(prob: np.ndarray, cfg: InferConfig) -> np.ndarray:
    mask = largest_component(prob >= cfg.threshold)
    if cfg.post_filter:
        mask = post_filter(mask, cfg.min_size, cfg.min_hole)
    return mask


class InstanceCanvas:
    """Instance ids and winning probabilities over a region [r0, r0 + h) x [c0, c0 + w)."""

    def __init__(self, r0: int, c0: int, h: int, w: int):
        self.r0, self.c0 = r0, c0
        self.ids = np.zeros((h, w), dtype=np.int32)
        self.prob = np.zeros((h, w), dtype=np.float32)

    def paste(self, instance: int, box: np.ndarray, mask: np.ndarray, prob: np.ndarray) -> None:
        """Claim the mask's pixels where this instance's probability beats the current owner's."""
        r0, c0 = int(box[0]) - self.r0, int(box[1]) - self.c0
        ids = self.ids[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]]
        best = self.prob[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]]
        win = mask & (prob > best)
        ids[win], best[win] = instance, prob[win]

    def finalize(self) -> np.ndarray:
        """Each instance keeps its largest 8-connected piece; ids renumbered 1..N in click order."""
        out = np.zeros(self.ids.shape, dtype=np.uint16)
        boxes = ndi.find_objects(self.ids)
        n = 0
        for k, sl in enumerate(boxes, start=1):
            if sl is None:
                continue
            piece = largest_component(self.ids[sl] == k)
            if piece.any():
                n += 1
                out[sl][piece] = n
        if n > np.iinfo(np.uint16).max:
            raise ValueError(f"{n} instances do not fit a 16-bit instance map")
        return out


# ============================================================================= outputs
def instance_polygons(instances: np.ndarray, r0: int = 0, c0: int = 0) -> list[tuple[int, np.ndarray]]:
    """(id, closed (M, 2) polygon in full-image (x, y)) per instance: the outer contour at 0.5 of
    the mask, pixel (r, c) covering [c, c + 1] x [r, r + 1]."""
    polygons = []
    for k, sl in enumerate(ndi.find_objects(instances.astype(np.int32)), start=1):
        if sl is None:
            continue
        mask = np.pad(instances[sl] == k, 1)
        contours = find_contours(mask.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = approximate_polygon(max(contours, key=len), tolerance=1e-6)  # drop collinear vertices; (row, col)
        xy = np.stack([ring[:, 1] - 1 + sl[1].start + c0 + 0.5, ring[:, 0] - 1 + sl[0].start + r0 + 0.5], axis=1)
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        polygons.append((k, xy))
    return polygons


def geojson_features(polygons: list[tuple[int, np.ndarray]], clicks: dict[int, tuple[int, int]], origin,
                     stem: str = "") -> dict:
    """QuPath-compatible FeatureCollection: one detection per nucleus (deterministic UUID ids)."""
    features = []
    for k, xy in polygons:
        area = 0.5 * abs(float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1])))
        features.append({"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"nuclick/{stem}/{k}")),
                         "geometry": {"type": "Polygon", "coordinates": [np.round(xy, 2).tolist()]},
                         "properties": {"objectType": "detection", "name": f"nucleus {k}", "instance": k,
                                        "classification": {"name": "Nucleus", "color": [255, 64, 64]},
                                        "click": list(clicks.get(k, ())),
                                        "measurements": {"area_px": round(area, 2)}}})
    return {"type": "FeatureCollection", "features": features,
            "properties": {"instance_map_origin_xy": [int(origin[1]), int(origin[0])]}}


def overlay_image(rgb: np.ndarray, instances: np.ndarray, xy: np.ndarray) -> Image.Image:
    """Instance contours in distinct colours and the clicks (yellow crosses)."""
    from matplotlib import colormaps

    out = rgb.copy()
    colours = (np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
    edges = find_boundaries(instances, mode="inner") & (instances > 0)
    out[edges] = colours[(instances[edges].astype(np.int64) - 1) % len(colours)]
    H, W = out.shape[:2]
    for x, y in xy:  # a small yellow cross on each click
        out[y, max(x - 1, 0):min(x + 2, W)] = (255, 255, 0)
        out[max(y - 1, 0):min(y + 2, H), x] = (255, 255, 0)
    return Image.fromarray(out)


def _save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda fh: image.save(fh, format="PNG"))


# ============================================================================= driver
@torch.no_grad()
def predict(model, image, xy: np.ndarray, boxes: np.ndarray, canvas: InstanceCanvas, cfg: InferConfig,
            device: torch.device, amp: MixedPrecision, stain: StainNormalizer = StainNormalizer()) -> None:
    """Batched forward over all clicks (boxes stain normalised when ``stain`` has a target); each
    post-processed mask is pasted as instance i + 1."""
    workers = cfg.num_workers if isinstance(image, SlideImage) else 0
    loader = DataLoader(ClickPatches(image, xy, boxes, cfg.bb_size), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    channels_last = cfg.channels_last and device.type == "cuda"
    for x, idx in progress(loader, desc="clicks"):
        x = network_input(x.to(device, non_blocking=True), stain)
        if cfg.gaussian:
            x[:, 3:] = smooth_points(x[:, 3:], cfg.sigma, cfg.truncated)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)
        prob = torch.sigmoid(logits.float())[:, 0].cpu().numpy()  # (b, bb, bb)
        for p, i in zip(prob, idx.tolist()):
            canvas.paste(i + 1, boxes[i], postprocess(p, cfg), p)


def region_of(boxes: np.ndarray, image, max_pixels: int) -> tuple[int, int, int, int]:
    """(r0, c0, h, w) of the output maps: the whole image when it is decoded in memory, else the
    bounding box of the click boxes (must stay under ``max_pixels``)."""
    if isinstance(image, ArrayImage):
        return 0, 0, image.height, image.width
    r0, c0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    h, w = int(boxes[:, 2].max()) - r0, int(boxes[:, 3].max()) - c0
    if h * w > max_pixels:
        raise ValueError(f"the clicks span {w}x{h} px, more than --max-region-pixels {max_pixels}; "
                         "split them into several click files")
    return r0, c0, h, w


def segment_clicks(model, image, xy: np.ndarray, cfg: InferConfig, device: torch.device, amp: MixedPrecision,
                   stain: StainNormalizer = StainNormalizer()) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint16 instance map over the output region (r0, c0, h, w) for integer (x, y) clicks."""
    boxes = click_boxes(xy, image.height, image.width, cfg.bb_size)
    r0, c0, h, w = region_of(boxes, image, cfg.max_region_pixels)
    canvas = InstanceCanvas(r0, c0, h, w)
    predict(model, image, xy, boxes, canvas, cfg, device, amp, stain)
    return canvas.finalize(), (r0, c0, h, w)


def to_level0(instances: np.ndarray, region, scale: float, level0_shape: tuple[int, int]):
    """An instance map on network pixels ``region`` = (r0, c0, h, w), each ``scale`` level-0 pixels
    (network pixel u spans level-0 [u * scale, (u + 1) * scale)), and its polygons -> the instance
    map on the level-0 pixels it covers (each takes the network pixel holding its centre), that
    level-0 region, and the polygons in level-0 (x, y). Scale 1 changes nothing."""
    r0, c0, h, w = region
    polygons = instance_polygons(instances, r0, c0)
    if scale == 1.0:
        return instances, region, polygons
    H0, W0 = level0_shape
    R0, C0 = math.floor(r0 * scale), math.floor(c0 * scale)
    R1, C1 = min(math.ceil((r0 + h) * scale), H0), min(math.ceil((c0 + w) * scale), W0)
    rows = np.clip(np.floor((np.arange(R0, R1) + 0.5) / scale).astype(np.int64) - r0, 0, h - 1)
    cols = np.clip(np.floor((np.arange(C0, C1) + 0.5) / scale).astype(np.int64) - c0, 0, w - 1)
    return instances[np.ix_(rows, cols)], (R0, C0, R1 - R0, C1 - C0), [(k, xy * scale) for k, xy in polygons]


def write_outputs(out: Path, stem: str, image, instances: np.ndarray, region, xy: np.ndarray,
                  polygons: list | None = None) -> dict[str, Path]:
    """<stem>_instances.png (16-bit), <stem>_overlay.png and <stem>.geojson, written atomically; the
    instance map, its region, the clicks and the polygons (default: traced on the map) are all in the
    image's level-0 pixels."""
    r0, c0, h, w = region
    out.mkdir(parents=True, exist_ok=True)
    paths = {"instances": out / f"{stem}_instances.png", "overlay": out / f"{stem}_overlay.png",
             "geojson": out / f"{stem}.geojson"}
    _save_png(paths["instances"], Image.fromarray(instances))  # uint16 -> 16-bit greyscale PNG
    rgb = image.rgb if isinstance(image, ArrayImage) else image.read_level0(r0, c0, h, w)
    _save_png(paths["overlay"], overlay_image(rgb, instances, xy - [c0, r0]))
    owner = instances[xy[:, 1] - r0, xy[:, 0] - c0]
    clicks = {int(k): (int(x), int(y)) for k, (x, y) in zip(owner, xy) if k > 0}
    polygons = instance_polygons(instances, r0, c0) if polygons is None else polygons
    features = geojson_features(polygons, clicks, (r0, c0), stem)
    atomic_write_text(paths["geojson"], json.dumps(features) + "\n")
    return paths


def run(cfg: InferConfig) -> dict:
    """Segment the clicked nuclei of one image; returns a summary with the output paths."""
    ctx = dist.setup(cfg.device)
    if not cfg.image or not cfg.clicks or not cfg.checkpoint:
        raise SystemExit("infer.py needs --image IMG --clicks FILE --checkpoint FILE")
    target = target_from_files(cfg)  # a bad --stain-target stops here, before anything is read
    image = open_image(cfg.image, cfg.max_region_pixels)
    xy = usable_clicks(read_clicks(cfg.clicks), *image.level0_shape, source=cfg.clicks)  # level-0 pixels
    checkpoint = load_file(cfg.checkpoint)  # read once: the weights, the recorded µm/px, the stored stain target
    resolution = {}
    if isinstance(image, SlideImage):
        model_mpp, mpp_from = model_resolution(checkpoint, cfg.model_mpp)
        resolution = use_slide_resolution(image, model_mpp, cfg)
        dist.print0(f"{Path(cfg.image).name}: {resolution['slide_mpp']:g} µm/px ({resolution['mpp_source']}), "
                    f"model {model_mpp:g} µm/px ({mpp_from}) -> level {resolution['level']}, "
                    f"resampling x{resolution['resampling']:.4g}")
    model, info = load_nuclick_weights(checkpoint, cfg.axis_order or None, ctx.device, name=cfg.checkpoint)
    stain = inference_stain(cfg, target, checkpoint, cfg.checkpoint)
    del checkpoint  # the model holds its own copy of the weights
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = MixedPrecision(ctx.device, cfg.precision)
    instances, region = segment_clicks(model, image, image.to_network(xy), cfg, ctx.device, amp, stain)
    n = int(instances.max(initial=0))
    instances, region, polygons = to_level0(instances, region, image.scale, image.level0_shape)
    stem = Path(cfg.image).stem
    paths = write_outputs(Path(cfg.output_dir), stem, image, instances, region, xy, polygons)
    where = stain.target.source if target is not None else "the checkpoint's stored target"
    normalised = f"; {cfg.stain_normalize} stain normalisation to {where}" if stain.enabled else ""
    dist.print0(f"{stem}: {len(xy)} clicks -> {n} nuclei ({info['kind']}, axis order {info['axis_order']}{normalised}); "
                f"wrote {', '.join(p.name for p in paths.values())} to {cfg.output_dir}")
    return {"image": str(cfg.image), "clicks": int(len(xy)), "n_instances": n, "region": list(region),
            "checkpoint": info, **resolution, **{k: str(v) for k, v in paths.items()}}


def main(cfg: InferConfig) -> None:
    run(cfg)
    dist.cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(InferConfig))
