"""Stain robustness on the training device: colour deconvolution, HED augmentation and Reinhard /
Macenko stain normalisation, on whole batches.

Images are taken as ``common.augment`` takes them: float RGB (B, 3, H, W) in [0, bound] (255 by
default; 1.0 for [0, 1] images). uint8 and half precision are accepted; results are float32 for
them, else of the input's dtype.

- Colour deconvolution (Ruifrok & Johnston 2001, the matrix and units of ``skimage.color.rgb2hed``):
  :func:`rgb_to_od`, :func:`od_to_hed`, :func:`rgb_to_hed` and their inverses.
- HED augmentation (Tellez et al. 2018, 2019): :func:`sample_hed` draws per-sample parameters from
  a ``common.augment.make_generator(seed, rank, step)`` generator, :func:`apply_hed` applies them;
  :class:`HEDAugment` is the step a trainer's batch augmentation calls (off by default).
- Stain normalisation to a :class:`StainTarget` (Reinhard et al. 2001; Macenko et al. 2009):
  :func:`normalize_stain` with the source statistics fitted per tile (batched) or once per slide
  (``target.fit_source(tiles)``).
- Wiring to the scripts (flags declared in ``common.config``: ``StainAugmentConfig``,
  ``StainNormalizeConfig``): ``HEDAugment.from_config(cfg)``; :class:`StainNormalizer`, the
  batch step (the identity without a target); :func:`training_stain` (a trainer's normaliser and
  the checkpoint entry ``stain_target`` that stores its target); :func:`target_from_files` (at
  start-up) and :func:`inference_stain` (files, else the checkpoint's target) for inference.

Background. A pixel is background when it is near-white: its optical density -ln(I / white) is
below ``BACKGROUND_OD`` = 0.15 in every channel, i.e. every channel > 86.1 % of white (> 219.5 of
255). Augmentation and normalisation leave such pixels exactly as they were.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import kornia
import torch
from PIL import Image

from common.augment import sample_flags
from common.checkpoint import load_file
from common.config import ConfigError
from common.errors import DataError
from common.image import read_image

#: optical density below which, in every channel, a pixel is background (near-white; see module doc)
BACKGROUND_OD = 0.15
#: fewer tissue pixels than this fraction of a tile: no per-tile fit (fallback, see normalize_stain)
MIN_TISSUE = 0.05

# Ruifrok & Johnston 2001, as skimage.color.rgb_from_hed: rows are the OD colours of
# haematoxylin, eosin and DAB. Pixels are row vectors: od = hed @ RGB_FROM_HED.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_EPS = 1e-6  # skimage floors intensities at 1e-6 of white before the log ...
_HED_UNIT = -math.log(_EPS)  # ... and divides OD by -ln(1e-6), so a black pixel has OD 1 in its units

METHODS = ("macenko", "reinhard")


# ----------------------------------------------------------------------------- colour deconvolution
def _as_float(x: torch.Tensor) -> torch.Tensor:
    """float32 or float64 (half precision is not enough for the log / eigen-decomposition)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _mix(v: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Per-pixel row vector times ``matrix``: (..., 3, H, W) x (3, 3) -> (..., 3, H, W)."""
    return torch.einsum("...chw,cd->...dhw", v, matrix.to(device=v.device, dtype=v.dtype))


def rgb_to_od(x: torch.Tensor, bound: float = 255.0) -> torch.Tensor:
    """Optical density -ln(I / I0) per channel (Beer-Lambert, I0 = ``bound`` = white) of RGB
    (..., 3, H, W); intensities below 1e-6 of white are floored there, as skimage does."""
    return -(_as_float(x) / bound).clamp_min(_EPS).log()


def od_to_rgb(od: torch.Tensor, bound: float = 255.0) -> torch.Tensor:
    """Inverse of :func:`rgb_to_od`, not clipped."""
    return bound * torch.exp(-od)


def od_to_hed(od: torch.Tensor) -> torch.Tensor:
    """Haematoxylin, eosin, DAB amounts (..., 3, H, W) of optical density (Ruifrok & Johnston 2001)
    in skimage's units (OD / -ln 1e-6). Unlike ``skimage.color.rgb2hed`` negative amounts are
    kept, so :func:`hed_to_od` inverts this exactly."""
    return _mix(od / _HED_UNIT, HED_FROM_RGB)


def hed_to_od(hed: torch.Tensor, rgb_from_hed: torch.Tensor = RGB_FROM_HED) -> torch.Tensor:
    """Optical density of H, E, D amounts (inverse of :func:`od_to_hed`); ``rgb_from_hed``: other
    stain colours (rows: the OD colours of H, E, D) re-mix the amounts as another lab's stains would."""
    return _mix(hed, rgb_from_hed) * _HED_UNIT


def rgb_to_hed(x: torch.Tensor, bound: float = 255.0) -> torch.Tensor:
    """RGB (..., 3, H, W) in [0, bound] -> HED, as ``skimage.color.rgb2hed`` without its clip at 0."""
    return od_to_hed(rgb_to_od(x, bound))


def hed_to_rgb(hed: torch.Tensor, bound: float = 255.0) -> torch.Tensor:
    """HED -> RGB in [0, bound] (clipped), as ``skimage.color.hed2rgb`` (times ``bound``)."""
    return od_to_rgb(hed_to_od(hed), bound).clamp(0, bound)


def background_mask(x: torch.Tensor, bound: float = 255.0, threshold: float = BACKGROUND_OD) -> torch.Tensor:
    """(..., 1, H, W) bool: near-white pixels, optical density < ``threshold`` in every channel."""
    return (_as_float(x) > bound * math.exp(-threshold)).all(dim=-3, keepdim=True)


def _tissue_pixels(i255: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, N) bool: pixels (B, 3, N) on the 0-255 scale that are not background."""
    return ~(i255 > 255 * math.exp(-threshold)).all(1)


# ----------------------------------------------------------------------------- HED augmentation
@dataclass
class HEDParams:
    alpha: torch.Tensor  # (B, 3) float64 factors for H, E, D
    beta: torch.Tensor  # (B, 3) float64 offsets for H, E, D, in skimage's HED units


def sample_hed(n: int, gen: torch.Generator, sigma: float = 0.05, bias: float = 0.05, p: float = 1.0) -> HEDParams:
    """Tellez et al. 2018 (TMI, mitosis detection) per sample and stain: alpha ~ U(1 - sigma,
    1 + sigma), beta ~ U(-bias, bias); their values sigma = bias = 0.05. Tellez et al. 2019
    (MedIA, "Quantifying the effects of data augmentation ...") call this HED-light and use 0.2
    for both in HED-strong. Samples not drawn with probability ``p`` get alpha 1, beta 0."""
    apply = sample_flags(n, p, gen).view(n, 1)
    alpha = 1 - sigma + 2 * sigma * torch.rand((n, 3), generator=gen, dtype=torch.float64)
    beta = -bias + 2 * bias * torch.rand((n, 3), generator=gen, dtype=torch.float64)
    return HEDParams(alpha=torch.where(apply, alpha, torch.ones_like(alpha)),
                     beta=torch.where(apply, beta, torch.zeros_like(beta)))


def apply_hed(x: torch.Tensor, params: HEDParams, bound: float = 255.0,
              background_od: float = BACKGROUND_OD) -> torch.Tensor:
    """s' = alpha * s + beta on the H, E and D amounts of each sample of RGB (B, 3, H, W), back to RGB
    clipped to [0, bound]. Background pixels (:func:`background_mask`) and samples with alpha 1 and
    beta 0 are returned exactly as they were."""
    x = _as_float(x)
    alpha = params.alpha.to(device=x.device, dtype=x.dtype).view(-1, 3, 1, 1)
    beta = params.beta.to(device=x.device, dtype=x.dtype).view(-1, 3, 1, 1)
    out = hed_to_rgb(rgb_to_hed(x, bound) * alpha + beta, bound)
    changed = ((params.alpha != 1) | (params.beta != 0)).any(1).to(x.device).view(-1, 1, 1, 1)
    return torch.where(changed & ~background_mask(x, bound, background_od), out, x)


@dataclass(frozen=True)
class HEDAugment:
    """HED jitter as a step of a trainer's batch augmentation: ``x = hed(x, gen)`` with the step's
    ``make_generator(seed, rank, step)``. Off by default (``p = 0``): then it returns ``x`` itself
    and draws nothing, so adding it to a recipe leaves the recipe's other parameters unchanged.
    ``p = 1`` with the default sigma and bias is Tellez et al.'s HED-light. When on, the result is
    float (uint8 input gives float32)."""
    p: float = 0.0  # probability per sample
    sigma: float = 0.05  # alpha ~ U(1 - sigma, 1 + sigma)
    bias: float = 0.05  # beta ~ U(-bias, bias)
    bound: float = 255.0  # white of the images it is given
    background_od: float = BACKGROUND_OD

    def __post_init__(self):
        if not 0 <= self.p <= 1 or not 0 <= self.sigma < 1 or self.bias < 0 or self.bound <= 0:
            raise ValueError(f"HEDAugment: need 0 <= p <= 1, 0 <= sigma < 1, bias >= 0, bound > 0; got {self}")

    @classmethod
    def from_config(cls, cfg, bound: float = 255.0) -> HEDAugment:
        """The step a config with ``common.config.StainAugmentConfig``'s fields asks for: off for
        ``stain_augment`` none, every sample jittered (p = 1) with its sigma and bias for hed."""
        if cfg.stain_augment == "none":
            return cls(bound=bound)
        return cls(p=1.0, sigma=cfg.hed_sigma, bias=cfg.hed_bias, bound=bound)

    @property
    def enabled(self) -> bool:
        return self.p > 0 and (self.sigma > 0 or self.bias > 0)

    def sample(self, n: int, gen: torch.Generator) -> HEDParams | None:
        """Parameters for n samples; None, drawing nothing, when off (for recipes that draw first)."""
        return sample_hed(n, gen, self.sigma, self.bias, self.p) if self.enabled else None

    def apply(self, x: torch.Tensor, params: HEDParams | None) -> torch.Tensor:
        """x itself when ``params`` is None."""
        return x if params is None else apply_hed(x, params, self.bound, self.background_od)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], gen))


# ----------------------------------------------------------------------------- Macenko
def _pixels255(x: torch.Tensor, bound: float) -> torch.Tensor:
    """(B, 3, H, W) in [0, bound] -> (B, 3, N) float in [0, 255] (Macenko's Io is on that scale)."""
    x = _as_float(x)
    return (x * (255.0 / bound)).flatten(2)


def _macenko_od(i255: torch.Tensor, io: float) -> torch.Tensor:
    return -((i255 + 1) / io).log()  # Macenko / torchstain: +1 keeps log finite at 0


def _macenko_rgb(od: torch.Tensor, io: float) -> torch.Tensor:
    return (io * torch.exp(-od) - 1).clamp(0, 255)  # exact inverse of _macenko_od before the clip


def _percentile(v: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q-th percentile along the last dim of (..., N), over ``mask``ed entries, without
    interpolation: entry round(q/100 (n - 1)) of the sorted values, as torchstain's percentile."""
    if mask is None:
        k = 1 + round(0.01 * float(q) * (v.shape[-1] - 1))
        return v.kthvalue(k, dim=-1).values
    n = mask.sum(-1, keepdim=True)
    k = torch.round(0.01 * float(q) * (n - 1).clamp_min(0).double()).long()
    ordered = torch.where(mask, v, torch.full_like(v, float("inf"))).sort(-1).values
    return ordered.gather(-1, k).squeeze(-1)


def _stain_vectors(od: torch.Tensor, tissue: torch.Tensor, alpha: float) -> torch.Tensor:
    """Macenko et al. 2009: (B, 3, 2) H and E optical-density unit vectors of od (B, 3, N) from
    the tissue (B, N) pixels: the plane of the two main eigenvectors of their OD covariance, the
    alpha and 100 - alpha percentiles of the angle in that plane, H the one with more red OD."""
    n = tissue.sum(1).clamp_min(2).view(-1, 1, 1)
    w = tissue.to(od.dtype).unsqueeze(1)  # (B, 1, N)
    centred = (od - (od * w).sum(2, keepdim=True) / n) * w
    cov = centred @ centred.transpose(1, 2) / (n - 1)  # (B, 3, 3)
    plane = torch.linalg.eigh(cov).eigenvectors[..., 1:]  # (B, 3, 2), eigenvalues ascending
    t = plane.transpose(1, 2) @ od  # (B, 2, N)
    phi = torch.atan2(t[:, 1], t[:, 0])  # (B, N)
    ends = [_percentile(phi, q, tissue) for q in (alpha, 100 - alpha)]
    v_lo, v_hi = [(plane @ torch.stack([a.cos(), a.sin()], 1).unsqueeze(-1)).squeeze(-1) for a in ends]  # (B, 3)
    h_first = (v_lo[:, 0] > v_hi[:, 0]).view(-1, 1, 1)
    return torch.where(h_first, torch.stack([v_lo, v_hi], -1), torch.stack([v_hi, v_lo], -1))


def _concentrations(od: torch.Tensor, he: torch.Tensor) -> torch.Tensor:
    """Least-squares H, E amounts (B, 2, N) of od (B, 3, N) on the stain vectors he (B, 3, 2)."""
    return torch.linalg.pinv(he) @ od


def _macenko_tissue(od: torch.Tensor, beta: float) -> torch.Tensor:
    return (od >= beta).all(1)  # (B, N): Macenko's "transparent" pixels have OD < beta in a channel


def macenko_stats(x: torch.Tensor, bound: float = 255.0, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                  min_tissue: float = MIN_TISSUE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Macenko statistics of every tile of (B, 3, H, W), batched: stain matrix (B, 3, 2) (columns
    H, E), the 99th-percentile H and E amounts over all pixels (B, 2) (as Macenko 2009 and
    torchstain), and ok (B,) bool: False where fewer than ``min_tissue`` of the pixels have
    OD >= beta in every channel, or the fit is not finite (those rows are not to be used)."""
    return _macenko_stats(_macenko_od(_pixels255(x, bound), io), alpha, beta, min_tissue)


def _macenko_stats(od: torch.Tensor, alpha: float, beta: float, min_tissue: float):
    tissue = _macenko_tissue(od, beta)
    he = _stain_vectors(od, tissue, alpha)
    he = torch.where(he.isfinite(), he, torch.zeros_like(he))  # no tissue: NaN angles; pinv needs finite input
    max_conc = _percentile(_concentrations(od, he), 99)  # (B, 2)
    enough = tissue.sum(1) >= max(2, math.ceil(min_tissue * od.shape[-1]))
    ok = enough & max_conc.isfinite().all(1) & (max_conc > 1e-6).all(1)
    return he, max_conc, ok


def _macenko_normalize(x: torch.Tensor, target: StainTarget, source: StainTarget | None, bound: float) -> torch.Tensor:
    """Macenko et al. 2009: amounts on the source's stain vectors, scaled by the target's over the
    source's 99th percentiles, recomposed with the target's vectors and Io."""
    od = _macenko_od(_pixels255(x, bound), target.io)  # (B, 3, N)
    ref_he = target.stain_matrix.to(od)
    ref_max = target.max_conc.to(od)
    if source is not None:
        he, max_conc = source.stain_matrix.to(od).expand(len(od), 3, 2), source.max_conc.to(od).expand(len(od), 2)
    else:
        he, max_conc, ok = _macenko_stats(od, target.alpha, target.beta, target.min_tissue)
        _warn_fallback(ok, "Macenko: tiles with too little tissue (or no finite stain fit) keep the target's "
                           "stain vectors: their optical density is projected onto them, without rescaling")
        he = torch.where(ok.view(-1, 1, 1), he, ref_he)
        max_conc = torch.where(ok.view(-1, 1), max_conc, ref_max)
    conc = _concentrations(od, he) * (ref_max / max_conc).unsqueeze(-1)  # (B, 2, N)
    return _macenko_rgb(ref_he @ conc, target.io)  # (B, 3, N) in [0, 255]


def _warn_fallback(ok: torch.Tensor, message: str) -> None:
    """One warning per call however many tiles fell back; the text is fixed, so Python's default
    filter shows it once per calling line in a training loop."""
    if not bool(ok.all()):
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- Reinhard
def _lab(i255: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (B, 3, N) of RGB pixels (B, 3, N) in [0, 255] (kornia, D65)."""
    return kornia.color.rgb_to_lab((i255 / 255).clamp(0, 1).unsqueeze(2)).squeeze(2)


def _masked_mean_std(v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std (B, 3) of v (B, 3, N) over mask (B, N)."""
    w = mask.to(v.dtype).unsqueeze(1)
    n = w.sum(2)  # (B, 1)
    mean = (v * w).sum(2) / n.clamp_min(1)
    var = (((v - mean.unsqueeze(2)) * w) ** 2).sum(2) / (n - 1).clamp_min(1)
    return mean, var.sqrt()


def reinhard_stats(x: torch.Tensor, bound: float = 255.0, background_od: float = BACKGROUND_OD,
                   min_tissue: float = MIN_TISSUE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reinhard statistics of every tile of (B, 3, H, W), batched: L*a*b* mean and std (B, 3) over
    the tissue (non-background) pixels, and ok (B,) bool (enough tissue, non-zero spread)."""
    i255 = _pixels255(x, bound)
    return _reinhard_stats(i255, _tissue_pixels(i255, background_od), min_tissue)


def _reinhard_stats(i255: torch.Tensor, tissue: torch.Tensor, min_tissue: float):
    mean, std = _masked_mean_std(_lab(i255), tissue)
    enough = tissue.sum(1) >= max(2, math.ceil(min_tissue * tissue.shape[-1]))
    return mean, std, enough & (std > 1e-3).all(1)


def _reinhard_normalize(x: torch.Tensor, target: StainTarget, source: StainTarget | None, bound: float) -> torch.Tensor:
    """Reinhard et al. 2001: per-channel mean and std of the source moved to the target's. They
    worked in Ruderman's l-alpha-beta; like torchstain and StainTools this uses CIE L*a*b*. Tiles
    without enough tissue are left as they are."""
    i255 = _pixels255(x, bound)
    tissue = _tissue_pixels(i255, target.background_od)  # (B, N)
    lab = _lab(i255)
    ref_mean, ref_std = target.lab_mean.to(lab), target.lab_std.to(lab)
    if source is not None:
        mean, std = source.lab_mean.to(lab), source.lab_std.to(lab)
        ok = torch.ones(len(lab), dtype=torch.bool, device=lab.device)
    else:
        mean, std, ok = _reinhard_stats(i255, tissue, target.min_tissue)  # (B, 3), (B, 3), (B,)
        _warn_fallback(ok, "Reinhard: tiles with too little tissue are left unnormalised")
        mean = torch.where(ok.view(-1, 1), mean, ref_mean)
        std = torch.where(ok.view(-1, 1), std, ref_std)
    moved = (lab - mean.view(-1, 3, 1)) / std.view(-1, 3, 1) * ref_std.view(1, 3, 1) + ref_mean.view(1, 3, 1)
    out = kornia.color.lab_to_rgb(moved.unsqueeze(2), clip=True).squeeze(2) * 255  # (B, 3, N)
    return torch.where(ok.view(-1, 1, 1), out, i255)


# ----------------------------------------------------------------------------- targets
@dataclass(frozen=True, eq=False)
class StainTarget:
    """Stain statistics of a target (or of a slide's tiles, as the source of a normalisation).

    Macenko: ``stain_matrix`` (3, 2) (OD unit vectors, columns H, E) and ``max_conc`` (2,) (99th
    percentile amounts), fitted with ``io``, ``alpha``, ``beta``. Reinhard: ``lab_mean`` and
    ``lab_std`` (3,) of the tissue pixels in CIE L*a*b*. Build with :meth:`fit` (tensors) or
    :meth:`from_files`; store with :meth:`to_state` (plain tensors, floats and strings, loadable
    with ``torch.load(weights_only=True)``)."""
    method: str
    stain_matrix: torch.Tensor | None = None  # (3, 2) float32
    max_conc: torch.Tensor | None = None  # (2,)
    lab_mean: torch.Tensor | None = None  # (3,)
    lab_std: torch.Tensor | None = None  # (3,)
    io: float = 240.0  # Macenko's transmitted light, on the 0-255 scale
    alpha: float = 1.0  # percentile of the angle for the stain vectors
    beta: float = 0.15  # OD below which (in any channel) a pixel is transparent for the Macenko fit
    background_od: float = BACKGROUND_OD
    min_tissue: float = MIN_TISSUE
    source: str = ""  # what the statistics were fitted on

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"stain method must be one of {METHODS}, got {self.method!r}")
        if not (self.io > 0 and 0 <= self.alpha < 50 and self.beta >= 0 and 0 < self.min_tissue <= 1):
            raise ValueError(f"stain target: need io > 0, 0 <= alpha < 50, beta >= 0, 0 < min_tissue <= 1; got {self}")

    # -- fitting
    @classmethod
    def fit(cls, images, method: str = "macenko", bound: float = 255.0, source: str = "tensors",
            **params) -> StainTarget:
        """Statistics of all the pixels of ``images`` together (one (3, H, W) or (B, 3, H, W) tensor,
        or a list of them, sizes may differ): a target, or one slide's tiles fitted once. ``params``
        are the other fields (io, alpha, beta, background_od, min_tissue). Too little tissue or no
        colour raises a DataError naming ``source``."""
        spec = cls(method, source=source, **params)
        pixels = torch.cat(_pixel_sets(images, bound), dim=1).unsqueeze(0)  # (1, 3, N)
        spec._check_usable(pixels, source)
        return spec._fitted(pixels)

    @classmethod
    def from_files(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], method: str = "macenko",
                   **params) -> StainTarget:
        """Statistics of one image file or of several together (each must show stained tissue). A
        missing or unreadable file raises an OSError, a grey, all-background or non-RGB one a
        DataError; both name the file."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("StainTarget.from_files: no files given")
        spec = cls(method, **params)
        sets = []
        for path in paths:
            pixels = _read_target(Path(path))
            spec._check_usable(pixels.unsqueeze(0), str(path))
            sets.append(pixels)
        source = ", ".join(str(p) for p in paths)
        return cls(method, source=source, **params)._fitted(torch.cat(sets, 1).unsqueeze(0))

    def fit_source(self, images, bound: float = 255.0, source: str = "tensors") -> StainTarget:
        """The same statistics (method and parameters) of other images, e.g. of one slide's tiles,
        for ``normalize_stain(x, target, source=...)``."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _PARAMS}
        return StainTarget.fit(images, self.method, bound, source, **params)

    def _tissue(self, i255: torch.Tensor) -> torch.Tensor:
        """(B, N) pixels this method fits on."""
        if self.method == "macenko":
            return _macenko_tissue(_macenko_od(i255, self.io), self.beta)
        return _tissue_pixels(i255, self.background_od)

    def _check_usable(self, i255: torch.Tensor, source: str) -> None:
        """DataError naming ``source`` unless (1, 3, N) pixels show enough tissue, in colour."""
        tissue = self._tissue(i255)[0]
        share = float(tissue.float().mean())
        if share < self.min_tissue:
            raise DataError(f"{source}: no tissue to fit stain statistics on: {100 * share:.1f}% of the pixels are "
                            f"stained, at least {100 * self.min_tissue:.0f}% needed (an empty or white image?)")
        spread = i255[0][:, tissue]  # (3, n)
        if float((spread.amax(0) - spread.amin(0)).mean()) < 2.0:
            raise DataError(f"{source}: no colour (R = G = B in the tissue): a greyscale image, or an RGBA file "
                            "whose picture is only in its alpha channel; a stain target must be an RGB H&E image")

    def _fitted(self, i255: torch.Tensor) -> StainTarget:
        """This record with the statistics of the (1, 3, N) pixels filled in."""
        if self.method == "macenko":
            he, max_conc, ok = _macenko_stats(_macenko_od(i255, self.io), self.alpha, self.beta, self.min_tissue)
            if not bool(ok[0]):
                raise DataError(f"{self.source}: the Macenko fit failed (degenerate stain colours)")
            return _replace(self, stain_matrix=he[0].float().cpu(), max_conc=max_conc[0].float().cpu())
        mean, std, ok = _reinhard_stats(i255, self._tissue(i255), self.min_tissue)
        if not bool(ok[0]):
            raise DataError(f"{self.source}: the tissue has no colour spread to fit Reinhard statistics on")
        return _replace(self, lab_mean=mean[0].float().cpu(), lab_std=std[0].float().cpu())

    # -- checkpoint state
    def to_state(self) -> dict:
        """Plain tensors, floats and strings (``torch.load(weights_only=True)`` reads them back)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_json(self, with_source: bool = True) -> str:
        """:meth:`to_state` as one line of JSON (tensors as lists), e.g. for a run's config.json;
        without ``source``: what the statistics are, not where they came from."""
        state = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in self.to_state().items()
                 if with_source or k != "source"}
        return json.dumps(state, sort_keys=True)

    @classmethod
    def from_state(cls, state: dict) -> StainTarget:
        """Inverse of :meth:`to_state`; a malformed state raises a DataError."""
        names = {f.name for f in fields(cls)}
        unknown = set(state) - names
        if unknown or "method" not in state:
            raise DataError(f"stain target state: unknown keys {sorted(unknown)} or no method")
        try:
            target = cls(**state)
        except (TypeError, ValueError) as err:
            raise DataError(f"stain target state: {err}") from err
        for name, shape in _SHAPES[target.method].items():
            value = getattr(target, name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                raise DataError(f"stain target state: {target.method} needs {name} of shape {shape}, got {value!r}")
        return target


_PARAMS = ("io", "alpha", "beta", "background_od", "min_tissue")
_SHAPES = {"macenko": {"stain_matrix": (3, 2), "max_conc": (2,)}, "reinhard": {"lab_mean": (3,), "lab_std": (3,)}}


def _replace(target: StainTarget, **stats) -> StainTarget:
    values = {f.name: getattr(target, f.name) for f in fields(target)}
    return StainTarget(**{**values, **stats})


def _pixel_sets(images, bound: float) -> list[torch.Tensor]:
    """A (3, H, W) / (B, 3, H, W) tensor or a list of them -> list of (3, N) pixels in [0, 255]."""
    items = [images] if isinstance(images, torch.Tensor) else list(images)
    sets = []
    for item in items:
        if item.ndim not in (3, 4) or item.shape[-3] != 3:
            raise ValueError(f"stain statistics need RGB (3, H, W) or (B, 3, H, W) images, got {tuple(item.shape)}")
        item = item.unsqueeze(0) if item.ndim == 3 else item
        sets.append(_pixels255(item, bound).transpose(0, 1).reshape(3, -1))
    if not sets:
        raise ValueError("stain statistics need at least one image")
    return sets


def _read_target(path: Path) -> torch.Tensor:
    """(3, N) float pixels of a colour image file; a grey file (mode L, LA, I, F, ...) is a DataError."""
    rgb = read_image(path)  # missing / undecodable: OSError naming the file
    with Image.open(path) as im:
        mode = im.mode
    if Image.getmodebase(mode) == "L":
        raise DataError(f"{path}: {Image.getmodebands(mode)} channel(s) of grey (mode {mode}); a stain target must "
                        "be an RGB H&E image")
    return torch.from_numpy(rgb).permute(2, 0, 1).reshape(3, -1).float()


# ----------------------------------------------------------------------------- normalisation
def normalize_stain(x: torch.Tensor, target: StainTarget, source: StainTarget | None = None,
                    bound: float = 255.0) -> torch.Tensor:
    """Normalise RGB (B, 3, H, W) in [0, bound] to ``target``'s stain, on x's device.

    ``source=None`` fits each tile's statistics (batched); a tile with too little tissue falls back
    (Macenko: the target's stain vectors and percentiles, i.e. its OD is only projected onto the
    target's stain plane; Reinhard: left unchanged) with one RuntimeWarning per call. Otherwise
    ``source`` (``target.fit_source(tiles)``, e.g. once per slide) is used for every tile.
    Background pixels are returned unchanged; the result is float in [0, bound]."""
    if source is not None and (source.method != target.method
                               or any(getattr(source, k) != getattr(target, k) for k in _PARAMS)):
        raise ValueError("normalize_stain: source statistics were fitted with another method or parameters "
                         "than the target's (use target.fit_source)")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"normalize_stain: expected RGB (B, 3, H, W), got {tuple(x.shape)}")
    xf = _as_float(x)
    run = _macenko_normalize if target.method == "macenko" else _reinhard_normalize
    out = (run(xf, target, source, bound) * (bound / 255.0)).reshape(xf.shape)
    return torch.where(background_mask(xf, bound, target.background_od), xf, out)


# ----------------------------------------------------------------------------- wiring to the scripts
@dataclass(frozen=True, eq=False)
class StainNormalizer:
    """:func:`normalize_stain` as a step on batches in [0, ``bound``]: ``x`` itself (any dtype)
    when there is no target, so a script without ``--stain-normalize`` runs exactly as before.
    ``source`` (``target.fit_source(...)``): fixed statistics, e.g. one slide's; None: per tile."""
    target: StainTarget | None = None
    source: StainTarget | None = None
    bound: float = 255.0

    @property
    def enabled(self) -> bool:
        return self.target is not None

    def with_source(self, source: StainTarget | None) -> StainNormalizer:
        return StainNormalizer(self.target, source, self.bound)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.target is None else normalize_stain(x, self.target, self.source, self.bound)


#: where a training checkpoint keeps its target (``StainTarget.to_state()``)
CHECKPOINT_KEY = "stain_target"


def stored_stain_target(checkpoint: Any) -> dict | None:
    """The target state a run's checkpoint (a loaded dict) stores, or None (also for a plain
    state_dict such as a released bundle's)."""
    state = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
    return state if isinstance(state, Mapping) else None


def check_stain_flags(cfg) -> None:
    """A ``--stain-target`` without ``--stain-normalize`` is a ConfigError (the target would be ignored)."""
    if cfg.stain_target and cfg.stain_normalize == "none":
        raise ConfigError(f"--stain-target {' '.join(cfg.stain_target)}: needs --stain-normalize macenko or reinhard")


def target_from_files(cfg) -> StainTarget | None:
    """The target fitted from ``--stain-target`` files (None when none are given). Called at
    start-up: a missing, white, grey or non-image file stops the script with one line naming it."""
    check_stain_flags(cfg)
    if cfg.stain_normalize == "none" or not cfg.stain_target:
        return None
    return StainTarget.from_files(cfg.stain_target, cfg.stain_normalize)


def resolve_stain_target(cfg, checkpoint: Any = None, checkpoint_name: str = "the checkpoint") -> StainTarget | None:
    """The target ``--stain-normalize`` asks for (``cfg`` has ``StainNormalizeConfig``'s fields):
    fitted from ``--stain-target`` if given, else the one ``checkpoint`` (a loaded dict, or None
    for a trainer) stores; None when ``--stain-normalize none`` (with a warning when the checkpoint
    was trained on normalised images). Neither, or a stored target of another method: ConfigError."""
    method, stored = cfg.stain_normalize, stored_stain_target(checkpoint)
    if method == "none":
        check_stain_flags(cfg)
        if stored is not None:
            warnings.warn(f"{checkpoint_name} was trained on {stored.get('method')}-normalised images; "
                          "--stain-normalize none feeds it unnormalised ones", stacklevel=2)
        return None
    if cfg.stain_target:
        return target_from_files(cfg)
    if stored is None:
        where = "" if checkpoint is None else f" ({checkpoint_name} stores none)"
        raise ConfigError(f"--stain-normalize {method}: needs --stain-target FILE [FILE ...]{where}")
    target = StainTarget.from_state(dict(stored))
    if target.method != method:
        raise ConfigError(f"--stain-normalize {method}: {checkpoint_name} stores a {target.method} target; "
                          f"give --stain-target FILE or --stain-normalize {target.method}")
    return target


def training_stain(cfg) -> tuple[StainNormalizer, dict]:
    """A trainer's ``--stain-normalize`` (``cfg`` has ``StainTrainConfig``'s fields): the
    normaliser, and the checkpoint entries that store its target for inference. Records the
    target's statistics in ``cfg.stain_statistics`` (so config.json shows them)."""
    target = resolve_stain_target(cfg)
    cfg.stain_statistics = target.to_json() if target is not None else ""
    return StainNormalizer(target), ({CHECKPOINT_KEY: target.to_state()} if target is not None else {})


def inference_stain(cfg, fitted: StainTarget | None, checkpoint: Any,
                    checkpoint_name: str = "the checkpoint") -> StainNormalizer:
    """An inference or evaluation script's normaliser: ``fitted`` (:func:`target_from_files`, called
    at start-up), else the target stored in ``checkpoint`` (a path, or the loaded dict, whose file
    ``checkpoint_name`` names in messages)."""
    if fitted is not None:
        return StainNormalizer(fitted)
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint_name, checkpoint = str(checkpoint), load_file(checkpoint)
    return StainNormalizer(resolve_stain_target(cfg, checkpoint, checkpoint_name))
