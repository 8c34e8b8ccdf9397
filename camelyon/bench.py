"""Whole-slide inference benchmark: prints numbers, asserts nothing.

    python camelyon/bench.py [--slide PATH] [--cells 16] [--device cuda] [--precision fp16]
    python camelyon/bench.py --large [--large-mode patch]      # Camelyon scale: large vs small slide

On one slide and the same block of tissue cells it measures, each in a forked process (so peak
memory is per mode):
- naive: one ``read_region`` + one forward per patch, sequentially (how a first script does it);
- patch: the bundle mode (data-loader workers, batches of patches);
- dense: the fully convolutional tile mode;
- pure forward: the network alone on random tensors shaped like the dense tiles (and like patch
  batches), no reading; end-to-end efficiency = mode throughput / its pure-forward throughput.
Throughput is in patch-equivalents (grid cells) per second.

``--large``: flat memory and time proportional to tissue. On a 204,800 x 98,304 px pyramid with
three tissue islands and on an 8,192 x 8,192 px slide with the same islands
(``camelyon/large_slide.py``, generated once into the cache), each in a fresh process: the tissue
mask's time, infer.py's whole run on the slide (``--large-mode``, dense by default; random weights
in the bundle's layout), tissue cells per second, the process's peak RSS (and its reader workers'),
and the ratios large / small against the goal: time and peak RSS within 1.2x, peak RSS < 2 GB.

``--stain``: stain robustness across centres. The demo model is trained twice (the demo preset,
``--stain-augment none`` and ``hed``), each evaluated on the demo's slides (original centre) and
on the same slides re-stained as a second centre (``camelyon/second_centre.py``, built once), with
``--stain-normalize none`` and ``macenko`` (target: ``TARGET_REGIONS`` original-centre training
regions, as ``--stain-target`` files): patch accuracy on the val patches (``camelyon/eval.py
--patch-list``) and FROC on the test slides (``camelyon/infer.py`` dense + ``camelyon/eval.py``).
Every training and every cell runs in a fresh process; prints a Markdown table and the wall time.
``--stain-epochs/--stain-steps/--stain-val-regions/--stain-test-slides`` make it smaller.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import pickle
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.config import BaseConfig, parse_config
from common.errors import exit_on_user_error
from common.io import atomic_write_text
from common.memory import peak_rss_mb
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
    large: bool = False  # Camelyon-scale slide vs a small slide with the same tissue (time, memory)
    large_mode: str = "dense"  # --large: infer.py's --mode on both slides (dense or patch)
    large_goal: float = 1.2  # --large: the goal for large / small time and peak RSS
    large_goal_rss_mb: float = 2048  # --large: the goal for the large slide's peak RSS
    shapes: bool = False  # whole slides of several tissue shapes: dense, patch, naive, MONAI, pure forward
    shape_kinds: list[str] = field(default_factory=list)  # --shapes: only these ways (default: all)
    shape_names: list[str] = field(default_factory=list)  # --shapes: only these slides (islands ellipse strips ring)
    stain: bool = False  # models with and without HED augmentation, on the demo and a re-stained second centre
    stain_output: str = "runs/camelyon_stain_bench"  # --stain: runs, maps and the table (a rerun reuses finished runs and slides)
    stain_epochs: int = 0  # --stain: training epochs (0: the demo preset's 2)
    stain_steps: int = 0  # --stain: training steps per epoch (0: the demo preset's 30)
    stain_val_regions: int = 0  # --stain: val regions for patch accuracy (0: all 80, 720 patches)
    stain_test_slides: int = 0  # --stain: test slides for FROC (0: all 4)
    stain_fit: str = "slide"  # --stain: infer.py's --stain-fit for the normalised runs (tile or slide)

    def validate(self) -> None:
        if self.large_mode not in ("dense", "patch"):
            raise ValueError(f"--large-mode must be dense or patch, got {self.large_mode!r}")
        if self.stain_fit not in ("tile", "slide"):
            raise ValueError(f"--stain-fit must be tile or slide, got {self.stain_fit!r}")


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
    result["peak_rss_mb"] = peak_rss_mb()
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


def as_a_command() -> None:
    """Make a process started with the spawn method behave as ``python camelyon/infer.py`` does: its
    data-loader workers forked (a spawned process would spawn them too -- each one importing torch
    again and competing for the cores: 53 s instead of 30 s on a three-island slide), no progress bars."""
    mp.set_start_method("fork", force=True)
    os.environ["PATHMONO_NO_PROGRESS"] = "1"


# ============================================================================= --large
def _measure_slide(slide: str, checkpoint: str, out_dir: str, cfg: BenchConfig, queue) -> None:
    """In a fresh process: the tissue mask alone, then infer.py's run on the slide (which computes
    the mask again, as a user's run does); times, tissue cells and this process's peak RSS."""
    as_a_command()
    from camelyon.config import InferConfig
    from camelyon.dataset import CAMELYON16_MPP
    from camelyon.infer import run
    from camelyon.prepare import tissue_mask_at
    from common.wsi import resolve_scale, slide_mpp

    infer_cfg = InferConfig(slides=slide, checkpoint=checkpoint, output_dir=out_dir, mode=cfg.large_mode,
                            num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision)
    with open_slide(slide) as handle:
        scale = resolve_scale(slide_mpp(handle, slide), CAMELYON16_MPP).scale
    t0 = time.perf_counter()
    tm = tissue_mask_at(slide, infer_cfg.mask_downsample, scale)
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # infer.py's per-slide lines; the table says it
        run(infer_cfg)
    t2 = time.perf_counter()
    cells = int(tm.mask.sum())
    queue.put({"tissue_cells": cells, "grid": list(tm.mask.shape), "mask_s": t1 - t0, "infer_s": t2 - t1,
               "cells_per_s": cells / (t2 - t1), "peak_rss_mb": peak_rss_mb()})


def _measure_or_report(*args) -> None:
    try:
        _measure_slide(*args)
    except Exception as err:
        args[-1].put(RuntimeError(f"{type(err).__name__}: {err}"))


def measure_in_fresh_process(slide: Path, checkpoint: Path, out_dir: Path, cfg: BenchConfig) -> dict:
    """:func:`_measure_slide` in a new interpreter (spawn), so its peak memory is the slide's own;
    ``process_s`` is the whole process, start-up to outputs written."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_measure_or_report, args=(str(slide), str(checkpoint), str(out_dir), cfg, queue))
    proc.start()
    with TreeMemory(proc.pid) as tree:
        result = _result_or_death(proc, queue)
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return {**result, "process_s": time.perf_counter() - t0, "tree_peak_pss_mb": tree.peak_mb}


