"""One alert per person per pass: the tracker core (pure, capture times in ns)."""

from __future__ import annotations

import itertools

from lfr.match.tracker import Sighting, Tracker
from lfr.models.boxes import iou

S = 10**9
FPS = 10


def tracker(**kw) -> Tracker:
    ids = itertools.count(1)
    return Tracker(new_id=lambda: f"id{next(ids)}", **kw)


def walk(t: Tracker, entry: str, start_s: float, seconds: float, x0: float = 0.0, speed_px_s: float = 60.0,
         scores=None, vector=(1.0, 0.0, 0.0), camera: str = "cam", skip=()):
    """A face walking left to right at 10 fps; returns all actions."""
    actions = []
    n = round(seconds * FPS)
    for k in range(n):
        if k in skip:
            continue
        ts = start_s + k / FPS
        x = x0 + speed_px_s * k / FPS
        score = scores(k) if scores else 0.6
        actions += t.observe("dep", camera, int(ts * S), [
            Sighting((x, 100, x + 80, 190), vector, entry, "S-" + entry, score, probe=("frame", k))])
    return actions


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert abs(iou((0, 0, 10, 10), (5, 0, 15, 10)) - 1 / 3) < 1e-9


def test_a_pass_raises_one_alert_updated_with_the_best_probe():
    t = tracker(realert_window_s=0.0, update_interval_s=1.0)
    # 4 s walk; the score rises then falls: best at frame 25
    actions = walk(t, "e1", 0.0, 4.0, scores=lambda k: 0.5 + 0.01 * (25 - abs(25 - k)))
    actions += t.tick(10 * S)  # the pass is over: its best probe is published
    raises = [a for a in actions if a.kind == "raise"]
    assert len(raises) == 1
    alert_ids = {a.alert.alert_id for a in actions}
    assert alert_ids == {raises[0].alert.alert_id}
    final = actions[-1].alert
    assert final.best_probe == ("frame", 25) and abs(final.best_score - 0.75) < 1e-9
    revisions = [a.alert.revision for a in actions if a.kind == "update"]
    assert revisions == sorted(revisions) and len(revisions) <= 4  # rate-limited: about once a second
    assert final.sightings == 40


def test_a_short_occlusion_keeps_the_pass_a_long_gap_ends_it():
    t = tracker(realert_window_s=0.0, track_gap_s=1.0)
    actions = walk(t, "e1", 0.0, 4.0, skip=range(10, 15))  # 0.5 s hidden
    assert sum(a.kind == "raise" for a in actions) == 1
    t2 = tracker(realert_window_s=0.0, track_gap_s=1.0)
    actions = walk(t2, "e1", 0.0, 4.0, skip=range(10, 25))  # 1.5 s hidden: a second pass
    assert sum(a.kind == "raise" for a in actions) == 2


def test_the_realert_window_joins_passes_of_one_entry():
    t = tracker(realert_window_s=5.0, track_gap_s=1.0)
    first = walk(t, "e1", 0.0, 2.0)
    again = walk(t, "e1", 4.0, 2.0, x0=400)  # back 2 s later, elsewhere in view: same alert, updated
    assert sum(a.kind == "raise" for a in first + again) == 1
    t.tick(20 * S)
    later = walk(t, "e1", 20.0, 2.0)  # after the window: a new alert
    assert sum(a.kind == "raise" for a in later) == 1
    assert later[0].alert.alert_id != first[0].alert.alert_id


def test_two_people_at_once_are_two_tracks():
    t = tracker(realert_window_s=0.0)
    actions = []
    for k in range(20):
        ts = int(k / FPS * S)
        actions += t.observe("dep", "cam", ts, [
            Sighting((10 + k, 100, 90 + k, 190), (1.0, 0.0), "e1", "A", 0.6),
            Sighting((400 - k, 100, 480 - k, 190), (0.0, 1.0), "e2", "B", 0.6)])
    raised = [a.alert.entry_id for a in actions if a.kind == "raise"]
    assert sorted(raised) == ["e1", "e2"]
    # the same entry twice in one frame (two different people alike to one entry) with no window: two alerts
    t = tracker(realert_window_s=0.0)
    acts = t.observe("dep", "cam", 0, [Sighting((0, 0, 50, 50), (1.0, 0.0), "e1", "A", 0.6),
                                       Sighting((300, 0, 350, 50), (0.0, 1.0), "e1", "A", 0.6)])
    assert [a.kind for a in acts] == ["raise", "raise"]


