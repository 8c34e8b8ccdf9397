"""Benchmark sliding-window inference at the bundle's settings (prints numbers; not a test).

    python spleen/bench.py                                  # 512 x 512 x 100, roi 96, 4 windows/batch, overlap 0.5
    python spleen/bench.py --shape 341 341 250 --device cuda --precision fp16

Times ``common.sliding_window`` (batched windows, one output buffer, blended logits) and, in the
same run, a naive reference that evaluates one window at a time with no batching; reports peak
memory of each (CUDA: allocator peak; CPU: resident-set peak above the start, sampled) and the
largest difference between the two outputs.
"""
from __future__ import annotations

import itertools
import os
import threading
import time

import torch
import torch.nn.functional as F

from common.amp import MixedPrecision
from common.config import parse_config
from common.dist import resolve_device
from common.sliding_window import window_count
from common.errors import exit_on_user_error
from spleen.config import BenchConfig
from spleen.model import build_model, load_unet_weights, predict_logits


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the sampled peak RSS above the start (CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - base)
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()


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


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return result, time.perf_counter() - t0, mem.peak


def main(cfg: BenchConfig) -> dict:
    device = resolve_device(cfg.device)
    amp = MixedPrecision(device, cfg.precision)
    model = build_model()
    if cfg.checkpoint:
        load_unet_weights(model, cfg.checkpoint)
    model = model.to(device).eval()
    torch.manual_seed(cfg.seed)
    x = torch.rand(1, 1, *cfg.shape, device=device)
    roi = tuple(cfg.roi_size)
    n = window_count(cfg.shape, roi, cfg.sw_overlap)
    print(f"volume {tuple(cfg.shape)}, roi {roi}, overlap {cfg.sw_overlap}, {n} windows, batch {cfg.sw_batch_size}, "
          f"{cfg.sw_mode} blending, device {device}, {amp.dtype}, threads {torch.get_num_threads()}", flush=True)
    with torch.no_grad(), amp.autocast():
        model(torch.rand(1, 1, *roi, device=device))  # warm-up (allocator, kernels)
    batched, t_sw, mem_sw = timed(lambda: predict_logits(model, x, roi, cfg.sw_batch_size, cfg.sw_overlap, cfg.sw_mode,
                                                         autocast=amp.autocast, progress=True), device)
    print(f"sliding window (batched): {t_sw:.1f} s, {n / t_sw:.2f} windows/s, peak memory {mem_sw / 2**20:.0f} MiB "
          f"(input {x.numel() * 4 / 2**20:.0f} MiB, output {batched.numel() * 4 / 2**20:.0f} MiB)", flush=True)
    result = {"windows": n, "seconds": t_sw, "peak_mib": mem_sw / 2**20}
    if cfg.naive:
        naive, t_naive, mem_naive = timed(lambda: naive_sliding_window(model, x, roi, cfg.sw_overlap, amp.autocast),
                                          device)
        diff = float((naive - batched).abs().max()) if cfg.sw_mode == "constant" else float("nan")
        print(f"naive (one window at a time): {t_naive:.1f} s, {n / t_naive:.2f} windows/s, peak memory "
              f"{mem_naive / 2**20:.0f} MiB; speed-up {t_naive / t_sw:.2f}x; max |difference| {diff:.2e}", flush=True)
        result.update(naive_seconds=t_naive, naive_peak_mib=mem_naive / 2**20, max_difference=diff)
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(BenchConfig))