class TreeMemory:
    """Peak, sampled every ``interval`` s, of the summed PSS (proportional set size: shared pages
    split between their users) of a process and its descendants (its reader workers) -- what the
    whole job costs the machine. Linux only (``/proc``); 0 elsewhere."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, sum(map(_pss_mb, _process_tree(self.pid))))

    
def _process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:  # gone meanwhile, or no /proc
            pass
    return tree


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _result_or_death(proc, queue, poll_s: float = 1.0):
    """What the child puts in ``queue``; an error if it dies without (killed, out of memory)."""
    import queue as queue_module

    while True:
        try:
            return queue.get(timeout=poll_s)
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # it may have put its result just before exiting
                    return queue.get(timeout=poll_s)
                except queue_module.Empty:
                    return RuntimeError(f"the measuring process died (exit code {proc.exitcode}) before reporting")


def _random_bundle_checkpoint(path: Path) -> Path:
    """Random weights (seed 0) saved as the bundle's ``model.pt`` is: a bare state_dict."""
    from camelyon.model import build_model

    torch.manual_seed(0)
    torch.save(build_model().state_dict(), path)
    return path


def large_vs_small(cfg: BenchConfig, slides=None) -> dict:
    """``--large``: both benchmark slides (default: ``make_benchmark_slides()``, built once), each
    measured in a fresh process; prints the table, the ratios and the goal."""
    from camelyon.large_slide import describe, make_benchmark_slides

    slides = slides or make_benchmark_slides()
    print(describe(slides))
    print(f"infer.py --mode {cfg.large_mode}, random bundle-layout weights, {cfg.num_workers} reader workers, "
          f"device {cfg.device}, each slide in a fresh process; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="camelyon_bench_large_") as tmp:
        checkpoint = _random_bundle_checkpoint(Path(tmp) / "model.pt")
        results = {name: measure_in_fresh_process(path, checkpoint, Path(tmp) / name, cfg)
                   for name, path in (("small", slides.small), ("large", slides.large))}
    print(f"{'slide':>6} {'tissue cells':>12} {'mask s':>7} {'inference s':>11} {'cells/s':>8} "
          f"{'process s':>9} {'peak RSS MB':>11} {'tree PSS MB':>11}")
    for name, r in results.items():
        print(f"{name:>6} {r['tissue_cells']:>12} {r['mask_s']:>7.2f} {r['infer_s']:>11.1f} {r['cells_per_s']:>8.1f} "
              f"{r['process_s']:>9.1f} {r['peak_rss_mb']:>11.0f} {r['tree_peak_pss_mb']:>11.0f}")
    ratios = {key: results["large"][key] / results["small"][key]
              for key in ("mask_s", "infer_s", "process_s", "peak_rss_mb", "tree_peak_pss_mb") if results["small"][key]}
    met = (ratios["infer_s"] <= cfg.large_goal and ratios["peak_rss_mb"] <= cfg.large_goal
           and results["large"]["peak_rss_mb"] < cfg.large_goal_rss_mb)
    print("large / small: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + f"; goal (inference time and peak RSS within {cfg.large_goal:g}x, peak RSS < {cfg.large_goal_rss_mb:g} MB): "
          + ("met" if met else "NOT met"))
    summary = {"slides": {"large": str(slides.large), "small": str(slides.small), "generation": slides.info},
               "results": results, "ratios": ratios, "goal_met": met}
    print(json.dumps(summary))
    return summary


# ============================================================================= --shapes
SHAPE_KINDS = ("dense", "dense_keep", "dense_tile", "forward", "patch", "naive", "monai")


def _monai_map(slide: str, model, batch_size: int, workers: int) -> int:
    """MONAI's bundle pipeline: MaskedPatchWSIDataset (its own Otsu mask at level 6, one 224 level-0
    patch per mask pixel, OpenSlide reader) -> the bundle's transforms -> batches -> the network ->
    the map. Returns the number of patches."""
    from monai.data import DataLoader as MonaiLoader, MaskedPatchWSIDataset
    from monai.transforms import CastToTyped, Compose, ScaleIntensityRanged, ToTensord

    transform = Compose([CastToTyped(keys="image", dtype=np.float32),
                         ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0),
                         ToTensord(keys="image")])
    ds = MaskedPatchWSIDataset([{"image": slide}], patch_size=224, patch_level=0, mask_level=6,
                               transform=transform, reader="OpenSlide")
    with open_slide(slide) as handle:
        w, h = handle.level_dimensions[6]
    prob = np.zeros((h, w))
    with torch.no_grad():
        loader = MonaiLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False,
                             multiprocessing_context="fork" if workers else None)  # as torch does on Linux
        for batch in loader:
            p = torch.sigmoid(model(batch["image"].as_tensor())).flatten().numpy()
            rows, cols = np.asarray(batch["image"].meta["mask_location"]).reshape(2, -1)
            prob[rows, cols] = p
    return len(ds)


