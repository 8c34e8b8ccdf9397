"""Batch augmentation on the training device: per-sample random parameters drawn from an explicit
``torch.Generator`` (reproducible from a seed, independent of the global RNG and of the device),
applied with kornia / torch ops to whole batches.

Every random op is split into ``sample_*`` (parameters for a batch, on the CPU generator) and
``apply_*`` (pure function of tensor + parameters), so the same geometric parameters can be
replayed on an image and its masks (``mode="nearest"`` for labels). Each task assembles its
recipe from these blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import kornia
import numpy as np
import torch
import torch.nn.functional as F


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers, e.g. ``make_generator(seed, rank, step)``: distinct
    streams per process and step, and a resumed run draws exactly the same parameters. Keys are
    taken mod 2**32; their number is mixed in too, since SeedSequence zero-pads short entropy
    (without it ``(s, 0, 0)``, ``(s, 0)`` and ``(s,)`` would give the same stream)."""
    entropy = [len(keys)] + [int(k) & 0xFFFFFFFF for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def sample_flags(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """(n,) bool: which samples an op with probability ``p`` applies to."""
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


# ----------------------------------------------------------------------------- geometry
def apply_flip(x: torch.Tensor, flags: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Flip the flagged samples of (B, C, H, W) along ``dims`` (default both: a 180° rotation)."""
    flags = flags.to(x.device)
    return torch.where(flags.view(-1, *[1] * (x.ndim - 1)), x.flip(dims), x)


def sample_rot90(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """(n,) int64 quarter turns: 0 with probability 1-p, else uniform in {1, 2, 3}."""
    apply = sample_flags(n, p, gen)
    k = torch.randint(1, 4, (n,), generator=gen)
    return torch.where(apply, k, torch.zeros_like(k))


def apply_rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each sample of (B, C, H, W) by k[b] quarter turns in the (H, W) plane."""
    if x.shape[-1] != x.shape[-2] and bool((k % 2 == 1).any()):
        raise ValueError(f"rot90 by an odd k needs square images, got {tuple(x.shape[-2:])}")
    out = x.clone()
    for turns in (1, 2, 3):
        idx = (k == turns).nonzero().flatten().to(x.device)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], turns, dims=(-2, -1))
    return out


def sample_zoom(n: int, p: float, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """(n,) zoom factors: 1.0 where not applied, else uniform in [lo, hi] (one factor per sample)."""
    apply = sample_flags(n, p, gen)
    z = _uniform(n, lo, hi, gen)
    return torch.where(apply, z, torch.ones_like(z))


def apply_zoom(x: torch.Tensor, zoom: torch.Tensor, mode: str = "area", padding_mode: str = "replicate") -> torch.Tensor:
    """MONAI ``RandZoom(keep_size=True)`` per sample: resize (H, W) to floor(size * z), then pad
    symmetrically (edge replicate by default; floor(diff/2) before) or centre-crop back to (H, W)
    (start size//2 - H//2, as MONAI: floor(diff/2) when H is even). Samples are grouped by output
    size (few launches)."""
    H, W = x.shape[-2:]
    sizes = [(int(np.floor(H * z)), int(np.floor(W * z))) for z in zoom.tolist()]
    out = x.clone()
    for size in sorted(set(sizes)):
        if size == (H, W):
            continue
        idx = torch.tensor([i for i, s in enumerate(sizes) if s == size], device=x.device)
        src = x[idx]
        resized = F.interpolate(src.float(), size=size, mode=mode).to(x.dtype)
        out[idx] = _pad_or_crop(resized, (H, W), padding_mode)
    return out


def _pad_or_crop(x: torch.Tensor, size: tuple[int, int], padding_mode: str) -> torch.Tensor:
    (H, W), (h, w) = size, x.shape[-2:]
    if h < H or w < W:
        dh, dw = max(H - h, 0), max(W - w, 0)
        x = F.pad(x.float(), (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode=padding_mode).to(x.dtype)
        h, w = x.shape[-2:]
    # MONAI CenterSpatialCrop: start = size // 2 - target // 2, i.e. floor(diff / 2) for an even
    # target and ceil(diff / 2) for an odd target taken from an even size.
    top, left = h // 2 - H // 2, w // 2 - W // 2
    return x[..., top:top + H, left:left + W]


def sample_crop(n: int, in_size: tuple[int, int], out_size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """(n, 2) top-left corners of uniformly placed ``out_size`` crops inside ``in_size``."""
    (H, W), (h, w) = in_size, out_size
    if h > H or w > W:
        raise ValueError(f"crop {out_size} is larger than the image {in_size}")
    top = torch.randint(0, H - h + 1, (n,), generator=gen)
    left = torch.randint(0, W - w + 1, (n,), generator=gen)
    return torch.stack([top, left], 1)


def apply_crop(x: torch.Tensor, corners: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    h, w = out_size
    return torch.stack([x[b, ..., t:t + h, l:l + w] for b, (t, l) in enumerate(corners.tolist())])


# ----------------------------------------------------------------------------- colour
@dataclass
class ColorJitterParams:
    brightness: torch.Tensor  # (B,) factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # (B,) in [-0.5, 0.5] of a full turn
    order: torch.Tensor  # (B, 4) permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)


def sample_color_jitter(n: int, brightness: float, contrast: float, saturation: float, hue: float,
                        gen: torch.Generator) -> ColorJitterParams:
    """torchvision ``ColorJitter`` parameters per sample: factors in [1-x, 1+x] (hue in [-h, h])
    and a random order of the four ops, drawn for every sample."""
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)]) if n else torch.zeros(0, 4, dtype=torch.long)
    return ColorJitterParams(
        brightness=_uniform(n, max(0.0, 1 - brightness), 1 + brightness, gen),
        contrast=_uniform(n, max(0.0, 1 - contrast), 1 + contrast, gen),
        saturation=_uniform(n, max(0.0, 1 - saturation), 1 + saturation, gen),
        hue=_uniform(n, -hue, hue, gen),
        order=order)


def _grayscale(x: torch.Tensor, uint8: bool) -> torch.Tensor:
    gray = 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return gray.floor() if uint8 else gray


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor, bound: float, uint8: bool) -> torch.Tensor:
    # As torchvision: both weights are formed in double (1.0 - ratio), then rounded to the image
    # dtype; forming 1 - ratio in float32 is off by an ulp often enough to flip the uint8 floor.
    ratio = ratio.to(torch.float64).view(-1, 1, 1, 1)  # on the parameters' device (CPU)
    w_a, w_b = ratio.to(a.dtype).to(a.device), (1 - ratio).to(a.dtype).to(a.device)
    out = (w_a * a + w_b * b).clamp(0, bound)
    return out.floor() if uint8 else out


def _adjust(x: torch.Tensor, op: int, factor: torch.Tensor, bound: float, uint8: bool) -> torch.Tensor:
    if op == 0:  # brightness: blend with black
        return _blend(x, torch.zeros_like(x), factor, bound, uint8)
    if op == 1:  # contrast: blend with the mean grey level
        mean = _grayscale(x, uint8).mean(dim=(-3, -2, -1), keepdim=True)
        return _blend(x, mean, factor, bound, uint8)
    if op == 2:  # saturation: blend with the grey image
        return _blend(x, _grayscale(x, uint8), factor, bound, uint8)
    # hue: rotate in HSV (kornia works in radians on [0, 1] images)
    shifted = kornia.enhance.adjust_hue(x / bound, factor.to(device=x.device, dtype=x.dtype) * 2 * np.pi) * bound
    if uint8:  # torchvision converts float -> uint8 as floor(v * 255.999)
        return (shifted / bound * (bound + 1 - 1e-3)).floor().clamp(0, bound)
    return shifted.clamp(0, bound)


def apply_color_jitter(x: torch.Tensor, params: ColorJitterParams, bound: float = 255.0,
                       uint8_semantics: bool = True) -> torch.Tensor:
    """Apply per-sample colour jitter to float RGB (B, 3, H, W) in [0, bound].

    With ``uint8_semantics`` every op truncates to integers as torchvision does on uint8 tensors
    (the MONAI bundle jitters uint8 patches), so values match torchvision exactly for brightness,
    contrast and saturation and to rounding for hue."""
    factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue], 1)  # (B, 4)
    out = x
    for position in range(4):
        ops = params.order[:, position]
        new = out.clone()
        for op in range(4):
            idx = (ops == op).nonzero().flatten()
            if idx.numel():
                new[idx.to(x.device)] = _adjust(out[idx.to(x.device)], op, factors[idx, op], bound, uint8_semantics)
        out = new
    return out


