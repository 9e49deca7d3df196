"""Live operations end to end on the embedded system (real nats-server, six services, real models, a video of
LFW people from ../shared/data): the reference image for review (watchlist GetEntryImages, only for the roles
that review alerts, refused after the purge, audited as the officer; match GetAlert beside the probe), and the
command line's `lfr source start|list|stop`, `lfr alerts watch` and `lfr deployment stats`."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from PIL import Image

from lfr.cli.client import Clients
from lfr.cli.live import create_deployment, enroll
from lfr.cli.liveops import AlertBoard
from lfr.pb import audit_pb2, match_pb2, watchlist_pb2
from lfr.runtime import clock

CAMERA = "cam-liveops"
LFR = [sys.executable, "-m", "lfr.cli.main"]
OPERATOR, OFFICER = "op-liveops", "pc-liveops"  # development users with one role each
wait_for = clock.wait_for


def as_role(system, user: str, *roles: str) -> Clients:
    return Clients.connect(system.endpoints(), access=system.access(user=user, roles=list(roles)))


def lfr(system, user: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*LFR, *args, "--state-dir", str(system.state_dir), "--as", user], capture_output=True,
                       text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def watch(system, deployment_id: str) -> tuple[subprocess.Popen, list[str]]:
    """`lfr alerts watch --json` as a subprocess; its stdout lines collected by a thread."""
    proc = subprocess.Popen([*LFR, "alerts", "watch", deployment_id, "--from-start", "--json", "--state-dir",
                             str(system.state_dir), "--as", OFFICER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


def access_records(clients: Clients, deployment_id: str, method: str) -> list[audit_pb2.Record]:
    return list(clients.audit.Query(audit_pb2.QueryRequest(deployment_id=deployment_id,
                                                           type_prefix=f"access.watchlist.{method}")).records)


@pytest.fixture(scope="module")
def active(system, clients, ground_truth):
    """An ACTIVE deployment with the ground truth's enrolled people; its entries by subject."""
    system.add_dev_user(OPERATOR, ["operator"])
    system.add_dev_user(OFFICER, ["engagement_officer"])
    d = create_deployment(clients, "liveops", [CAMERA])
    results = enroll(clients, d.id, {name: [path] for name, path in ground_truth.enrolled.items()})
    entries = {name: r.entry_id for name, r in results.items()}
    assert all(entries.values()), results
    clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    return d, entries


