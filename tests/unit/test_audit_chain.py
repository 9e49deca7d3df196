"""The audit chain (tamper detection with the right position), the audit index, the records of alert facts,
the published deployment records, and the alert book's time rules on a moved clock."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest

from lfr.audit import chain, report
from lfr.audit.core import RecordData, record_from_event
from lfr.audit.store import AuditStore
from lfr.errors import Refused
from lfr.match.alerts import AlertBook
from lfr.match.core import check_adjudication
from lfr.pb import audit_pb2, match_pb2, watchlist_pb2
from lfr.runtime import events
from lfr.runtime.clock import ManualClock, OffsetFileClock

DAY = 86400


def data(i: int, typ: str = "alert.raised", dep: str = "d1") -> RecordData:
    return RecordData(1_700_000_000_000_000_000 + i, typ, "match", dep, f"a{i}", f"{i:064x}", json.dumps({"i": i}))


def build(n: int) -> list[chain.ChainRecord]:
    out, head = [], None
    for i in range(1, n + 1):
        head = chain.link(head, data(i), f"LFR_ALERTS:{i}")
        out.append(head)
    return out


def test_an_intact_chain_verifies():
    recs = build(6)
    v = chain.verify(recs)
    assert v.ok and v.records == 6 and v.head_hash == recs[-1].hash and v.first_bad == 0
    assert recs[0].prev_hash == chain.GENESIS and all(b.prev_hash == a.hash for a, b in zip(recs, recs[1:]))
    assert chain.compare(recs, list(recs)).ok


@pytest.mark.parametrize("position", [1, 3, 6])
def test_a_changed_record_is_named(position):
    recs = build(6)
    recs[position - 1] = replace(recs[position - 1], actor="someone else")
    v = chain.verify(recs)
    assert not v.ok and v.first_bad == position and "altered" in v.reason


def test_a_changed_record_with_a_recomputed_hash_breaks_the_next_link_and_differs_from_the_durable_copy():
    durable = build(6)
    recs = list(durable)
    r = recs[2]
    forged = replace(r, summary_json='{"i": 999}')
    forged = replace(forged, hash=chain.record_hash(3, chain.data_of(forged), forged.source, forged.prev_hash))
    recs[2] = forged
    v = chain.verify(recs)
    assert not v.ok and v.first_bad == 4 and "does not link" in v.reason
    both = v.worst(chain.compare(recs, durable))
    assert both.first_bad == 3 and "durable copy" in both.reason


@pytest.mark.parametrize("position", [1, 4, 6])
def test_a_deleted_record_is_named(position):
    recs = build(6)
    durable = list(recs)
    del recs[position - 1]
    v = chain.verify(recs).worst(chain.compare(recs, durable))
    assert not v.ok and v.first_bad == position
    assert "missing" in v.reason or "durable" in v.reason


def test_reordered_records_are_named():
    recs = build(6)
    recs[2], recs[3] = recs[3], recs[2]  # as stored
    v = chain.verify(recs)
    assert not v.ok and v.first_bad == 3 and "out of place" in v.reason
    # the same swap with the sequence numbers rewritten to look in order
    recs = build(6)
    a, b = recs[2], recs[3]
    recs[2], recs[3] = replace(b, sequence=3), replace(a, sequence=4)
    v = chain.verify(recs)
    assert not v.ok and v.first_bad == 3


def test_an_inserted_record_and_a_truncated_tail_are_named():
    recs = build(5)
    extra = chain.link(recs[1], data(99), "LFR_EVENTS:99")
    v = chain.verify(recs[:2] + [extra] + recs[2:])
    assert not v.ok and v.first_bad == 4  # the forged 3 links to 2, the real 3 no longer links
    v = chain.verify(recs[:3]).worst(chain.compare(recs[:3], recs))
    assert not v.ok and v.first_bad == 4 and "missing from the index" in v.reason


def store_with(tmp_path, n: int) -> AuditStore:
    store = AuditStore(tmp_path / "audit.sqlite")
    for r in build(n):
        store.insert(r)
    return store


def test_tampering_with_the_sqlite_index_is_detected_at_the_right_position(tmp_path):
    store = store_with(tmp_path, 8)
    assert chain.verify(store.chain()).ok and store.count() == 8 and store.head().sequence == 8
    assert store.has_source("LFR_ALERTS:3") and store.recorded_from("LFR_ALERTS", 4) == 5
    db = sqlite3.connect(tmp_path / "audit.sqlite")
    db.execute("UPDATE records SET actor = 'x' WHERE sequence = 5")
    db.commit()
    assert chain.verify(store.chain()).first_bad == 5
    db.execute("UPDATE records SET actor = 'match' WHERE sequence = 5")
    db.execute("DELETE FROM records WHERE sequence = 3")
    db.commit()
    v = chain.verify(store.chain())
    assert v.first_bad == 3 and "missing" in v.reason
    db.close()

    store = store_with(tmp_path / "b", 8)
    db = sqlite3.connect(tmp_path / "b" / "audit.sqlite")
    db.execute("UPDATE records SET sequence = -6 WHERE sequence = 6")
    db.execute("UPDATE records SET sequence = 6 WHERE sequence = 7")
    db.execute("UPDATE records SET sequence = 7 WHERE sequence = -6")
    db.commit()
    db.close()
    assert chain.verify(store.chain()).first_bad == 6


def test_alert_facts_become_records_without_images():
    env = events.envelope("match", "d1", "c1")
    alert = match_pb2.Alert(envelope=env, alert_id="a1", entry_id="e1", score=0.8, revision=2,
                            probe_jpeg=b"\xff\xd8\xff" + b"x" * 50)
    r = record_from_event("lfr.v1.alerts.d1.c1", alert.SerializeToString())
    assert r.type == "alert.updated" and "probe_jpeg" not in r.summary_json
    adj = match_pb2.AlertAdjudicated(envelope=env, alert_id="a1", adjudication=match_pb2.Adjudication(
        outcome=match_pb2.OUTCOME_FALSE_ALERT, engagement=match_pb2.ENGAGEMENT_NO_ACTION, actor="pc 1"))
    r = record_from_event("lfr.v1.adjudications.d1", adj.SerializeToString())
    assert (r.type, r.actor, r.subject) == ("alert.adjudicated", "pc 1", "a1")
    adj.previous_outcome = match_pb2.OUTCOME_CONFIRMED_MATCH
    assert record_from_event("lfr.v1.adjudications.d1", adj.SerializeToString()).type == "alert.amended"
    r = record_from_event("lfr.v1.alertflags.d1", match_pb2.AlertOverdue(envelope=env, alert_id="a1")
                          .SerializeToString())
    assert r.type == "alert.overdue"
    r = record_from_event("lfr.v1.retention.d1", match_pb2.CropsDeleted(envelope=env, alert_ids=["a1"],
                                                                         probe_crops_deleted=1).SerializeToString())
    assert r.type == "retention.crops_deleted" and json.loads(r.summary_json)["alert_ids"] == ["a1"]
    acc = audit_pb2.AccessEvent(envelope=env, service="match", method="GetAlert", actor="pc 1", subject="a1")
    r = record_from_event("lfr.v1.access.match", acc.SerializeToString())
    assert (r.type, r.actor, r.subject) == ("access.match.GetAlert", "pc 1", "a1")
    assert record_from_event("lfr.v1.access.match", b"\xff\xff\xff").type == "event.malformed"


def test_identification_facts_name_what_they_were_about():
    env = events.envelope("watchlist")
    cases = [(dict(action="identification_search", search_id="s1", case_reference="C/1"), "s1"),
             (dict(action="identification_job_finished", job_id="j1", gallery="custody"), "j1"),
             (dict(action="gallery_images_added", gallery="custody", subject_ref="P-7"), "P-7")]
    for fields, subject in cases:
        r = record_from_event("lfr.v1.watchlist._", watchlist_pb2.WatchlistEvent(envelope=env, actor="dc 9",
                                                                                  **fields).SerializeToString())
        assert (r.type, r.actor, r.subject) == (f"watchlist.{fields['action']}", "dc 9", subject)


def test_adjudication_rules():
    check_adjudication(match_pb2.OUTCOME_CONFIRMED_MATCH, match_pb2.ENGAGEMENT_ARREST, "", "pc", False, False)
    cases = [(match_pb2.OUTCOME_UNSPECIFIED, 0, "pc", False, False, "INVALID_ARGUMENT"),
             (match_pb2.OUTCOME_FALSE_ALERT, 0, "pc", False, False, "INVALID_ARGUMENT"),
             (match_pb2.OUTCOME_NOT_ENGAGED, match_pb2.ENGAGEMENT_ARREST, "pc", False, False, "INVALID_ARGUMENT"),
             (match_pb2.OUTCOME_FALSE_ALERT, match_pb2.ENGAGEMENT_NO_ACTION, "", False, False, "INVALID_ARGUMENT"),
             (match_pb2.OUTCOME_FALSE_ALERT, match_pb2.ENGAGEMENT_NO_ACTION, "pc", True, False,
              "FAILED_PRECONDITION")]
    for outcome, engagement, actor, already, amend, code in cases:
        with pytest.raises(Refused) as info:
            check_adjudication(outcome, engagement, "", actor, already, amend)
        assert info.value.code == code
    check_adjudication(match_pb2.OUTCOME_NOT_ENGAGED, 0, "", "pc", True, True)  # an amendment may be recorded


def lifecycle(dep: str, action: str, t_ns: int, **fields) -> bytes:
    d = watchlist_pb2.Deployment(id=dep, site="Station Square", purpose="wanted offenders", threshold=0.4,
                                 model_id="sface-2021dec", model_version="1", watchlist_size=fields.pop("size", 0),
                                 **fields)
    return watchlist_pb2.DeploymentEvent(envelope=events.envelope("watchlist", dep, capture_ns=t_ns),
                                         deployment=d, action=action, actor="op").SerializeToString()


def test_published_records_and_totals():
    t0 = 1_760_000_000 * 10**9  # 2025-10-09
    recs, head, n = [], None, 0

    def add(subject: str, payload: bytes):
        nonlocal head, n
        n += 1
        r = record_from_event(subject, payload)
        head = chain.link(head, replace(r, time_ns=r.time_ns or t0), f"S:{n}")
        recs.append(head)

    add("lfr.v1.lifecycle.d1", lifecycle("d1", "created", t0))
    add("lfr.v1.lifecycle.d1", lifecycle("d1", "started", t0, size=12, started_at=events.ts_from_ns(t0)))
    for i, outcome, engagement in [(1, match_pb2.OUTCOME_CONFIRMED_MATCH, match_pb2.ENGAGEMENT_ARREST),
                                   (2, match_pb2.OUTCOME_FALSE_ALERT, match_pb2.ENGAGEMENT_NO_ACTION),
                                   (3, match_pb2.OUTCOME_NOT_ENGAGED, match_pb2.ENGAGEMENT_NO_ACTION), (4, 0, 0)]:
        env = events.envelope("match", "d1", "c1")
        for rev in (0, 1):
            add("lfr.v1.alerts.d1.c1", match_pb2.Alert(envelope=env, alert_id=f"a{i}", revision=rev)
                .SerializeToString())
        if outcome:
            add("lfr.v1.adjudications.d1", match_pb2.AlertAdjudicated(
                envelope=env, alert_id=f"a{i}", adjudication=match_pb2.Adjudication(
                    outcome=match_pb2.OUTCOME_CONFIRMED_MATCH if i == 2 else outcome, engagement=engagement,
                    actor="pc")).SerializeToString())
    # a.2 first confirmed, then amended to a false alert
    add("lfr.v1.adjudications.d1", match_pb2.AlertAdjudicated(
        envelope=events.envelope("match", "d1"), alert_id="a2", previous_outcome=match_pb2.OUTCOME_CONFIRMED_MATCH,
        adjudication=match_pb2.Adjudication(outcome=match_pb2.OUTCOME_FALSE_ALERT,
                                            engagement=match_pb2.ENGAGEMENT_NO_ACTION, actor="sgt"),
    ).SerializeToString())
    for instance, faces in (("m1", 1000), ("m1", 30000), ("m2", 2000)):  # a restarted match counts from zero
        add("lfr.v1.matchstats.d1", match_pb2.MatchStats(envelope=events.envelope("match", "d1"),
                                                          instance_id=instance, faces_seen=faces).SerializeToString())
    t1 = t0 + 3600 * 10**9
    add("lfr.v1.lifecycle.d1", lifecycle("d1", "ended", t1, size=12, ended_at=events.ts_from_ns(t1)))
    add("lfr.v1.lifecycle.d1", lifecycle("d1", "purged", t1))  # size 0 after the purge: the start's size counts
    assert chain.verify(recs).ok

    p = report.published_record([r for r in recs if r.type in report.TYPES])
    assert (p.date, p.site, p.purpose_category, p.watchlist_size, p.status) == (
        "2025-10-09", "Station Square", "wanted offenders", 12, "ended")
    assert (p.start_ns, p.end_ns) == (t0, t1) and p.model == "sface-2021dec 1" and abs(p.threshold - 0.4) < 1e-6
    assert (p.faces_seen, p.alerts, p.confirmed_alerts, p.false_alerts, p.not_engaged, p.unadjudicated,
            p.arrests) == (32000, 4, 1, 1, 1, 1, 1)
    assert p.false_alert_rate == 1 / 32000 and p.false_alert_one_in == 32000
    assert report.published_record([r for r in recs if r.type == "deployment.created"]) is None
    n, t = report.totals([p, p])
    assert n == 2 and t.false_alerts == 2 and t.faces_seen == 64000 and t.false_alert_one_in == 32000
    assert report.period_ns("2025-10-09", "2025-10-09") == (t0 - t0 % (DAY * 10**9), t0 - t0 % (DAY * 10**9)
                                                             + DAY * 10**9)
    with pytest.raises(ValueError):
        report.period_ns("2025-10-10", "2025-10-09")
    with pytest.raises(ValueError):
        report.period_ns("yesterday", "")


def alert(alert_id: str, revision: int = 0) -> match_pb2.Alert:
    return match_pb2.Alert(envelope=events.envelope("match", "d1", "c1"), alert_id=alert_id, entry_id="e1",
                           revision=revision, raised_at=events.now_ts())


def test_retention_deletes_crops_on_time_with_a_moved_clock_and_the_deletion_is_a_fact(tmp_path):
    clock = ManualClock(1_760_000_000 * 10**9)
    book = AlertBook(tmp_path / "alerts.sqlite", clock, due_s=900, retention_s=31 * DAY)
    crop = b"\xff\xd8\xff" + b"probe-crop" * 100
    book.record(alert("a1"), crop)
    book.record(alert("a1", 1), crop + b"better")
    book.record(alert("a1", 0), b"stale")  # an older revision never overwrites a newer
    assert book.current("a1") == (1, crop + b"better", False)
    clock.advance(10 * DAY)
    book.record(alert("a2"), crop)
    book.adjudicate("a2", match_pb2.Adjudication(outcome=match_pb2.OUTCOME_FALSE_ALERT,
                                                 engagement=match_pb2.ENGAGEMENT_NO_ACTION, actor="pc"))

    clock.set(1_760_000_000 * 10**9 + 31 * DAY * 10**9 - 1)  # one nanosecond before a1's period ends
    flagged, deleted = book.sweep()
    assert [f.alert_id for f in flagged] == ["a1"]  # a1 was never adjudicated: flagged (once)
    assert deleted == [] and book.get("a1").alert.probe_jpeg
    clock.advance(1e-9)
    flagged, deleted = book.sweep()
    assert flagged == [] and len(deleted) == 1
    assert list(deleted[0].alert_ids) == ["a1"] and deleted[0].probe_crops_deleted == 1
    review = book.get("a1")
    assert not review.alert.probe_jpeg and review.alert.probe_deleted and review.crops_deleted_at.seconds
    assert book.get("a2").alert.probe_jpeg  # a2 is 10 days younger
    assert book.sweep() == ([], [])  # done once
    # the deletion's record is durable (waiting for JetStream in the same transaction) and audited
    subjects_pending = [(p.subject, record_from_event(p.subject, p.data).type) for p in book.pending()]
    assert subjects_pending == [("lfr.v1.adjudications.d1", "alert.adjudicated"),
                                ("lfr.v1.alertflags.d1", "alert.overdue"),
                                ("lfr.v1.retention.d1", "retention.crops_deleted")]
    for p in book.pending():
        book.outbox.published(p.n)
    assert book.pending() == []
    clock.advance(10 * DAY)
    _, deleted = book.sweep()
    assert [list(d.alert_ids) for d in deleted] == [["a2"]]
    book.close()
    # nothing of the crops is left in the files
    for f in tmp_path.iterdir():
        assert b"probe-crop" not in f.read_bytes(), f


def test_the_offset_file_clock_moves_running_services(tmp_path):
    path = tmp_path / "offset"
    clock = OffsetFileClock(path)
    assert clock.offset_ns() == 0
    path.write_text(str(32 * DAY))
    assert clock.offset_ns() == 32 * DAY * 10**9
    path.write_text("not a number")
    assert clock.offset_ns() == 0
