"""Tiled pyramidal TIFFs that OpenSlide opens as ``generic-tiff``: the writer behind the synthetic
demo slides and the test fixtures of every task that reads slides.

    write_pyramidal_tiff("slide.tif", rgb, mpp=0.243)          # JPEG tiles, levels at 1, 2, 4, ... 64
    write_pyramidal_tiff("mask.tif", mask)                      # single channel: deflate, binary stays binary

Level 0 is a full-resolution IFD, each further level a reduced-resolution IFD (SubfileType 1) in
the main chain, each with its own X/YResolution (pixels per centimetre) so OpenSlide reports
``openslide.mpp-x``/``-y``. :func:`downsample2` halves an image by 2x2 area mean or, for binary
masks, by majority.

Slides too large to hold in memory are streamed tile by tile instead::

    shapes = halving_shapes(204_800, 98_304, below=1000)      # level (height, width)s
    write_streamed_pyramid("big.tif", shapes, tiles_of_level)  # tiles_of_level(k) yields JPEG bytes

:func:`encode_jpeg_tile` encodes a tile exactly as :func:`write_pyramidal_tiff` does (YCbCr 4:2:0 at
the given quality, Huffman tables optimised, which changes no pixel), so one pre-encoded tile (a
blank background tile) can be written any number of times.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

#: Default level-0 resolution (µm per pixel): a 40x scan, as Camelyon16's.
DEFAULT_MPP = 0.243


def downsample2(a: np.ndarray, resample: str = "area") -> np.ndarray:
    """Halve a uint8 image (H, W) or (H, W, C); odd sides are edge-padded first.

    ``"area"``: rounded mean of each 2x2 block.  ``"majority"``: for binary
    images (0 and one other value v), v where at least 2 of the 4 block pixels
    are nonzero, else 0, so the values stay exactly binary.
    """
    if a.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {a.dtype}")
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    q = (a[0::2, 0::2], a[1::2, 0::2], a[0::2, 1::2], a[1::2, 1::2])
    if resample == "area":
        s = q[0].astype(np.uint16)
        for b in q[1:]:
            s += b
        s += 2
        s >>= 2
        return s.astype(np.uint8)
    if resample == "majority":
        value = a.max()
        count = (q[0] != 0).view(np.uint8).copy()
        for b in q[1:]:
            count += b != 0
        return np.where(count >= 2, value, 0).astype(np.uint8)
    raise ValueError(f"unknown resample {resample!r} (expected 'area' or 'majority')")


def _pyramid(image: np.ndarray, min_size: int, min_levels: int, resample: str) -> list[np.ndarray]:
    """Level list: halve while the smaller side stays >= min_size, or until min_levels exist."""
    levels = [image]
    while True:
        h, w = levels[-1].shape[:2]
        nh, nw = (h + 1) // 2, (w + 1) // 2
        if h == 1 and w == 1:
            break
        if min(nh, nw) < min_size and len(levels) >= min_levels:
            break
        levels.append(downsample2(levels[-1], resample))
    return levels


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, tile: int = 256, mpp: float = DEFAULT_MPP,
                         compression: str | None = "auto", min_size: int = 64, min_levels: int = 7,
                         quality: int = 85, resample: str | None = None,
                         maxworkers: int | None = None) -> list[tuple[int, int]]:
    """Write ``image`` as a tiled pyramidal TIFF that OpenSlide opens as ``generic-tiff``.

    Parameters
    ----------
    image : (H, W, 3) RGB or (H, W) single-channel uint8 (level 0).
    tile : tile side (multiple of 16).
    mpp : level-0 µm per pixel, stored as X/YResolution in pixels per
        centimetre (ResolutionUnit = CENTIMETER) so OpenSlide reports
        ``openslide.mpp-x``/``-y``.  Each reduced level carries its own
        resolution.
    compression : ``"jpeg"`` (quality ``quality``), ``"deflate"``, ``None`` or
        ``"auto"``: JPEG for RGB, deflate (lossless) for single-channel masks.
    min_size : levels are halved while the smaller side stays >= ``min_size``;
        ...but at least ``min_levels`` levels are written (level 6 = 64x, where
        tissue masks are usually computed) as long as the image is >= 1 px.
    resample : ``"area"`` (2x2 mean) or ``"majority"`` (binary masks stay
        binary); default area for RGB, majority for single-channel.

    The file is written to a temporary file in the same folder and moved into place with
    :func:`os.replace`.  Returns the (height, width) of each level.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be (H, W, 3) or (H, W) uint8, got {image.shape} {image.dtype}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    rgb = image.ndim == 3
    options = _tile_options(rgb, compression, quality, tile, maxworkers)
    levels = _pyramid(np.ascontiguousarray(image), min_size, min_levels, resample or ("area" if rgb else "majority"))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # tifffile wants a file name
    try:
        _write_levels(tmp, levels, mpp, options)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return [lv.shape[:2] for lv in levels]


