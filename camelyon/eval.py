"""Evaluation: Camelyon16 lesion-level FROC (+ slide AUC) under two protocols, or patch accuracy
(the bundle's validation metric, also what ``train.py`` validates with: :func:`patch_accuracy`).

    python camelyon/eval.py --detections DIR --ground-truth DIR [--protocol official|bundle] [--level L]
    python camelyon/eval.py --patch-list validation.csv --image-dir DIR --checkpoint FILE

``--protocol official`` (default; ``Evaluation_FROC.py``, the number NCRF and the challenge report):
one ``<slide>.csv`` per evaluated slide (``probability,X,Y`` at level 0); the number of CSVs is the
FP-rate denominator. A slide is a tumour slide when ground truth exists for it: ``<stem>.tif``
(Camelyon16 mask, 0/1 or 0/255, read at level 5) or ``<stem>.xml|.json|.geojson`` (polygons
rasterised at 2**level; give ``--slides`` for the level-0 size, otherwise the extent of polygons and
detections is used). Slides without ground truth are normal and add FPs. Deviation on purpose: the
official script recognises tumour slides by the first 8 characters of the mask names (so
``Tumor_001`` counts as normal); ``--stem-chars 8`` restores that behaviour.

``--protocol bundle`` (MONAI ``LesionFROC`` as the model-zoo bundle ran it for its FROC 0.72,
``scripts/evaluate_froc.sh``: level 6, spacing 0.243):

1. Slides: each ``<name>.npy`` probability map in ``--detections`` (``<name>.tif.npy`` too) whose
   ``<name>.tif`` mask is in ``--ground-truth``. Slides without a mask are skipped (listed in the
   output): they add no FPs and do not count in the FP-rate denominator.
2. Detections: NMS on the map (box 48, strict p > 0.5, no smoothing); map (r, c) -> level 0
   ``int((c + 0.5) * 64), int((r + 0.5) * 64)`` -> mask index ``int(v / 64)`` (exact round trip).
   A slide with only ``<name>.csv`` (no map) is scored from the CSV with a warning: infer.py wrote it
   with the same NMS, but rounded to 6 decimals, and MONAI itself reads maps only.
3. Ground truth: channel 0 of the mask at level 6; tumour = value 1 exactly (MONAI computes
   ``255 - mask * 255`` in uint8, so 255 wraps to background). Masks with other values are scored
   that way, with a warning naming the file. EDT < 2.411 px, fill holes, 8-connected labels; ITC =
   major axis < 17.683 px. A mask without tumour keeps SciPy's corner label (an ITC), as MONAI.
4. TP/FP per slide, curve and score as official (smallest threshold dropped); TP slots are
   compared with thresholds as MONAI's NumPy scalars are (float64 on NumPy >= 2). No slide AUC.

Outputs ``froc.json`` (protocol and its constants, score, the six sensitivities, slide AUC from the
max probability per slide, per-slide details) and ``froc.png`` (the FROC curve).
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from camelyon.config import EvalConfig
from camelyon.dataset import RegionDataset, eval_transform, read_patch_list, split_grid, validate_records
from common import dist
from common.amp import MixedPrecision
from common.io import atomic_write, atomic_write_text
from common.config import parse_config
from common.logging import progress
from common.metrics.classification import roc_auc
from common.metrics.froc import (FP_RATES, MONAI_NMS_BOX, MONAI_NMS_SIGMA, MONAI_NMS_THRESHOLD,
                                 MONAI_TP_THRESHOLD_DTYPE, SlideResult, compute_froc, detections_to_level0,
                                 evaluation_mask, growth_threshold_px, itc_labels, itc_threshold_px,
                                 monai_tumour_pixels, nms, slide_fp_tp)
from common.errors import exit_on_user_error
from common.stain import StainNormalizer, inference_stain, target_from_files

ANNOTATION_SUFFIXES = (".xml", ".json", ".geojson")


def read_detections(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``probability,X,Y`` rows -> (probs, xs, ys). Blank lines are skipped."""
    rows = []
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{lineno}: expected 'probability,X,Y', got {row}")
            try:
                rows.append((float(row[0]), int(float(row[1])), int(float(row[2]))))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: not a number ({err})") from err
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def find_ground_truth(stem: str, gt_dir: Path, stem_chars: int = 0) -> Path | None:
    if stem_chars:  # official quirk: tumour set = first N characters of the mask file names
        known = {p.stem[:stem_chars] for p in gt_dir.glob("*.tif")}
        return gt_dir / f"{stem}.tif" if stem in known else None
    for suffix in (".tif", *ANNOTATION_SUFFIXES):
        if (gt_dir / f"{stem}{suffix}").is_file():
            return gt_dir / f"{stem}{suffix}"
    return None


