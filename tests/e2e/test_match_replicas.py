"""match scaled out (#20 items 4 and 6): two match replicas in the real embedded system, two cameras that NATS's
subject partitioning puts on different replicas, a real video of enrolled people and strangers (LFW photos).

One alert per pass per person on each camera, alert ids that name their replica and never repeat, every alert in
the audit; any replica answers for all alerts (lists, reviews, adjudication, the stream); the watchlist's vectors
are in each replica's memory from the deployment's start to its end; a replica killed mid-stream stops only its
own camera's alerts (its alerts wait for it: UNAVAILABLE), and when it is back its camera alerts again, its
adjudication is still there, and no alert it raised is missing from the durable stream or the audit; the
supervisor restarts one replica alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import grpc
import pytest

from lfr.cli.client import Clients
from lfr.cli.live import AlertCollector, create_deployment, enroll, stream_video
from lfr.match.replicas import alert_owner
from lfr.pb import audit_pb2, match_pb2, watchlist_pb2
from lfr.runtime import clock, subjects
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.natsserver import NatsServer
from tests.e2e.conftest import HARNESS_ROLES, media_env

REPLICAS = 2
CANDIDATES = [f"cam-{i}" for i in range(12)]
wait_for = clock.wait_for


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = media_env(tmp_path_factory) | {"LFR_REALERT_WINDOW_S": "2.0", "LFR_ALERT_SWEEP_INTERVAL_S": "1.0"}
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env=env, replicas={"match": REPLICAS},
                        console=False) as s:
        yield s


@pytest.fixture(scope="module")
def clients(system):
    """The clients call replica 0 ("match" in endpoints.json), as the CLI and the console do."""
    c = Clients.connect(system.endpoints(), access=system.access(user="e2e", follow_actor=True, roles=HARNESS_ROLES))
    yield c
    c.close()


def partitions(tmp_path, deployment_id: str, cameras: list[str]) -> dict[str, int]:
    """Where the platform's nats-server mapping sends each camera's embeddings: asked of a real nats-server with
    the same mapping (not computed here: the hash is the server's)."""
    import nats

    async def ask() -> dict[str, int]:
        with NatsServer(tmp_path / "probe-nats") as srv:
            nc = await nats.connect(srv.url)
            got: dict[str, int] = {}

            async def on(msg) -> None:
                got[msg.data.decode()] = int(msg.subject.rsplit(".", 1)[1])

            await nc.subscribe(subjects.embeddings_partition(), cb=on)
            for cam in cameras:
                await nc.publish(subjects.embeddings(deployment_id, cam), cam.encode())
            await nc.flush()
            deadline = time.monotonic() + 5
            while len(got) < len(cameras) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await nc.close()
            return got

    return asyncio.run(ask())


def two_cameras(tmp_path, deployment_id: str) -> tuple[str, str]:
    """A candidate camera served by replica 0 and one served by replica 1."""
    where = {cam: k % REPLICAS for cam, k in partitions(tmp_path, deployment_id, CANDIDATES).items()}
    assert len(where) == len(CANDIDATES)
    on = {r: [c for c, x in where.items() if x == r] for r in range(REPLICAS)}
    assert on[0] and on[1], where
    return on[0][0], on[1][0]


def log_events(system, process: str, event: str, deployment_id: str) -> list[dict]:
    out = []
    for line in (system.state_dir / "logs" / f"{process}.log").read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == event and e.get("deployment_id") == deployment_id:
            out.append(e)
    return out


def start(clients, ground_truth, tmp_path, name: str):
    d = create_deployment(clients, name, CANDIDATES)
    results = enroll(clients, d.id, {n: [p] for n, p in ground_truth.enrolled.items()})
    assert all(r.entry_id for r in results.values()), results
    clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    return d, *two_cameras(tmp_path, d.id)


def stream(clients, d, camera: str, ground_truth, out: dict) -> threading.Thread:
    t = threading.Thread(target=lambda: out.update({camera: stream_video(
        clients, d.id, camera, str(ground_truth.video), fps=10, realtime=True)}))
    t.start()
    return t


def latest(collector) -> dict[str, match_pb2.Alert]:
    out: dict[str, match_pb2.Alert] = {}
    for a, _ in collector.alerts:
        if a.alert_id not in out or a.revision > out[a.alert_id].revision:
            out[a.alert_id] = a
    return out


def audit_alert_ids(clients, deployment_id: str) -> set[str]:
    recs = clients.audit.Query(audit_pb2.QueryRequest(deployment_id=deployment_id, type_prefix="alert.raised",
                                                      limit=10_000)).records
    return {r.subject for r in recs}


def test_two_replicas_two_cameras_one_alert_per_pass_and_any_replica_answers(system, clients, ground_truth,
                                                                            tmp_path):
    d, cam0, cam1 = start(clients, ground_truth, tmp_path, "replicas")
    # each replica holds the live watchlist's vectors from the start, before any frame
    for process in ("match", "match-1"):
        loaded = wait_for(lambda p=process: log_events(system, p, "match.watchlist_loaded", d.id), timeout_s=15)
        assert loaded and loaded[0]["entries"] == len(ground_truth.enrolled), (process, loaded)
    collector = AlertCollector(clients, d.id)  # through replica 0: replica 1's alerts arrive through it
    out: dict = {}
    for t in [stream(clients, d, cam, ground_truth, out) for cam in (cam0, cam1)]:
        t.join(120)
    assert set(out) == {cam0, cam1}
    stats = wait_for(lambda: (s := clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id)))
                     and s.alerts and len(latest(collector)) >= s.alerts and s, timeout_s=20)
    time.sleep(2.0)  # the passes' last revisions (best probes) as their tracks end
    collector.close()
    assert not collector.error and stats
    alerts = latest(collector)
    # one alert per pass per person on each camera: each camera's video shows each enrolled person once
    for cam, replica in ((cam0, 0), (cam1, 1)):
        mine = [a for a in alerts.values() if a.envelope.camera_id == cam]
        assert sorted(a.subject_ref for a in mine) == sorted(ground_truth.enrolled), (cam, mine)
        assert {alert_owner(a.alert_id) for a in mine} == {replica}  # raised by the camera's replica
        assert all(a.probe_jpeg[:3] == b"\xff\xd8\xff" for a in mine)  # with its crop, from its owner
    assert len(alerts) == stats.alerts == 2 * len(ground_truth.enrolled)  # the counts of both replicas, summed
    ids = [a.alert_id for a, _ in collector.alerts if a.revision == 0]
    assert len(ids) == len(set(ids)) == len(alerts)  # no id raised twice, none shared by the replicas
    assert wait_for(lambda: audit_alert_ids(clients, d.id) >= set(alerts), timeout_s=20), "alerts missing from audit"

    # any replica answers for every alert: the list, a review and an adjudication of replica 1's alert
    listed = clients.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=d.id))
    assert sorted(r.alert.alert_id for r in listed.alerts) == sorted(alerts)
    other = next(a for a in alerts.values() if alert_owner(a.alert_id) == 1)
    review = clients.match.GetAlert(match_pb2.GetAlertRequest(alert_id=other.alert_id, actor="pc-1"))
    assert review.alert.alert_id == other.alert_id and review.alert.probe_jpeg[:3] == b"\xff\xd8\xff"
    assert review.reference_jpeg[:3] == b"\xff\xd8\xff"
    r = clients.match.Adjudicate(match_pb2.AdjudicateRequest(
        alert_id=other.alert_id, actor="pc-1", outcome=match_pb2.OUTCOME_CONFIRMED_MATCH,
        engagement=match_pb2.ENGAGEMENT_NO_ACTION, note="spoke, left"))
    assert r.adjudicated and r.adjudication.actor == "pc-1"
    pending = clients.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=d.id, unadjudicated_only=True))
    assert other.alert_id not in {x.alert.alert_id for x in pending.alerts} and len(pending.alerts) == len(alerts) - 1

    # the vectors leave both replicas' memory at the end
    clients.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    for process in ("match", "match-1"):
        assert wait_for(lambda p=process: log_events(system, p, "match.watchlist_dropped", d.id), timeout_s=15)


