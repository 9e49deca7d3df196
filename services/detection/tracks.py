"""Which detected faces go on to be embedded, live: a box tracker per camera that samples each tracked face.

At 10 fps a person crossing the view is in many consecutive frames, 100 ms apart. Embedding every one of them
costs most of a CPU core per camera and adds little. Here each face is followed from frame to frame by box
overlap (IoU): positions only, never a chip or a vector, kept at most `expire_s` after the face was last seen.
A face is embedded when it starts a track, when `interval_s` has passed since its track was last embedded, or
when it is clearly better (inter-eye distance x detector score, by the factor `better`) than the best face
embedded so far on its track. The others are skipped and counted. Pure: no I/O; time comes in as capture time.

Every track has an id, unique per camera while the process runs, sent with each face embedded from it: match
counts faces seen per track (and splits a track whose embedded faces are of different people). A face that takes up
a track its face was missing from for more than `split_gap_s` and at least two processed frames (someone stepping
into the place of someone who left; a stall of the frames themselves is no gap) gets a new id: it is counted as a new
face, and embedded at once. A track's box is carried forward by its face's speed before it is compared (a face
crossing the picture at 10 fps moves most of its width between frames).

Evidence comes quickly (#14): match raises a pass's alert once `LFR_ALERT_MIN_FRAMES` of its frames match, so a new
track's first `follow` embeddings after the first are due `follow_s` apart (match counts frames of evidence only
that far apart: LFR_ALERT_EVIDENCE_GAP_MS), not at the interval, which a crowd stretches to seconds; and when match
says a pass waits for evidence (`want`: a face that matched weakly later in its track), that track's next face is
due `follow_s` after its last too. Without it a matched person waited for the interval before a second frame could
confirm the alert.
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
    track_id: int = 0
    vx: float = 0.0  # speed of the box's centre, px/s
    vy: float = 0.0
    missed: int = 0  # processed frames of its camera since its face was last in one
    follow: int = 0  # embeddings still due `follow_s` apart (a new track's first frames of evidence)

    def at(self, t: float) -> Box:
        """Where its box would be at `t`, at its last speed (for at most a second)."""
        dt = min(max(0.0, t - self.last_seen), 1.0)
        x1, y1, x2, y2 = self.box
        return (x1 + self.vx * dt, y1 + self.vy * dt, x2 + self.vx * dt, y2 + self.vy * dt)

    def moved(self, box: Box, t: float) -> None:
        dt = t - self.last_seen
        if dt > 0:
            vx = ((box[0] + box[2]) - (self.box[0] + self.box[2])) / 2 / dt
            vy = ((box[1] + box[3]) - (self.box[1] + self.box[3])) / 2 / dt
            self.vx, self.vy = (vx, vy) if self.vx == self.vy == 0.0 else ((self.vx + vx) / 2, (self.vy + vy) / 2)
        self.box, self.last_seen, self.missed = box, max(self.last_seen, t), 0


class FaceSampler:
    def __init__(self, interval_s: float = 0.3, expire_s: float = 1.0, min_iou: float = 0.3, better: float = 1.25,
                 split_gap_s: float = 0.4, max_per_s: float = 0.0, follow: int = 0, follow_s: float = 0.1):
        self.interval_s, self.expire_s, self.min_iou, self.better = interval_s, expire_s, min_iou, better
        self.follow, self.follow_s = follow, follow_s
        self.split_gap_s = split_gap_s
        self.max_per_s = max_per_s  # a crowd: tracked faces re-embedded at most this often a second per camera
        self.tracks: dict[object, list[_Track]] = {}
        self.new = 0  # faces of the last `select` that started a track (a face not seen in the frames before)
        self.ids: list[int] = []  # the track id of each face of the last `select`
        self._next_id = 0

    def select(self, key: object, t: float, boxes: list[Box], qualities: list[float]) -> list[bool]:
        """For the faces of one frame of camera `key` captured at `t` (seconds): embed this face or not (every
        face when `interval_s` is 0). Their track ids are in `ids` after the call."""
        tracks = [tr for tr in self.tracks.get(key, []) if t - tr.last_seen <= self.expire_s]
        pairs = sorted(((self._overlap(b, tr, t), i, j) for i, b in enumerate(boxes) for j, tr in enumerate(tracks)),
                       reverse=True)
        owner: dict[int, int] = {}
        taken: set[int] = set()
        for overlap, i, j in pairs:
            if overlap < self.min_iou:
                break
            if i not in owner and j not in taken:
                owner[i] = j
                taken.add(j)
        # In a crowd the interval grows so the camera's tracked faces are re-embedded at most `max_per_s` times a
        # second together (a face new to the camera is always embedded at once)
        interval = max(self.interval_s, len(tracks) / self.max_per_s) if self.max_per_s > 0 else self.interval_s
        keep = []
        self.new, self.ids = 0, []
        for i, (box, q) in enumerate(zip(boxes, qualities, strict=True)):
            j = owner.get(i)
            if j is None:
                self.new += 1
                self._next_id += 1
                tracks.append(_Track(box, t, t, q, self._next_id, follow=self.follow))
                keep.append(True)
                self.ids.append(self._next_id)
                continue
            tr = tracks[j]
            if t - tr.last_seen > self.split_gap_s and tr.missed >= 2:  # back after a gap: maybe someone else
                self.new += 1
                self._next_id += 1
                tr.track_id, tr.last_embedded, tr.best = self._next_id, t - self.interval_s, q
                tr.follow = self.follow
            self.ids.append(tr.track_id)
            due = min(interval, self.follow_s) if tr.follow > 0 else interval
            embed = self.interval_s <= 0 or t - tr.last_embedded >= due - 1e-3 or q > tr.best * self.better
            tr.moved(box, t)
            if embed:
                tr.last_embedded, tr.best, tr.follow = t, max(tr.best, q), max(0, tr.follow - 1)
            keep.append(embed)
        for j, tr in enumerate(tracks):
            if j not in taken and tr.last_seen < t:
                tr.missed += 1
        if tracks:
            self.tracks[key] = tracks
        else:
            self.tracks.pop(key, None)
        return keep

    def want(self, key: object, track_ids) -> None:
        """match waits for more evidence of these tracks' passes: their next face is due `follow_s` after the last
        one embedded (when `follow` is on)."""
        if self.follow <= 0:
            return
        ids = set(track_ids)
        for tr in self.tracks.get(key, []):
            if tr.track_id in ids:
                tr.follow = max(tr.follow, 1)

    def _overlap(self, box: Box, tr: _Track, t: float) -> float:
        """Box overlap with the track where it was, or where its speed would have taken it. Failing that, a face of
        the track's size whose centre is within one face width of where the track's speed puts it (a face seen once
        has no speed yet; one coming out from behind something was tracked with a shrinking box) is taken too,
        scored at `min_iou`, after every real overlap."""
        ahead = tr.at(t)
        o = max(iou(box, tr.box), iou(box, ahead))
        if o < self.min_iou:
            w, w2 = ahead[2] - ahead[0], box[2] - box[0]
            dx = (box[0] + box[2] - ahead[0] - ahead[2]) / 2
            dy = (box[1] + box[3] - ahead[1] - ahead[3]) / 2
            if w > 0 and 2 / 3 <= w2 / w <= 1.5 and dx * dx + dy * dy <= w * w:
                return self.min_iou
        return o

    def forget(self, older_than: float) -> None:
        """Drop every track last seen before `older_than` (a camera that went quiet leaves nothing behind)."""
        for key in list(self.tracks):
            kept = [tr for tr in self.tracks[key] if tr.last_seen >= older_than]
            if kept:
                self.tracks[key] = kept
            else:
                del self.tracks[key]
