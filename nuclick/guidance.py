"""Click guidance: the two extra input channels of the network, built from clicks (MONAI
``AddPointGuidanceSignald``, nuclick.md §4).

    positive map  one click inside the target nucleus, drawn with weight exp(chessboard distance) - 1
                  (deep pixels strongly preferred) or uniformly
    negative map  the floored centroids of the other nuclei in the crop, dropped with ``drop_rate``
                  (the whole map, then each nucleus)
    optional      Gaussian smoothing of both maps (``gaussian``, ``sigma``, ``truncated``)

Random numbers come from explicit generators or uniform draws passed in, never from the global RNG.
"""
from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F

from nuclick.config import GuidanceConfig


def chessboard_distance(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) binary -> chessboard distance of every foreground pixel to the nearest background
    pixel of its image (0 on background), as ``scipy.ndimage.distance_transform_cdt``: pixels
    outside the image are not background. Computed as 1 + the number of 3x3 erosions a pixel
    survives (a min-pool that ignores the outside)."""
    current = mask.float()
    dist = torch.zeros_like(current)
    for _ in range(max(mask.shape[-2:])):
        if not bool(current.any()):
            break
        dist += current
        current = -F.max_pool2d(-current, kernel_size=3, stride=1, padding=1)  # erosion; outside = +inf
    return dist


def positive_points(mask: torch.Tensor, u: torch.Tensor, use_distance: bool = True) -> torch.Tensor:
    """One click per sample inside its mask: pixel p drawn with weight exp(d(p)) - 1 (d = chessboard
    distance, deep pixels strongly preferred) or uniformly, by inverting the cumulative weights at
    ``u`` (B,) in [0, 1). Empty masks give empty maps. Returns (B, 1, H, W) float {0, 1}."""
    B, _, H, W = mask.shape
    if use_distance:
        d = chessboard_distance(mask).flatten(1).double()  # (B, H*W)
        top = d.max(dim=1, keepdim=True).values
        weights = torch.where(d > 0, torch.exp(d - top) - torch.exp(-top), torch.zeros_like(d))  # (e^d - 1) / e^top
    else:
        weights = (mask.flatten(1) > 0).double()
    cdf = weights.cumsum(dim=1)
    total = cdf[:, -1]
    target = u.to(device=cdf.device, dtype=torch.float64).view(B) * total
    index = torch.searchsorted(cdf, target[:, None], right=True).clamp_max(H * W - 1).view(B)
    points = torch.zeros(B, H * W, device=mask.device)
    valid = total > 0
    points[valid.nonzero().flatten(), index[valid]] = 1.0
    return points.view(B, 1, H, W)


def region_centroids(others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance map (B, 1, H, W) with labels 1..K -> (present (B, K) bool, floor row (B, K), floor col
    (B, K)) of every label's pixel centroid (skimage ``regionprops`` centroid, floored)."""
    B, _, H, W = others.shape
    K = int(others.max()) if others.numel() else 0
    labels = others.long().view(B, H * W)
    flat = (torch.arange(B, device=others.device)[:, None] * (K + 1) + labels).flatten()
    rows = torch.arange(H, device=others.device).repeat_interleave(W).double().repeat(B)
    cols = torch.arange(W, device=others.device).repeat(H).double().repeat(B)
    count = torch.bincount(flat, minlength=B * (K + 1)).view(B, K + 1)[:, 1:]
    sum_r = torch.bincount(flat, weights=rows, minlength=B * (K + 1)).view(B, K + 1)[:, 1:]
    sum_c = torch.bincount(flat, weights=cols, minlength=B * (K + 1)).view(B, K + 1)[:, 1:]
    safe = count.clamp_min(1).double()
    return count > 0, torch.floor(sum_r / safe).long(), torch.floor(sum_c / safe).long()


def negative_points(others: torch.Tensor, gen: torch.Generator, drop_rate: float) -> torch.Tensor:
    """Exclusion map (B, 1, H, W): with probability ``drop_rate`` a sample gets none; otherwise each
    other nucleus is kept with probability 1 - drop_rate and marked at its floored centroid."""
    B, _, H, W = others.shape
    points = torch.zeros(B, 1, H, W, device=others.device)
    if drop_rate >= 1.0 or not bool(others.any()):
        return points
    present, rows, cols = region_centroids(others)
    K = present.shape[1]
    drop_all = torch.rand(B, generator=gen, dtype=torch.float64) < drop_rate
    drop_one = torch.rand(B, K, generator=gen, dtype=torch.float64) < drop_rate
    keep = present & ~(drop_all[:, None] | drop_one).to(others.device)
    b, k = keep.nonzero(as_tuple=True)
    points[b, 0, rows[b, k], cols[b, k]] = 1.0
    return points


def smooth_points(points: torch.Tensor, sigma: float = 1.0, truncated: float = 2.0) -> torch.Tensor:
    """Gaussian option: each point map filtered with a normalised Gaussian (radius
    int(truncated * sigma + 0.5), zero padding), no renormalisation; empty maps stay empty."""
    radius = int(truncated * sigma + 0.5)
    if radius < 1:
        return points
    size = 2 * radius + 1
    return kornia.filters.gaussian_blur2d(points, (size, size), (sigma, sigma), border_type="constant")


def guidance_inputs(image: torch.Tensor, mask: torch.Tensor, others: torch.Tensor, u: torch.Tensor,
                    gen: torch.Generator, cfg: GuidanceConfig) -> torch.Tensor:
    """Scaled image (B, 3, H, W) in [-1, 1] + positive and negative maps -> (B, 5, H, W)."""
    pos = positive_points(mask, u, cfg.use_distance)
    neg = negative_points(others, gen, cfg.drop_rate)
    if cfg.gaussian:
        pos, neg = smooth_points(pos, cfg.sigma, cfg.truncated), smooth_points(neg, cfg.sigma, cfg.truncated)
    return torch.cat([image, pos.to(image.dtype), neg.to(image.dtype)], dim=1)
