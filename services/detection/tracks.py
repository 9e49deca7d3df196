"""Which detected faces go on to be embedded, live: a box tracker per camera that samples each tracked face.

At 10 fps a person crossing the view is in many consecutive frames, 100 ms apart. Embedding every one of them
costs most of a CPU core per camera and adds little. Here each face is followed from frame to frame by box
overlap (IoU): positions only, never a chip or a vector, kept at most `expire_s` after the face was last seen.
A face is embedded when it starts a track, when `interval_s` has passed since its track was last embedded, or
when it is clearly better (inter-eye distance x detector score, by the factor `better`) than the best face
embedded so far on its track. The others are skipped and counted. Pure: no I/O; time comes in as capture time.
"""

from __future__ import annotations

from dataclasses import dataclass

from lfr.models.boxes import Box, iou


@dataclass
class _Track:
    box: Box
    last_seen: float
    last_embedded: float
    best: float


class FaceSampler:
    def __init__(self, interval_s: float = 0.3, expire_s: float = 1.0, min_iou: float = 0.3, better: float = 1.25):
        self.interval_s, self.expire_s, self.min_iou, self.better = interval_s, expire_s, min_iou, better
        self.tracks: dict[object, list[_Track]] = {}
        self.new = 0  # faces of the last `select` that started a track (a face not seen in the frames before)

    def select(self, key: object, t: float, boxes: list[Box], qualities: list[float]) -> list[bool]:
        """For the faces of one frame of camera `key` captured at `t` (seconds): embed this face or not."""
        if self.interval_s <= 0:
            return [True] * len(boxes)
        tracks = [tr for tr in self.tracks.get(key, []) if t - tr.last_seen <= self.expire_s]
        pairs = sorted(((iou(b, tr.box), i, j) for i, b in enumerate(boxes) for j, tr in enumerate(tracks)),
                       reverse=True)
        owner: dict[int, int] = {}
        taken: set[int] = set()
        for overlap, i, j in pairs:
            if overlap < self.min_iou:
                break
            if i not in owner and j not in taken:
                owner[i] = j
                taken.add(j)
        keep = []
        self.new = 0
        for i, (box, q) in enumerate(zip(boxes, qualities, strict=True)):
            j = owner.get(i)
            if j is None:
                self.new += 1
                tracks.append(_Track(box, t, t, q))
                keep.append(True)
                continue
            tr = tracks[j]
            embed = t - tr.last_embedded >= self.interval_s - 1e-3 or q > tr.best * self.better
            tr.box, tr.last_seen = box, max(tr.last_seen, t)
            if embed:
                tr.last_embedded, tr.best = t, max(tr.best, q)
            keep.append(embed)
        if tracks:
            self.tracks[key] = tracks
        else:
            self.tracks.pop(key, None)
        return keep

    def forget(self, older_than: float) -> None:
        """Drop every track last seen before `older_than` (a camera that went quiet leaves nothing behind)."""
        for key in list(self.tracks):
            kept = [tr for tr in self.tracks[key] if tr.last_seen >= older_than]
            if kept:
                self.tracks[key] = kept
            else:
                del self.tracks[key]
