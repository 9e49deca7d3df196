"""decode_image: limits are checked before decoding, every refusal carries a reason, modes convert to RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lfr.models.images import ImageError, decode_image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG built by hand: raw = filtered scanlines (filter byte + samples per row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as exc:
        decode_image(data, **kw)
    assert exc.value.message
    return exc.value.reason


def _rgb(h: int = 40, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_empty_bytes():
    assert _reason(b"") == "empty"


def test_non_image_bytes():
    assert _reason(b"this is not an image, just some text" * 10) == "not_an_image"


def test_truncated_jpeg():
    data = _encode(_rgb(64, 64), "JPEG", quality=90)
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_one_pixel_is_too_small():
    assert _reason(_encode(np.zeros((1, 1, 3), np.uint8))) == "too_small"


def test_min_side_configurable():
    data = _encode(_rgb(20, 20))
    assert decode_image(data).shape == (20, 20, 3)
    assert _reason(data, min_side=32) == "too_small"
    assert decode_image(_encode(np.zeros((1, 1, 3), np.uint8)), min_side=1).shape == (1, 1, 3)


def test_rgb_roundtrip_exact():
    a = _rgb()
    out = decode_image(_encode(a))
    assert out.dtype == np.uint8 and out.shape == (40, 32, 3)
    np.testing.assert_array_equal(out, a)


def test_greyscale_becomes_rgb():
    g = np.arange(40 * 32, dtype=np.uint8).reshape(40, 32)
    out = decode_image(_encode(g))
    assert out.shape == (40, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_rgba_composited_on_white():
    a = np.zeros((20, 20, 4), np.uint8)
    a[:, :, 0] = 200  # red everywhere
    a[:10, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = decode_image(_encode(a))
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[15, 0], [255, 255, 255])


def test_palette_image():
    p = Image.fromarray(_rgb(24, 24)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    p.save(buf, "PNG")
    out = decode_image(buf.getvalue())
    np.testing.assert_array_equal(out, np.asarray(p.convert("RGB")))


def test_16bit_grey_png_scaled_to_8bit():
    w, h = 17, 16
    vals = np.full((h, w), 0xABCD, dtype=">u2")
    raw = b"".join(b"\x00" + vals[r].tobytes() for r in range(h))
    out = decode_image(_png(w, h, 16, 0, raw))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert (out == 0xAB).all()


def test_16bit_rgb_png():
    w, h = 16, 16
    vals = np.zeros((h, w, 3), dtype=">u2")
    vals[..., 0], vals[..., 1], vals[..., 2] = 0xFF00, 0x8000, 0x0100
    raw = b"".join(b"\x00" + vals[r].tobytes() for r in range(h))
    out = decode_image(_png(w, h, 16, 2, raw))
    assert (out[..., 0] == 0xFF).all() and (out[..., 1] == 0x80).all() and (out[..., 2] == 0x01).all()


def test_decompression_bomb_refused_from_header():
    # 30000 x 30000 declared, a few hundred bytes on the wire: must be refused without decoding.
    data = _png(30000, 30000, 8, 2, b"\x00" * 64)
    assert len(data) < 200
    assert _reason(data) == "too_many_pixels"


def test_pixel_limit_configurable():
    data = _png(5000, 5000, 8, 0, b"\x00")  # 25 Mpx declared: under the default 40 Mpx limit ...
    assert _reason(data) == "truncated"  # ... so it is parsed, and its 1-byte payload is found truncated
    assert _reason(data, max_pixels=1_000_000) == "too_many_pixels"
    assert _reason(_encode(_rgb(40, 40)), max_pixels=1000) == "too_many_pixels"


def test_byte_limit_checked_first():
    data = _encode(_rgb())
    assert _reason(data, max_bytes=len(data) - 1) == "too_large"
    assert _reason(b"x" * 101, max_bytes=100) == "too_large"


def test_exif_orientation_applied():
    a = np.zeros((20, 40, 3), np.uint8)  # stored landscape: 40 wide, 20 high
    a[:, :20] = 255  # left half white
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 20, 3)  # displayed portrait
    assert out[5, 10].mean() > 200 and out[35, 10].mean() < 50  # stored left half is now on top


def test_error_is_value_error_with_reason():
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
