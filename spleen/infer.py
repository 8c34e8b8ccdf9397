"""Segment CT volumes with a trained UNet and write the masks on the original voxel grid.

    python spleen/infer.py --images PATH_OR_DIR --checkpoint best.pt --output-dir DIR
    python spleen/infer.py --images imagesTs/ --checkpoint model.pt --sw-mode gaussian --largest-component true
    python spleen/infer.py --images imagesTs/ --checkpoint model.pt --prediction whole_volume   # ~5x faster
    torchrun --nproc_per_node 4 spleen/infer.py ...        # volumes are split across processes

Per volume (spleen.md §9): read -> RAS -> (1.5, 1.5, 2.0) mm -> HU window -> sliding window
(96^3, overlap 0.5, 4 windows per batch, blended logits) -> softmax -> probabilities resampled
(bilinear, border) to the oriented original grid -> orientation undone -> argmax.

Outputs per volume ``<name>``: ``<name>_seg.nii.gz`` (uint8 {0, 1}, the input's shape, affine and
header, so it overlays the CT in 3D Slicer / ITK-SNAP) and ``<name>_preview.png`` (three
orthogonal slices through the mask with its contour). Memory: the blended output is allocated
once at the resampled size; inversion and argmax run in slabs.

Restartable: outputs are written atomically, then a record ``.finished/<name>.json``
(:mod:`common.finished`); the same command run again skips every volume finished with the same
checkpoint (sha256) and the same output-shaping settings (``OUTPUT_SETTINGS``), and redoes the
rest; ``--overwrite`` redoes everything. ``inference.json`` lists every volume of the run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common import dist
from common.amp import MixedPrecision
from common.finished import FinishedWork
from common.io import atomic_write, atomic_write_text, file_sha256
from common.memory import keep_freed_memory
from common.config import parse_config
from common.errors import exit_on_user_error
from spleen.config import InferConfig
from spleen.dataset import list_nifti
from spleen.model import UNet, arch_from_checkpoint, build_model, load_unet_weights, predict_logits, prepare_for_inference
from spleen.transforms import (Geometry, VolumeError, affine_spacing, invert_to_original, nifti_stem,
                               oriented_affine, preprocess_image, ras_ornt, read_volume, reorient, save_like)

PREVIEW_WINDOW = (-160.0, 240.0)  # soft-tissue display window (HU)
#: InferConfig fields that shape the written outputs: a finished volume is redone when one changes.
OUTPUT_SETTINGS = ("pixdim", "hu_range", "prediction", "roi_size", "sw_overlap", "sw_mode", "block_size", "halo",
                   "channels_last", "fold_batchnorm", "precision", "largest_component", "preview")


def list_images(images: str) -> list[Path]:
    path = Path(images)
    if path.is_dir():
        found = list_nifti(path)
        if not found:
            raise VolumeError(f"{path}: no .nii/.nii.gz files in this folder")
        return found
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    return [path]


def load_model(checkpoint: str, device: torch.device, channels_last: bool = False,
               fold_batchnorm: bool = False) -> UNet:
    model = build_model(**arch_from_checkpoint(checkpoint))
    load_unet_weights(model, checkpoint)
    return prepare_for_inference(model, channels_last, fold_batchnorm).to(device)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected foreground component."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.reshape(-1))[1:]
    return (labels == (int(np.argmax(sizes)) + 1)).astype(mask.dtype)


@torch.no_grad()
def segment(model: UNet, data: np.ndarray, affine: np.ndarray, cfg: InferConfig, device: torch.device,
            amp: MixedPrecision | None = None, desc: str = "windows") -> tuple[np.ndarray, Geometry]:
    """HU volume on its original grid -> uint8 mask on the same grid (and the geometry used)."""
    image, geom = preprocess_image(data, affine, cfg.pixdim, cfg.hu_range)
    x = image.to(device, non_blocking=True)[None, None]  # (1, 1, X', Y', Z')
    logits = predict_logits(model, x, cfg.roi_size, cfg.sw_batch_size, cfg.sw_overlap, cfg.sw_mode,
                            autocast=amp.autocast if amp else None,
                            output_device=torch.device("cpu") if cfg.sw_on_cpu else None, progress=True, desc=desc,
                            channels_last=cfg.channels_last, prediction=cfg.prediction, block_size=cfg.block_size,
                            halo=cfg.halo)
    del x
    probs = torch.softmax(logits[0], dim=0)  # (2, X', Y', Z')
    del logits
    mask = invert_to_original(probs, geom).cpu().numpy()
    if cfg.largest_component:
        mask = largest_component(mask)
    return mask, geom


# ============================================================================= preview
def _display_slices(ct: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    """RAS-oriented CT and mask, a centre (the mask's centroid if any) and voxel sizes."""
    ornt = ras_ornt(affine)
    ct_r = reorient(torch.from_numpy(np.ascontiguousarray(ct)), ornt).numpy()
    mask_r = reorient(torch.from_numpy(np.ascontiguousarray(mask)), ornt).numpy()
    spacing = affine_spacing(oriented_affine(affine, ct.shape, ornt))
    centre = np.round(np.argwhere(mask_r).mean(0)).astype(int) if mask_r.any() else np.array(mask_r.shape) // 2
    return ct_r, mask_r, centre, spacing


def save_preview(ct: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, title: str = "") -> Path:
    """PNG with axial, coronal and sagittal slices (radiological view, physical aspect) + contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct_r, mask_r, (cx, cy, cz), (sx, sy, sz) = _display_slices(ct, mask, affine)
    views = [  # (slice as rows x cols, pixel aspect = row spacing / column spacing, name)
        (ct_r[:, :, cz].T[::-1, ::-1], mask_r[:, :, cz].T[::-1, ::-1], sy / sx, f"axial z={cz}"),
        (ct_r[:, cy, :].T[::-1, ::-1], mask_r[:, cy, :].T[::-1, ::-1], sz / sx, f"coronal y={cy}"),
        (ct_r[cx, :, :].T[::-1, ::-1], mask_r[cx, :, :].T[::-1, ::-1], sz / sy, f"sagittal x={cx}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100)
    for ax, (img, m, aspect, name) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=PREVIEW_WINDOW[0], vmax=PREVIEW_WINDOW[1], aspect=aspect,
                  interpolation="nearest")
        if m.any():
            ax.contour(m.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    def write(fh) -> None:
        fig.savefig(fh, format="png")

    atomic_write(path, write)
    plt.close(fig)
    return path


# ============================================================================= driver
def infer_all(cfg: InferConfig, ctx: dist.DistContext) -> list[dict]:
    """Segment every image not finished before (split across processes); rank 0 writes
    ``inference.json`` with every image's summary."""
    out = Path(cfg.output_dir)
    images = list_images(cfg.images)
    model = load_model(cfg.checkpoint, ctx.device, cfg.channels_last, cfg.fold_batchnorm)
    amp = MixedPrecision(ctx.device, cfg.precision)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in OUTPUT_SETTINGS}
    finished = FinishedWork(out, {"checkpoint_sha256": file_sha256(cfg.checkpoint), "settings": settings})
    results = []
    for path in images[ctx.rank::ctx.world_size]:
        name = nifti_stem(path)
        done = None if cfg.overwrite else finished.lookup(name, path, output_paths(out, name, cfg.preview))
        if done is not None:
            print(f"{name}: finished before with this checkpoint and settings, skipped", flush=True)
            results.append({**done, "skipped": True})
            continue
        summary = segment_file(model, path, cfg, ctx.device, amp, out)
        finished.record(name, path, summary)
        results.append(summary)
    gathered = sorted((r for part in dist.all_gather_object(results) for r in part), key=lambda r: r["name"])
    if ctx.is_main:
        atomic_write_text(out / "inference.json", json.dumps(gathered, indent=2) + "\n")
    return gathered


