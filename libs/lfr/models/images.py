"""Decode untrusted image bytes (uploads, enrollment photos, operator probes) into RGB uint8 arrays.

Every refusal raises :class:`ImageError` with a stable ``reason`` code that services can map to an API error:

=================  ==========================================================================
reason             meaning
=================  ==========================================================================
``empty``          no bytes at all
``too_large``      more bytes than ``max_bytes`` (checked before anything is parsed)
``not_an_image``   no accepted image format (JPEG, PNG, WebP, BMP, GIF, TIFF) recognised in the bytes;
                   other formats (EPS, ICNS, ...) are never parsed at all
``wrong_format``   a recognised format that the caller does not accept (``formats``)
``too_many_pixels`` the *declared* width × height exceeds ``max_pixels`` (a decompression bomb);
                   refused from the header, before any pixel data is decompressed (Pillow's own bomb
                   error or warning, for limits above Pillow's, is reported the same way)
``too_small``      width or height below ``min_side``
``truncated``      the pixel data ends early or is corrupt
``unsupported``    a pixel mode we cannot turn into RGB
=================  ==========================================================================

Conversions: greyscale (8/16-bit) → replicated to RGB; 16-bit samples are scaled to 8 bits (high byte);
palette → RGB; CMYK/YCbCr/LAB → RGB; images with alpha are composited onto white (a transparent
background is most often an ID-photo cut-out; dropping alpha would expose whatever colour the
transparent pixels happen to store); the EXIF orientation tag is applied, so phone photos come out
upright. Multi-frame files (GIF, TIFF, APNG) give their first frame.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16
# The only formats whose parsers see untrusted bytes (Pillow names). Others, some of which hand the data to
# external programs (EPS -> Ghostscript) or hold many images (ICNS, ICO), are refused as not an image.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class ImageError(ValueError):
    """An image was refused. ``reason`` is a stable machine-readable code (see module doc)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1"):
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (PNG/TIFF). "I" is a 32-bit container Pillow also uses for 16-bit data.
        a = np.asarray(im)
        a = a.astype(np.int64)
        a = np.clip(a, 0, 65535) >> 8
        grey = a.astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        # float greyscale: assume 0..1 when it fits, else 0..255
        a = np.asarray(im, dtype=np.float64)
        if np.isfinite(a).all() and a.size and a.max() <= 1.0:
            a = a * 255.0
        grey = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported", f"cannot convert pixel mode {mode!r} to RGB: {exc}") from exc


def _open(data: bytes, max_bytes: int, max_pixels: int, min_side: int, formats) -> Image.Image:
    """Check the size, parse the header only (no pixel data is decompressed) and check the declared
    dimensions; returns the opened, not yet loaded image (the caller closes it)."""
    if data is None or len(data) == 0:
        raise ImageError("empty", "no image data")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        # Image.open parses the header only; pixel data is decoded lazily by load(). Only the accepted
        # formats' parsers ever see the bytes.
        im = Image.open(io.BytesIO(bytes(data)), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own limit
        raise ImageError("too_many_pixels", f"the declared size is over the limit of {max_pixels} pixels "
                         f"(and Pillow's own decompression-bomb limit: {exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "not a decodable image: no known image format in the data "
                         f"(accepted: {', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # malformed header of a recognised format
        raise ImageError("truncated", f"not a decodable image: cannot parse its header: {exc}") from exc
    w, h = im.size
    fmt = im.format or "image"
    try:
        if formats is not None and fmt not in formats:
            raise ImageError("wrong_format", f"{fmt} images are not accepted (only {' or '.join(formats)})")
        if w * h > max_pixels:
            raise ImageError(
                "too_many_pixels",
                f"{fmt} declares {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
            )
        if w < min_side or h < min_side:
            raise ImageError("too_small", f"{fmt} is {w}x{h}; both sides must be at least {min_side} px")
    except ImageError:
        im.close()
        raise
    return im


def image_header(
    data: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    formats: tuple[str, ...] | None = None,
) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, after the same checks as :func:`decode_image`;
    nothing is decompressed. ``formats`` narrows the accepted formats (Pillow names: "JPEG", "PNG")."""
    with _open(data, max_bytes, max_pixels, min_side, formats) as im:
        return im.format or "image", im.size[0], im.size[1]


def decode_image(
    data: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    formats: tuple[str, ...] | None = None,
) -> np.ndarray:
    """Decode ``data`` into an (H, W, 3) uint8 RGB array, or raise :class:`ImageError`.

    The byte size is checked first, then the header is parsed and the declared dimensions are checked
    against ``max_pixels`` and ``min_side``; only then is pixel data decompressed.
    """
    im = _open(data, max_bytes, max_pixels, min_side, formats)
    with im:
        fmt = im.format or "image"
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("too_many_pixels", f"over Pillow's decompression-bomb limit: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError("truncated", f"not a decodable image: {fmt} pixel data is truncated or corrupt: "
                             f"{exc}") from exc
        if im.size[0] * im.size[1] > max_pixels:  # a format whose loaded frame differs from its header
            raise ImageError("too_many_pixels", f"{fmt} decodes to {im.size[0]}x{im.size[1]} pixels, over the "
                             f"limit of {max_pixels}")
        try:
            im = ImageOps.exif_transpose(im) or im
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a good image unusable
            pass
        arr = np.ascontiguousarray(_to_rgb(im))
    if not arr.flags.writeable:  # np.asarray over a Pillow image is a read-only view
        arr = arr.copy()
    return arr


def decode_frame(
    data: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """A camera frame (JPEG or PNG) as :func:`decode_image` gives it, faster: after the same header checks a JPEG
    is decoded by OpenCV's libjpeg-turbo straight into an array (less CPU than Pillow's decode and array copy;
    measured in docs/benchmarks.md). Anything OpenCV cannot decode goes to :func:`decode_image`, for its precise refusal."""
    fmt, w, h = image_header(data, max_bytes, max_pixels, DEFAULT_MIN_SIDE)
    if fmt == "JPEG":
        import cv2

        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None and bgr.shape[0] * bgr.shape[1] == w * h:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return decode_image(data, max_bytes, max_pixels)


def i420_to_rgb(planes: bytes, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An (H, W, 3) RGB array from a frame's YUV 4:2:0 planes (Y, then U and V at half size: I420, as a video
    decoder gives them; BT.601 limited range, as the decoder's own RGB conversion). Refused (:class:`ImageError`)
    unless the dimensions are even, within `max_pixels`, and the bytes are exactly the planes."""
    if width < DEFAULT_MIN_SIDE or height < DEFAULT_MIN_SIDE or width % 2 or height % 2:
        raise ImageError("too_small" if min(width, height) < DEFAULT_MIN_SIDE else "truncated",
                         f"I420 planes of {width}x{height}: both sides must be even and at least {DEFAULT_MIN_SIDE}")
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"I420 planes of {width}x{height} = {width * height} pixels, over the "
                         f"limit of {max_pixels}")
    if len(planes) != width * height * 3 // 2:
        raise ImageError("truncated", f"I420 planes of {width}x{height} are {width * height * 3 // 2} bytes, "
                         f"got {len(planes)}")
    import cv2

    return cv2.cvtColor(np.frombuffer(planes, np.uint8).reshape(height * 3 // 2, width), cv2.COLOR_YUV2RGB_I420)