def _shape_measure(kind: str, slide: str, checkpoint: str, out_dir: str, cfg: BenchConfig, queue) -> None:
    """In a fresh process: one way of computing the slide's map, timed inside (the parent times the
    whole process, interpreter start to outputs written)."""
    as_a_command()
    from camelyon.config import InferConfig
    from camelyon.infer import load_model, run, use_channels_last
    from camelyon.prepare import compute_tissue_mask
    from camelyon.tiling import SPARSE_MAX_SIDE, plan_sparse_tiles, plan_summary, plan_tiles, tile_side

    infer_cfg = InferConfig(slides=slide, checkpoint=checkpoint, output_dir=out_dir, num_workers=cfg.num_workers,
                            device=cfg.device, precision=cfg.precision,
                            mode="patch" if kind == "patch" else "dense", keep_freed_memory=kind == "dense_keep",
                            dense_engine="tile" if kind == "dense_tile" else "auto")
    t0 = time.perf_counter()
    result: dict = {"kind": kind}
    if kind in ("dense", "dense_keep", "dense_tile", "patch"):
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run(infer_cfg)[0]
        result.update(cells=summary["tissue_cells"], seconds=time.perf_counter() - t0)
    elif kind == "forward":  # the network alone, infer.py's engine, on random tiles shaped like the dense plan's
        from camelyon.infer import HALO, TileProbability, dense_engine_for, plan_dense_tiles, tile_outputs
        from common.amp import MixedPrecision

        tm = compute_tissue_mask(slide)
        device = torch.device(cfg.device if cfg.device != "auto" else "cpu")
        model, _ = load_model(checkpoint, device, use_channels_last(infer_cfg, device))
        engine = dense_engine_for(infer_cfg.dense_engine, device, model)
        tiles = plan_dense_tiles(tm.mask, engine, infer_cfg.tile_cells, infer_cfg.sparse_tile_tissue, 2)
        result.update(plan_summary(tm.mask, plan_tiles(tm.mask, infer_cfg.tile_cells)))  # the whole-tile engine's plan
        sparse_tiles = plan_sparse_tiles(tm.mask, SPARSE_MAX_SIDE, infer_cfg.sparse_tile_tissue)
        result.update(engine=engine, sparse_tiles=len(sparse_tiles),
                      sparse_px_per_tissue_px=sparse_work(model, tm.mask, sparse_tiles),
                      exact_bound_vs_patch=exact_bound_vs_patch(model, tm.mask))
        net = TileProbability(model, MixedPrecision(device, infer_cfg.precision), ["id"], infer_cfg.dense_engine)
        fmt = torch.channels_last if use_channels_last(infer_cfg, device) else torch.contiguous_format
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in sorted(tiles, key=lambda t: -t.rows * t.cols):
                x = torch.rand(1, 3, int(tile_side(t.rows, 2)), int(tile_side(t.cols, 2)), device=device)
                net(x.contiguous(memory_format=fmt), tile_outputs(t, tm.mask[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols], 2, HALO))
        result.update(cells=int(tm.mask.sum()), seconds=time.perf_counter() - t0)
    elif kind == "naive":  # one read_region + one forward per patch, on the first naive_cells cells
        from camelyon.infer import cell_top_left
        from common.augment import scale_intensity
        from common.wsi import read_rgb

        tm = compute_tissue_mask(slide)
        model, _ = load_model(checkpoint, torch.device("cpu"))
        cells = np.argwhere(tm.mask)
        sample = cells[:cfg.naive_cells]
        tops, lefts = cell_top_left(sample[:, 0], sample[:, 1], tm.ratio)
        handle = open_slide(slide)
        t1 = time.perf_counter()
        with torch.no_grad():
            for top, left in zip(tops, lefts):
                x = scale_intensity(torch.from_numpy(read_rgb(handle, left, top, 224, 224)).permute(2, 0, 1)[None].float())
                torch.sigmoid(model(x)).item()
        per_cell = (time.perf_counter() - t1) / len(sample)
        result.update(cells=len(cells), sampled=len(sample), per_cell_s=per_cell,
                      seconds=(t1 - t0) + per_cell * len(cells))
    elif kind == "monai":
        model, _ = load_model(checkpoint, torch.device("cpu"))
        result.update(cells=_monai_map(slide, model, infer_cfg.batch_size, cfg.num_workers),
                      seconds=time.perf_counter() - t0)
    result["peak_rss_mb"] = peak_rss_mb()
    queue.put(result)


