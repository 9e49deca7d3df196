"""Pure core of the ingest service: frame checks (sampling is `lfr.media.Sampler`). No I/O."""

from __future__ import annotations

from lfr.models.images import ImageError, image_header
from lfr.runtime.limits import InputInvalid, InputTooLarge

FORMATS = ("JPEG", "PNG")


def check_frame(data: bytes, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    """Cheap checks before a frame enters the pipeline: size, container, declared dimensions, completeness.

    Returns (width, height); raises a `lfr.runtime.limits.InputError` (a ValueError): InputTooLarge over a
    limit, InputInvalid otherwise. Pixels are decoded by detection.
    """
    if not data:
        raise InputInvalid("empty frame")
    if len(data) > max_bytes:
        raise InputTooLarge(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        fmt, w, h = image_header(data, max_bytes, max_pixels)  # the header only: nothing is decompressed
    except ImageError as exc:
        if exc.reason == "too_many_pixels":
            raise InputTooLarge(f"frame exceeds the limit of {max_pixels} pixels: {exc.message}") from None
        raise InputInvalid("frame is not a JPEG or PNG image") from None
    if fmt not in FORMATS:
        raise InputInvalid(f"frame format {fmt} not accepted (JPEG or PNG)")
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise InputInvalid("JPEG frame is truncated (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-16:]:
        raise InputInvalid("PNG frame is truncated (no IEND chunk)")
    return w, h
