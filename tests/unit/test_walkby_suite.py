"""The walk-by suite (#14 item 3) is a fixed definition: 720p and 1080p, crowds of 10 to 40, one with more than 30
people in view, every video with its own seed (the same videos are built again from the same images)."""

from __future__ import annotations

from lfr.bench.walkby import SUITE, suite_truths


def test_the_suite_covers_both_resolutions_and_crowds_of_10_to_40():
    assert {p["resolution"] for p in SUITE.values()} == {"720p", "1080p"}
    crowds = sorted(p.get("crowd", 0) for p in SUITE.values())
    assert crowds[-1] == 40 and min(c for c in crowds if c) == 10
    assert any(p.get("crowd", 0) > 30 and p["watchlisted"] + p["strangers"] > 30 for p in SUITE.values())
    seeds = [p["seed"] for p in SUITE.values()]
    assert len(set(seeds)) == len(seeds)


def test_suite_truths_lists_only_videos_built(tmp_path):
    (tmp_path / "crowd10-1080p").mkdir()
    (tmp_path / "crowd10-1080p" / "truth.json").write_text("{}")
    (tmp_path / "not-in-the-suite").mkdir()
    (tmp_path / "not-in-the-suite" / "truth.json").write_text("{}")
    assert list(suite_truths(tmp_path)) == ["crowd10-1080p"]
