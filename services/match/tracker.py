"""One alert per person per pass: a small IoU + embedding tracker of matched faces, per camera. Pure: no I/O,
time comes in as capture times (ns).

Only faces that matched a watchlist entry are tracked (a face that matched nobody is never kept, not even its
position). A sighting joins a track of the same entry on the same camera when their boxes overlap or their
vectors are alike; a track ends when its face has gone unmatched for `track_gap_s`. A sighting that joins no
track starts one; it raises a new alert unless the same entry was seen in the deployment within
`realert_window_s`, in which case it continues that alert. While a pass goes on, a better probe updates the
alert (same id, revision + 1), at most every `update_interval_s`; the best probe is always published in the end.

The decision is per pass (#14): a new track raises its alert only once it holds `min_frames` matching sightings
of its entry (consistent frames of one person) at least `evidence_gap_s` apart (neighbouring frames of a face are
nearly the same picture: a stranger who matches in one matches in the next), or at once when one sighting scores
`strong_margin` above the deployment threshold. A stranger who matches in one blurred frame makes a track that ends unconfirmed and
raises nothing (its probe is dropped with it, and counted in `unconfirmed`); a person on the list, seen in
several frames, is alerted at the frame that completes the evidence. ``min_frames=1`` is the per-frame rule.
After each frame `waiting` lists the sightings whose pass waits for more evidence (the service asks detection to
embed those faces' next frames soon).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfr.models import scoring
from lfr.models.boxes import Box, iou


@dataclass
class Sighting:
    """One matching face in one frame."""

    box: Box
    vector: Sequence[float] | None
    entry_id: str
    subject_ref: str
    score: float
    probe: Any = None  # what the service needs to publish the probe (crop, frame, envelope); opaque here
    component: scoring.Component | None = None  # the vector's model: its metric links faces (default cosine)


@dataclass(eq=False)
class AlertState:
    alert_id: str
    deployment_id: str
    entry_id: str
    subject_ref: str
    raised_ns: int
    camera_id: str  # of the best probe
    best_score: float
    best_ns: int
    best_box: Box
    best_probe: Any
    last_seen_ns: int
    sightings: int = 1
    revision: int = 0
    published_ns: int = 0
    dirty: bool = False  # the best probe is newer than the last published revision
    raised_wall_ns: int = 0  # when the service published the raise (set by the service)


@dataclass(eq=False)
class Track:
    track_id: str
    camera_id: str
    entry_id: str
    box: Box
    vector: tuple[str, tuple[float, ...]] | None  # (metric, vector): see link_vector
    last_ns: int
    alert: AlertState | None  # None while the pass has not yet shown enough evidence (`min_frames`)
    frames: int = 1  # of an unconfirmed pass: its frames of evidence (matching frames `evidence_gap_s` apart)
    pending: Sighting | None = None  # the best sighting of an unconfirmed track
    evidence_ns: int = 0  # capture time of its last frame of evidence


@dataclass(frozen=True)
class Action:
    kind: str  # "raise" or "update"
    alert: AlertState


def unit(vector: Sequence[float] | None) -> tuple[float, ...] | None:
    if not vector:
        return None
    n = math.sqrt(sum(v * v for v in vector))
    return tuple(v / n for v in vector) if n > 0 else None


def link_vector(s: Sighting) -> tuple[str, tuple[float, ...]] | None:
    """A sighting's vector as the tracker compares it: (metric, vector), normalised for cosine."""
    metric = s.component.metric if s.component is not None else scoring.COSINE
    if not s.vector:
        return None
    v = unit(s.vector) if metric == scoring.COSINE else tuple(float(x) for x in s.vector)
    return (metric, v) if v is not None else None


def similarity(a: tuple[str, tuple[float, ...]] | None, b: tuple[str, tuple[float, ...]] | None) -> float:
    """Two link vectors' similarity by their model's metric (lfr.models.scoring); 0 when not comparable."""
    if a is None or b is None or a[0] != b[0] or len(a[1]) != len(b[1]):
        return 0.0
    return float(scoring.similarity_rows(a[0], [a[1]], [b[1]])[0])


