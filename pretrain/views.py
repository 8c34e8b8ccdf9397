"""Self-supervised views on the training device: the upstream torchvision augmentation recipes of
SimCLR, MoCo v2, BYOL (PatchTCGA), DINO and MAE (reference §7), as batch ops with per-sample
parameters from an explicit CPU ``torch.Generator`` (``common.augment.make_generator(seed, rank,
step)``), so a resumed run sees the same views and the global RNG is never touched.

Input: the decoded uint8 batch (B, 3, H, W) already on the device. Output: a list of float views
(B, 3, s, s). Each upstream ``transforms.Compose`` is a :class:`ViewSpec` (its ops in order);
views drawn from one spec are rendered as a single (copies * B) batch.

Differences from the PIL pipelines upstream (all ops run on float [0, 1] instead of uint8):
no rounding between ops; colour jitter uses torchvision's tensor formulas; the PIL-style blur is
a true Gaussian (kornia, +-3 sigma support, reflected border) where PIL chains box blurs; the
resized crop is clamped to [0, 1] after resampling, as PIL's uint8 output is.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from common.augment import (ColorJitterParams, apply_blur, apply_color_jitter, apply_flip, apply_grayscale,
                            apply_resized_crop, apply_solarize, blur_kernel_size, sample_color_jitter,
                            sample_flags, sample_resized_crop)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METHODS = ("simclr", "moco", "byol", "dino", "mae")


@dataclass(frozen=True)
class ViewSpec:
    """One upstream ``transforms.Compose`` as data. The random resized crop always comes first;
    ``ops`` then run in order, each drawing its parameters from the generator when it runs:
    hflip, vflip, jitter (RandomApply(ColorJitter)), gray, blur, solarize, clip, normalize."""
    size: int
    scale: tuple[float, float]
    ops: tuple[str, ...]
    copies: int = 1  # independent views drawn from this spec
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_taps: int = 0  # 0: PIL-style blur (support from the max sigma, reflected border); else SimCLR's zero-padded kernel
    solarize_prob: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in _OPS]
        if unknown:
            raise ValueError(f"ViewSpec: unknown op(s) {unknown} (known: {', '.join(_OPS)})")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"ViewSpec: interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")


# ============================================================================= recipes (reference §7)
def simclr_taps(size: int) -> int:
    """simclr-pytorch ``GaussianBlur(size // 10)``: radius = k // 2, taps = 2 * radius + 1 (224 -> 23)."""
    return 2 * (size // 10 // 2) + 1


def simclr_specs(size: int = 224) -> list[ViewSpec]:
    """RRC(0.08-1, bicubic), HFlip, CJ(0.8, 0.8, 0.8, 0.2) p 0.8, Gray 0.2, blur p 0.5 sigma
    U[0.2, 2] with a size//10 kernel, clip to [0, 1]; no mean/std normalisation. Two views."""
    return [ViewSpec(size, (0.08, 1.0), ("hflip", "jitter", "gray", "blur", "clip"), copies=2,
                     interpolation="bicubic", jitter=(0.8, 0.8, 0.8, 0.2), blur_sigma=(0.2, 2.0),
                     blur_taps=simclr_taps(size))]


def moco_specs(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[ViewSpec]:
    """MoCo v2 ``aug_plus``: RRC(0.2-1), CJ p 0.8, Gray 0.2, blur p 0.5, HFlip, normalise. Two views."""
    return [ViewSpec(size, (0.2, 1.0), ("jitter", "gray", "blur", "hflip", "normalize"), copies=2,
                     mean=tuple(mean), std=tuple(std))]


def byol_specs(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[ViewSpec]:
    """PatchTCGA PTCGA BYOL: RRC(0.8-1), CJ p 0.8, Gray 0.2, blur p 0.5, HFlip, VFlip, normalise."""
    return [ViewSpec(size, (0.8, 1.0), ("jitter", "gray", "blur", "hflip", "vflip", "normalize"), copies=2,
                     mean=tuple(mean), std=tuple(std))]


def dino_specs(global_size: int = 224, local_size: int = 96, n_local: int = 8, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> list[ViewSpec]:
    """DINO multi-crop: global 1 (blur always), global 2 (blur 0.1, solarize 0.2), ``n_local``
    locals (blur 0.5); all bicubic with HFlip, CJ(0.4, 0.4, 0.2, 0.1) p 0.8, Gray 0.2, normalise."""
    shared = dict(interpolation="bicubic", jitter=(0.4, 0.4, 0.2, 0.1), mean=tuple(mean), std=tuple(std))
    ops = ("hflip", "jitter", "gray", "blur", "normalize")
    specs = [ViewSpec(global_size, (0.4, 1.0), ops, blur_prob=1.0, **shared),
             ViewSpec(global_size, (0.4, 1.0), ops[:-1] + ("solarize", "normalize"), blur_prob=0.1,
                      solarize_prob=0.2, **shared)]
    if n_local:
        specs.append(ViewSpec(local_size, (0.05, 0.4), ops, copies=n_local, blur_prob=0.5, **shared))
    return specs


def mae_specs(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[ViewSpec]:
    """MAE: RRC(0.2-1, bicubic), HFlip, normalise. One view."""
    return [ViewSpec(size, (0.2, 1.0), ("hflip", "normalize"), interpolation="bicubic",
                     mean=tuple(mean), std=tuple(std))]


def simclr_views(x: torch.Tensor, gen: torch.Generator, size: int = 224) -> list[torch.Tensor]:
    return render_views(x, simclr_specs(size), gen)


def moco_views(x: torch.Tensor, gen: torch.Generator, size: int = 224, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> list[torch.Tensor]:
    return render_views(x, moco_specs(size, mean, std), gen)


def byol_views(x: torch.Tensor, gen: torch.Generator, size: int = 224, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> list[torch.Tensor]:
    return render_views(x, byol_specs(size, mean, std), gen)


def dino_views(x: torch.Tensor, gen: torch.Generator, global_size: int = 224, local_size: int = 96,
               n_local: int = 8, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[torch.Tensor]:
    """[global 1, global 2, local 1 .. local n_local]."""
    return render_views(x, dino_specs(global_size, local_size, n_local, mean, std), gen)


def mae_views(x: torch.Tensor, gen: torch.Generator, size: int = 224, mean=IMAGENET_MEAN,
              std=IMAGENET_STD) -> list[torch.Tensor]:
    return render_views(x, mae_specs(size, mean, std), gen)


def method_specs(method: str, cfg) -> list[ViewSpec]:
    """The view recipe of ``method`` sized by ``cfg`` (attributes image_size, local_size, n_local,
    mean, std; missing or None ones take the upstream defaults)."""
    size = getattr(cfg, "image_size", None) or 224
    mean = getattr(cfg, "mean", None) or IMAGENET_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_STD
    if method == "simclr":
        return simclr_specs(size)
    if method == "moco":
        return moco_specs(size, mean, std)
    if method == "byol":
        return byol_specs(size, mean, std)
    if method == "dino":
        n_local = getattr(cfg, "n_local", None)
        return dino_specs(size, getattr(cfg, "local_size", None) or 96, 8 if n_local is None else n_local, mean, std)
    if method == "mae":
        return mae_specs(size, mean, std)
    raise ValueError(f"make_views: unknown method {method!r} (known: {', '.join(METHODS)})")


def make_views(method: str, x: torch.Tensor, gen: torch.Generator, cfg) -> list[torch.Tensor]:
    """uint8 (B, 3, H, W) on the device -> the method's list of float views (B, 3, s, s).
    ``cfg.blur_scale`` (default 1) multiplies the blur sigmas, for crops much smaller than 224."""
    specs = method_specs(method, cfg)
    scale = getattr(cfg, "blur_scale", None) or 1.0
    if scale != 1.0:
        specs = [replace(s, blur_sigma=(s.blur_sigma[0] * scale, s.blur_sigma[1] * scale)) for s in specs]
    return render_views(x, specs, gen)


# ============================================================================= rendering
def render_views(x: torch.Tensor, specs: list[ViewSpec], gen: torch.Generator) -> list[torch.Tensor]:
    """All views of ``specs`` (in order, ``copies`` each) from a uint8 (B, 3, H, W) batch."""
    _check_batch(x)
    x01 = x.float().div_(255)  # shared by every view
    views = []
    for spec in specs:
        views += _render(x01, spec, gen)
    return views


def _check_batch(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"views: expected a non-empty uint8 (B, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")


def _render(x01: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> list[torch.Tensor]:
    b, _, h, w = x01.shape
    boxes = sample_resized_crop(b * spec.copies, h, w, spec.scale, gen, spec.ratio)  # (copies * B, 4)
    v = torch.cat([apply_resized_crop(x01, boxes[k * b:(k + 1) * b], spec.size, spec.interpolation)
                   for k in range(spec.copies)]).clamp_(0, 1)  # (copies * B, 3, s, s)
    for op in spec.ops:
        v = _OPS[op](v, spec, gen)
    return list(v.split(b))


def _hflip(v, spec, gen):
    return apply_flip(v, sample_flags(len(v), spec.flip_prob, gen), dims=(-1,))


def _vflip(v, spec, gen):
    return apply_flip(v, sample_flags(len(v), spec.flip_prob, gen), dims=(-2,))


def _jitter(v, spec, gen):
    """RandomApply([ColorJitter], p): jitter only the flagged samples (torchvision tensor semantics on [0, 1])."""
    on = sample_flags(len(v), spec.jitter_prob, gen)
    params = sample_color_jitter(len(v), *spec.jitter, gen)
    idx = on.nonzero().flatten()
    if not idx.numel():
        return v
    sub = ColorJitterParams(**{f.name: getattr(params, f.name)[idx] for f in fields(params)})
    dev_idx = idx.to(v.device)
    return v.index_copy(0, dev_idx, apply_color_jitter(v[dev_idx], sub, bound=1.0, uint8_semantics=False))


def _gray(v, spec, gen):
    return apply_grayscale(v, sample_flags(len(v), spec.gray_prob, gen))


def _blur(v, spec, gen):
    on = sample_flags(len(v), spec.blur_prob, gen)
    lo, hi = spec.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(len(v), generator=gen, dtype=torch.float64)
    if spec.blur_taps:  # SimCLR: fixed kernel, Conv2d zero padding
        return apply_blur(v, on, sigma, kernel_size=spec.blur_taps, border_type="constant")
    # a kernel fixed by the sigma range, so a sample's blur does not depend on its batch
    return apply_blur(v, on, sigma, kernel_size=blur_kernel_size(hi))


def _solarize(v, spec, gen):
    return apply_solarize(v, sample_flags(len(v), spec.solarize_prob, gen), 128 / 255)


def _clip(v, spec, gen):
    return v.clamp(0, 1)


def _normalize(v, spec, gen):
    mean = torch.tensor(spec.mean, dtype=v.dtype, device=v.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=v.dtype, device=v.device).view(1, -1, 1, 1)
    return (v - mean) / std


_OPS = {"hflip": _hflip, "vflip": _vflip, "jitter": _jitter, "gray": _gray, "blur": _blur,
        "solarize": _solarize, "clip": _clip, "normalize": _normalize}

