"""Ingest hands a pulled frame to detection without a JPEG round trip (#14 item 4): the decoder's own I420 planes
(FrameEvent.i420), turned into the same RGB pixels the JPEG path gives, and refused when they do not fit; a pushed
JPEG frame is decoded by OpenCV's libjpeg-turbo into the pixels Pillow gives."""

from __future__ import annotations

import io
import os
import time

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


def shared_event(ref, w=1920, h=1080):
    return ingest_pb2.FrameEvent(width=w, height=h, shared=ingest_pb2.SharedFrame(
        ring=ref.ring, slot=ref.slot, seq=ref.seq, size=ref.size))


def test_shared_memory_frames_give_the_raw_pixels_and_are_gone_once_overwritten_or_closed(data):
    """LFR_FRAME_ENCODING=shm: the planes go into a ring in /dev/shm (mode 0600), only their place on NATS; a frame
    overwritten or a ring closed is refused as gone, never read torn; closing zeroes and removes the ring."""
    from lfr.ingest.sources import Rings
    from lfr.runtime import framering

    frame = first_frame(data / "video/pedestrians-1080p25.mp4")
    rings, reader = Rings(slots=3, linger_s=0.0), framering.RingReader()
    ref = frame_payload(frame, "shm", 90, 0, rings)
    assert isinstance(ref, framering.FrameRef) and ref.size == 1920 * 1080 * 3 // 2
    path = framering.SHM_DIR / ref.ring
    assert path.stat().st_mode & 0o777 == 0o600
    raw = frame_image(ingest_pb2.FrameEvent(i420=frame_payload(frame, "raw", 90, 8 << 20), width=1920, height=1080),
                      20_000_000, 40_000_000)
    shared = frame_image(shared_event(ref), 20_000_000, 40_000_000, reader)
    assert np.array_equal(shared, raw)
    with pytest.raises(ImageError, match="unreachable"):  # a process without a reader
        frame_image(shared_event(ref), 20_000_000, 40_000_000)
    later = [frame_payload(frame, "shm", 90, 0, rings) for _ in range(3)]  # 3 slots: the first is overwritten
    with pytest.raises(ImageError, match="gone"):
        frame_image(shared_event(ref), 20_000_000, 40_000_000, reader)
    assert frame_image(shared_event(later[-1]), 20_000_000, 40_000_000, reader).shape == (1080, 1920, 3)
    ring = rings.ring
    rings.close()  # the source ended: closed after linger_s (0 here)
    ring_closed = time.monotonic() + 5
    while path.exists() and time.monotonic() < ring_closed:
        time.sleep(0.01)
    assert not path.exists() and ring.closed
    with pytest.raises(ImageError, match="gone"):  # the reader's old mapping now holds zeros
        frame_image(shared_event(later[-1]), 20_000_000, 40_000_000, reader)
    reader.close()


@pytest.mark.parametrize("ring, slot, size", [("../../etc/passwd", 0, 10), ("lfr-frames-1-zz", 0, 10),
                                              (None, 99, 10), (None, 0, 10**9)])
def test_a_bad_frame_reference_is_refused_not_followed(ring, slot, size):
    from lfr.runtime import framering

    r = framering.FrameRing(2, 64 * 64 * 3 // 2)
    try:
        good = r.put(np.zeros(64 * 64 * 3 // 2, np.uint8))
        ref = framering.FrameRef(ring or good.ring, slot, good.seq, size)
        with pytest.raises(ImageError, match="unreachable"):
            frame_image(shared_event(ref, 64, 64), 20_000_000, 40_000_000, framering.RingReader())
    finally:
        r.close()


def test_rings_of_a_dead_ingest_are_zeroed_and_removed():
    import subprocess
    import sys

    from lfr.runtime import framering

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = framering.SHM_DIR / f"{framering.PREFIX}{int(dead.stdout)}-{'ab' * 8}"
    orphan.write_bytes(b"\x07" * 8192)
    mine = framering.FrameRing(2, 4096)  # this process runs: its ring stays
    try:
        assert orphan.name in framering.remove_orphans()
        assert not orphan.exists() and mine.path.exists()
    finally:
        mine.close()
        orphan.unlink(missing_ok=True)


def test_a_pulled_source_hands_frames_through_its_ring_and_removes_it_after(data):
    from lfr.runtime import framering

    reader, got = framering.RingReader(), []
    src = SourceState("s", "d", "c", str(data / "video/pedestrians-1080p25.mp4"), 5.0, realtime=False)

    def emit(ref, w, h, capture_ns, t, index):  # detection reads each frame as it is published
        got.append(frame_image(shared_event(ref, w, h), 20_000_000, 40_000_000, reader).shape)

    run_source(src, 90, emit, encoding="shm", linger_s=0.2)
    assert src.state == "FINISHED", src.error
    assert got and all(g == (1080, 1920, 3) for g in got)
    time.sleep(0.6)
    assert not [p for p in framering.SHM_DIR.glob(f"{framering.PREFIX}{os.getpid()}-*")]
    reader.close()


def test_close_all_leaves_no_ring_and_a_full_shm_falls_back_to_raw_planes(data, monkeypatch):
    """Ingest's stop (and the process's exit) closes every ring at once; a ring that cannot be made (a full
    /dev/shm: its memory is reserved up front, never a SIGBUS later) sends the planes on NATS instead."""
    from lfr.ingest.sources import Rings
    from lfr.runtime import framering

    rings = [framering.FrameRing(2, 4096) for _ in range(3)]
    framering.close_all()
    assert all(r.closed and not r.path.exists() for r in rings)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    frame = first_frame(data / "video/pedestrians-1080p25.mp4")
    payload = frame_payload(frame, "shm", 90, 0, Rings(4, 0.0))
    assert isinstance(payload, I420) and len(payload) == 1920 * 1080 * 3 // 2
    assert not list(framering.SHM_DIR.glob(f"{framering.PREFIX}{os.getpid()}-*"))
