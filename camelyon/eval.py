"""Evaluation: the official Camelyon16 lesion-level FROC (+ slide AUC), or patch accuracy.

    python camelyon/eval.py --detections DIR --ground-truth DIR [--level 5] [--slides DIR]
    python camelyon/eval.py --patch-list validation.csv --image-dir DIR --checkpoint FILE

FROC (``Evaluation_FROC.py`` protocol, common/metrics/froc.py): one ``<slide>.csv`` per evaluated
slide (``probability,X,Y`` at level 0); the number of CSVs is the FP-rate denominator. A slide is a
tumour slide when ground truth exists for it: ``<stem>.tif`` (Camelyon16 mask, 0/1 or 0/255,
read at ``--level``) or ``<stem>.xml|.json|.geojson`` (polygons rasterised at 2**level; give
``--slides`` for the level-0 size, otherwise the extent of polygons and detections is used).
Slides without ground truth are normal. Deviation on purpose: the official script recognises
tumour slides by the first 8 characters of the mask names (so ``Tumor_001`` counts as normal);
``--stem-chars 8`` restores that behaviour.

Outputs ``froc.json`` (score, the six sensitivities, slide AUC from the max probability per slide,
per-slide details) and ``froc.png`` (the FROC curve).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from camelyon.config import EvalConfig
from common import dist
from common.checkpoint import atomic_write, atomic_write_text
from common.config import parse_config
from common.metrics.classification import roc_auc
from common.metrics.froc import SlideResult, compute_froc, evaluation_mask, itc_labels, slide_fp_tp

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


def mask_from_tiff(path: Path, level: int) -> np.ndarray:
    """Tumour mask at ``level`` from a Camelyon16 mask TIFF (channel 0 > 0: accepts 0/1 and 0/255)."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        if level < slide.level_count and abs(slide.level_downsamples[level] - 2 ** level) < 0.05 * 2 ** level:
            w, h = slide.level_dimensions[level]
            return np.asarray(slide.read_region((0, 0), level, (w, h)))[..., 0] > 0
        best = slide.get_best_level_for_downsample(2 ** level)
        w, h = slide.level_dimensions[best]
        full = np.asarray(slide.read_region((0, 0), best, (w, h)))[..., 0]
        W0, H0 = slide.dimensions
    size = (int(np.ceil(W0 / 2 ** level)), int(np.ceil(H0 / 2 ** level)))
    return np.asarray(Image.fromarray(full).resize(size, Image.NEAREST)) > 0


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


def evaluate_slide(csv_path: Path, cfg: EvalConfig) -> tuple[SlideResult, dict]:
    stem = csv_path.stem
    probs, xs, ys = read_detections(csv_path)
    gt = find_ground_truth(stem, Path(cfg.ground_truth), cfg.stem_chars)
    npy = csv_path.with_suffix(".npy")
    slide_score = float(np.load(npy).max(initial=0.0)) if npy.is_file() else float(probs.max(initial=0.0))
    info = {"slide": stem, "ground_truth": str(gt) if gt else None, "detections": len(probs),
            "slide_score": slide_score}
    if gt is None:
        fp, tp, n = slide_fp_tp(probs, xs, ys, None, level=cfg.level)
    else:
        tumour = mask_from_tiff(gt, cfg.level) if gt.suffix == ".tif" else \
            mask_from_annotation(gt, cfg.level, _slide_size(cfg.slides, stem), xs, ys)
        labels = evaluation_mask(tumour, cfg.level, cfg.spacing_um)
        itc = itc_labels(labels, cfg.level, cfg.spacing_um)
        fp, tp, n = slide_fp_tp(probs, xs, ys, labels, itc, level=cfg.level)
        info.update(lesions=int(labels.max()), itc=len(itc), has_tumour=bool(tumour.any()))
    info.update(targets=n, true_positives=int((tp > 0).sum()), false_positives=len(fp))
    return SlideResult(stem, fp, tp, n), info


def froc_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(result["fps"], result["sensitivity"], "-", color="tab:blue", drawstyle="steps-post")
    rates, sens = zip(*sorted(result["sensitivities"].items()))
    ax.plot(rates, sens, "o", color="tab:red", label="official operating points")
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_xlim(0, max(8.5, max(result["fps"], default=0)))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(f"FROC {result['froc']:.4f}  (slide AUC {result.get('slide_auc', float('nan')):.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def evaluate_froc(cfg: EvalConfig) -> dict:
    det_dir, gt_dir = Path(cfg.detections), Path(cfg.ground_truth)
    if not det_dir.is_dir():
        raise FileNotFoundError(f"detections folder not found: {det_dir}")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
    csvs = sorted(det_dir.glob("*.csv"))
    if not csvs:
        raise FileNotFoundError(f"{det_dir}: no <slide>.csv detection files")
    mine = [evaluate_slide(p, cfg) for p in csvs[dist.get_rank()::dist.get_world_size()]]
    gathered = sorted((r for part in dist.all_gather_object(mine) for r in part), key=lambda r: r[0].name)
    slides, infos = [r for r, _ in gathered], [i for _, i in gathered]
    result = compute_froc(slides)
    labels = [i.get("has_tumour", False) for i in infos]
    result.update(slide_auc=roc_auc(labels, [i["slide_score"] for i in infos]), level=cfg.level, slides=infos)
    result["sensitivities"] = {float(k): v for k, v in result["sensitivities"].items()}
    if dist.is_main_process():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "froc.json", json.dumps({**result, "sensitivities": {
            str(k): v for k, v in result["sensitivities"].items()}}, indent=2) + "\n")
        froc_plot(result, out / "froc.png")
    return result


def evaluate_patches(cfg: EvalConfig) -> dict:
    """Patch-level accuracy of a checkpoint on a patch list (the bundle's validation metric)."""
    import torch
    from torch.utils.data import DataLoader

    from camelyon.dataset import RegionDataset, read_patch_list, validate_records
    from camelyon.infer import load_model
    from camelyon.train import evaluate
    from common.amp import MixedPrecision

    ctx = dist.setup(cfg.device)
    records = read_patch_list(cfg.patch_list, cfg.image_dir or None, cfg.annotation_dir or None, json_key="validation")
    validate_records(records, source=cfg.patch_list)
    model, _ = load_model(cfg.checkpoint, ctx.device)
    ds = RegionDataset(records)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=dist.ShardSampler(len(ds)),
                        num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda")
    with torch.no_grad():
        return evaluate(model, loader, MixedPrecision(ctx.device, cfg.precision), ctx)


def print_froc(result: dict) -> None:
    print(f"FROC {result['froc']:.4f} on {result['num_images']} slides, {result['num_targets']} lesions "
          f"(level {result['level']}); slide AUC {result['slide_auc']:.4f}")
    print("  sensitivity at " + ", ".join(f"{k:g} FP: {v:.3f}" for k, v in sorted(result["sensitivities"].items())))


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
    dist.launch(main, parse_config(EvalConfig))