def output_paths(out: Path, name: str, preview: bool) -> list[Path]:
    """The files one volume leaves in ``out``."""
    return [out / f"{name}_seg.nii.gz"] + ([out / f"{name}_preview.png"] if preview else [])


def segment_file(model: UNet, path: Path, cfg: InferConfig, device: torch.device, amp: MixedPrecision,
                 out: Path) -> dict:
    """Segment one NIfTI file; write ``<name>_seg.nii.gz`` (+ preview) and return a summary."""
    t0 = time.time()
    name = nifti_stem(path)
    data, affine, img = read_volume(path)
    mask, geom = segment(model, data, affine, cfg, device, amp, desc=name)
    seg_path = save_like(mask, img, out / f"{name}_seg.nii.gz")
    if cfg.preview:
        save_preview(data, mask, affine, out / f"{name}_preview.png", title=f"{name}: {int(mask.sum())} voxels")
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    summary = {"name": name, "image": str(path), "segmentation": str(seg_path), "shape": list(mask.shape),
               "resampled_shape": list(geom.shape), "spleen_voxels": int(mask.sum()),
               "spleen_ml": round(float(mask.sum()) * voxel_ml, 2), "seconds": round(time.time() - t0, 2)}
    print(f"{name}: {tuple(mask.shape)} -> {seg_path} ({summary['spleen_ml']} ml, {summary['seconds']}s)", flush=True)
    return summary


def run(cfg: InferConfig) -> list[dict]:
    ctx = dist.setup(cfg.device)
    if cfg.keep_freed_memory and ctx.device.type == "cpu":
        keep_freed_memory()  # reuse activation memory across windows and volumes (common/memory.py)
    try:
        return infer_all(cfg, ctx)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        run(parse_config(InferConfig))