def test_embedding_similarity_keeps_a_track_through_a_jump():
    t = tracker(realert_window_s=0.0)
    a = t.observe("dep", "cam", 0, [Sighting((0, 0, 50, 50), (1.0, 0.0), "e1", "A", 0.6)])
    b = t.observe("dep", "cam", S // 10, [Sighting((200, 0, 250, 50), (0.99, 0.1), "e1", "A", 0.7)])
    assert [x.kind for x in a] == ["raise"] and all(x.kind == "update" for x in b)
    c = t.observe("dep", "cam", 2 * S // 10, [Sighting((400, 0, 450, 50), (0.0, 1.0), "e1", "A", 0.6)])
    assert [x.kind for x in c] == ["raise"]  # neither overlapping nor alike: another person


def test_cameras_and_deployments_are_separate():
    t = tracker(realert_window_s=60.0)
    a = walk(t, "e1", 0.0, 1.0, camera="c1")
    b = walk(t, "e1", 0.0, 1.0, camera="c2")
    # one entry in one deployment: the window makes it one alert even across cameras
    assert sum(x.kind == "raise" for x in a + b) == 1
    other = t.observe("dep2", "c1", int(0.5 * S), [Sighting((0, 100, 80, 190), None, "e1", "A", 0.6)])
    assert [x.kind for x in other] == ["raise"]


def test_close_publishes_pending_best_probes_and_tick_forgets():
    t = tracker(realert_window_s=2.0, update_interval_s=10.0)
    walk(t, "e1", 0.0, 1.0, scores=lambda k: 0.5 + k / 100)
    pending = t.close(int(1.0 * S))
    assert [a.kind for a in pending] == ["update"] and pending[0].alert.best_probe == ("frame", 9)
    t.tick(100 * S)
    assert not t.open_alerts and not t.tracks


def test_a_restored_alert_is_continued_not_raised_again():
    """After a restart of the match service its alerts come back from the alert book: the same person seen again
    inside the re-alert window continues the alert (an update with a better probe), no second alert."""
    from lfr.match.tracker import AlertState

    first = tracker(realert_window_s=120.0)
    raised = [a for a in walk(first, "e1", 0.0, 1.0) if a.kind == "raise"]
    assert len(raised) == 1
    old = raised[0].alert
    restarted = tracker(realert_window_s=120.0)
    restarted.restore(AlertState(old.alert_id, "dep", "e1", "S-e1", old.raised_ns, "cam", old.best_score,
                                 old.last_seen_ns, old.best_box, None, old.last_seen_ns, revision=old.revision))
    again = walk(restarted, "e1", 5.0, 1.0, scores=lambda k: 0.7)
    assert [a.kind for a in again if a.kind == "raise"] == []
    assert {a.alert.alert_id for a in again} == {old.alert_id}
    assert again[0].alert.revision == old.revision + 1 and again[0].alert.best_probe == ("frame", 0)
    # outside the window it is a new pass: a new alert
    late = walk(restarted, "e1", 200.0, 1.0)
    assert [a.kind for a in late].count("raise") == 1


# Pass-level decisions (#14) ---------------------------------------------------------------------------
class _Probe:
    def __init__(self, k: int, threshold: float = 0.5):
        self.k, self.threshold = k, threshold


def _one(t: Tracker, entry: str, ts: float, x: float, score: float, k: int = 0):
    return t.observe("dep", "cam", int(ts * S), [Sighting((x, 100, x + 80, 190), (1.0, 0.0), entry, "S-" + entry,
                                                          score, probe=_Probe(k))])


def test_one_matching_frame_of_a_stranger_raises_nothing_under_the_pass_rule():
    t = tracker(min_frames=3, strong_margin=0.2)
    assert _one(t, "e1", 0.0, 0, 0.55) == []  # one blurred frame above the threshold, then gone
    assert t.tick(int(3 * S)) == [] and t.unconfirmed == 1
    assert tracker(min_frames=1).observe("dep", "cam", 0, [Sighting((0, 100, 80, 190), None, "e1", "S", 0.55)])


def test_a_pass_raises_once_at_the_frame_that_completes_the_evidence_with_its_best_probe():
    t = tracker(min_frames=3, strong_margin=0.2)
    assert _one(t, "e1", 0.0, 0, 0.55, 0) == []
    assert _one(t, "e1", 0.1, 6, 0.62, 1) == []
    raised = _one(t, "e1", 0.2, 12, 0.58, 2)
    assert [a.kind for a in raised] == ["raise"]
    alert = raised[0].alert
    assert alert.raised_ns == int(0.2 * S) and alert.best_score == 0.62 and alert.best_probe.k == 1
    more = [a for k in range(3, 20) for a in _one(t, "e1", k / 10, 6 * k, 0.56, k)]
    assert all(a.kind == "update" for a in more)  # the same pass: no second alert


def test_frames_of_evidence_must_be_apart_in_time():
    """Neighbouring frames of one face are nearly the same picture (a stranger who matches in one matches in the
    next: the demo's stage video did this): with evidence_gap_s 0.25 the frame 0.1 s later adds no evidence, the
    one 0.3 s after the first does."""
    t = tracker(min_frames=2, strong_margin=0.2, evidence_gap_s=0.25)
    assert _one(t, "e1", 0.0, 0, 0.55) == []
    assert _one(t, "e1", 0.1, 6, 0.56) == [] and t.waiting == [0]  # too soon: still waiting for evidence
    raised = _one(t, "e1", 0.3, 18, 0.55)
    assert [a.kind for a in raised] == ["raise"] and raised[0].alert.best_score == 0.56
    same_moment = tracker(min_frames=2, strong_margin=0.2, evidence_gap_s=0.25)
    for k in range(3):  # three frames within 0.2 s: never convincing
        assert _one(same_moment, "e2", k / 10, 6 * k, 0.55) == []


def test_waiting_names_the_sightings_whose_pass_needs_more_evidence():
    """After each frame `waiting` lists the sightings in a pass not yet convincing (match asks detection for more
    frames of those faces); a confirmed pass, a strong frame and an open alert's sighting are not waiting."""
    t = tracker(min_frames=2, strong_margin=0.2)
    _one(t, "e1", 0.0, 0, 0.55)
    assert t.waiting == [0]
    assert [a.kind for a in _one(t, "e1", 0.1, 6, 0.55)] == ["raise"] and t.waiting == []
    _one(t, "e1", 0.2, 12, 0.55)
    assert t.waiting == []  # its alert is open: more frames only update it
    _one(t, "e2", 0.3, 400, 0.75)
    assert t.waiting == []  # one strong frame raised at once


def test_one_strong_frame_raises_at_once():
    t = tracker(min_frames=3, strong_margin=0.2)
    assert [a.kind for a in _one(t, "e1", 0.0, 0, 0.75)] == ["raise"]


def test_faces_link_by_their_models_metric():
    """Two faces far apart in the frame are one track when their vectors are alike by the model's own metric:
    dlib's euclidean (s = 1 - d, linked above its one-to-one threshold 0.4), not a raw dot product."""
    from lfr.models import scoring

    dlib = scoring.COMPONENTS[scoring.DLIB]
    a = [0.1] * 128
    b = [0.1 + (0.3 / 128 ** 0.5)] * 128  # euclidean distance 0.3: the same person for dlib (s = 0.7)
    c = [0.1 + (1.2 / 128 ** 0.5)] * 128  # distance 0.9 from b: someone else (s = 0.1), a larger dot product though
    assert scoring.similarity_rows(dlib.metric, [a], [b])[0] > dlib.threshold_1to1
    t = tracker(min_frames=3)
    t.observe("dep", "cam", 0, [Sighting((0, 0, 10, 10), a, "E", "S", 0.6, component=dlib)])
    t.observe("dep", "cam", S // 10, [Sighting((500, 500, 510, 510), b, "E", "S", 0.6, component=dlib)])
    assert [tr.frames for tr in t.tracks[("dep", "cam")]] == [2]  # linked across the frame by vector alone
    t.observe("dep", "cam", 2 * S // 10, [Sighting((900, 0, 910, 10), c, "E", "S", 0.6, component=dlib)])
    assert sorted(tr.frames for tr in t.tracks[("dep", "cam")]) == [1, 2]  # not alike: a track of its own
