"""Evaluate a segPANDA200 model: confusion matrix summed across processes -> per-class and mean
IoU / Dice (torchvision ``*_nan`` and PatchTCGA ``patchtcga_*`` variants, common.md §3), pixel
accuracy; centre crops (PatchTCGA) or whole tiles with sliding-window inference; overlay PNGs.

    python segpanda/eval.py --checkpoint runs/segpanda/best.pt --data-root datasets/segPANDA200 --split test
    python segpanda/eval.py --checkpoint Last_segPANDA200_DeepLabv3_1000itr.pt --val-crop-size 0
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common import dist
from common.amp import MixedPrecision
from common.checkpoint import load_file
from common.io import atomic_write, atomic_write_text
from common.config import parse_config
from common.logging import progress
from common.metrics.miou import ConfusionMatrix
from common.sliding_window import sliding_window_inference
from common.config import BaseConfig
from common.errors import exit_on_user_error
from common.stain import StainNormalizer, inference_stain, target_from_files
from segpanda.config import EvalConfig, ModelConfig
from segpanda.dataset import CLASS_NAMES, SegPandaDataset, eval_transform, find_samples, validate_samples
from segpanda.model import build_model, load_segmentation_weights

# background grey, stroma pink, benign green, Gleason 3/4/5 yellow/orange/red
PALETTE = np.array([[200, 200, 200], [255, 105, 180], [0, 170, 0], [255, 220, 0], [255, 120, 0], [200, 0, 0]],
                   dtype=np.uint8)


def predict(model, images: torch.Tensor, amp: MixedPrecision, crop_size: int, sw_batch_size: int = 8,
            overlap: float = 0.25) -> torch.Tensor:
    """Logits (B, C, H, W) in float32 for normalised images; tiles larger than the crop are
    scanned with overlapping windows (common.sliding_window, constant blending)."""
    def net(x: torch.Tensor) -> torch.Tensor:
        with amp.autocast():
            return model(x)["out"].float()

    if max(images.shape[-2:]) <= crop_size:
        return net(images)
    return sliding_window_inference(images, crop_size, sw_batch_size, net, overlap=overlap)


@torch.no_grad()
def evaluate(model, loader, amp: MixedPrecision, ctx: dist.DistContext, num_classes: int, crop_size: int,
             mean: list[float], std: list[float], ignore_index: int = -1, sw_batch_size: int = 8,
             overlap: float = 0.25, overlay_dir: Path | None = None, num_overlays: int = 0,
             desc: str = "evaluate", stain: StainNormalizer = StainNormalizer()) -> dict:
    """Metrics over every tile of the loader's shard, reduced across processes; each tile stain
    normalised (as a whole) when ``stain`` has a target. Rank 0 writes up to ``num_overlays``
    overlay PNGs of its first tiles into ``overlay_dir``."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index if ignore_index >= 0 else None, device=ctx.device)
    written = 0
    for images, masks in progress(loader, desc=desc):
        images = images.to(ctx.device, non_blocking=True)
        masks = masks.to(ctx.device, non_blocking=True).long()
        x = eval_transform(stain(images), mean, std)
        pred = predict(model, x, amp, crop_size, sw_batch_size, overlap).argmax(1)
        cm.update(pred, masks)
        if overlay_dir is not None and ctx.is_main and written < num_overlays:
            for b in range(min(len(images), num_overlays - written)):
                save_overlay(overlay_dir / f"overlay_{written:03d}.png", images[b], masks[b], pred[b])
                written += 1
    cm.reduce()
    metrics = cm.compute()
    metrics["confusion_matrix"] = cm.mat.cpu().tolist()
    return metrics


# ============================================================================= reporting
def colorize(labels: np.ndarray) -> np.ndarray:
    return PALETTE[np.clip(labels, 0, len(PALETTE) - 1)]


