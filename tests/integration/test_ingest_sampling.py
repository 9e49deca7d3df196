"""Pulled sources sample a video to the target rate; a fast stream skips undecoded B-frames without losing the
rate (lfr.ingest.sources.NonRefSkip)."""

from __future__ import annotations

from lfr.ingest.sources import SourceState, run_source


def _run(path, fps: float) -> tuple[SourceState, list[float], list[int]]:
    times: list[float] = []
    decoded: list[int] = []  # frames decoded so far, at each sample
    src = SourceState("s", "d", "c", str(path), fps, realtime=False)
    run_source(src, 90, lambda jpeg, w, h, capture_ns, t, index: (times.append(t), decoded.append(index)))
    return src, times, decoded


def test_fast_stream_sampled_with_nonref_skip_keeps_the_rate(data):
    src, times, decoded = _run(data / "video/pedestrians-1080p25.mp4", 10.0)  # 25 fps, 4.2 s
    assert src.state == "FINISHED", src.error
    assert len(times) >= 0.9 * 10 * (times[-1] - times[0])  # a skipped B-frame may shift a sample a frame on
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) <= 0.2 and min(gaps) > 0
    assert decoded[-1] < 0.7 * 25 * times[-1]  # B-frames were not decoded (105 frames in all)


def test_slow_stream_decodes_every_frame(data):
    src, times, _ = _run(data / "video/stage-audience-360p30.mp4", 20.0)  # 29.97 fps: less than 2x the target
    assert src.state == "FINISHED", src.error
    assert len(times) >= 0.95 * 20 * (times[-1] - times[0])  # the full rate over the stream's span