def sparse_work(model, mask: np.ndarray, tiles) -> float:
    """The sparse engine's multiply-adds for the plan's tiles, as input pixels of the whole-tile
    forward (its multiply-adds per pixel) per tissue pixel: comparable with px read per tissue px."""
    from camelyon.infer import HALO, tile_outputs
    from camelyon.sparse import SparseResNet
    from camelyon.tiling import tile_side

    sparse = SparseResNet(model)
    macs = sum(sparse.multiply_adds(sparse.plan(tile_outputs(t, mask[t.r0:t.r0 + t.rows, t.c0:t.c0 + t.cols], 2, HALO),
                                                int(tile_side(t.rows, 2)), int(tile_side(t.cols, 2)))) for t in tiles)
    return macs / sparse.dense_multiply_adds_per_pixel() / (int(mask.sum()) * 64 ** 2)


def exact_bound_vs_patch(model, mask: np.ndarray) -> float:
    """How many times fewer multiply-adds than one 224 patch per tissue cell (patch mode, MONAI) any
    exact dense computation needs: every layer computed once, only where the slide's tissue cells
    need it (the whole slide one tile, the finest blocks)."""
    from camelyon.infer import HALO, tile_outputs
    from camelyon.sparse import SparseResNet
    from camelyon.tiling import Tile, tile_side

    finest = SparseResNet(model, block_px=32)
    rows, cols = mask.shape
    plan = finest.plan(tile_outputs(Tile(0, 0, rows, cols), mask, 2, HALO), int(tile_side(rows, 2)), int(tile_side(cols, 2)))
    patch = finest.dense_multiply_adds_per_pixel() * 224 ** 2 * int(mask.sum())
    return patch / finest.multiply_adds(plan)


