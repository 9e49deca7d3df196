"""Ingest hands a pulled frame to detection without a JPEG round trip (#14 item 4): the decoder's own I420 planes
(FrameEvent.i420), turned into the same RGB pixels the JPEG path gives, and refused when they do not fit; a pushed
JPEG frame is decoded by OpenCV's libjpeg-turbo into the pixels Pillow gives."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from lfr.detection.core import frame_image
from lfr.ingest.sources import I420, SourceState, frame_payload, run_source
from lfr.models.images import ImageError, decode_image
from lfr.pb import ingest_pb2


def first_frame(path):
    with av.open(str(path)) as c:
        return next(c.decode(video=0))


def test_raw_frames_are_the_decoders_planes_and_give_the_same_pixels(data):
    frame = first_frame(data / "video/pedestrians-1080p25.mp4")
    raw = frame_payload(frame, "raw", 90, 8 << 20)
    assert isinstance(raw, I420) and len(raw) == 1920 * 1080 * 3 // 2
    rgb = frame_image(ingest_pb2.FrameEvent(i420=raw, width=1920, height=1080), 20_000_000, 40_000_000)
    ref = frame.to_ndarray(format="rgb24")  # the decoder's own RGB conversion
    assert rgb.shape == ref.shape and np.abs(rgb.astype(int) - ref).mean() < 1.5
    jpeg = frame_payload(frame, "jpeg", 90, 8 << 20)  # LFR_FRAME_ENCODING=jpeg, or a frame too big for NATS
    assert not isinstance(jpeg, I420) and jpeg[:3] == b"\xff\xd8\xff"
    assert not isinstance(frame_payload(frame, "raw", 90, 1 << 20), I420)  # over the limit: a JPEG
    from_jpeg = frame_image(ingest_pb2.FrameEvent(image=jpeg, width=1920, height=1080), 20_000_000, 40_000_000)
    assert np.abs(from_jpeg.astype(int) - rgb).mean() < 3


def test_pulled_source_emits_raw_frames(data):
    got = []
    src = SourceState("s", "d", "c", str(data / "video/pedestrians-1080p25.mp4"), 5.0, realtime=False)
    run_source(src, 90, lambda image, w, h, capture_ns, t, index: got.append((type(image), len(image), w, h)),
               encoding="raw", raw_limit=8 << 20)
    assert src.state == "FINISHED", src.error
    assert got and all(g == (I420, 1920 * 1080 * 3 // 2, 1920, 1080) for g in got)


@pytest.mark.parametrize("planes, w, h", [(b"\0" * 100, 1920, 1080), (b"\0" * (33 * 32 * 3 // 2), 33, 32),
                                          (b"\0" * (64 * 64 * 3 // 2), 64, 64 * 10**6)])
def test_bad_planes_are_refused(planes, w, h):
    with pytest.raises(ImageError):
        frame_image(ingest_pb2.FrameEvent(i420=planes, width=w, height=h), 20_000_000, 40_000_000)


def test_jpeg_frames_decode_as_pillow_does(data):
    img = Image.open(next((data / "lfw-dev").rglob("*.jpg"))).convert("RGB").resize((640, 480))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    ours = frame_image(ingest_pb2.FrameEvent(image=buf.getvalue()), 20_000_000, 40_000_000)
    ref = decode_image(buf.getvalue())
    assert ours.shape == ref.shape and np.abs(ours.astype(int) - ref).max() <= 3
    with pytest.raises(ImageError):
        frame_image(ingest_pb2.FrameEvent(image=buf.getvalue()[:200]), 20_000_000, 40_000_000)
