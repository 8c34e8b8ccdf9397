"""Benchmark volume inference at the bundle's settings (prints numbers; not a test).

    python spleen/bench.py                                   # the real CT fixture (resampled) and 512 x 512 x 200
    python spleen/bench.py --shapes fixture --checkpoint runs/spleen/best.pt
    python spleen/bench.py --shapes 341x341x250 --device cuda --precision fp16

For every volume, in one run and each in a fresh process (so peak memory is the method's own
and one method's heap does not speed up the next), at roi 96^3, 4 windows per batch, overlap 0.5,
constant blending:

- ``sliding window``: ``spleen.model.predict_logits`` on the plain model (the bundle's computation;
  bit-identical to MONAI's);
- ``sliding window, infer.py``: the same with channels-last-3d weights and folded BatchNorm
  (infer.py's defaults);
- ``MONAI``: ``monai.inferers.sliding_window_inference`` (when MONAI is importable; a benchmark
  comparison, not a dependency);
- ``naive``: one window at a time, no batching, written plainly;
- ``whole volume``: the UNet on the whole padded volume at once (infer.py ``--prediction
  whole_volume``).

Each line: seconds (after a warm-up on one window), speed relative to the sliding window, peak
memory above the loaded model and input (CPU: peak RSS; CUDA: allocator peak) and agreement with the sliding window (largest logit difference,
fraction of voxels with the same argmax, Dice between the two foregrounds). The allocator
setting (``--keep-freed-memory``, common/memory.py) applies to every method alike.
"""
from __future__ import annotations

import importlib
import itertools
import json
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.amp import MixedPrecision
from common.config import parse_config
from common.dist import resolve_device
from common.errors import exit_on_user_error
from common.io import atomic_write_text
from common.memory import keep_freed_memory
from common.sliding_window import window_count
from spleen.config import BenchConfig, parse_shape
from spleen.model import build_model, load_unet_weights, predict_logits, prepare_for_inference
from spleen.transforms import preprocess_image, read_volume

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ct" / "totalsegmentator" / "example_ct.nii.gz"
METHODS = ("sliding window", "sliding window, infer.py", "MONAI", "naive", "whole volume")


@torch.no_grad()
def naive_sliding_window(model, x: torch.Tensor, roi, overlap: float, autocast) -> torch.Tensor:
    """Reference written plainly: pad to the window, step by int(roi * (1 - overlap)) with the last
    window flush with the border, run each window alone, average the overlaps, crop the padding."""
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(x.shape[2:], roi)]
    xp = F.pad(x, [p for pair in reversed(pads) for p in pair])
    size = xp.shape[2:]
    starts = []
    for s, r in zip(size, roi):
        step = r if r == s else max(int(r * (1 - overlap)), 1)
        axis = list(range(0, s - r, step)) + [s - r]
        starts.append(sorted(set(axis)))
    out = torch.zeros(1, 2, *size, device=x.device)
    count = torch.zeros(1, 1, *size, device=x.device)
    for corner in itertools.product(*starts):
        sl = (slice(None), slice(None), *(slice(a, a + r) for a, r in zip(corner, roi)))
        with autocast():
            out[sl] += model(xp[sl]).float()
        count[sl] += 1
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, x.shape[2:]))
    return (out / count)[(slice(None), slice(None), *crop)]


def monai_available() -> bool:
    try:
        importlib.import_module("monai.inferers")
    except Exception:  # not installed, or an install that does not import with this torch
        return False
    return True