def read_mask_values(path: Path, level: int) -> np.ndarray:
    """Channel 0 of a mask TIFF at ``level`` (2**level downsample), raw uint8 values.

    Reads that pyramid level as the reference scripts do. When the file has no such level (or its
    downsample is off by more than 5 %), the nearest finer level is resized with nearest neighbour
    to ``ceil(level-0 size / 2**level)``, with a warning: the reference scripts would fail there.
    """
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as err:
        raise ValueError(f"{path}: not a readable mask TIFF ({err})") from None
    scale = 2 ** level
    with slide:
        if level < slide.level_count and abs(slide.level_downsamples[level] - scale) < 0.05 * scale:
            return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))[..., 0].copy()
        best = slide.get_best_level_for_downsample(scale)
        full = np.asarray(slide.read_region((0, 0), best, slide.level_dimensions[best]))[..., 0]
        width0, height0 = slide.dimensions
        downsamples = [round(d, 2) for d in slide.level_downsamples]
    warnings.warn(f"{path}: no pyramid level with downsample {scale} (has {downsamples}); resized level "
                  f"{best} to level {level} with nearest neighbour", stacklevel=2)
    size = (math.ceil(width0 / scale), math.ceil(height0 / scale))
    return np.asarray(Image.fromarray(full).resize(size, Image.NEAREST))


def mask_from_tiff(path: Path, level: int) -> np.ndarray:
    """Official protocol's tumour mask at ``level``: channel 0 > 0 (accepts 0/1 and 0/255)."""
    return read_mask_values(path, level) > 0


