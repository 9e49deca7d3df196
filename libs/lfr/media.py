"""The one place the platform opens videos and images from files and streams: PyAV containers under the pixel
limit, sampling at a target rate, the media of a retrospective job (paths confined to the media roots, URLs to
the allowed camera hosts, folders expanded, durations probed) and its sampled frames as JPEG.

Used by ingest (pulled sources) and identification (retrospective jobs). Checks that refuse input raise
`lfr.runtime.limits.InputError`; nothing here keeps a frame.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

from lfr.models.images import DEFAULT_MAX_PIXELS
from lfr.runtime import limits

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}


def open_container(url: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open a checked location (see `lfr.runtime.limits.check_source_url`): an rtsp(s):// URL, or a file that
    ffmpeg may read only as a file (no network or pseudo-protocol it could name, e.g. from a playlist). A
    video stream whose frames would exceed `max_pixels` is refused before anything is decoded."""
    import av

    if url.startswith(("rtsp://", "rtsps://")):
        options = {"rtsp_transport": "tcp", "stimeout": "5000000"}
    else:
        options = {"protocol_whitelist": "file"}
    container = av.open(url, options=options, timeout=10)
    try:
        if container.streams.video:
            cc = container.streams.video[0].codec_context
            limits.check_pixels(cc.width, cc.height, max_pixels)
    except BaseException:
        container.close()
        raise
    return container


class Sampler:
    """Keep frames at a target rate from a source of timestamped frames."""

    def __init__(self, target_fps: float):
        self.period = 1.0 / target_fps
        self.next_t: float | None = None

    def keep(self, t: float) -> bool:
        if self.next_t is None:
            self.next_t = t
        if t + 1e-6 >= self.next_t:
            # Advance on the grid; if the source jumped ahead, restart the grid at t.
            self.next_t = max(self.next_t + self.period, t + self.period * 0.5)
            return True
        return False


@dataclass
class Item:
    """One media item: a video (file or URL) or an image file."""

    location: str
    video: bool
    frames_est: int = 1  # sampled frames expected (a video: duration x fps; unknown length: 0)
    duration_s: float = 0.0
    error: str = ""


def check_media(media: list[dict], roots: str, hosts: str) -> None:
    """At submission: every path inside the media roots (links resolved), every URL rtsp(s):// on an allowed
    host; raises `lfr.runtime.limits.InputError`. Checked again when the media are read (`resolve_items`)."""
    limits.check_count(len(media), limits.MAX_MEDIA_PER_JOB, "media sources")
    for m in media:
        if "url" in m:
            limits.check_source_url(m["url"], hosts)
        else:
            limits.confine_path(m["path"], roots)


def resolve_items(media: list[dict], fps: float, roots: str = "", hosts: str = "",
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Item]:
    """The items of `media` ([{"path": ...} | {"url": ...}]): videos and images, folders searched recursively
    (sorted), durations probed. Paths are confined to `roots` (each file found in a folder too: a link out of
    the roots is an item error), URLs to rtsp(s):// on `hosts`; at most MAX_ITEMS_PER_JOB items."""
    items: list[Item] = []
    for m in media:
        if "url" in m:
            try:
                items.append(video_item(limits.check_source_url(m["url"], hosts), fps, max_pixels))
            except limits.InputError as exc:
                items.append(Item(m["url"], True, 0, error=exc.message[:200]))
            continue
        try:
            p = limits.confine_path(m["path"], roots)
        except limits.InputError as exc:
            items.append(Item(m["path"], False, 0, error=exc.message[:200]))
            continue
        files = [p]
        if not p.is_dir() and not p.is_file():
            items.append(Item(m["path"], False, 0, error="not a regular file or folder"))
            continue
        if p.is_dir():
            files = []
            for x in p.rglob("*"):  # does not descend into linked folders; linked files are confined below
                if len(files) > limits.MAX_ITEMS_PER_JOB:
                    break
                if x.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES and x.is_file():
                    files.append(x)
            files.sort()
        for f in files:
            if len(items) >= limits.MAX_ITEMS_PER_JOB:
                items.append(Item(str(p), False, 0, error=f"more than {limits.MAX_ITEMS_PER_JOB} media files: "
                                  "the rest are not examined"))
                return items
            try:
                real = limits.confine_path(f, roots)
            except limits.InputError as exc:
                items.append(Item(str(f), False, 0, error=exc.message[:200]))
                continue
            if not real.is_file():
                items.append(Item(str(f), False, 0, error="not a regular file"))
            elif f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(str(real), False, 1))
            else:
                items.append(video_item(str(real), fps, max_pixels))
    return items


def video_item(location: str, fps: float, max_pixels: int = DEFAULT_MAX_PIXELS) -> Item:
    """A video item with its duration probed and its sampled frames estimated (an error item if unreadable)."""
    try:
        with open_container(location, max_pixels) as c:
            stream = c.streams.video[0]
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = float(c.duration or 0) / 1e6
    except Exception as exc:
        return Item(location, True, 0, error=f"cannot open: {type(exc).__name__}: {exc}"[:200])
    return Item(location, True, max(1, math.ceil(duration * fps)) if duration > 0 else 0, duration)


class FrameReader:
    """Sampled frames of one video as JPEG, from just after `after_s` (resume); used from worker threads."""

    def __init__(self, location: str, fps: float, after_s: float, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.container = open_container(location, max_pixels)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate
        self.rate = float(rate) if rate else 25.0
        self.sampler = Sampler(fps)
        self.after_s = after_s
        if after_s >= 0:
            self.sampler.next_t = after_s + self.sampler.period
            if self.stream.time_base:
                with contextlib.suppress(Exception):
                    self.container.seek(int(after_s / self.stream.time_base), stream=self.stream, backward=True)
        self.frames = self.container.decode(self.stream)

    def next_batch(self, n: int) -> list[tuple[float, int, bytes]]:
        """Up to `n` sampled frames as (time s, frame index, JPEG); [] at the end."""
        out = []
        for frame in self.frames:
            t = float(frame.time or 0.0)
            if t <= self.after_s + 1e-6 or not self.sampler.keep(t):
                continue
            limits.check_pixels(frame.width, frame.height, self.max_pixels)  # a stream may change size midway
            buf = io.BytesIO()
            frame.to_image().save(buf, format="JPEG", quality=90)
            out.append((t, int(round(t * self.rate)), buf.getvalue()))
            if len(out) >= n:
                break
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
