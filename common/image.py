"""Decode ordinary image files (PNG, JPEG, TIFF, ...) to (H, W, 3) uint8 RGB, one way for every task.

Grey is replicated, transparent pixels are composited onto white (opaque images are unchanged,
the same rule as ``common.wsi.read_rgb`` for slides), 16-bit values are scaled to 8 bits and
palette / CMYK / YCbCr images are converted by PIL. Whole-slide images are read region by region
with ``common.wsi`` instead.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# PIL modes whose arrays ``to_rgb`` takes as they are; every other mode is converted by PIL first
_DIRECT_MODES = {"1", "L", "LA", "RGB", "RGBA", "I", "I;16"}
_ALPHA_MODES = {"P", "PA", "La", "RGBa"}  # converted to RGBA (their transparency is kept)


def to_rgb(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Any PIL-decoded array -> (H, W, 3) uint8 RGB: grey is replicated, alpha is composited onto
    white (opaque images are unchanged), 16-bit values are scaled to 8 bits."""
    a = np.asarray(array)
    if a.dtype in (np.uint16, np.int32):  # 16-bit PNG/TIFF (PIL "I;16" / "I")
        wide = a.astype(np.float64)
        a = np.clip(np.rint(wide / 257.0 if wide.max(initial=0) > 255 else wide), 0, 255).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ValueError(f"{source}: unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{source}: expected a grey, grey+alpha, RGB or RGBA image, got shape {a.shape}")
    colour = a[..., :1].repeat(3, -1) if a.shape[-1] in (1, 2) else a[..., :3]
    if a.shape[-1] in (2, 4):
        alpha = a[..., -1:].astype(np.uint16)
        if alpha.min() < 255:
            colour = ((colour.astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(colour)


def _decode(fh, source: str) -> np.ndarray:
    try:
        with Image.open(fh) as im:
            if im.mode in _ALPHA_MODES:
                im = im.convert("RGBA")
            elif im.mode.startswith("I;16") and im.mode != "I;16":  # byte-swapped 16-bit
                im = im.convert("I")
            elif im.mode not in _DIRECT_MODES:  # CMYK, YCbCr, LAB, HSV, RGBX, big-endian 16-bit ...
                im = im.convert("RGB")
            array = np.array(im)  # a writable copy, decoded inside the ``with``
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(f"{source}: not a readable image ({err})") from err
    return to_rgb(array, source)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; a missing or undecodable file raises an OSError that
    names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    return _decode(path, str(path))


def decode_image(blob: bytes, source: str = "encoded image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an encoded image file held in memory (see :func:`read_image`)."""
    return _decode(io.BytesIO(blob), source)
