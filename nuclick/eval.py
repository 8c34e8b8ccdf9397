"""Evaluation: validation Dice of a checkpoint on prepared crops (the bundle's ``evaluate.json``), or
instance-level scores of an ``infer.py`` result against a ground-truth instance map.

    python nuclick/eval.py --checkpoint runs/nuclick/best.pt --data-root /data/CoNSePNuclei
    python nuclick/eval.py --instances out/img_instances.png --ground-truth CoNSeP/Test/Labels/img.mat

Crop Dice follows the bundle: sigmoid >= 0.5, MONAI ``DiceMetric(include_background=False)`` on the
single channel (per-sample 2|A∩B|/(|A|+|B|), NaN for an empty ground truth, excluded from the mean);
the positive click is sampled (drop rate 1.0: no negative clicks), from (seed, epoch, index) so the
number is reproducible. Instance scores: per ground-truth nucleus the Dice with the predicted
instance overlapping it most (mean = ``instance_dice``), the object-level Dice of Sirinukunwattana
et al. (2017, area-weighted both ways), and the binary pixel Dice.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.segmentation import find_boundaries
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.io import atomic_write, atomic_write_text
from common.config import parse_config
from common.logging import progress
from common.metrics.dice import DiceAccumulator
from common.errors import exit_on_user_error
from common.stain import StainNormalizer, inference_stain, target_from_files
from nuclick.config import EvalConfig, GuidanceConfig
from nuclick.dataset import NucleiDataset, read_datalist, val_batch
from nuclick.model import dice_loss, load_nuclick_weights


# ============================================================================= crop Dice
@torch.no_grad()
def evaluate(model, loader, amp: MixedPrecision, ctx: dist.DistContext, seed: int, epoch: int,
             guide_cfg: GuidanceConfig, preview_path: Path | None = None, channels_last: bool = False,
             stain: StainNormalizer = StainNormalizer()) -> dict:
    """Mean Dice (MONAI conventions), pixel accuracy and Dice loss over the whole loader, exact
    across processes (per-sample Dice gathered, sums all-reduced); crops stain normalised when
    ``stain`` has a target."""
    model.eval()
    dice = DiceAccumulator(include_background=False)
    sums = {"correct": 0.0, "pixels": 0.0, "loss": 0.0, "n": 0.0}
    for i, batch in enumerate(progress(loader, desc="validate")):
        x, target = val_batch(batch, seed, epoch, guide_cfg, ctx.device, stain)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            logits = model(x)
        pred = (torch.sigmoid(logits.float()) >= 0.5).float()
        dice.update(pred, target)
        sums["correct"] += float((pred == target).sum())
        sums["pixels"] += target.numel()
        sums["loss"] += float(dice_loss(logits, target)) * len(target)
        sums["n"] += len(target)
        if i == 0 and preview_path is not None and ctx.is_main:
            save_preview(x, target, pred, preview_path)
    total = dist.reduce_sums(sums, ctx.device)
    n = max(total["n"], 1.0)
    return {"dice": dice.compute(), "accuracy": total["correct"] / max(total["pixels"], 1.0),
            "loss": total["loss"] / n, "samples": total["n"]}


def save_preview(x: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, path: Path, n: int = 8) -> None:
    """A row of crops: ground truth outline green, prediction outline red, positive click yellow,
    negative clicks cyan."""
    tiles = []
    for b in range(min(n, len(x))):
        rgb = ((x[b, :3].float().cpu().numpy().transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        gt, pr = target[b, 0].cpu().numpy() > 0, pred[b, 0].cpu().numpy() > 0
        rgb[find_boundaries(gt, mode="inner")] = (0, 220, 0)
        rgb[find_boundaries(pr, mode="inner")] = (230, 0, 0)
        for channel, colour in ((3, (255, 255, 0)), (4, (0, 255, 255))):
            for r, c in np.argwhere(x[b, channel].float().cpu().numpy() > 0.5):
                rgb[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = colour
        tiles.append(np.pad(rgb, ((2, 2), (2, 2), (0, 0)), constant_values=255))
    image = Image.fromarray(np.concatenate(tiles, axis=1))
    scale = max(1, 128 // x.shape[-1])  # small crops are enlarged (nearest) to stay readable
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    atomic_write(path, lambda fh: image.save(fh, format="PNG"))


# ============================================================================= instance scores
def read_instance_map(path: str | Path) -> np.ndarray:
    """An instance map from a 16/8-bit PNG, an ``.npz`` (``inst_map`` or its only array) or a CoNSeP
    ``.mat`` (``inst_map``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: instance map not found")
    if path.suffix.lower() == ".mat":
        from nuclick.prepare import read_mat
        return read_mat(path).inst_map.astype(np.int64)
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            key = "inst_map" if "inst_map" in z.files else z.files[0]
            return z[key].astype(np.int64)
    with Image.open(path) as im:
        array = np.asarray(im)
    if array.ndim != 2:
        raise ValueError(f"{path}: an instance map must be single-channel, got shape {array.shape}")
    return array.astype(np.int64)


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gt ids, pred ids, gt areas, pred areas, intersection matrix (n_gt, n_pred))."""
    gt_ids, gt_inv = np.unique(gt, return_inverse=True)
    pr_ids, pr_inv = np.unique(pred, return_inverse=True)
    inter = np.bincount(gt_inv.ravel() * len(pr_ids) + pr_inv.ravel(),
                        minlength=len(gt_ids) * len(pr_ids)).reshape(len(gt_ids), len(pr_ids))
    gt_keep, pr_keep = gt_ids > 0, pr_ids > 0
    return (gt_ids[gt_keep], pr_ids[pr_keep], inter[gt_keep].sum(1), inter[:, pr_keep].sum(0),
            inter[np.ix_(gt_keep, pr_keep)])


def instance_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Per-nucleus, object-level and pixel Dice of a predicted instance map against ground truth."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    gt_ids, pr_ids, gt_area, pr_area, inter = _overlaps(gt, pred)
    pair_dice = 2 * inter / np.maximum(gt_area[:, None] + pr_area[None, :], 1)  # (n_gt, n_pred)
    best_for_gt = np.take_along_axis(pair_dice, inter.argmax(1)[:, None], 1)[:, 0] if inter.size else np.zeros(len(gt_ids))
    best_for_pr = np.take_along_axis(pair_dice, inter.argmax(0)[None, :], 0)[0] if inter.size else np.zeros(len(pr_ids))
    best_for_gt = np.where(inter.max(1, initial=0) > 0, best_for_gt, 0.0)
    best_for_pr = np.where(inter.max(0, initial=0) > 0, best_for_pr, 0.0)
    obj = 0.5 * (float((gt_area * best_for_gt).sum() / max(gt_area.sum(), 1)) +
                 float((pr_area * best_for_pr).sum() / max(pr_area.sum(), 1)))
    fg_p, fg_g = pred > 0, gt > 0
    pixel = 2 * np.logical_and(fg_p, fg_g).sum() / max(fg_p.sum() + fg_g.sum(), 1)
    return {"instance_dice": float(best_for_gt.mean()) if len(gt_ids) else float("nan"),
            "object_dice": obj, "pixel_dice": float(pixel), "n_ground_truth": int(len(gt_ids)),
            "n_predicted": int(len(pr_ids)), "per_nucleus": dict(zip(map(int, gt_ids), map(float, best_for_gt)))}


# ============================================================================= driver
def evaluate_checkpoint(cfg: EvalConfig, ctx: dist.DistContext) -> dict:
    target = target_from_files(cfg)  # a bad --stain-target stops here
    model, info = load_nuclick_weights(cfg.checkpoint, cfg.axis_order or None, ctx.device)
    stain = inference_stain(cfg, target, cfg.checkpoint)
    items = read_datalist(cfg.datalist or Path(cfg.data_root) / "dataset.json", cfg.split)
    ds = NucleiDataset(items, cache=False)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=dist.ShardSampler(len(ds)),
                        num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda")
    amp = MixedPrecision(ctx.device, cfg.precision)
    out = Path(cfg.output_dir)
    metrics = evaluate(model, loader, amp, ctx, cfg.seed, 0, GuidanceConfig(drop_rate=1.0),
                       preview_path=out / "preview.png", stain=stain)
    metrics.update(checkpoint=info)
    return metrics


def run(cfg: EvalConfig) -> dict:
    ctx = dist.setup(cfg.device)
    if cfg.instances:
        if not cfg.ground_truth:
            raise SystemExit("--instances needs --ground-truth (CoNSeP .mat, .npz or instance PNG)")
        result = instance_scores(read_instance_map(cfg.instances), read_instance_map(cfg.ground_truth))
    elif cfg.checkpoint:
        result = evaluate_checkpoint(cfg, ctx)
    else:
        raise SystemExit("eval.py needs --checkpoint (crop Dice) or --instances with --ground-truth")
    if ctx.is_main:
        summary = {k: v for k, v in result.items() if k != "per_nucleus"}
        print(json.dumps(summary, indent=2))
        atomic_write_text(Path(cfg.output_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


def main(cfg: EvalConfig) -> None:
    run(cfg)
    dist.cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(EvalConfig))