def _tile_options(rgb: bool, compression: str | None, quality: int, tile: int, maxworkers: int | None) -> dict:
    """``TiffWriter.write`` arguments shared by every level."""
    if compression == "auto":
        compression = "jpeg" if rgb else "deflate"
    if compression not in ("jpeg", "deflate", None):
        raise ValueError(f"unknown compression {compression!r}")
    options: dict = dict(tile=(tile, tile), photometric="rgb" if rgb else "minisblack",
                         compression=compression, resolutionunit="CENTIMETER", metadata=None,
                         maxworkers=maxworkers)
    if compression == "jpeg":
        options["compressionargs"] = {"level": int(quality)}
    elif compression == "deflate":  # TIFF code 8 (Adobe), what libtiff writes for "deflate"
        options["compression"] = tifffile.COMPRESSION.ADOBE_DEFLATE
        options["compressionargs"] = {"level": 6}
    return options


def _write_levels(path: str, levels: list[np.ndarray], mpp: float, options: dict) -> None:
    """Level 0 as SubfileType 0, the others as reduced-resolution IFDs, each with its resolution."""
    h0, w0 = levels[0].shape[:2]
    bigtiff = sum(lv.nbytes for lv in levels) > 2**32 - 2**27
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for i, lv in enumerate(levels):
            h, w = lv.shape[:2]
            res = (1e4 / (mpp * w0 / w), 1e4 / (mpp * h0 / h))  # pixels per cm
            tw.write(lv, subfiletype=0 if i == 0 else 1, resolution=res, **options)


# ============================================================================= streamed writing
def halving_shapes(height: int, width: int, below: int, min_levels: int = 1) -> list[tuple[int, int]]:
    """(height, width) of level 0 and of each halved level (sides rounded up), down to the first
    level whose sides are both below ``below``, and at least ``min_levels`` levels (while > 1 px)."""
    shapes = [(int(height), int(width))]
    while (max(shapes[-1]) >= below or len(shapes) < min_levels) and shapes[-1] != (1, 1):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def encode_jpeg_tile(rgb: np.ndarray, quality: int = 85) -> bytes:
    """One (tile, tile, 3) uint8 RGB tile as a JPEG stream the way :func:`write_pyramidal_tiff`
    stores RGB tiles (YCbCr, 4:2:0 subsampling, ``quality``), with optimised Huffman tables."""
    return imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=int(quality), colorspace="RGB",
                                    outcolorspace="YCBCR", subsampling=(2, 2), optimize=True)


def write_streamed_pyramid(path: str | os.PathLike, shapes: list[tuple[int, int]],
                           tiles_of_level: Callable[[int], Iterable[bytes]], tile: int = 256,
                           mpp: float = DEFAULT_MPP) -> int:
    """Write a JPEG-tiled RGB pyramid whose tiles come from ``tiles_of_level(k)``: the JPEG streams
    (:func:`encode_jpeg_tile`) of level ``k``'s ceil(h / tile) x ceil(w / tile) tiles, row by row,
    left to right; tiles on the right and bottom edges are full-size (the part outside the level is
    never shown). Only the tile being written is in memory. Same layout, resolution tags and
    atomic replace as :func:`write_pyramidal_tiff`; returns the file size in bytes."""
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_streamed_levels(tmp, shapes, tiles_of_level, tile, mpp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path.stat().st_size


def _write_streamed_levels(path: str, shapes: list[tuple[int, int]], tiles_of_level, tile: int, mpp: float) -> None:
    h0, w0 = shapes[0]
    bigtiff = sum(3 * h * w for h, w in shapes) > 2**32 - 2**27  # as write_pyramidal_tiff, on raw size
    options = _tile_options(True, "jpeg", 85, tile, None)  # the tags; the tiles come encoded
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for k, (h, w) in enumerate(shapes):
            res = (1e4 / (mpp * w0 / w), 1e4 / (mpp * h0 / h))  # pixels per cm
            tw.write(iter(tiles_of_level(k)), shape=(h, w, 3), dtype=np.uint8, subfiletype=0 if k == 0 else 1,
                     resolution=res, **options)