def _shape_measure_or_report(*args) -> None:
    try:
        _shape_measure(*args)
    except Exception as err:
        args[-1].put(RuntimeError(f"{type(err).__name__}: {err}"))


def _shape_in_fresh_process(kind: str, slide: Path, checkpoint: Path, out_dir: Path, cfg: BenchConfig) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_shape_measure_or_report, args=(kind, str(slide), str(checkpoint), str(out_dir), cfg, queue))
    proc.start()
    result = _result_or_death(proc, queue)
    proc.join()
    if isinstance(result, BaseException):
        raise result
    process_s = time.perf_counter() - t0
    if kind == "naive":  # extrapolated: the sampled loop stands for all cells
        process_s += result["per_cell_s"] * (result["cells"] - result["sampled"])
    return {**result, "process_s": process_s, "cells_per_s": result["cells"] / process_s}


def monai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("monai") is not None  # a benchmark-only comparison, not a dependency


def tissue_shapes(cfg: BenchConfig) -> dict:
    """``--shapes``: whole slides of several tissue shapes (``camelyon.large_slide.shape_specs``),
    every way of computing the map in a fresh process, whole-process tissue cells/s."""
    from camelyon.large_slide import make_shape_slides

    slides = make_shape_slides()
    kinds = [k for k in SHAPE_KINDS if k != "monai" or monai_available()]
    if "monai" not in kinds:
        print("MONAI is not importable: its per-patch pipeline is left out (pip install monai to compare)")
    print(f"8,192^2 px slides, random bundle-layout weights, {cfg.num_workers} reader workers, device {cfg.device}; "
          f"whole process (interpreter start to outputs written) per run; naive extrapolated from "
          f"{cfg.naive_cells} cells; load average {os.getloadavg()[0]:.1f}")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="camelyon_bench_shapes_") as tmp:
        checkpoint = _random_bundle_checkpoint(Path(tmp) / "model.pt")
        for name, slide in slides.items():
            if cfg.shape_names and name not in cfg.shape_names:
                continue
            results[name] = {k: _shape_in_fresh_process(k, slide, checkpoint, Path(tmp) / f"{name}_{k}", cfg)
                             for k in (cfg.shape_kinds or kinds)}
            r = results[name]
            plan = r.get("forward", {})
            print(f"{name}: {r[next(iter(r))]['cells']} tissue cells"
                  + (f", whole-tile plan {plan['tiles']} tiles, tissue {plan['tissue_fraction_of_tile_cells']:.0%} of "
                     f"tile cells, {plan['pixels_per_tissue_pixel']:.2f} px read per tissue px; sparse plan "
                     f"{plan['sparse_tiles']} tiles, computing {plan['sparse_px_per_tissue_px']:.2f} px-equivalents per "
                     f"tissue px (forward runs the {plan['engine']} engine); an exact dense computation "
                     f"needs at least {plan['exact_bound_vs_patch']:.1f}x fewer multiply-adds than patch mode"
                     if plan else ""))
            for k, m in r.items():
                print(f"  {k:>10}: {m['cells_per_s']:7.1f} tissue cells/s  ({m['process_s']:6.1f} s whole process, "
                      f"peak RSS {m['peak_rss_mb']:.0f} MB)")
            for base in ("monai", "naive", "patch", "forward"):
                if base in r and "dense" in r:
                    line = ", ".join(f"{k} {r[base]['process_s'] / r[k]['process_s']:.2f}x"
                                     for k in ("dense", "dense_keep", "dense_tile") if k in r)
                    print(f"  speed-up over {base}: {line}")
    print(json.dumps(results))
    return results