def test_entry_images_for_the_roles_that_review_alerts(system, clients, active, ground_truth):
    d, entries = active
    name, entry_id = sorted(entries.items())[0]
    officer = as_role(system, "pc-images", "engagement_officer")
    try:
        r = officer.watchlist.GetEntryImages(watchlist_pb2.GetEntryImagesRequest(
            deployment_id=d.id, entry_id=entry_id), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            officer.watchlist.GetEntryImages(watchlist_pb2.GetEntryImagesRequest(
                deployment_id=d.id, entry_id="no-such-entry"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            officer.watchlist.GetEntryImages(watchlist_pb2.GetEntryImagesRequest(deployment_id=d.id), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        officer.close()
    assert (r.deployment_id, r.entry_id, r.subject_ref) == (d.id, entry_id, name)
    assert r.source_system == "demo" and r.legal_basis and r.added_by == "builder"
    [img] = r.images
    assert img.data == ground_truth.enrolled[name].read_bytes()  # the image as enrolled
    assert img.sha256 == hashlib.sha256(img.data).hexdigest() and img.media_type == "image/jpeg" and img.image_id
    with Image.open(io.BytesIO(img.data)) as im:
        im.load()
        assert im.width > 0 and im.height > 0
    # the list of entries never carries image bytes
    listed = clients.watchlist.ListEntries(watchlist_pb2.ListEntriesRequest(deployment_id=d.id))
    assert all(not i.data for e in listed.entries for i in e.images)

    for role in ("auditor", "watchlist_manager", "authorising_officer", "investigator", "public"):
        other = as_role(system, f"x-{role}", role)
        try:
            with pytest.raises(grpc.RpcError) as info:
                other.watchlist.GetEntryImages(watchlist_pb2.GetEntryImagesRequest(
                    deployment_id=d.id, entry_id=entry_id), timeout=30)
        finally:
            other.close()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, role

    # the audit names the officer and the entry they were shown
    recs = wait_for(lambda: [x for x in access_records(clients, d.id, "GetEntryImages")
                             if x.actor == "pc-images" and x.subject == entry_id])
    assert recs and json.loads(recs[0].summary_json)["decision"] == "ACCESS_DECISION_ALLOWED"
    assert all("data" not in x.summary_json for x in recs)


def test_entry_images_refused_after_the_purge(system, clients, ground_truth):
    name, photo = sorted(ground_truth.enrolled.items())[0]
    d = create_deployment(clients, "liveops-purge", ["cam-purge"])
    entry_id = enroll(clients, d.id, {name: [photo]}, authorise_as="")[name].entry_id
    officer = as_role(system, "pc-purge", "operator")
    req = watchlist_pb2.GetEntryImagesRequest(deployment_id=d.id, entry_id=entry_id)
    try:
        assert officer.watchlist.GetEntryImages(req, timeout=30).images[0].data == photo.read_bytes()
        clients.watchlist.CancelDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op",
                                                                           reason="test of the purge"))
        assert wait_for(lambda: clients.watchlist.GetDeployment(
            watchlist_pb2.GetDeploymentRequest(deployment_id=d.id)).purged_at.seconds)
        with pytest.raises(grpc.RpcError) as info:
            officer.watchlist.GetEntryImages(req, timeout=30)
    finally:
        officer.close()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "purged at" in info.value.details() and d.id in info.value.details()
    def records():
        return [json.loads(x.summary_json) for x in access_records(clients, d.id, "GetEntryImages")
                if x.actor == "pc-purge"]

    recs = wait_for(lambda: len(records()) >= 2 and records())
    assert sorted(r["decision"] for r in recs) == ["ACCESS_DECISION_ALLOWED", "ACCESS_DECISION_DENIED"]
    assert any("purged" in r.get("reason", "") for r in recs)


@pytest.fixture(scope="module")
def played(system, clients, active, ground_truth, tmp_path_factory):
    """`lfr alerts watch` follows the deployment while `lfr source start` plays the video; the source is listed,
    then stopped once the first alert is printed; the watch is stopped with Ctrl-C (SIGINT)."""
    d, entries = active
    proc, lines = watch(system, d.id)
    try:
        started = json.loads(lfr(system, OPERATOR, "source", "start", "--deployment", d.id, "--camera", CAMERA,
                                 str(ground_truth.video), "--fps", "10", "--json").stdout)
        listed = json.loads(lfr(system, OPERATOR, "source", "list", "--deployment", d.id, "--json").stdout)
        first = wait_for(lambda: [json.loads(x) for x in lines], timeout_s=60)
        # some faces that matched nobody (the strangers) pass too, unless the video ends first
        wait_for(lambda: clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id)).nonmatches_disposed,
                 timeout_s=20)
        stopped = json.loads(lfr(system, OPERATOR, "source", "stop", started["source_id"], "--json").stdout)
        # the alert's later revisions and any other alert still arrive while the track ends
        stats = wait_for(lambda: (s := clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id)))
                         and len({json.loads(x)["alert_id"] for x in lines}) >= s.alerts and s, timeout_s=20)
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    return dict(started=started, listed=listed, first=first, stopped=stopped, stats=stats,
                alerts=[json.loads(x) for x in lines], returncode=proc.returncode, stderr=err)


def test_cli_sources_start_list_stop(played, active, ground_truth):
    d, _ = active
    s = played["started"]
    assert s["state"] == "RUNNING" and s["camera_id"] == CAMERA and s["deployment_id"] == d.id
    assert s["url"] == str(ground_truth.video.resolve()) and s["target_fps"] == 10
    assert s["source_id"] in [x["source_id"] for x in played["listed"]]
    assert all(x["deployment_id"] == d.id for x in played["listed"])
    assert played["stopped"]["source_id"] == s["source_id"]
    assert played["stopped"]["state"] in ("STOPPED", "FINISHED") and played["stopped"]["frames_published"] > 0


