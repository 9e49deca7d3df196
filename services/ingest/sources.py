"""Pulled sources: a file path or rtsp(s):// URL (checked by the caller) opened by `lfr.media`, decoded with PyAV in
a thread, sampled to a target fps."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lfr.media import Sampler, open_container
from lfr.models.images import DEFAULT_MAX_PIXELS
from lfr.runtime import framering
from lfr.runtime.limits import check_pixels


@dataclass
class SourceState:
    source_id: str
    deployment_id: str
    camera_id: str
    url: str
    target_fps: float
    realtime: bool
    state: str = "RUNNING"
    frames_published: int = 0
    error: str = ""
    stop: threading.Event = field(default_factory=threading.Event)


class NonRefSkip:
    """Sampling a fast stream (e.g. 10 of 25 fps), frames that no other frame is predicted from (B-frames) need
    not be decoded: the decoder skips them, which cut decoding of the 1080p25 test video from 13.4 to 7.5 ms per
    source frame (3.5x less CPU per second of video); the frames it does decode are exact. If what remains over
    the first 2 s of the stream is less than 1.2x the target rate, every frame is decoded again."""

    WINDOW_S = 2.0

    def __init__(self, stream, target_fps: float):
        self.stream, self.target_fps = stream, target_fps
        rate = float(stream.average_rate or 0)
        self.active = rate >= 2 * target_fps > 0
        self.first: float | None = None
        self.count = 0
        if self.active:
            stream.codec_context.skip_frame = "NONREF"

    def saw(self, t: float) -> None:
        if not self.active:
            return
        if self.first is None:
            self.first = t
        self.count += 1
        if t - self.first >= self.WINDOW_S:
            if self.count / (t - self.first) < 1.2 * self.target_fps:
                self.stream.codec_context.skip_frame = "DEFAULT"
            self.active = False  # decided


class I420(bytes):
    """A decoded frame's planes, YUV 4:2:0: Y (w x h), then U and V (w/2 x h/2 each). Handed to detection as they
    are (FrameEvent.i420): no JPEG encode here, no decode there (#14)."""


class Rings:
    """A source's shared-memory frame ring (LFR_FRAME_ENCODING=shm, lfr.runtime.framering), made for its frame
    size: a new one when the size changes; each is closed `linger_s` after its last frame (frames still in flight
    are stale by then)."""

    def __init__(self, slots: int, linger_s: float):
        self.slots, self.linger_s = slots, linger_s
        self.ring: framering.FrameRing | None = None

    def put(self, planes) -> framering.FrameRef | None:
        """The frame's place in the ring; None when no ring can be made (a full /dev/shm: the caller sends the
        planes themselves)."""
        if self.ring is None or self.ring.frame_bytes != planes.size:
            self.close()
            try:
                self.ring = framering.FrameRing(self.slots, planes.size)
            except OSError:
                return None
        return self.ring.put(planes)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close_later(self.linger_s)
            self.ring = None


def frame_payload(frame, encoding: str, jpeg_quality: int, raw_limit: int,
                  rings: Rings | None = None) -> bytes | framering.FrameRef:
    """What ingest publishes of a decoded frame: where its I420 planes are in shared memory (`encoding` "shm",
    even dimensions), or the planes themselves ("raw", at most `raw_limit` bytes), else a JPEG. H.264 decodes to
    yuv420p already, so the planes are one copy; other pixel formats are converted by the decoder's own scaler (no
    RGB step)."""
    w, h = frame.width, frame.height
    shm = encoding == "shm" and rings is not None
    if (shm or encoding == "raw") and w % 2 == 0 and h % 2 == 0 and (shm or w * h * 3 // 2 <= raw_limit):
        if frame.format.name not in ("yuv420p", "yuvj420p"):
            frame = frame.reformat(format="yuv420p")
        planes = frame.to_ndarray()
        ref = rings.put(planes) if shm else None
        return ref if ref is not None else I420(planes.tobytes())
    buf = io.BytesIO()
    frame.to_image().save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def run_source(src: SourceState, jpeg_quality: int,
               emit: Callable[[bytes, int, int, int, float, int], None], max_pixels: int = DEFAULT_MAX_PIXELS,
               encoding: str = "jpeg", raw_limit: int = 0, linger_s: float = 1.0) -> None:
    """Decode, sample and hand frames to `emit(image, w, h, capture_ns, video_time_s, index)` until the end
    of the source or `src.stop`; `image` is a JPEG, the frame's `I420` planes, or a `FrameRef` (`frame_payload`).
    Files are paced at their own frame rate when `realtime` is set. Frame rings live `linger_s` after the source."""
    # a ring holds about a second of the source's frames, and a few more (frames older are stale at detection)
    rings = Rings(min(framering.MAX_SLOTS, int(src.target_fps) + 4), linger_s) if encoding == "shm" else None
    try:
        with open_container(src.url, max_pixels) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            skip = NonRefSkip(stream, src.target_fps)
            sampler = Sampler(src.target_fps)
            t_start = time.monotonic()
            index = 0
            for frame in container.decode(stream):
                if src.stop.is_set():
                    src.state = "STOPPED"
                    return
                t = float(frame.time or 0.0)
                skip.saw(t)
                index += 1
                if not sampler.keep(t):
                    continue
                if src.realtime:
                    delay = t_start + t - time.monotonic()
                    if delay > 0:
                        src.stop.wait(delay)
                check_pixels(frame.width, frame.height, max_pixels)  # a stream may change size midway
                capture_ns = time.time_ns()
                emit(frame_payload(frame, encoding, jpeg_quality, raw_limit, rings), frame.width, frame.height,
                     capture_ns, t, index - 1)
                src.frames_published += 1
        src.state = "FINISHED"
    except Exception as exc:  # a source failure is reported on the source, never crashes the service
        src.state = "FAILED"
        src.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if rings is not None:
            rings.close()


async def start_thread(loop: asyncio.AbstractEventLoop, src: SourceState, jpeg_quality: int, emit,
                       max_pixels: int = DEFAULT_MAX_PIXELS, encoding: str = "jpeg",
                       raw_limit: int = 0, linger_s: float = 1.0) -> threading.Thread:
    thread = threading.Thread(target=run_source, args=(src, jpeg_quality, emit, max_pixels, encoding, raw_limit,
                                                       linger_s),
                              name=f"source-{src.source_id}", daemon=True)
    thread.start()
    return thread