def test_a_lost_replica_stops_only_its_cameras_and_loses_no_alert(system, clients, ground_truth, tmp_path):
    d, cam0, cam1 = start(clients, ground_truth, tmp_path, "replica-loss")
    collector = AlertCollector(clients, d.id)
    out: dict = {}
    threads = [stream(clients, d, cam, ground_truth, out) for cam in (cam0, cam1)]
    # replica 1 dies (SIGKILL) once it has raised an alert for its camera: whatever it wrote is in its book
    assert wait_for(lambda: any(alert_owner(a.alert_id) == 1 for a, _ in collector.alerts), timeout_s=30)
    first = next(a for a, _ in collector.alerts if alert_owner(a.alert_id) == 1)
    clients.match.Adjudicate(match_pb2.AdjudicateRequest(  # through replica 0, kept in replica 1's book
        alert_id=first.alert_id, actor="pc-2", outcome=match_pb2.OUTCOME_FALSE_ALERT,
        engagement=match_pb2.ENGAGEMENT_NO_ACTION, note="not the subject"))
    os.kill(system.pids()["match-1"], signal.SIGKILL)
    killed_ns = time.time_ns()
    for t in threads:
        t.join(120)
    # camera 0's alerts kept flowing: every enrolled person, raised by replica 0, also after the kill
    mine = [a for a in latest(collector).values() if a.envelope.camera_id == cam0]
    assert wait_for(lambda: sorted(a.subject_ref for a in latest(collector).values() if a.envelope.camera_id == cam0)
                    == sorted(ground_truth.enrolled), timeout_s=10), mine
    assert any(a.envelope.capture_time.ToNanoseconds() > killed_ns for a in latest(collector).values()
               if a.envelope.camera_id == cam0)
    assert not collector.error  # the stream went on without the lost replica

    with pytest.raises(grpc.RpcError) as info:  # its alerts wait for it, and the refusal says why
        clients.match.GetAlert(match_pb2.GetAlertRequest(alert_id=first.alert_id, actor="pc-2"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "match replica 1" in info.value.details()
    loaded = len(log_events(system, "match-1", "match.watchlist_loaded", d.id))
    system.start_service("match-1")  # back (as the supervisor or Kubernetes would)
    system.wait_healthy(["match-1"], 120)
    back = time.monotonic()
    # the restarted replica loaded the live watchlist at its start, before its camera's next frame
    assert wait_for(lambda: len(log_events(system, "match-1", "match.watchlist_loaded", d.id)) == loaded + 1,
                    timeout_s=15)

    def review():
        try:
            return clients.match.GetAlert(match_pb2.GetAlertRequest(alert_id=first.alert_id, actor="pc-2"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return None

    r = wait_for(review, timeout_s=10)  # replica 0 reaches it again (reconnect backoff at most 2 s)
    assert r is not None and time.monotonic() - back < 5
    assert r.adjudicated and r.adjudication.outcome == match_pb2.OUTCOME_FALSE_ALERT  # the adjudication survived
    # its camera alerts again, and the same stream (opened before the loss) carries those alerts
    before = set(latest(collector))
    stream_video(clients, d.id, cam1, str(ground_truth.video), fps=10, realtime=True)
    assert wait_for(lambda: {a.subject_ref for i, a in latest(collector).items() if i not in before
                             and a.envelope.camera_id == cam1} == set(ground_truth.enrolled), timeout_s=20)
    # no alert lost: every alert in the replicas' books is in the durable stream, once, and in the audit
    time.sleep(2.0)
    booked = {r.alert.alert_id for r in clients.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=d.id)).alerts}
    assert any(alert_owner(i) == 1 for i in booked & before)  # replica 1's alerts of before its loss are kept
    assert wait_for(lambda: set(latest(collector)) == booked, timeout_s=20), (set(latest(collector)) ^ booked)
    collector.close()
    raised = [a.alert_id for a, _ in collector.alerts if a.revision == 0]
    assert len(raised) == len(set(raised)) == len(booked)
    assert wait_for(lambda: audit_alert_ids(clients, d.id) >= booked, timeout_s=20), "alerts missing from audit"
    clients.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))


def test_the_supervisor_restarts_one_replica_alone_and_status_shows_replicas(system):
    from lfr.cli.ops import system_health

    endpoints = system.endpoints()
    assert endpoints["replicas"] == {"match": [system.endpoint("match"), system.endpoint("match-1")]}
    system.supervise()
    pids = system.pids()
    os.kill(pids["match-1"], signal.SIGKILL)
    assert wait_for(lambda: system.status()["processes"]["match-1"]["restarts"] == 1, timeout_s=20)
    system.wait_healthy(["match-1"], 120)
    system.write_endpoints()
    status = system.status()["processes"]
    assert status["match"]["restarts"] == 0 and system.pids()["match"] == pids["match"]
    assert system.pids()["match-1"] != pids["match-1"]
    health = system_health(system.state_dir)  # what `lfr status` shows: every process, the replica too
    assert health["match-1"] == "SERVING" and all(v == "SERVING" for v in health.values()), health


def test_no_face_crop_on_disk_outside_the_alert_books(system):
    for path in system.state_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("match-alerts"):
            assert b"\xff\xd8\xff" not in path.read_bytes(), f"JPEG data found in {path}"
