"""Whole-slide inference benchmark: prints numbers, asserts nothing.

    python camelyon/bench.py [--slide PATH] [--cells 16] [--device cuda] [--precision fp16]

On one slide and the same block of tissue cells it measures, each in a forked process (so peak
memory is per mode):
- naive: one ``read_region`` + one forward per patch, sequentially (how a first script does it);
- patch: the bundle mode (data-loader workers, batches of patches);
- dense: the fully convolutional tile mode;
- pure forward: the network alone on random tensors shaped like the dense tiles (and like patch
  batches), no reading; end-to-end efficiency = mode throughput / its pure-forward throughput.
Throughput is in patch-equivalents (grid cells) per second.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import BaseConfig, parse_config
from common.errors import exit_on_user_error
from common.wsi import open_slide


@dataclass
class BenchConfig(BaseConfig):
    slide: str = ""  # default: the first demo test slide (generated if needed)
    cells: int = 32  # side of the block of grid cells processed by every mode
    naive_cells: int = 64  # the naive loop is slow: time this many cells and extrapolate the rate
    batch_size: int = 64  # patches per batch of the patch-mode and batched-forward timings
    num_workers: int = 2
    repeats: int = 1  # timed runs per mode (averaged)
    checkpoint: str = ""  # with a trained checkpoint: also measure dense vs patch agreement on the whole slide


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _block_mask(slide: str, cells: int):
    """The tissue mask restricted to the cells x cells block with the most tissue."""
    from camelyon.prepare import compute_tissue_mask

    tm = compute_tissue_mask(slide)
    m = tm.mask.astype(np.int64)
    H, W = m.shape
    n = min(cells, H, W)
    integral = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[n:, n:] - integral[:-n, n:] - integral[n:, :-n] + integral[:-n, :-n]
    r, c = np.unravel_index(np.argmax(sums), sums.shape)
    block = np.zeros_like(tm.mask)
    block[r:r + n, c:c + n] = True
    tm.mask = tm.mask & block
    return tm


def _run_mode(mode: str, cfg: BenchConfig, queue) -> None:
    from common.wsi import open_slide, read_rgb
    from camelyon.infer import cell_top_left, dense_mode_map, patch_mode_map
    from camelyon.model import build_model
    from common.amp import MixedPrecision
    from common.augment import scale_intensity
    from common.dist import resolve_device

    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    channels_last = device.type == "cuda"
    model = build_model().to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = MixedPrecision(device, cfg.precision)
    tm = _block_mask(cfg.slide, cfg.cells)
    n_cells = int(tm.mask.sum())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result: dict = {"mode": mode, "cells": n_cells}
    with torch.no_grad():
        if mode == "naive":
            cells = np.argwhere(tm.mask)[:cfg.naive_cells]
            tops, lefts = cell_top_left(cells[:, 0], cells[:, 1], tm.ratio)
            slide = open_slide(cfg.slide)
            t0 = time.perf_counter()
            for top, left in zip(tops, lefts):
                rgb = read_rgb(slide, left, top, 224, 224)
                x = scale_intensity(torch.from_numpy(rgb).permute(2, 0, 1)[None].float()).to(device)
                with amp.autocast():
                    torch.sigmoid(model(x)).item()
            sync()
            result.update(cells=len(cells), seconds=time.perf_counter() - t0)
        elif mode in ("patch", "dense"):
            fn = patch_mode_map if mode == "patch" else dense_mode_map
            kwargs = dict(batch_size=cfg.batch_size) if mode == "patch" else dict(tile_cells=cfg.cells)
            fn(model, cfg.slide, tm, device, amp, workers=cfg.num_workers, channels_last=channels_last, **kwargs)  # warm-up
            t0 = time.perf_counter()
            for _ in range(cfg.repeats):
                fn(model, cfg.slide, tm, device, amp, workers=cfg.num_workers, channels_last=channels_last, **kwargs)
            sync()
            result["seconds"] = (time.perf_counter() - t0) / cfg.repeats
        else:  # pure forward on random tensors shaped like dense tiles / patch batches
            side = 224 + 64 * (cfg.cells - 1) if mode == "forward_dense" else 224
            batch = 1 if mode == "forward_dense" else cfg.batch_size
            x = torch.randn(batch, 3, side, side, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp.autocast():
                model(x)
                sync()
                t0 = time.perf_counter()
                for _ in range(cfg.repeats):
                    model(x)
                sync()
            per_call = (time.perf_counter() - t0) / cfg.repeats
            result.update(cells=cfg.cells ** 2 if mode == "forward_dense" else batch, seconds=per_call)
    result["cells_per_s"] = result["cells"] / result["seconds"]
    result["peak_rss_mb"] = _peak_rss_mb()
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    queue.put(result)


def _run_mode_or_report(mode: str, cfg: BenchConfig, queue) -> None:
    """``_run_mode`` in the child; its error goes through the queue, so the parent does not wait forever."""
    try:
        _run_mode(mode, cfg, queue)
    except Exception as err:
        try:
            pickle.dumps(err)
        except Exception:  # an exception that cannot travel: its text does
            err = RuntimeError(f"{type(err).__name__}: {err}")
        queue.put(err)


def run_isolated(mode: str, cfg: BenchConfig) -> dict:
    """One timing in a forked process (its own peak-memory counters); an error there is raised here."""
    ctx = mp.get_context("fork")  # spawn would also spawn the data-loader workers (seconds of start-up per call)
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_mode_or_report, args=(mode, cfg, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


def agreement(cfg: BenchConfig) -> dict:
    """Dense vs patch mode with a trained model on the whole slide: map correlation over tissue,
    largest difference, and the lesion candidates each mode yields after NMS."""
    from camelyon.infer import dense_mode_map, detections_from_map, load_model, patch_mode_map
    from camelyon.prepare import compute_tissue_mask
    from common.amp import MixedPrecision
    from common.dist import resolve_device

    device = resolve_device(cfg.device)
    model, _ = load_model(cfg.checkpoint, device)
    amp = MixedPrecision(device, cfg.precision)
    tm = compute_tissue_mask(cfg.slide)
    kw = dict(workers=cfg.num_workers)
    t0 = time.perf_counter()
    patch = patch_mode_map(model, cfg.slide, tm, device, amp, batch_size=cfg.batch_size, **kw)
    t1 = time.perf_counter()
    dense = dense_mode_map(model, cfg.slide, tm, device, amp, **kw)
    t2 = time.perf_counter()
    on = tm.mask
    det_p, det_d = detections_from_map(patch, tm.ratio), detections_from_map(dense, tm.ratio)
    out = {"cells": int(on.sum()), "correlation": float(np.corrcoef(patch[on], dense[on])[0, 1]),
           "max_abs_diff": float(np.abs(patch - dense).max()),
           "mean_abs_diff": float(np.abs(patch - dense)[on].mean()),
           "label_agreement": float(((patch[on] > 0.5) == (dense[on] > 0.5)).mean()),
           "detections_patch": len(det_p), "detections_dense": len(det_d),
           "seconds_patch": t1 - t0, "seconds_dense": t2 - t1}
    print("dense vs patch with " + cfg.checkpoint + ": " + json.dumps(out))
    return out


def main(cfg: BenchConfig) -> dict:
    if not cfg.slide:
        from camelyon.config import demo_root
        from camelyon.demo import make_demo

        layout = make_demo(Path(demo_root()))
        cfg.slide = str(sorted(layout.test_images.glob("*.tif"))[0])
    with open_slide(cfg.slide):  # a missing or unreadable slide stops here, before any timing process starts
        pass
    print(f"slide {cfg.slide}, block of {cfg.cells}x{cfg.cells} cells, device {cfg.device}, "
          f"torch threads {torch.get_num_threads()}")
    results = {m: run_isolated(m, cfg) for m in ("naive", "patch", "dense", "forward_patch", "forward_dense")}
    for r in results.values():
        print(f"{r['mode']:>14}: {r['cells_per_s']:9.1f} patch-equivalents/s  ({r['cells']} cells in "
              f"{r['seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f", peak CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else "") + ")")
    rate = {m: r["cells_per_s"] for m, r in results.items()}
    summary = {
        "dense_vs_naive": rate["dense"] / rate["naive"],
        "patch_vs_naive": rate["patch"] / rate["naive"],
        "dense_vs_patch": rate["dense"] / rate["patch"],
        "dense_end_to_end_vs_forward": rate["dense"] / rate["forward_dense"],
        "patch_end_to_end_vs_forward": rate["patch"] / rate["forward_patch"],
    }
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    print(json.dumps({"results": results, "ratios": summary}))
    if cfg.checkpoint:
        summary["agreement"] = agreement(cfg)
    return summary


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(BenchConfig))