# ============================================================================= --stain
AUGMENTS = ("none", "hed")
CENTRES = ("original", "shifted")
NORMALIZATIONS = ("none", "macenko")
#: --stain: Macenko's target is fitted on the 768-px regions of this many training-list centres (original centre)
TARGET_REGIONS = 8


def in_fresh_process(fn, *args):
    """``fn(*args)``'s result, computed in a new interpreter (spawn) that behaves as a command does
    (:func:`as_a_command`): each training and evaluation starts with its own memory and threads."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call_and_report, args=(fn, args, queue))
    proc.start()
    result = _result_or_death(proc, queue)
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _call_and_report(fn, args, queue) -> None:
    as_a_command()
    try:
        queue.put(fn(*args))
    except Exception as err:
        queue.put(RuntimeError(f"{type(err).__name__}: {err}"))


def _train_demo_model(overrides: dict) -> dict:
    """camelyon/train.py's main on the demo preset with ``overrides``; its result and wall seconds."""
    from camelyon.config import TrainConfig
    from camelyon.train import main as train_main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_main(TrainConfig(**{**TrainConfig.demo_preset(), **overrides}))
    return {"best_val_acc": result["best_val_acc"], "seconds": time.perf_counter() - t0}


def _evaluate_cell(checkpoint: str, centre: dict, normalize: str, targets: list[str], out_dir: str,
                   cfg: BenchConfig) -> dict:
    """One cell of the table: patch accuracy on the centre's val patches (camelyon/eval.py
    --patch-list) and FROC on its test slides (camelyon/infer.py, dense, then camelyon/eval.py),
    both with ``--stain-normalize normalize --stain-target targets`` (nothing when none)."""
    from camelyon.config import EvalConfig, InferConfig
    from camelyon.eval import evaluate_froc, evaluate_patches
    from camelyon.infer import run as run_inference

    stain = dict(stain_normalize=normalize, stain_target=targets if normalize != "none" else [])
    common = dict(checkpoint=checkpoint, num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision)
    t0 = time.perf_counter()
    patches = evaluate_patches(EvalConfig(patch_list=centre["val_list"], image_dir=centre["val_images"],
                                          batch_size=8, max_regions=cfg.stain_val_regions, **common, **stain))
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        for slide in centre["test_slides"]:
            run_inference(InferConfig(slides=slide, output_dir=out_dir, mode="dense", stain_fit=cfg.stain_fit,
                                      **common, **stain))
        froc = evaluate_froc(EvalConfig(detections=out_dir, ground_truth=centre["test_masks"], output_dir=out_dir))
    return {"patch_acc": patches["acc"], "patches": patches["patches"], "froc": froc["froc"],
            "slide_auc": froc["slide_auc"], **tissue_cell_scores(out_dir, centre["test_masks"]),
            "patch_s": t1 - t0, "froc_s": time.perf_counter() - t1}