def bench_volume(cfg: BenchConfig, shape: str) -> torch.Tensor:
    """The preprocessed (1, 1, X, Y, Z) input: the fixture CT resampled as infer.py does, or noise."""
    size = parse_shape(shape)
    if size is None:
        path = Path(cfg.fixture) if cfg.fixture else FIXTURE
        data, affine, _ = read_volume(path)
        image, _ = preprocess_image(data, affine, (1.5, 1.5, 2.0), (-57.0, 164.0))
        return image[None, None].float().contiguous()
    torch.manual_seed(cfg.seed)
    return torch.rand(1, 1, *size)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def measure(cfg: BenchConfig, shape: str, method: str, out_path: str) -> dict:
    """Run one method in this (fresh) process; save its logits to ``out_path``; return the numbers."""
    device = resolve_device(cfg.device)
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    amp = MixedPrecision(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = build_model()
    if cfg.checkpoint:
        load_unet_weights(model, cfg.checkpoint)
    fast = method in ("sliding window, infer.py", "whole volume")
    model = prepare_for_inference(model, cfg.channels_last and fast, cfg.fold_batchnorm and fast).to(device)
    x = bench_volume(cfg, shape).to(device)
    roi = tuple(cfg.roi_size)
    if method == "MONAI":
        importlib.import_module("monai.inferers")  # its import is not part of its memory
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()  # peak memory counts from here: model and input loaded, nothing run
    run = {
        "sliding window": lambda: predict_logits(model, x, roi, cfg.sw_batch_size, cfg.sw_overlap, cfg.sw_mode,
                                                 autocast=amp.autocast),
        "sliding window, infer.py": lambda: predict_logits(model, x, roi, cfg.sw_batch_size, cfg.sw_overlap,
                                                           cfg.sw_mode, autocast=amp.autocast,
                                                           channels_last=cfg.channels_last),
        "MONAI": lambda: _monai(model, x, roi, cfg, amp),
        "naive": lambda: naive_sliding_window(model, x, roi, cfg.sw_overlap, amp.autocast),
        "whole volume": lambda: predict_logits(model, x, roi, autocast=amp.autocast, channels_last=cfg.channels_last,
                                               prediction="whole_volume", block_size=cfg.block_size, halo=cfg.halo),
    }[method]
    volume = x
    x = torch.rand(1, 1, *roi, device=device)
    with torch.no_grad():  # warm-up on one window: kernels, allocator, lazy imports
        run()
    x = volume
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    np.save(out_path, logits.float().cpu().numpy())
    return {"method": method, "seconds": seconds, "peak_mib": max(peak, 0) / 2**20}


def _monai(model, x, roi, cfg: BenchConfig, amp):
    from monai.inferers import sliding_window_inference

    def predictor(w):
        with amp.autocast():
            return model(w)

    return torch.as_tensor(sliding_window_inference(x, roi, cfg.sw_batch_size, predictor, overlap=cfg.sw_overlap,
                                                    mode=cfg.sw_mode))


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """Largest logit difference, argmax voxel agreement and foreground Dice between two logit volumes."""
    a, b = reference.argmax(1), other.argmax(1)
    fa, fb = a == 1, b == 1
    both = int(fa.sum()) + int(fb.sum())
    return {"max_abs_diff": float(np.abs(reference - other).max()), "voxel_agreement": float((a == b).mean()),
            "dice": 2.0 * int((fa & fb).sum()) / both if both else 1.0}


def methods(cfg: BenchConfig) -> list[str]:
    chosen = [m for m in METHODS if (m != "naive" or cfg.naive) and (m != "MONAI" or cfg.monai)]
    if "MONAI" in chosen and not monai_available():
        print("MONAI is not importable here: its sliding window is left out (pip install monai to compare)")
        chosen.remove("MONAI")
    return chosen


def bench_shape(cfg: BenchConfig, shape: str, pool_context) -> list[dict]:
    x = bench_volume(cfg, shape)
    n = window_count(tuple(x.shape[2:]), tuple(cfg.roi_size), cfg.sw_overlap)
    print(f"\n{shape}: preprocessed volume {tuple(x.shape[2:])}, roi {tuple(cfg.roi_size)}, overlap {cfg.sw_overlap}, "
          f"{n} windows, {cfg.sw_batch_size} per batch, {cfg.sw_mode} blending, "
          f"keep_freed_memory {cfg.keep_freed_memory}", flush=True)
    del x
    rows = []
    with tempfile.TemporaryDirectory(prefix="spleen_bench_") as tmp:
        for method in methods(cfg):
            path = str(Path(tmp) / f"{len(rows)}.npy")
            with ProcessPoolExecutor(max_workers=1, mp_context=pool_context) as pool:  # fresh process per method
                row = pool.submit(measure, cfg, shape, method, path).result()
            row["logits"] = path
            rows.append(row)
            print(f"  {method:<26s} {row['seconds']:7.2f} s   peak {row['peak_mib']:7.0f} MiB", flush=True)
        reference = np.load(rows[0]["logits"])
        for row in rows:
            row.update(agreement(reference, np.load(row.pop("logits"))), speedup=rows[0]["seconds"] / row["seconds"])
    print(f"  {'method':<26s} {'seconds':>8s} {'speed':>7s} {'peak MiB':>9s} {'max|dlogit|':>12s} "
          f"{'argmax agree':>13s} {'Dice vs SW':>11s}")
    for row in rows:
        print(f"  {row['method']:<26s} {row['seconds']:8.2f} {row['speedup']:6.2f}x {row['peak_mib']:9.0f} "
              f"{row['max_abs_diff']:12.2e} {row['voxel_agreement']:13.6f} {row['dice']:11.4f}")
    return rows


def main(cfg: BenchConfig) -> dict:
    print(f"device {resolve_device(cfg.device)}, threads {torch.get_num_threads()}, precision {cfg.precision}, "
          f"weights {cfg.checkpoint or 'random (seed %d)' % cfg.seed}")
    context = multiprocessing.get_context("spawn")
    results = {shape: bench_shape(cfg, shape, context) for shape in cfg.shapes}
    if cfg.output_dir:
        atomic_write_text(Path(cfg.output_dir) / "bench.json", json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(BenchConfig))
