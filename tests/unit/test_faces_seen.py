"""Faces seen (#14 item 5): once per face followed by detection's tracker, once more when the face on a track
becomes someone else; the vectors compared are forgotten within the disposal bound."""

from __future__ import annotations

import numpy as np

from lfr.match.seen import FacesSeen

A, B = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def same(a, b) -> bool:
    return float(a["m"] @ b["m"]) >= 0.5


def probes(*vs):
    return {"m": np.stack(vs)}


def test_a_tracked_face_counts_once_and_untracked_faces_each():
    seen = FacesSeen()
    counts = [seen.count("d", "cam", k * 300_000_000, [7], probes(A), same) for k in range(10)]
    assert counts == [1] + [0] * 9  # one person embedded ten times along one track: one face seen
    assert seen.count("d", "cam", 3_000_000_000, [7, 8], probes(A, B), same) == 1  # a second track beside
    assert seen.count("d", "other-cam", 3_000_000_000, [7], probes(A), same) == 1  # track ids are per camera
    assert seen.count("d", "cam", 3_100_000_000, [0, 0], None) == 2  # no track id: each face counts


def test_someone_else_on_the_same_track_is_a_new_face():
    seen = FacesSeen(hold_s=0.75)
    assert seen.count("d", "cam", 0, [1], probes(A), same) == 1
    assert seen.count("d", "cam", 300_000_000, [1], probes(A), same) == 0
    assert seen.count("d", "cam", 600_000_000, [1], probes(B), same) == 1  # the track's face changed person
    assert seen.count("d", "cam", 900_000_000, [1], probes(B), same) == 0
    assert seen.count("d", "cam", 1_200_000_000, [1], None) == 0  # no vectors (not live): never split


def test_vectors_are_forgotten_within_the_disposal_bound():
    seen = FacesSeen(hold_s=0.75, forget_s=10.0)
    seen.count("d", "cam", 0, [1], probes(A), same)
    seen.forget(700_000_000)
    assert seen.held  # still within hold_s of its capture
    seen.forget(760_000_000)
    assert not seen.held and seen.tracks  # the vector is gone, the track (an id and a time) stays a while
    assert seen.count("d", "cam", 800_000_000, [1], probes(B), same) == 0  # nothing left to compare with
    seen.forget(20_000_000_000)
    assert not seen.tracks and not seen.held
