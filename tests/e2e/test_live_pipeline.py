"""The live path end to end: real nats-server, six services as separate processes, real models, a video
with known people at known times. Enrolled people alert, strangers do not, alerts reach StreamAlerts and
the audit, every non-match is disposed of within one second, and a NATS restart loses no durable alert."""

from __future__ import annotations

import json
import time

import pytest

from lfr.cli.client import Clients
from lfr.cli.live import AlertCollector, create_deployment, enroll, stream_video
from lfr.pb import audit_pb2, match_pb2, watchlist_pb2
from lfr.runtime import clock

CAMERA = "cam-e2e"


def start_deployment(clients: Clients, ground_truth) -> watchlist_pb2.Deployment:
    d = create_deployment(clients, "e2e", [CAMERA])
    results = enroll(clients, d.id, {name: [path] for name, path in ground_truth.enrolled.items()})
    for name, r in results.items():
        assert r.entry_id and all(x.accepted for x in r.results), (name, r)
    clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    return d


def segment_at(ground_truth, t: float):
    return next((s for s in ground_truth.segments if s.start_s - 0.05 <= t <= s.end_s + 0.05), None)


def audit_alert_ids(clients: Clients, deployment_id: str) -> set[str]:
    recs = clients.audit.Query(audit_pb2.QueryRequest(deployment_id=deployment_id, type_prefix="alert.")).records
    return {r.subject for r in recs}


wait_for = clock.wait_for


def test_enrolled_people_alert_and_strangers_do_not(system, clients, ground_truth):
    d = start_deployment(clients, ground_truth)
    collector = AlertCollector(clients, d.id)
    src = stream_video(clients, d.id, CAMERA, str(ground_truth.video), fps=10, realtime=True)
    assert src.frames_published >= 0.9 * 10 * ground_truth.segments[-1].end_s
    stats = wait_for(lambda: (s := clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id)))
                     and len(collector.alerts) >= s.alerts and s, timeout_s=10)
    collector.close()
    assert not collector.error

    alerts = [a for a, _ in collector.alerts]
    alerted = {a.subject_ref for a in alerts}
    assert alerted == set(ground_truth.enrolled), f"alerted {alerted}, enrolled {set(ground_truth.enrolled)}"
    for a in alerts:
        seg = segment_at(ground_truth, a.video_time_s)
        assert seg is not None and seg.subject == a.subject_ref, (a.subject_ref, a.video_time_s)
        assert seg.subject not in ground_truth.strangers
        assert a.score >= a.threshold == pytest.approx(d.threshold)
        assert a.probe_jpeg[:3] == b"\xff\xd8\xff"  # the probe crop travels with the alert for review
        assert a.envelope.model_id == d.model_id

    # Every alert is in the audit record (with no image), and nothing else was matched.
    ids = {a.alert_id for a in alerts}
    assert wait_for(lambda: audit_alert_ids(clients, d.id) >= ids), "alerts missing from the audit"
    recs = clients.audit.Query(audit_pb2.QueryRequest(deployment_id=d.id, type_prefix="alert.")).records
    assert all("probe_jpeg" not in json.loads(r.summary_json) for r in recs)

    # Strangers and everything else that matched nobody were disposed of within one second of capture.
    # Faces seen (#14 item 5): each person's face once, though it is in 15 frames and embedded about 5 times, and
    # though each takes the place of the one before in the middle of the picture (detection's track continues)
    assert stats.faces_seen == len(ground_truth.segments), (stats.faces_seen, len(ground_truth.segments))
    assert stats.nonmatches_disposed >= len(ground_truth.strangers) * 5
    assert 0 < stats.disposal_ms_max < 1000, stats
    clients.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))


def test_no_biometric_of_a_nonmatch_on_disk(system):
    """Only match's alert book may hold face crops (alerts, kept for review within retention); nothing else on
    disk may: not the streams, not the logs, not the other stores."""
    for path in system.state_dir.rglob("*"):
        if not path.is_file() or path.name.startswith("match-alerts.sqlite"):
            continue
        assert b"\xff\xd8\xff" not in path.read_bytes(), f"JPEG data found in {path}"


def test_frames_went_through_shared_memory_and_no_ring_is_left(system):
    """#14 item 4: `lfr up` hands frames from ingest to detection in a shared-memory ring (lfr.runtime.framering),
    only their place on NATS; detection read every one it processed from there, and once the source had ended its
    ring was zeroed and removed: no frame is left in memory (or in /dev/shm) after the stream."""
    from lfr.bench.live import metric_sum, scrape
    from lfr.runtime import framering

    assert system.service_env("ingest")["LFR_FRAME_ENCODING"] == "shm"
    det = scrape(system.endpoints()["metrics"]["detection"])
    assert metric_sum(det, "lfr_items_processed_total", stage="detect") > 0
    assert metric_sum(det, "lfr_items_dropped_total", stage="detect", reason="unreachable") == 0
    assert metric_sum(det, "lfr_items_dropped_total", stage="detect", reason="bad_image") == 0
    ingest_pid = system.procs["ingest"].pid
    assert wait_for(lambda: not list(framering.SHM_DIR.glob(f"{framering.PREFIX}{ingest_pid}-*")), timeout_s=5)


def test_nats_restart_mid_stream_loses_no_durable_alert(system, clients, ground_truth):
    d = start_deployment(clients, ground_truth)
    collector = AlertCollector(clients, d.id)
    import threading

    result = {}
    t = threading.Thread(target=lambda: result.update(src=stream_video(
        clients, d.id, CAMERA, str(ground_truth.video), fps=10, realtime=True)))
    t.start()
    time.sleep(2.5)
    system.nats.kill()  # abrupt: SIGKILL mid-stream
    time.sleep(1.0)
    system.nats.start()
    restarted_ns = time.time_ns()
    t.join(120)
    assert result["src"].frames_published > 0

    def settled():
        s = clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id))
        return s if s.alerts and len(collector.alerts) >= s.alerts else None

    stats = wait_for(settled, timeout_s=20)
    collector.close()
    assert stats is not None, "alerts raised by match did not all reach StreamAlerts"
    ids = {a.alert_id for a, _ in collector.alerts}
    assert len(ids) == stats.alerts  # every alert match raised is in the durable stream, once
    assert wait_for(lambda: audit_alert_ids(clients, d.id) >= ids, timeout_s=20), "alerts missing from the audit"
    assert any(a.envelope.capture_time.ToNanoseconds() > restarted_ns for a, _ in collector.alerts), \
        "no alert after NATS came back: services did not reconnect"
