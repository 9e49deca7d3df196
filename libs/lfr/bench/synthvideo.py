"""Build a video with exact ground truth from LFW-layout images: each segment shows one photo for a known
time span. Used by the end-to-end tests and `lfr bench pipeline --synthetic`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Segment:
    subject: str  # person name (LFW folder)
    image: Path
    start_s: float
    end_s: float


def make_video(path: str | Path, images: list[tuple[str, Path]], seconds_each: float = 1.5, fps: int = 10,
               size: tuple[int, int] = (640, 480), gap_s: float = 0.5) -> list[Segment]:
    """Write an H.264 MP4: a grey frame, then each image (scaled x1.5, centred) for `seconds_each`,
    separated by `gap_s` of grey. Returns the segments with their times."""
    w, h = size
    segments = []
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        blank = np.full((h, w, 3), 96, np.uint8)
        t = 0

        def emit(img: np.ndarray, n: int) -> None:
            nonlocal t
            for _ in range(n):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
                t += 1

        emit(blank, round(gap_s * fps))
        for subject, image in images:
            im = Image.open(image).convert("RGB")
            im = im.resize((round(im.width * 1.5), round(im.height * 1.5)), Image.BILINEAR)
            canvas = blank.copy()
            x, y = (w - im.width) // 2, (h - im.height) // 2
            canvas[y:y + im.height, x:x + im.width] = np.asarray(im)
            start = t / fps
            emit(canvas, round(seconds_each * fps))
            segments.append(Segment(subject, Path(image), start, t / fps))
            emit(blank, round(gap_s * fps))
        for packet in stream.encode():
            out.mux(packet)
    return segments
