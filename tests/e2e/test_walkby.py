"""A generated walk-by with known truth (#14) through the whole embedded system, as `lfr bench pipeline --truth`
runs it: every watchlisted pass raises exactly one alert, no stranger raises any. People are chosen with the
library's clear margin around the threshold (`--clear-margin`), so the outcome tests the pipeline's pass-level
decision and tracking, not borderline faces."""

from __future__ import annotations

from argparse import Namespace

from lfr.bench import live
from lfr.bench.walkby import generate


def test_one_alert_per_watchlisted_pass_and_none_for_strangers(data, tmp_path, monkeypatch):
    # Decisions, not speed (that is `lfr bench pipeline`): on a loaded 2-core machine detection may take a second
    # a frame, so frames are kept (freshness 60 s, longer queues) and the video sampled at 4 fps.
    monkeypatch.setenv("LFR_FRESHNESS_MS", "60000")
    monkeypatch.setenv("LFR_QUEUE_SIZE", "64")
    made = generate(tmp_path / "walkby", data, resolution="720p", fps=25, seconds=5.5, watchlisted=2, strangers=2,
                    eye_px=(46.0, 56.0), speed=(280.0, 340.0), occluded=0.0, blur=0.5, clear_margin=0.12, seed=3)
    assert made["passes"] == 4 and made["watchlisted_passes"] == 2
    args = Namespace(video="", enroll="", fps=4.0, seconds=0.0, loops=1, minutes=0.0, sample_s=15.0, window_min=5.0,
                     state_dir="", truth=made["truth"], min_frames=0, strong_margin=-1.0, drain_s=120.0,
                     json=True)
    out = live.run(args)
    score = out["truth"]
    assert score["watchlisted_alerted"] == 2 and score["missed"] == [], (score, out["alert_list"])
    assert score["duplicate_alerts"] == 0 and score["false_alerts"] == 0, (score, out["alert_list"])
    assert out["alerts"] == 2 and out["frames_dropped"] == 0, out