def overlay_panel(image: np.ndarray, target: np.ndarray, pred: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, 3W + 2*gap, 3) uint8: the tile | ground truth over it | prediction over it."""
    img = image.astype(np.float32)
    blend = lambda lab: (img * (1 - alpha) + colorize(lab).astype(np.float32) * alpha).astype(np.uint8)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, blend(target), gap, blend(pred)], 1)


def save_overlay(path: Path, image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor) -> None:
    panel = overlay_panel(image.permute(1, 2, 0).cpu().numpy(), target.cpu().numpy(), pred.cpu().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(panel).save(f, format="PNG"))


def format_metrics(metrics: dict, names=CLASS_NAMES) -> str:
    """A per-class table plus both mean variants, named so numbers compare with the paper
    (PatchTCGA's mIoU = ``patchtcga_miou_macro``: eps 1e-5, divided by all classes)."""
    rows = [f"{'class':<12}{'IoU':>8}{'Dice':>8}{'acc':>8}"]
    for i, (iou, dice, acc) in enumerate(zip(metrics["iou_per_class_nan"], metrics["dice_per_class_nan"],
                                            metrics["class_accuracy_nan"])):
        name = names[i] if i < len(names) else str(i)
        rows.append(f"{name:<12}{iou:>8.4f}{dice:>8.4f}{acc:>8.4f}")
    rows += [f"mIoU macro (torchvision, absent classes excluded) miou_macro_nan      {metrics['miou_macro_nan']:.4f}",
             f"mIoU macro (PatchTCGA DiceJaccardAccuracy)        patchtcga_miou_macro {metrics['patchtcga_miou_macro']:.4f}",
             f"mIoU micro                                        miou_micro           {metrics['miou_micro']:.4f}",
             f"mDice macro nan / PatchTCGA                        {metrics['mdice_macro_nan']:.4f} / {metrics['patchtcga_mdice_macro']:.4f}",
             f"pixel accuracy                                    pixel_accuracy       {metrics['pixel_accuracy']:.4f}",
             f"mPA (PatchTCGA)                                   patchtcga_mpa        {metrics['patchtcga_mpa']:.4f}"]
    return "\n".join(rows)


def make_eval_loader(root: str, split: str, num_classes: int, val_crop_size: int, batch_size: int,
                     num_workers: int, ctx: dist.DistContext, check_values: bool = True) -> DataLoader:
    """Every tile of ``split`` sharded without padding; centre-cropped in the worker, or whole
    tiles one at a time (``val_crop_size`` 0) for sliding-window inference."""
    samples = find_samples(root, split)
    if ctx.is_main:
        validate_samples(samples, num_classes, min_size=val_crop_size, check_values=check_values,
                         workers=max(num_workers, 1))
    dist.barrier()
    ds = SegPandaDataset(samples, num_classes, center_crop=val_crop_size)
    return DataLoader(ds, batch_size=batch_size if val_crop_size else 1, sampler=dist.ShardSampler(len(ds)),
                      num_workers=num_workers, pin_memory=ctx.device.type == "cuda", worker_init_fn=dist.worker_init_fn)


def apply_checkpoint_config(cfg: EvalConfig, state) -> EvalConfig:
    """A run's checkpoint stores its config: take the model fields from it (the released plain
    state_dict has none, so the flags, whose defaults describe it, stay)."""
    saved = state.get("config") if isinstance(state, dict) else None
    if not cfg.use_checkpoint_config or not isinstance(saved, dict):
        return cfg
    fields = [f for f in ModelConfig.__dataclass_fields__ if f not in BaseConfig.__dataclass_fields__]
    return replace(cfg, **{f: saved[f] for f in fields if f in saved})


def main(cfg: EvalConfig) -> dict:
    ctx = dist.setup(cfg.device)
    if not cfg.checkpoint:
        raise SystemExit("--checkpoint is required (a run's best.pt or the released DeepLabv3 .pt)")
    target = target_from_files(cfg)  # a bad --stain-target stops here
    state = load_file(cfg.checkpoint)
    stain = inference_stain(cfg, target, state)
    cfg = apply_checkpoint_config(cfg, state)
    model = build_model(cfg)
    load_segmentation_weights(model, state)
    model = model.to(ctx.device)
    loader = make_eval_loader(cfg.data_root, cfg.split, cfg.num_classes, cfg.val_crop_size, cfg.batch_size,
                              cfg.num_workers, ctx, cfg.validate_values)
    out = Path(cfg.output_dir)
    metrics = evaluate(model, loader, MixedPrecision(ctx.device, cfg.precision), ctx, cfg.num_classes, cfg.crop_size,
                       cfg.image_mean, cfg.image_std, cfg.ignore_index, cfg.sw_batch_size, cfg.sw_overlap,
                       overlay_dir=out / "overlays", num_overlays=cfg.num_overlays, desc=f"evaluate {cfg.split}",
                       stain=stain)
    if ctx.is_main:
        print(f"{cfg.split}: {len(loader.dataset)} tiles\n{format_metrics(metrics)}")
        atomic_write_text(out / f"metrics_{cfg.split}.json", json.dumps(metrics, indent=2) + "\n")
        print(f"metrics: {out / f'metrics_{cfg.split}.json'}, overlays: {out / 'overlays'}")
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    with exit_on_user_error():
        dist.launch(main, parse_config(EvalConfig))