def test_cli_source_start_refusals_are_one_line(system, active, tmp_path):
    d, _ = active
    for args, code in ((["--camera", CAMERA, str(tmp_path / "missing.mp4")], "NOT_FOUND"),
                       (["--camera", "cam-not-in-deployment", "/etc/hostname"], "FAILED_PRECONDITION"),
                       (["--camera", CAMERA, "/etc/hostname"], "PERMISSION_DENIED"),  # outside the media roots
                       (["--camera", CAMERA, "--fps", "0.5", "rtsp://camera.example/live"], "PERMISSION_DENIED")):
        r = lfr(system, OPERATOR, "source", "start", "--deployment", d.id, *args, check=False)
        assert r.returncode == 1 and r.stderr.startswith(f"lfr: {code}") and "Traceback" not in r.stderr, (args,
                                                                                                          r.stderr)
    r = lfr(system, OFFICER, "source", "stop", "no-such-source", check=False)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr  # an engagement officer does not run cameras
    r = lfr(system, OPERATOR, "source", "stop", "no-such-source", check=False)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_cli_alerts_watch_prints_alerts_and_stops_cleanly_on_ctrl_c(played, active):
    d, entries = active
    assert played["alerts"], played["stderr"]
    for a in played["alerts"]:
        assert a["deployment_id"] == d.id and a["camera_id"] == CAMERA
        assert entries[a["subject_ref"]] == a["entry_id"] and a["score"] >= a["threshold"] > 0
    assert len({a["alert_id"] for a in played["alerts"]}) == played["stats"].alerts
    # each alert's revisions arrive in order (the watcher drops a revision older than one shown)
    for alert_id in {a["alert_id"] for a in played["alerts"]}:
        revs = [a["revision"] for a in played["alerts"] if a["alert_id"] == alert_id]
        assert revs == sorted(set(revs)) and revs[0] == 0
    assert played["returncode"] == 0 and "Traceback" not in played["stderr"]
    assert "stopped watching" in played["stderr"]


def test_alert_board_folds_revisions_into_one_line_with_a_bell_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    board = AlertBoard(out, as_json=False, bell=True)
    a = match_pb2.Alert(alert_id="a1", subject_ref="s1", score=0.8, threshold=0.5, revision=0)
    b = match_pb2.Alert(alert_id="b2", subject_ref="s2", score=0.7, threshold=0.5, revision=0)
    assert board.show(a) == "new" and board.show(b) == "new"
    a.revision, a.score = 1, 0.9
    assert board.show(a) == "revision"
    a.revision = 0
    assert board.show(a) == "stale"
    text = out.getvalue()
    assert text.count("\a") == 2 and text.count("\n") == 2  # two alerts, two lines; the revision rewrote one
    assert "\x1b[2A\r\x1b[2K" in text and "0.900" in text and "rev 1" in text