@dataclass
class Tracker:
    track_gap_s: float = 1.5
    realert_window_s: float = 120.0
    update_interval_s: float = 1.0
    iou_min: float = 0.1
    similarity_min: float = 0.6
    min_frames: int = 1  # matching sightings a pass needs before it raises (1 = the first frame raises)
    strong_margin: float = 0.0  # ... unless one scores this far above the threshold (0 = no shortcut)
    evidence_gap_s: float = 0.0  # matching frames count as separate evidence only this far apart
    unconfirmed: int = 0  # passes that ended without enough evidence: nothing was raised
    waiting: list[int] = field(default_factory=list)  # of the last `observe`: sightings in a pass still unconfirmed
    new_id: Callable[[], str] = field(default=lambda: uuid.uuid4().hex)
    tracks: dict[tuple[str, str], list[Track]] = field(default_factory=dict)  # (deployment, camera) -> tracks
    open_alerts: dict[tuple[str, str], AlertState] = field(default_factory=dict)  # (deployment, entry) -> alert

    def observe(self, deployment_id: str, camera_id: str, capture_ns: int,
                sightings: Sequence[Sighting]) -> list[Action]:
        """The matching faces of one frame; returns the alerts to raise and to update, in that order."""
        actions = self._end_tracks(capture_ns, (deployment_id, camera_id))
        self.waiting = []
        tracks = self.tracks.setdefault((deployment_id, camera_id), [])
        vectors = [link_vector(s) for s in sightings]
        # Greedy association, best pair first: same entry, and overlapping boxes or alike vectors.
        pairs = []
        for i, s in enumerate(sightings):
            for t in tracks:
                if t.entry_id != s.entry_id:
                    continue
                o, sim = iou(s.box, t.box), similarity(vectors[i], t.vector)
                if o >= self.iou_min or sim >= self._link_min(s):
                    pairs.append((o + sim, i, t))
        pairs.sort(key=lambda p: -p[0])
        taken: dict[int, Track] = {}
        used: set[str] = set()
        for _, i, t in pairs:
            if i not in taken and t.track_id not in used:
                taken[i] = t
                used.add(t.track_id)
        touched: list[AlertState] = []
        for i, s in enumerate(sightings):
            track = taken.get(i)
            confirmed = False
            if track is not None and track.alert is None:  # an unconfirmed pass: one more frame of evidence
                track.box, track.last_ns = s.box, capture_ns
                if capture_ns - track.evidence_ns >= self.evidence_gap_s * 1e9 - 1e6:  # not the same moment again
                    track.frames, track.evidence_ns = track.frames + 1, capture_ns
                if vectors[i] is not None:
                    track.vector = vectors[i]
                if track.pending is None or s.score > track.pending.score:
                    track.pending = s
                if not self._convincing(track.frames, s):
                    self.waiting.append(i)
                    continue
                tracks.remove(track)  # confirmed: it becomes an alerting track below, from its best sighting
                s, track, confirmed = track.pending, None, True
            if track is None and not confirmed and not self._convincing(1, s) and \
                    self._open_alert(deployment_id, s.entry_id, capture_ns) is None:
                tracks.append(Track(self.new_id(), camera_id, s.entry_id, s.box, vectors[i], capture_ns, None,
                                    pending=s, evidence_ns=capture_ns))
                self.waiting.append(i)
                continue
            if track is None:
                alert = self._open_alert(deployment_id, s.entry_id, capture_ns)
                if alert is None:
                    alert = AlertState(self.new_id(), deployment_id, s.entry_id, s.subject_ref, capture_ns,
                                       camera_id, s.score, capture_ns, s.box, s.probe, capture_ns,
                                       published_ns=capture_ns)
                    self.open_alerts[(deployment_id, s.entry_id)] = alert
                    actions.append(Action("raise", alert))
                else:
                    self._sighted(alert, camera_id, capture_ns, s)
                    touched.append(alert)
                track = Track(self.new_id(), camera_id, s.entry_id, s.box, vectors[i], capture_ns, alert)
                tracks.append(track)
                continue
            track.box, track.last_ns = s.box, capture_ns
            if vectors[i] is not None:
                track.vector = vectors[i]
            self._sighted(track.alert, camera_id, capture_ns, s)
            touched.append(track.alert)
        seen: set[str] = set()
        for alert in touched:
            if alert.alert_id not in seen:
                seen.add(alert.alert_id)
                actions.extend(self._flush(alert, capture_ns, force=False))
        return actions

    def tick(self, now_ns: int) -> list[Action]:
        """Publish due updates, end tracks gone quiet, forget alerts past their re-alert window."""
        actions = self._end_tracks(now_ns)
        for alert in list(self.open_alerts.values()):
            actions.extend(self._flush(alert, now_ns, force=False))
        horizon = max(self.realert_window_s, self.track_gap_s) * 1e9
        for key, alert in list(self.open_alerts.items()):
            if now_ns - alert.last_seen_ns > horizon and not alert.dirty:
                del self.open_alerts[key]
        return actions

    def restore(self, alert: AlertState) -> None:
        """An alert a previous run of the service raised (from the alert book): a sighting of its entry within the
        re-alert window continues it instead of raising a second alert for the same person."""
        key = (alert.deployment_id, alert.entry_id)
        current = self.open_alerts.get(key)
        if current is None or current.last_seen_ns < alert.last_seen_ns:
            self.open_alerts[key] = alert

    def _link_min(self, s: Sighting) -> float:
        """The similarity at which two faces are one person's: the model's own one-to-one threshold when it
        publishes one, else `similarity_min`."""
        c = s.component
        return c.threshold_1to1 if c is not None and c.threshold_1to1 > 0 else self.similarity_min

    def _convincing(self, frames: int, s: Sighting) -> bool:
        """Enough evidence for a pass: `min_frames` matching frames, or one strong frame."""
        if frames >= self.min_frames:
            return True
        return self.strong_margin > 0 and s.probe is not None and hasattr(s.probe, "threshold") and \
            s.score >= s.probe.threshold + self.strong_margin

    # -------------------------------------------------------------------------------------------------
    def close(self, now_ns: int) -> list[Action]:
        """At shutdown: publish every alert's best probe not yet published."""
        alerts = {id(t.alert): t.alert for ts in self.tracks.values() for t in ts if t.alert is not None}
        alerts.update({id(a): a for a in self.open_alerts.values()})
        return [act for a in alerts.values() for act in self._flush(a, now_ns, force=True)]

    def _open_alert(self, deployment_id: str, entry_id: str, now_ns: int) -> AlertState | None:
        alert = self.open_alerts.get((deployment_id, entry_id))
        if alert is not None and self.realert_window_s > 0 and \
                now_ns - alert.last_seen_ns <= self.realert_window_s * 1e9:
            return alert
        return None

    @staticmethod
    def _sighted(alert: AlertState, camera_id: str, now_ns: int, s: Sighting) -> None:
        alert.last_seen_ns = max(alert.last_seen_ns, now_ns)
        alert.sightings += 1
        if s.score > alert.best_score:
            alert.best_score, alert.best_ns, alert.best_box, alert.best_probe = s.score, now_ns, s.box, s.probe
            alert.camera_id = camera_id
            alert.dirty = True

    def _flush(self, alert: AlertState, now_ns: int, force: bool) -> list[Action]:
        if alert.dirty and (force or now_ns - alert.published_ns >= self.update_interval_s * 1e9):
            alert.dirty = False
            alert.revision += 1
            alert.published_ns = now_ns
            return [Action("update", alert)]
        return []

    def _end_tracks(self, now_ns: int, only: tuple[str, str] | None = None) -> list[Action]:
        actions = []
        for key in [only] if only else list(self.tracks):
            tracks = self.tracks.get(key, [])
            keep = [t for t in tracks if now_ns - t.last_ns <= self.track_gap_s * 1e9]
            live = {id(k.alert) for k in keep}
            for t in tracks:
                if t.alert is None:  # a pass that ended without enough evidence: nothing raised, probe dropped
                    if now_ns - t.last_ns > self.track_gap_s * 1e9:
                        self.unconfirmed += 1
                    continue
                if now_ns - t.last_ns > self.track_gap_s * 1e9 and id(t.alert) not in live:
                    actions.extend(self._flush(t.alert, now_ns, force=True))  # the pass is over: its best probe
            if keep:
                self.tracks[key] = keep
            else:
                self.tracks.pop(key, None)
        return actions
