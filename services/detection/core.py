"""Pure core of the detection service: image -> faces with quality, aligned chips and review crops."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import replace

import cv2
import numpy as np
from PIL import Image

from lfr.models.images import ImageError, decode_frame, i420_to_rgb
from lfr.models.quality import face_quality
from lfr.models.types import Face
from lfr.pb import common_pb2, detection_pb2, ingest_pb2
from lfr.runtime import framering


def downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the longer side is at most max_side; returns (image, factor to map back to full size)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0
    factor = max(h, w) / max_side
    # area averaging (a box filter at an integer factor, e.g. 1080p -> 960), with OpenCV: less CPU than Pillow's reduce
    small = cv2.resize(image, (round(w / factor), round(h / factor)), interpolation=cv2.INTER_AREA)
    return small, w / small.shape[1]


def frame_image(frame: ingest_pb2.FrameEvent, max_bytes: int, max_pixels: int,
                rings: framering.RingReader | None = None) -> np.ndarray:
    """A frame event's pixels (RGB): its I420 planes as ingest decoded them (in a shared-memory ring, read with
    `rings`, or in the event), else its JPEG or PNG. Raises `lfr.models.images.ImageError` (reason "gone": the
    ring's slot was overwritten or released before it was read)."""
    if frame.HasField("shared"):
        ref = frame.shared
        if rings is None:
            raise ImageError("unreachable", "a shared-memory frame, and this process reads no frame rings")
        try:
            rgb = rings.read(framering.FrameRef(ref.ring, ref.slot, ref.seq, ref.size),
                             lambda planes: i420_to_rgb(planes, frame.width, frame.height, max_pixels))
        except ImageError:  # the planes themselves (a ValueError too)
            raise
        except (ValueError, OSError) as exc:  # a reference that is no frame of a ring
            raise ImageError("unreachable", f"frame ring {ref.ring[:40]!r}: {type(exc).__name__}") from None
        if rgb is None:
            raise ImageError("gone", "the frame's slot was overwritten or its ring closed before it was read")
        return rgb
    if frame.i420:
        return i420_to_rgb(frame.i420, frame.width, frame.height, max_pixels)
    return decode_frame(frame.image, max_bytes, max_pixels)


def rescale_face(face: Face, factor: float) -> Face:
    if factor == 1.0:
        return face
    return replace(face, box=tuple(v * factor for v in face.box), landmarks=face.landmarks * factor)


def crop_jpeg(image: np.ndarray, box, margin: float = 0.4, quality: int = 85) -> bytes:
    """A review crop around the face (with margin), for alerts and officers' side-by-side view."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
    right, bottom = min(w, int(x2 + mx) + 1), min(h, int(y2 + my) + 1)
    if right <= left or bottom <= top:
        return b""
    buf = io.BytesIO()
    Image.fromarray(image[top:bottom, left:right]).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def face_pb(image: np.ndarray, face: Face, chips: dict[str, np.ndarray] | None, crop: bool,
            track_id: int = 0) -> detection_pb2.DetectedFace:
    q = face.quality
    out = detection_pb2.DetectedFace(
        box=common_pb2.Box(x1=face.box[0], y1=face.box[1], x2=face.box[2], y2=face.box[3]),
        landmarks=[common_pb2.Point(x=float(x), y=float(y)) for x, y in np.asarray(face.landmarks)],
        score=face.score, track_id=track_id,
    )
    if q is not None:
        out.quality.CopyFrom(common_pb2.FaceQuality(
            inter_eye_px=q.inter_eye_px, sharpness=q.sharpness, yaw_deg=q.yaw_deg, pitch_deg=q.pitch_deg,
            roll_deg=q.roll_deg, detector_score=q.detector_score))
    for model_id, chip in (chips or {}).items():
        out.chips.append(common_pb2.Chip(model_id=model_id, size=chip.shape[0],
                                         rgb=np.ascontiguousarray(chip, dtype=np.uint8).tobytes()))
    if crop:
        out.crop_jpeg = crop_jpeg(image, face.box)
    return out


def inter_eye_px(face: Face) -> float:
    lm = np.asarray(face.landmarks, dtype=np.float64).reshape(5, 2)
    return float(np.hypot(*(lm[1] - lm[0])))


def detect_images(engine, images: list[np.ndarray], max_side: int | Sequence[int], with_chips: bool, with_crops: bool,
                  min_face_px: float = 0.0, select: Callable[[int, list[Face]], list[int | None]] | None = None
                  ) -> list[list[detection_pb2.DetectedFace]]:
    """Detect on (downscaled) copies, align and crop from the full-resolution images. Faces with fewer than
    `min_face_px` between the eyes (full resolution) are dropped before their quality, chip or crop is made;
    `select(image index, faces)`, if given, then says which of the rest to keep: per face its track id (kept) or
    None (skipped; the live face sampler). `max_side` may be given per image."""
    sides = [max_side] * len(images) if isinstance(max_side, int) else list(max_side)
    small = [downscale(im, side) for im, side in zip(images, sides, strict=True)]
    found = engine.detect([s for s, _ in small])
    out = []
    for k, (image, (_, factor), faces) in enumerate(zip(images, small, found, strict=True)):
        faces = [f for f in (rescale_face(f, factor) for f in faces) if inter_eye_px(f) >= min_face_px]
        tracks = [0] * len(faces)
        if select is not None:  # also for a frame without faces: the tracker counts the frames a face is missing
            chosen = [(f, t) for f, t in zip(faces, select(k, faces), strict=True) if t is not None]
            faces, tracks = [f for f, _ in chosen], [t for _, t in chosen]
        if factor != 1.0:
            faces = [replace(f, quality=face_quality(image, f)) for f in faces]
        out.append([face_pb(image, f, engine.chips(image, f) if with_chips else None, with_crops, t)
                     for f, t in zip(faces, tracks, strict=True)])
    return out