def test_get_alert_shows_the_reference_beside_the_probe_as_the_officer(system, clients, played, active,
                                                                       ground_truth, tmp_path):
    d, entries = active
    alert = played["first"][0]
    officer = as_role(system, "pc-review", "engagement_officer")
    auditor = as_role(system, "aud-review", "auditor")
    try:
        review = officer.match.GetAlert(match_pb2.GetAlertRequest(alert_id=alert["alert_id"]), timeout=30)
        audited = auditor.match.GetAlert(match_pb2.GetAlertRequest(alert_id=alert["alert_id"]), timeout=30)
    finally:
        officer.close()
        auditor.close()
    assert review.alert.probe_jpeg[:3] == b"\xff\xd8\xff" and review.alert.score >= review.alert.threshold
    assert review.reference_jpeg == ground_truth.enrolled[alert["subject_ref"]].read_bytes()
    assert review.reference_media_type == "image/jpeg" and not review.reference_status
    # a role that may not see watchlist images gets the alert, and the reason instead of the image
    assert audited.alert.alert_id == alert["alert_id"] and not audited.reference_jpeg
    assert "refuses" in audited.reference_status
    # the watchlist's audit names the officer (match called it with the officer's token), not the match service
    entry_id = entries[alert["subject_ref"]]
    assert wait_for(lambda: [x for x in access_records(clients, d.id, "GetEntryImages")
                             if x.actor == "pc-review" and x.subject == entry_id])
    # lists carry no images
    listed = clients.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=d.id))
    assert all(not r.reference_jpeg and not r.alert.probe_jpeg for r in listed.alerts)

    # `lfr alerts show --reference` writes the enrolled image
    ref, probe = tmp_path / "reference.jpg", tmp_path / "probe.jpg"
    shown = json.loads(lfr(system, OFFICER, "alerts", "show", alert["alert_id"], "--reference", str(ref),
                           "--probe", str(probe)).stdout)
    assert ref.read_bytes() == review.reference_jpeg and probe.read_bytes()[:3] == b"\xff\xd8\xff"
    assert shown["reference_status"] == "" and shown["subject_ref"] == alert["subject_ref"]


def test_cli_deployment_stats(system, clients, played, active):
    d, _ = active
    r = json.loads(lfr(system, OPERATOR, "deployment", "stats", d.id, "--json").stdout)
    s = clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id))
    pending = clients.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=d.id, unadjudicated_only=True))
    assert r["alerts"] == s.alerts >= 1 and r["faces_seen"] == s.faces_seen > r["alerts"]
    assert r["pending_adjudications"] == len(pending.alerts) == s.alerts  # none adjudicated yet
    assert r["nonmatches_disposed"] == s.nonmatches_disposed > 0
    assert 0 < r["disposal_ms"]["p50"] <= r["disposal_ms"]["max"] < 1000
    # (a frame being read when the stop came may still be published)
    assert r["frames_published"] == r["sources"][0]["frames_published"] >= played["stopped"]["frames_published"] > 0
    assert [x["source_id"] for x in r["sources"]] == [played["started"]["source_id"]]
    assert set(r["pipeline_drops_all_deployments"]) == {"detection", "embedding", "match"}
    text = lfr(system, OPERATOR, "deployment", "stats", d.id).stdout
    assert f"pending adjudications  {s.alerts}" in text and "disposal p50" in text
    refused = lfr(system, "public", "deployment", "stats", d.id, check=False)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and "Traceback" not in refused.stderr


def test_get_alert_after_the_purge_keeps_the_probe_and_says_why_there_is_no_reference(system, clients, played,
                                                                                      active, tmp_path):
    d, _ = active
    clients.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    assert wait_for(lambda: clients.watchlist.GetDeployment(
        watchlist_pb2.GetDeploymentRequest(deployment_id=d.id)).purged_at.seconds)
    officer = as_role(system, "pc-after", "engagement_officer")
    try:
        review = officer.match.GetAlert(match_pb2.GetAlertRequest(alert_id=played["first"][0]["alert_id"]),
                                        timeout=30)
    finally:
        officer.close()
    assert review.alert.probe_jpeg[:3] == b"\xff\xd8\xff"  # the alert's own crop is kept for its retention
    assert not review.reference_jpeg and "purged at" in review.reference_status
    ref = tmp_path / "reference.jpg"
    r = lfr(system, OFFICER, "alerts", "show", played["first"][0]["alert_id"], "--reference", str(ref))
    assert not ref.exists() and "no reference image" in r.stderr and "purged at" in r.stderr
    assert "purged at" in json.loads(r.stdout)["reference_status"]


def test_cli_alerts_watch_says_so_when_the_system_stops(system, active):
    """Last in the module: the match service is stopped under an open watch."""
    d, _ = active
    proc, _lines = watch(system, d.id)
    try:
        time.sleep(3)  # the stream is open
        assert proc.poll() is None
        system.stop_service("match")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1, err
    assert "the alert stream ended: the match service" in err and "lfr up" in err and "Traceback" not in err