def scale_intensity(x: torch.Tensor, in_min: float = 0.0, in_max: float = 255.0,
                    out_min: float = -1.0, out_max: float = 1.0) -> torch.Tensor:
    """Linear map [in_min, in_max] -> [out_min, out_max], no clipping (MONAI ScaleIntensityRange)."""
    return (x - in_min) / (in_max - in_min) * (out_max - out_min) + out_min


def scale_intensity_(x: torch.Tensor, in_min: float = 0.0, in_max: float = 255.0,
                     out_min: float = -1.0, out_max: float = 1.0) -> torch.Tensor:
    """:func:`scale_intensity` in place (the same operations in the same order: equal bit for bit),
    for large tiles, where each temporary of the out-of-place formula is a copy of the tile."""
    return x.sub_(in_min).div_(in_max - in_min).mul_(out_max - out_min).add_(out_min)


# ----------------------------------------------------------------------------- resized crop
def sample_resized_crop(n: int, h: int, w: int, scale, gen: torch.Generator, ratio=(3 / 4, 4 / 3),
                        attempts: int = 10) -> torch.Tensor:
    """(n, 4) float64 boxes x0, y0, x1, y1 (pixels, inclusive) drawn as torchvision
    ``RandomResizedCrop.get_params`` on an (h, w) image.

    Up to ``attempts`` (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``) draws,
    the first whose rounded size fits is kept and placed uniformly; when none fits, the centre crop
    of the whole image clipped to ``ratio`` (torchvision's fallback). All attempts are drawn for
    every sample at once (a different random stream from torchvision, the same distribution)."""
    u_area = torch.rand(n, attempts, generator=gen, dtype=torch.float64)
    u_ratio = torch.rand(n, attempts, generator=gen, dtype=torch.float64)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u_area)  # (n, attempts)
    log_lo, log_hi = float(np.log(ratio[0])), float(np.log(ratio[1]))
    aspect = (log_lo + (log_hi - log_lo) * u_ratio).exp()
    cw, ch = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # half to even, as Python round
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.int64).argmax(1, keepdim=True)  # index of the first fitting attempt
    found = fits.any(1)
    fb_w, fb_h = _centre_fallback(h, w, ratio)
    cw = torch.where(found, cw.gather(1, first)[:, 0], torch.tensor(float(fb_w), dtype=torch.float64))
    ch = torch.where(found, ch.gather(1, first)[:, 0], torch.tensor(float(fb_h), dtype=torch.float64))
    y0 = ((h - ch + 1) * torch.rand(n, generator=gen, dtype=torch.float64)).floor()
    x0 = ((w - cw + 1) * torch.rand(n, generator=gen, dtype=torch.float64)).floor()
    y0 = torch.where(found, y0, (h - ch) // 2)
    x0 = torch.where(found, x0, (w - cw) // 2)
    return torch.stack([x0, y0, x0 + cw - 1, y0 + ch - 1], 1)


def _centre_fallback(h: int, w: int, ratio) -> tuple[int, int]:
    """torchvision's (width, height) when no attempt fits: the whole image, cut to the ratio range."""
    in_ratio = w / h
    if in_ratio < min(ratio):
        return w, int(round(w / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(h * max(ratio))), h
    return w, h


def apply_resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Cut each sample of (B, C, H, W) to its box (x0, y0, x1, y1 inclusive, from
    :func:`sample_resized_crop`) and resize it to (size, size) with antialiasing: torchvision
    ``resized_crop(..., antialias=True)`` on float tensors. Integer input gives float32 output.
    No clamping (bicubic may overshoot the input range)."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"apply_resized_crop: mode must be 'bilinear' or 'bicubic', got {mode!r}")
    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"apply_resized_crop: boxes {tuple(boxes.shape)} do not match the batch of {x.shape[0]}")
    H, W = x.shape[-2:]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=dtype, device=x.device)
    for b, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        if not (0 <= x0 <= x1 < W and 0 <= y0 <= y1 < H):
            raise ValueError(f"apply_resized_crop: box {(x0, y0, x1, y1)} of sample {b} is outside the {W}x{H} image")
        crop = x[b:b + 1, :, y0:y1 + 1, x0:x1 + 1].to(dtype)  # (1, C, h, w)
        out[b] = F.interpolate(crop, size=(size, size), mode=mode, align_corners=False, antialias=True)[0]
    return out


# ----------------------------------------------------------------------------- blur, grey, solarize
def blur_kernel_size(max_sigma: float) -> int:
    """Odd kernel covering +-3 sigma (PIL's GaussianBlur support is ~3 sigma too)."""
    return 2 * int(np.ceil(3 * max_sigma)) + 1


def apply_blur(x: torch.Tensor, flags: torch.Tensor, sigma: torch.Tensor, kernel_size: int | None = None,
               border_type: str = "reflect") -> torch.Tensor:
    """Gaussian blur with a per-sample sigma on the flagged samples of float (B, C, H, W).

    ``kernel_size`` (odd taps) defaults to :func:`blur_kernel_size` of the largest flagged sigma;
    SimCLR passes its fixed kernel with ``border_type="constant"`` (its Conv2d zero-pads)."""
    idx = flags.nonzero().flatten()
    if not idx.numel():
        return x
    s = sigma[idx].to(device=x.device, dtype=x.dtype)
    k = kernel_size or blur_kernel_size(float(sigma[idx].max()))
    out = x.clone()
    dev_idx = idx.to(x.device)
    out[dev_idx] = kornia.filters.gaussian_blur2d(x[dev_idx], (k, k), torch.stack([s, s], 1), border_type=border_type)
    return out


def apply_grayscale(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Flagged samples of RGB (B, 3, H, W) -> luma 0.299 R + 0.587 G + 0.114 B in all three channels
    (PIL ``convert("L")``, which torchvision ``RandomGrayscale`` runs on PIL images; torchvision's
    tensor path uses 0.2989 for R)."""
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return torch.where(flags.to(x.device).view(-1, 1, 1, 1), gray, x)


def apply_solarize(x: torch.Tensor, flags: torch.Tensor, threshold: float = 128 / 255,
                   bound: float = 1.0) -> torch.Tensor:
    """PIL ``ImageOps.solarize`` on the flagged samples: values >= threshold become bound - value
    (threshold 128/255 on [0, 1] images is PIL's default 128 on uint8)."""
    hit = flags.to(x.device).view(-1, 1, 1, 1) & (x >= threshold)
    return torch.where(hit, bound - x, x)
