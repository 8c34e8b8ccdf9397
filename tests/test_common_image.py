"""common/image.py: one decoder for image files and encoded bytes (nuclick crops, pretrain patches and
packs): grey replicated, alpha composited onto white, 16-bit scaled, palettes expanded, clear errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common.image import decode_image, read_image, to_rgb


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_rgba_is_composited_on_white_by_hand():
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], np.uint8)
    out = decode_image(_png(Image.fromarray(rgba, "RGBA")))
    # 128/255 of the colour + 127/255 of white, rounded: (200*128 + 255*127 + 127) // 255 = 227, ...
    assert out.tolist() == [[[200, 100, 0], [255, 255, 255], [227, 177, 127]]]


def test_grey_palette_and_16_bit(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), np.repeat(grey[..., None], 3, -1))
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert decode_image(_png(pal)).tolist() == [[[255, 0, 0], [0, 0, 255]], [[0, 0, 255], [255, 0, 0]]]
    wide = (grey.astype(np.uint16) * 257)
    Image.fromarray(wide).save(tmp_path / "w.png")  # 16-bit greyscale PNG
    assert np.array_equal(read_image(tmp_path / "w.png")[..., 0], grey)
    assert to_rgb(np.ones((2, 2), bool)).max() == 255


def test_file_and_bytes_agree_and_are_writable(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    a, b = read_image(tmp_path / "a.png"), decode_image((tmp_path / "a.png").read_bytes())
    assert np.array_equal(a, rgb) and np.array_equal(b, rgb) and a.flags.writeable and b.flags.writeable


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png: image not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="junk.png: not a readable image"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(OSError, match="item 3: not a readable image"):
        decode_image(b"\x89PNG broken", source="item 3")
