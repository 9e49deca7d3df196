"""Faces seen (#14 item 5): the count published in a deployment's record. Pure: no I/O; time comes in as capture
times (ns).

A face seen in several frames counts once: detection follows each face from frame to frame (by box overlap, per
camera) and sends its track id with every face it samples for embedding. Here each (camera, track id) counts once,
when its first face arrives, and once more each time the face on the track becomes someone else: two faces of one
track, embedded one after the other (about `LFR_LIVE_EMBED_INTERVAL_MS` apart), that the deployment's model scores
below `SPLIT_FRACTION` of its threshold are two people (one stepped into the other's place). To compare them, the
last vector of each track is held in memory, never longer than `hold_s` after its face's capture (within the
one-second disposal bound: match's tick forgets it). A face without a track id (0) counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SPLIT_FRACTION = 0.5  # two faces of one track scored under half the deployment threshold are different people


class FacesSeen:
    def __init__(self, hold_s: float = 0.75, forget_s: float = 10.0):
        self.hold_ns, self.forget_ns = int(hold_s * 1e9), int(forget_s * 1e9)
        self.tracks: dict[tuple, int] = {}  # (deployment, camera, track id) -> last capture time
        self.held: dict[tuple, tuple[int, dict[str, np.ndarray]]] = {}  # ... -> (capture time, its face's vectors)

    def count(self, deployment_id: str, camera_id: str, capture_ns: int, track_ids: Sequence[int],
              probes: dict[str, np.ndarray] | None = None,
              same: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], bool] | None = None) -> int:
        """How many of one frame's embedded faces are faces not seen before. `probes`: their vectors per component
        (rows in face order), and `same(a, b)` whether two faces' vectors are one person; without them a track
        is never split."""
        new = 0
        for i, track in enumerate(track_ids):
            if not track:
                new += 1
                continue
            key = (deployment_id, camera_id, track)
            vectors = {c: np.asarray(v[i]) for c, v in probes.items()} if probes is not None else None
            if key not in self.tracks:
                new += 1
            else:
                held = self.held.get(key)
                if held is not None and vectors is not None and same is not None and \
                        abs(capture_ns - held[0]) <= self.hold_ns and not same(held[1], vectors):
                    new += 1  # another person took this track's place
            self.tracks[key] = max(capture_ns, self.tracks.get(key, capture_ns))
            if vectors is not None and capture_ns >= self.held.get(key, (0, None))[0]:
                self.held[key] = (capture_ns, vectors)
        return new

    def forget(self, now_ns: int) -> None:
        """Vectors held past `hold_s` after capture, and tracks not seen for `forget_s`, are forgotten."""
        for key in [k for k, (t, _) in self.held.items() if now_ns - t > self.hold_ns]:
            del self.held[key]
        for key in [k for k, t in self.tracks.items() if now_ns - t > self.forget_ns]:
            del self.tracks[key]