def tissue_cell_scores(infer_dir: str, gt_dir: str) -> dict:
    """How well the maps in ``infer_dir`` tell tumour from normal tissue, cell by cell (the demo's
    FROC, seven lesions on four slides, saturates while the maps fade): over the tissue cells of
    every slide (infer.py's cached tissue masks), a cell is tumour when its pixel of the level-6
    ground-truth mask is (the grid is level 6 on the demo's 0.243 µm/px slides); the map's AUC over
    those cells, the tumour cells above 0.5 (recall) and the normal ones above 0.5 (FP rate)."""
    from camelyon.eval import read_mask_values
    from camelyon.infer import MASKS
    from common.metrics.classification import roc_auc

    labels, scores = [], []
    for npy in sorted(Path(infer_dir).glob("*.npy")):
        prob = np.load(npy)
        with np.load(Path(infer_dir) / MASKS / f"{npy.stem}.npz") as cached:
            tissue = cached["mask"]
        tumour = np.zeros(prob.shape, bool)
        mask = Path(gt_dir) / f"{npy.stem}.tif"
        if mask.is_file():
            values = read_mask_values(mask, 6)[:prob.shape[0], :prob.shape[1]]
            tumour[:values.shape[0], :values.shape[1]] = values > 0
        labels.append(tumour[tissue])
        scores.append(prob[tissue])
    y, p = np.concatenate(labels), np.concatenate(scores)
    return {"cell_auc": roc_auc(y, p), "cell_recall": float((p[y] > 0.5).mean()),
            "cell_fp_rate": float((p[~y] > 0.5).mean()), "tumour_cells": int(y.sum()), "normal_cells": int((~y).sum())}