def mask_from_annotation(path: Path, level: int, slide_size: tuple[int, int] | None,
                         xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    from camelyon.annotations import rasterize, read_annotation

    ann = read_annotation(path, allow_empty=True)
    ds = 2 ** level
    if slide_size is None:  # cover every polygon and detection
        pts = [np.c_[xs, ys]] + ann.positive + ann.negative
        extent = np.max(np.concatenate([p.reshape(-1, 2) for p in pts] + [np.zeros((1, 2))]), axis=0)
        slide_size = (int(extent[0]) + ds, int(extent[1]) + ds)
    shape = (int(np.ceil(slide_size[1] / ds)), int(np.ceil(slide_size[0] / ds)))
    return rasterize(ann, shape, downsample=ds)


def _slide_size(slides_dir: str, stem: str) -> tuple[int, int] | None:
    if not slides_dir:
        return None
    from camelyon.dataset import SLIDE_SUFFIXES, open_slide

    for path in Path(slides_dir).glob(f"{stem}.*"):
        if path.suffix.lower() in SLIDE_SUFFIXES:
            with open_slide(path) as slide:
                return slide.dimensions
    return None


def _assign(probs, xs, ys, labels, itc, level: int, source: Path):
    """:func:`slide_fp_tp`, with an error naming the file when a detection lies outside the mask."""
    try:
        return slide_fp_tp(probs, xs, ys, labels, itc, level=level)
    except IndexError as err:
        raise ValueError(f"{source}: a detection lies outside the level-{level} mask "
                         f"{labels.shape} ({err})") from None


# ============================================================================= official protocol
def evaluate_slide(csv_path: Path, cfg: EvalConfig) -> tuple[SlideResult, dict]:
    """Official protocol, one ``<slide>.csv``: a tumour slide when ground truth exists, else normal."""
    stem, level = csv_path.stem, cfg.mask_level()
    probs, xs, ys = read_detections(csv_path)
    gt = find_ground_truth(stem, Path(cfg.ground_truth), cfg.stem_chars)
    npy = csv_path.with_suffix(".npy")
    slide_score = float(np.load(npy).max(initial=0.0)) if npy.is_file() else float(probs.max(initial=0.0))
    info = {"slide": stem, "ground_truth": str(gt) if gt else None, "detections": len(probs),
            "slide_score": slide_score}
    if gt is None:
        fp, tp, n = slide_fp_tp(probs, xs, ys, None, level=level)
    else:
        tumour = mask_from_tiff(gt, level) if gt.suffix == ".tif" else \
            mask_from_annotation(gt, level, _slide_size(cfg.slides, stem), xs, ys)
        labels = evaluation_mask(tumour, level, cfg.spacing_um)
        itc = itc_labels(labels, level, cfg.spacing_um)
        fp, tp, n = _assign(probs, xs, ys, labels, itc, level, csv_path)
        info.update(lesions=int(labels.max()), itc=len(itc), has_tumour=bool(tumour.any()))
    info.update(targets=n, true_positives=int((tp > 0).sum()), false_positives=len(fp))
    return SlideResult(stem, fp, tp, n), info


def official_slides(det_dir: Path) -> list[Path]:
    csvs = sorted(det_dir.glob("*.csv"))
    if not csvs:
        raise FileNotFoundError(f"{det_dir}: no <slide>.csv detection files")
    return csvs


# ============================================================================= bundle protocol
@dataclass
class BundleSlide:
    """A slide the bundle protocol scores: its detections (``.npy`` map, else ``.csv``) and mask."""

    name: str
    detections: Path
    mask: Path


def _slide_name(path: Path) -> str:
    """``Test_001.npy`` (infer.py) and ``Test_001.tif.npy`` (MONAI ProbMapProducer) -> ``Test_001``."""
    name = path.name[: -len(path.suffix)]
    return name[:-4] if name.lower().endswith(".tif") else name


def bundle_slides(det_dir: Path, gt_dir: Path) -> tuple[list[BundleSlide], list[str]]:
    """Slides with detections and a ``<name>.tif`` mask, and the names skipped for lack of a mask."""
    found: dict[str, Path] = {}
    for path in sorted(det_dir.glob("*.csv")) + sorted(det_dir.glob("*.npy")):  # a map wins over a CSV
        found[_slide_name(path)] = path
    scored, skipped = [], []
    for name, path in sorted(found.items()):
        mask = gt_dir / f"{name}.tif"
        if mask.is_file():
            scored.append(BundleSlide(name, path, mask))
        else:
            skipped.append(name)
    if not scored:
        raise FileNotFoundError(f"{det_dir}: no <slide>.npy (or .csv) with a <slide>.tif mask in {gt_dir}")
    return scored, skipped


def load_probability_map(path: Path) -> np.ndarray:
    """A 2-D probability map saved by infer.py (or MONAI's ProbMapProducer)."""
    try:
        prob = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy probability map ({err})") from None
    if prob.ndim != 2 or not np.issubdtype(prob.dtype, np.number):
        raise ValueError(f"{path}: expected a 2-D numeric probability map, got {prob.dtype} {prob.shape}")
    if np.isnan(prob).any():
        raise ValueError(f"{path}: probability map contains NaN")
    return prob


def bundle_detections(path: Path, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(probs, xs, ys)`` at level 0: MONAI ``PathologyProbNMS`` on a map, or a CSV's rows."""
    if path.suffix != ".npy":
        return read_detections(path)
    found = nms(load_probability_map(path), MONAI_NMS_THRESHOLD, MONAI_NMS_BOX, MONAI_NMS_SIGMA)
    return detections_to_level0(found, 2 ** level)


def warn_mask_values(path: Path, values: np.ndarray, tumour_pixels: int, level: int) -> None:
    """Say so when a mask has values above 1, which MONAI's arithmetic turns into background."""
    top = int(values.max(initial=0))
    if top > 1:
        warnings.warn(f"{path}: mask values go up to {top}, but MONAI's LesionFROC counts only value 1 as "
                      f"tumour (255 - mask*255 in uint8 turns 255 into 254 = background); scored that way "
                      f"({tumour_pixels} tumour pixels at level {level}). Convert a 0/255 mask to 0/1 "
                      f"(mask // 255) to evaluate its tumour, or use --protocol official", stacklevel=2)


def bundle_ground_truth(path: Path, level: int, spacing_um: float) -> tuple[np.ndarray, set[int], int]:
    """MONAI ``prepare_ground_truth``: (evaluation labels, ITC labels, tumour pixel count)."""
    values = read_mask_values(path, level)
    tumour = monai_tumour_pixels(values)
    warn_mask_values(path, values, int(tumour.sum()), level)
    labels = evaluation_mask(tumour, level, spacing_um, phantom_if_empty=True)
    return labels, itc_labels(labels, level, spacing_um), int(tumour.sum())


def evaluate_bundle_slide(slide: BundleSlide, cfg: EvalConfig) -> tuple[SlideResult, dict]:
    """Bundle protocol, one slide: NMS detections against MONAI's level-6 evaluation mask."""
    level = cfg.mask_level()
    probs, xs, ys = bundle_detections(slide.detections, level)
    labels, itc, tumour_pixels = bundle_ground_truth(slide.mask, level, cfg.spacing_um)
    fp, tp, n = _assign(probs, xs, ys, labels, itc, level, slide.detections)
    info = {"slide": slide.name, "source": str(slide.detections), "ground_truth": str(slide.mask),
            "detections": len(probs), "slide_score": float(probs.max(initial=0.0)),
            "lesions": int(labels.max()), "itc": len(itc), "tumour_pixels": tumour_pixels,
            "has_tumour": tumour_pixels > 0, "targets": n, "true_positives": int((tp > 0).sum()),
            "false_positives": len(fp)}
    return SlideResult(slide.name, fp, tp, n), info


def _warn_csv_only(slides: list[BundleSlide]) -> None:
    names = [s.name for s in slides if s.detections.suffix != ".npy"]
    if names and dist.is_main_process():
        warnings.warn(f"bundle protocol: no <slide>.npy map for {', '.join(names)}; scoring their <slide>.csv "
                      f"instead (MONAI reads maps only; infer.py wrote the CSV with the same NMS, box "
                      f"{MONAI_NMS_BOX} and p > {MONAI_NMS_THRESHOLD} by default, rounded to 6 decimals)",
                      stacklevel=3)


# ============================================================================= both
def protocol_summary(cfg: EvalConfig) -> dict:
    """The protocol and its constants, as printed and stored in froc.json."""
    level = cfg.mask_level()
    summary = {"name": cfg.protocol, "level": level, "spacing_um": cfg.spacing_um,
               "growth_px": growth_threshold_px(level, cfg.spacing_um),
               "itc_px": itc_threshold_px(level, cfg.spacing_um), "fp_rates": list(FP_RATES)}
    if cfg.protocol == "bundle":
        summary.update(reference="MONAI LesionFROC as in model-zoo pathology_tumor_detection evaluate_froc.sh",
                       detections="<slide>.npy -> NMS (else <slide>.csv)",
                       nms={"box": MONAI_NMS_BOX, "threshold": MONAI_NMS_THRESHOLD, "sigma": MONAI_NMS_SIGMA},
                       tumour="mask value == 1 (255 - mask*255 in uint8)",
                       slides="only slides with a <slide>.tif mask; others add no FPs and are not counted",
                       tp_threshold_dtype=str(np.dtype(MONAI_TP_THRESHOLD_DTYPE)))
    else:
        summary.update(reference="Camelyon16 Evaluation_FROC.py", detections="<slide>.csv probability,X,Y",
                       tumour="mask channel 0 > 0 (0/1 or 0/255), or annotation polygons",
                       slides="every <slide>.csv; slides without ground truth are normal and add FPs",
                       tp_threshold_dtype="float32")
    return summary


def _no_targets(result: dict) -> None:
    """MONAI divides by zero lesions: sensitivity and score are NaN (written as null)."""
    warnings.warn("no lesion other than ITCs on the evaluated slides: MONAI's sensitivity is 0/0, "
                  "FROC undefined (NaN)", stacklevel=3)
    result.update(froc=float("nan"), sensitivity=[float("nan")] * len(result["sensitivity"]),
                  sensitivities={k: float("nan") for k in result["sensitivities"]})


def _json_ready(value):
    """NaN -> null (strict JSON), recursively; other values unchanged."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k) if isinstance(k, float) else k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def froc_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(result["fps"], result["sensitivity"], "-", color="tab:blue", drawstyle="steps-post")
    rates, sens = zip(*sorted(result["sensitivities"].items()))
    ax.plot(rates, sens, "o", color="tab:red", label="operating points (FP rates)")
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_xlim(0, max(8.5, max(result["fps"], default=0)))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(f"{result['protocol']['name']} FROC {result['froc']:.4f}  "
                 f"(slide AUC {result.get('slide_auc', float('nan')):.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def evaluate_froc(cfg: EvalConfig) -> dict:
    """Score a detections folder under ``cfg.protocol``; rank 0 writes froc.json and froc.png."""
    cfg.validate()
    det_dir, gt_dir = Path(cfg.detections), Path(cfg.ground_truth)
    if not det_dir.is_dir():
        raise FileNotFoundError(f"{det_dir}: detections folder not found")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"{gt_dir}: ground-truth folder not found")
    bundle = cfg.protocol == "bundle"
    if bundle:
        items, skipped = bundle_slides(det_dir, gt_dir)
        _warn_csv_only(items)
    else:
        items, skipped = official_slides(det_dir), []
    score_slide = evaluate_bundle_slide if bundle else evaluate_slide
    mine = [score_slide(item, cfg) for item in items[dist.get_rank()::dist.get_world_size()]]
    gathered = sorted((r for part in dist.all_gather_object(mine) for r in part), key=lambda r: r[0].name)
    slides, infos = [r for r, _ in gathered], [i for _, i in gathered]
    result = compute_froc(slides, tp_threshold_dtype=MONAI_TP_THRESHOLD_DTYPE if bundle else np.float32)
    result["sensitivities"] = {float(k): v for k, v in result["sensitivities"].items()}
    if bundle and result["num_targets"] == 0:
        _no_targets(result)
    slide_auc = float("nan") if bundle else \
        roc_auc([i.get("has_tumour", False) for i in infos], [i["slide_score"] for i in infos])
    result.update(protocol=protocol_summary(cfg), slide_auc=slide_auc, level=cfg.mask_level(), slides=infos,
                  skipped_without_mask=skipped)
    if dist.is_main_process():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "froc.json", json.dumps(_json_ready(result), indent=2) + "\n")
        froc_plot(result, out / "froc.png")
    return result


# ============================================================================= patch accuracy
def to_patches(regions: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """uint8 regions (B, 3, 768, 768) + labels (B, 3, 3) -> patches (B*9, 3, 224, 224), targets (B*9, 1, 1, 1)."""
    patches, targets = split_grid(regions.to(device, non_blocking=True), labels.to(device, non_blocking=True))
    return patches, targets.view(-1, 1, 1, 1)


@torch.no_grad()
def patch_accuracy(model, loader, amp: MixedPrecision, ctx: dist.DistContext,
                   stain: StainNormalizer = StainNormalizer()) -> dict[str, float]:
    """Patch accuracy (sigmoid >= 0.5) and mean BCE over all patches of a region loader, summed
    exactly across processes; also the patch count and the positive fraction. Patches are stain
    normalised per patch when ``stain`` has a target."""
    model.eval()
    sums = {"correct": 0.0, "loss": 0.0, "n": 0.0, "positives": 0.0}
    for regions, labels in progress(loader, desc="validate"):
        patches, targets = to_patches(regions, labels, ctx.device)
        with amp.autocast():
            logits = model(eval_transform(stain(patches))).float()
        sums["correct"] += float(((logits >= 0).float() == targets).sum())
        sums["loss"] += float(F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))
        sums["n"] += targets.numel()
        sums["positives"] += float(targets.sum())
    total = dist.reduce_sums(sums, ctx.device)
    n = max(total["n"], 1.0)
    return {"acc": total["correct"] / n, "loss": total["loss"] / n, "patches": total["n"],
            "positive_fraction": total["positives"] / n}


def evaluate_patches(cfg: EvalConfig) -> dict:
    """:func:`patch_accuracy` of a checkpoint on a patch list; ``--stain-normalize`` to ``--stain-target``,
    else to the target the checkpoint stores."""
    from camelyon.infer import load_model

    ctx = dist.setup(cfg.device)
    target = target_from_files(cfg)  # a bad --stain-target stops here, before any slide is read
    records = read_patch_list(cfg.patch_list, cfg.image_dir or None, cfg.annotation_dir or None, json_key="validation")
    validate_records(records, source=cfg.patch_list)
    if cfg.max_regions:
        records = records[:cfg.max_regions]
    model, _ = load_model(cfg.checkpoint, ctx.device)
    stain = inference_stain(cfg, target, cfg.checkpoint)
    ds = RegionDataset(records)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=dist.ShardSampler(len(ds)),
                        num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda")
    return patch_accuracy(model, loader, MixedPrecision(ctx.device, cfg.precision), ctx, stain=stain)


def protocol_line(protocol: dict) -> str:
    """One line: which protocol and its constants."""
    line = (f"protocol {protocol['name']} ({protocol['reference']}): level {protocol['level']}, growth "
            f"< {protocol['growth_px']:.3f} px, ITC < {protocol['itc_px']:.3f} px, tumour = {protocol['tumour']}")
    if "nms" in protocol:
        nms_cfg = protocol["nms"]
        line += f", NMS box {nms_cfg['box']} p > {nms_cfg['threshold']} sigma {nms_cfg['sigma']:g}"
    return line + f"; {protocol['slides']}"


def print_froc(result: dict) -> None:
    auc = result["slide_auc"]
    print(protocol_line(result["protocol"]))
    print(f"FROC {result['froc']:.4f} on {result['num_images']} slides, {result['num_targets']} lesions "
          f"(level {result['level']}); slide AUC " + ("n/a" if math.isnan(auc) else f"{auc:.4f}"))
    print("  sensitivity at " + ", ".join(f"{k:g} FP: {v:.3f}" for k, v in sorted(result["sensitivities"].items())))
    if result.get("skipped_without_mask"):
        skipped = result["skipped_without_mask"]
        print(f"  skipped {len(skipped)} slides without a <slide>.tif mask: {', '.join(skipped)}")


def main(cfg: EvalConfig) -> None:
    dist.setup(cfg.device)
    if cfg.patch_list:
        m = evaluate_patches(cfg)
        dist.print0(f"patch accuracy {m['acc']:.4f} on {m['patches']:.0f} patches (BCE {m['loss']:.4f})")
    else:
        if not cfg.detections or not cfg.ground_truth:
            raise SystemExit("eval.py needs --detections DIR --ground-truth DIR (or --patch-list ...)")
        result = evaluate_froc(cfg)
        if dist.is_main_process():
            print_froc(result)
            print(f"wrote {Path(cfg.output_dir) / 'froc.json'} and froc.png")
    dist.cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(EvalConfig))