def write_stain_targets(records, folder: Path, n: int = TARGET_REGIONS) -> list[str]:
    """PNGs of ``n`` 768-px training regions spread evenly over the (original centre's) training
    list, each at least half tissue (regions at the tissue's edge are passed over): the files
    ``--stain-target`` fits Macenko's target on, together."""
    from PIL import Image

    from camelyon.dataset import RegionDataset
    from common.stain import background_mask

    folder.mkdir(parents=True, exist_ok=True)
    ds = RegionDataset(records)
    paths = []
    for i in np.linspace(0, len(ds) - 1, 4 * n).round().astype(int):
        region = ds[i][0]
        if len(paths) == n or float(background_mask(region).float().mean()) > 0.5:
            continue
        path = folder / f"target_{len(paths)}_{Path(records[i].slide).stem}_{records[i].x}_{records[i].y}.png"
        Image.fromarray(region.permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    return paths


def _centre(layout, n_slides: int) -> dict:
    slides = [layout.slide_path(name) for name in layout.test_slides]
    return {"val_list": str(layout.root / "validation.csv"), "val_images": str(layout.train_images),
            "test_slides": [str(p) for p in (slides[:n_slides] if n_slides else slides)],
            "test_masks": str(layout.test_masks)}


def stain_robustness(cfg: BenchConfig) -> dict:
    """``--stain``: the demo model trained with and without ``--stain-augment hed`` (in fresh
    processes, the demo preset), each evaluated on the demo's val and test slides and on the same
    slides re-stained as a second centre (``camelyon/second_centre.py``), with and without Macenko
    normalisation to a target fitted on original-centre training regions: patch accuracy and FROC."""
    from camelyon.config import TrainConfig
    from camelyon.dataset import read_patch_list
    from camelyon.demo import prepare_demo
    from camelyon.second_centre import StainShift, make_second_centre

    t_start = time.perf_counter()
    preset = TrainConfig(**TrainConfig.demo_preset())
    demo = prepare_demo(preset)  # the demo slides and their patch lists, built once
    shift = StainShift()
    shifted = make_second_centre(demo, shift=shift)
    print(f"second centre in {shifted.root} ({'generated in %.0fs' % shifted.seconds if shifted.generated else 'cached'}): "
          f"{shift}; stain vectors turned {shift.vector_angles()[0]:.0f} and {shift.vector_angles()[1]:.0f} degrees")
    out = Path(cfg.stain_output)  # run again: finished trainings resume as done, finished slides are skipped
    targets = write_stain_targets(read_patch_list(preset.train_list, preset.image_dir), out / "stain_target")
    centres = {"original": _centre(demo, cfg.stain_test_slides), "shifted": _centre(shifted, cfg.stain_test_slides)}
    training = {k: v for k, v in dict(epochs=cfg.stain_epochs, max_steps_per_epoch=cfg.stain_steps,
                                      max_val_regions=cfg.stain_val_regions).items() if v}
    print(f"outputs in {out}; training {training or 'as the demo preset'}; device {cfg.device}, "
          f"{cfg.num_workers} reader workers; load average {os.getloadavg()[0]:.1f}", flush=True)
    models, cells = {}, {}
    for augment in AUGMENTS:
        run_dir = out / f"train_{augment}"
        models[augment] = in_fresh_process(_train_demo_model, {"output_dir": str(run_dir), "stain_augment": augment,
                                                               "num_workers": cfg.num_workers, **training})
        print(f"trained --stain-augment {augment}: best val acc {models[augment]['best_val_acc']:.4f} "
              f"[{models[augment]['seconds']:.0f}s]", flush=True)
        for centre in CENTRES:
            for normalize in NORMALIZATIONS:
                key = (augment, centre, normalize)
                cells[key] = in_fresh_process(_evaluate_cell, str(run_dir / "best.pt"), centres[centre], normalize,
                                              targets, str(out / f"infer_{augment}_{centre}_{normalize}"), cfg)
                print(f"  {centre:>8} slides, normalise {normalize:>7}: patch acc {cells[key]['patch_acc']:.4f}, "
                      f"FROC {cells[key]['froc']:.4f} [{cells[key]['patch_s']:.0f}s + {cells[key]['froc_s']:.0f}s]",
                      flush=True)
    seconds = time.perf_counter() - t_start
    table = stain_table(cells)
    print(table)
    print(f"bench wall time {seconds:.0f} s")
    summary = {"output": str(out), "shift": dataclasses.asdict(shift), "training": training, "models": models,
               "cells": {"/".join(k): v for k, v in cells.items()}, "seconds": seconds, "table": table}
    atomic_write_text(out / "stain_bench.json", json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


TABLE_METRICS = {"patch_acc": "val patch accuracy", "froc": "test FROC", "cell_auc": "test tissue-cell AUC",
                 "cell_recall": "test tumour cells > 0.5", "cell_fp_rate": "test normal cells > 0.5"}


def stain_table(cells: dict) -> str:
    """Markdown: one row per (metric, training), one column per (centre, normalisation)."""
    columns = [(c, n) for c in CENTRES for n in NORMALIZATIONS]
    head = " | ".join(f"{c}{' + ' + n if n != 'none' else ''}" for c, n in columns)
    lines = [f"| metric | training | {head} |", "|---" * (2 + len(columns)) + "|"]
    for key, metric in TABLE_METRICS.items():
        for augment in AUGMENTS:
            values = [f"{cells[(augment, c, n)][key]:.3f}" for c, n in columns]
            lines.append(f"| {metric} | --stain-augment {augment} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(cfg: BenchConfig) -> dict:
    if cfg.large:
        return large_vs_small(cfg)
    if cfg.shapes:
        return tissue_shapes(cfg)
    if cfg.stain:
        return stain_robustness(cfg)
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
