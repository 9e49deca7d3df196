"""Chaos benchmark: kill each part of the embedded system while a deployment runs, and count what was lost.

`lfr bench chaos --video FILE --enroll DIR`: the embedded system runs supervised (as `lfr up` does). A first
round streams the video undisturbed: the alerts it raises are the ones expected. Then, one round each, a
process is SIGKILLed at a moment chosen to hurt, while a camera streams the video again and again:

- ingest, detection, embedding, watchlist, nats-server: as frames flow, before the round's first alert;
- match: as its first alert arrives, with an officer's adjudication of it in flight;
- audit: as its first alert arrives (the audit is recording it);
- watchlist again ("watchlist-purge"): while it ends and purges the round's deployment;
- the watchlist's Qdrant server ("qdrant", only when LFR_QDRANT_URL is set; in local mode the store is a folder
  inside the watchlist process and dies with it): while the watchlist purges the round's deployment from it. The
  benchmark is given the server's PID (`--qdrant-pid`: whatever runs it, systemd or Kubernetes, starts it again)
  and/or the command that starts it (`--qdrant-command`: the benchmark starts it again itself, and first too
  when no PID is given). The round also counts the deployment's vectors left in Qdrant after its purge.

The supervisor brings the process back. Each round reports the time until the killed process is SERVING,
until faces are matched again, until the first alert; the alerts expected, raised, lost and duplicated;
alerts recorded by match but never published; adjudications acknowledged to the officer but lost; audit
records missing or doubled; lifecycle facts missing or doubled; the non-match disposal maximum. At the end the
audit chain is verified against its durable stream. Any loss or duplicate makes `ok` false (exit 1).

`--power-loss N`: instead, N rounds of a whole-system SIGKILL (the process group, or the supervisor alone so
its children die by their parent-death signal) at a random moment of a deployment with alerts, each followed
by a restart on the same state folder: every store opens (SQLite integrity_check, every service SERVING), the
chain verifies against the stream, and every acknowledged fact is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lfr.cli.client import Clients, subject_images
from lfr.cli.live import create_deployment, enroll
from lfr.pb import audit_pb2, ingest_pb2, match_pb2, watchlist_pb2
from lfr.runtime.embedded import NATS, SERVICES, EmbeddedSystem, check_health
from lfr.runtime.paths import data_dir

CAMERA = "chaos-camera"
VICTIMS = ("ingest", "detection", "embedding", "watchlist", "match", "audit", NATS, "watchlist-purge")
QDRANT = "qdrant"  # the watchlist's Qdrant server, a victim only when LFR_QDRANT_URL is set
RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
ONCE = ("created", "started", "ended", "purged")  # lifecycle facts a deployment has exactly once


def add_arguments(p) -> None:
    p.add_argument("--video", default="", help="video file (default: the shared stage-audience video)")
    p.add_argument("--enroll", default="", help="folder of <subject>/<image> files (default: the demo's watchlist "
                   "from the shared data)")
    p.add_argument("--fps", type=float, default=5.0, help="sampling rate (default 5)")
    p.add_argument("--round-s", type=float, default=30.0, help="seconds of video streamed per round (default 30)")
    p.add_argument("--victims", default="", help=f"comma-separated, in order (default: {','.join(VICTIMS)}, and "
                   f"{QDRANT} when LFR_QDRANT_URL is set)")
    p.add_argument("--qdrant-pid", type=int, default=0, help="victim qdrant: the PID of the Qdrant server at "
                   "LFR_QDRANT_URL (something else starts it again after the kill, unless --qdrant-command)")
    p.add_argument("--qdrant-command", default="", help="victim qdrant: the command that starts the Qdrant server "
                   "at LFR_QDRANT_URL; the benchmark starts it again with it after the kill (and first, without "
                   "--qdrant-pid)")
    p.add_argument("--power-loss", type=int, default=0, metavar="N",
                   help="run N whole-system SIGKILL rounds instead (restart on the same state folder each time)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the power-loss moments")
    p.add_argument("--state-dir", default="", help="state folder (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="one-line JSON")


def default_inputs(args) -> tuple[str, dict[str, list[Path]]]:
    if args.video and args.enroll:
        return args.video, subject_images(args.enroll)
    from lfr.cli.demo import DEFAULT_VIDEO, DEFAULT_WATCHLIST

    data = data_dir(required=True)
    subjects = subject_images(args.enroll) if args.enroll else {k: [data / v] for k, v in DEFAULT_WATCHLIST.items()}
    return args.video or str(data / DEFAULT_VIDEO), subjects


def call(fn, request, timeout_s: float = 120.0, per_call_s: float = 30.0, done_codes=()):
    """A call retried while the service is down (UNAVAILABLE and the like) until `timeout_s`. A status in
    `done_codes` (e.g. FAILED_PRECONDITION: an earlier try was applied) is returned as the exception."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn(request, timeout=per_call_s)
        except grpc.RpcError as exc:
            if exc.code() in done_codes:
                return exc
            if exc.code() not in RETRY or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# The live side: a camera manager, an officer, a stats sampler ---------------------------------------------
class Camera:
    """Keeps the video streaming (a file source in ingest, started again whenever it finished or ingest lost it),
    as a camera gateway would, until stop()."""

    def __init__(self, c: Clients, deployment_id: str, video: str, fps: float):
        self.c, self.deployment_id, self.video, self.fps = c, deployment_id, video, fps
        self.started = 0
        self.first_start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)

    def start(self) -> Camera:
        self._thread.start()
        return self

    def _running(self) -> bool:
        sources = self.c.ingest.ListSources(ingest_pb2.ListSourcesRequest(), timeout=5).sources
        return any(s.deployment_id == self.deployment_id and s.state == ingest_pb2.SOURCE_STATE_RUNNING
                   for s in sources)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._running():
                    self.c.ingest.StartSource(ingest_pb2.StartSourceRequest(
                        deployment_id=self.deployment_id, camera_id=CAMERA, url=self.video, target_fps=self.fps,
                        realtime=True), timeout=10)
                    self.started += 1
                    self.first_start = self.first_start or time.monotonic()
            except grpc.RpcError:
                pass  # ingest is down: try again
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        try:
            for s in self.c.ingest.ListSources(ingest_pb2.ListSourcesRequest(), timeout=5).sources:
                if s.deployment_id == self.deployment_id and s.state == ingest_pb2.SOURCE_STATE_RUNNING:
                    self.c.ingest.StopSource(ingest_pb2.StopSourceRequest(source_id=s.source_id), timeout=5)
        except grpc.RpcError:
            pass


class Officer:
    """Follows StreamAlerts (reconnecting after a kill, replaying from the start) and adjudicates every new alert
    (not engaged), retrying until the match service acknowledges it."""

    def __init__(self, c: Clients, deployment_id: str, adjudicate: bool = True):
        self.c, self.deployment_id, self.adjudicate = c, deployment_id, adjudicate
        self.alerts: dict[str, tuple[match_pb2.Alert, float]] = {}  # id -> (first revision seen, when)
        self.acknowledged: set[str] = set()  # adjudications the service confirmed (or had already applied)
        self.in_flight: set[str] = set()
        self.first_alert = threading.Event()
        self._stop = threading.Event()
        self._call = None
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._follow, name="alerts", daemon=True)]

    def start(self) -> Officer:
        for t in self._threads:
            t.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._call = self.c.match.StreamAlerts(match_pb2.StreamAlertsRequest(
                    deployment_id=self.deployment_id, from_start=True))
                for alert in self._call:
                    with self._lock:
                        new = alert.alert_id not in self.alerts
                        if new:
                            self.alerts[alert.alert_id] = (alert, time.monotonic())
                    if new:
                        self.first_alert.set()
                        if self.adjudicate:
                            t = threading.Thread(target=self._adjudicate, args=(alert.alert_id,), daemon=True)
                            t.start()
                            self._threads.append(t)
            except grpc.RpcError:
                pass
            self._stop.wait(0.3)

    def _adjudicate(self, alert_id: str) -> None:
        self.in_flight.add(alert_id)
        got = call(self.c.match.Adjudicate, match_pb2.AdjudicateRequest(
            alert_id=alert_id, outcome=match_pb2.OUTCOME_NOT_ENGAGED, note="chaos benchmark", actor="operator"),
            timeout_s=180, done_codes=(grpc.StatusCode.FAILED_PRECONDITION,))
        if not isinstance(got, grpc.RpcError) or "already adjudicated" in (got.details() or ""):
            self.acknowledged.add(alert_id)
        self.in_flight.discard(alert_id)

    def wait_adjudications(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()


class StatsSampler:
    """GetStats of the deployment every 0.25 s: the disposal maximum across match restarts, and when faces were
    last matched."""

    def __init__(self, c: Clients, deployment_id: str):
        self.c, self.deployment_id = c, deployment_id
        self.disposal_max_ms = 0.0
        self.faces = (None, -1)  # (instance, faces seen) last seen
        self.faces_changed: list[float] = []  # times the count moved
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> StatsSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                s = self.c.match.GetStats(match_pb2.GetStatsRequest(deployment_id=self.deployment_id), timeout=2)
            except grpc.RpcError:
                continue
            self.disposal_max_ms = max(self.disposal_max_ms, s.disposal_ms_max)
            now = (s.instance_id, s.faces_seen)
            if now != self.faces and s.faces_seen > 0:
                self.faces_changed.append(time.monotonic())
            self.faces = now

    def matched_after(self, t: float) -> float | None:
        later = [x for x in self.faces_changed if x > t]
        return later[0] if later else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# Checks through the audit ------------------------------------------------------------------------------
def audit_records(auditor: Clients, deployment_id: str) -> list[audit_pb2.Record]:
    out, after = [], 0
    while True:
        got = call(auditor.audit.Query, audit_pb2.QueryRequest(deployment_id=deployment_id, after_sequence=after,
                                                               limit=10000)).records
        out.extend(got)
        if len(got) < 10000:
            return out
        after = got[-1].sequence


def settle(c: Clients, auditor: Clients, deployment_id: str, timeout_s: float = 60.0) -> None:
    """Until the audit has recorded every durable fact and every alert of match's book is in the record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            v = auditor.audit.Verify(audit_pb2.VerifyRequest(index_only=True), timeout=30)
            book = {r.alert.alert_id for r in c.match.ListAlerts(match_pb2.ListAlertsRequest(
                deployment_id=deployment_id, actor="operator"), timeout=10).alerts}
            raised = {r.subject for r in audit_records(auditor, deployment_id) if r.type == "alert.raised"}
            if v.unrecorded == 0 and book <= raised:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)


def account(c: Clients, auditor: Clients, deployment_id: str, expected: Counter, officer: Officer,
            transitions: list[str]) -> dict:
    """Alerts, adjudications, lifecycle facts and audit records of one deployment, against what is expected."""
    records = audit_records(auditor, deployment_id)
    raised = [r for r in records if r.type == "alert.raised"]
    per_entry = Counter()
    for r in {r.subject: r for r in raised}.values():
        per_entry[json.loads(r.summary_json).get("subject_ref", "")] += 1
    book = {r.alert.alert_id for r in call(c.match.ListAlerts, match_pb2.ListAlertsRequest(
        deployment_id=deployment_id, actor="operator")).alerts}
    stream_ids = {r.subject for r in raised}
    adjudicated = Counter(r.subject for r in records if r.type == "alert.adjudicated")
    lifecycle = Counter(r.type.removeprefix("deployment.") for r in records if r.type.startswith("deployment."))
    digests = Counter(r.payload_digest for r in records)
    lost = sum(max(0, n - per_entry.get(e, 0)) for e, n in expected.items())
    dup = sum(max(0, n - expected.get(e, 0)) for e, n in per_entry.items())
    return {
        "alerts_expected": sum(expected.values()),
        "alerts_raised": len(stream_ids),
        "alerts_received": len(officer.alerts),
        "alerts_lost": lost,
        "alerts_duplicated": dup + (len(raised) - len(stream_ids)),
        "alerts_unpublished": len(book - stream_ids),  # in match's book, never in the durable stream
        "alerts_not_received": len(stream_ids - set(officer.alerts)),  # in the stream, never streamed to the officer
        "adjudications_acknowledged": len(officer.acknowledged),
        "adjudications_lost": len(officer.acknowledged - set(adjudicated)),
        "adjudications_doubled": sum(n - 1 for n in adjudicated.values() if n > 1),
        "lifecycle_missing": sorted(t for t in transitions if lifecycle.get(t, 0) == 0),
        "lifecycle_doubled": sorted(t for t in ONCE if lifecycle.get(t, 0) > 1),
        "audit_records": len(records),
        "audit_records_doubled": sum(n - 1 for n in digests.values() if n > 1),
    }


def failures(row: dict) -> list[str]:
    keys = ("alerts_lost", "alerts_duplicated", "alerts_unpublished", "alerts_not_received", "adjudications_lost",
            "adjudications_doubled", "audit_records_doubled")
    out = [f"{k} {row[k]}" for k in keys if row.get(k)]
    out += [f"lifecycle missing {row['lifecycle_missing']}"] if row.get("lifecycle_missing") else []
    out += [f"lifecycle doubled {row['lifecycle_doubled']}"] if row.get("lifecycle_doubled") else []
    out += [f"vectors left after purge {row['vectors_left_after_purge']}"] if row.get("vectors_left_after_purge") else []
    return out


class QdrantServer:
    """The watchlist's Qdrant server (LFR_QDRANT_URL) as a victim: killed by its PID; started again by the
    benchmark when it has the command that starts it, else by whatever runs it (systemd, Kubernetes)."""

    def __init__(self, url: str, api_key: str = "", pid: int = 0, command: str = "", log: Path | None = None):
        self.url, self.api_key, self.pid, self.command, self.log = url.rstrip("/"), api_key, pid, command, log
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def ready(self) -> bool:
        headers = {"api-key": self.api_key} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + "/readyz", headers=headers), timeout=1) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def start(self, wait_s: float = 0.0) -> None:
        """Start the server with its command, in a session of its own; wait up to `wait_s` until it is ready."""
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(shlex.split(self.command), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + wait_s
        while wait_s and not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Qdrant server ({self.command}) is not ready at {self.url}")
            time.sleep(0.2)

    def kill(self) -> tuple[int, float]:
        if not self.pid:
            raise RuntimeError("victim qdrant: the server's PID is not known (give --qdrant-pid or --qdrant-command)")
        pid, t = self.pid, time.monotonic()
        os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait()
        else:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < t + 10:
                time.sleep(0.02)
        self.pid = 0
        if self.command:  # as a supervisor would: at once, on the same storage
            self.start()
            self.restarts += 1
        return pid, t

    def stop(self) -> None:
        """Stop the server the benchmark started (not one it was given by PID)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vectors_left(url: str, api_key: str, deployment_id: str) -> int:
    from lfr.vectorindex import VectorIndex

    index = VectorIndex(url=url, api_key=api_key)
    try:
        return index.count_deployment(deployment_id)
    finally:
        index.close()


# One round --------------------------------------------------------------------------------------------
PURGE_ROUNDS = ("watchlist-purge", QDRANT)  # killed while the watchlist ends and purges the round's deployment


@dataclass
class Round:
    system: EmbeddedSystem
    c: Clients
    auditor: Clients
    video: str
    subjects: dict
    fps: float
    round_s: float
    kill_at_s: float = 1.0  # seconds after the camera starts, for the victims killed before the first alert
    notes: list = field(default_factory=list)
    qdrant: QdrantServer | None = None  # the watchlist's Qdrant server, when LFR_QDRANT_URL is set

    def deployment(self, name: str) -> watchlist_pb2.Deployment:
        d = call(lambda r, timeout: create_deployment(self.c, name, [CAMERA]), None)
        call(lambda r, timeout: enroll(self.c, d.id, self.subjects), None)
        call(self.c.watchlist.StartDeployment, watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"))
        return d

    def end(self, d) -> watchlist_pb2.Deployment | grpc.RpcError:
        return call(self.c.watchlist.EndDeployment, watchlist_pb2.TransitionRequest(
            deployment_id=d.id, actor="operator", reason="chaos round finished"),
            done_codes=(grpc.StatusCode.FAILED_PRECONDITION,))

    def kill(self, victim: str) -> tuple[int, float]:
        if victim == QDRANT:
            return self.qdrant.kill()
        pids = self.system.pids()
        pid = pids[victim]
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        return pid, t

    def wait_serving(self, victim: str, since: float, timeout_s: float = 180.0) -> float | None:
        deadline = since + timeout_s
        while time.monotonic() < deadline:
            if victim == NATS:
                if self.system.pids().get(NATS) and _nats_answers(self.system):
                    return time.monotonic() - since
            elif victim == QDRANT:
                if self.qdrant.ready():
                    return time.monotonic() - since
            elif self.system.pids().get(victim) and \
                    check_health(self.system.endpoint(victim), access=self.system.access()) == "SERVING":
                return time.monotonic() - since
            time.sleep(0.05)
        return None

    def run(self, victim: str | None, expected: Counter | None) -> dict:
        target = "watchlist" if victim == "watchlist-purge" else victim
        t_round = time.monotonic()
        d = self.deployment(f"chaos {victim or 'baseline'}")
        restarts0 = self.system.restarts.get(target, 0) if target else 0
        officer = Officer(self.c, d.id).start()
        stats = StatsSampler(self.c, d.id).start()
        camera = Camera(self.c, d.id, self.video, self.fps).start()
        row: dict = {"victim": victim or "none (baseline)"}
        t_kill = None
        try:
            while not camera.first_start:
                time.sleep(0.02)
            if target in ("match", "audit"):
                row["moment"] = "as the first alert arrives" + (", an adjudication in flight" if target == "match"
                                                                 else "")
                officer.first_alert.wait(self.round_s)
                if target == "match":
                    deadline = time.monotonic() + 2
                    while not officer.in_flight and time.monotonic() < deadline:
                        time.sleep(0.001)
            elif target in (NATS, "ingest", "detection", "embedding") or victim == "watchlist":
                row["moment"] = f"{self.kill_at_s:g} s into the stream, before the first alert, frames flowing"
                time.sleep(max(0.0, camera.first_start + self.kill_at_s - time.monotonic()))
            if target and victim not in PURGE_ROUNDS:
                row["killed_pid"], t_kill = self.kill(target)
                row["alerts_before_kill"] = len(officer.alerts)
                row["serving_s"] = _round(self.wait_serving(target, t_kill))
            t0 = camera.first_start
            time.sleep(max(0.0, t0 + self.round_s - time.monotonic()))
        finally:
            camera.stop()
        time.sleep(2.0)  # the last frames through the pipeline
        officer.wait_adjudications()
        if victim in PURGE_ROUNDS:
            row["moment"] = "while " + ("it ends and purges" if target == "watchlist" else "the watchlist ends and "
                                         "purges") + " the deployment"
            def end_it() -> None:
                got = self.end(d)
                row["end_result"] = (got.code().name if isinstance(got, grpc.RpcError) else
                                     watchlist_pb2.DeploymentStatus.Name(got.status).removeprefix("DEPLOYMENT_STATUS_"))

            ender = threading.Thread(target=end_it, daemon=True)
            ender.start()
            time.sleep(0.05)
            row["killed_pid"], t_kill = self.kill(target)
            row["serving_s"] = _round(self.wait_serving(target, t_kill))
            ender.join(180)
        settle(self.c, self.auditor, d.id)
        if victim not in PURGE_ROUNDS:
            self.end(d)
        final = call(self.c.watchlist.GetDeployment, watchlist_pb2.GetDeploymentRequest(deployment_id=d.id))
        officer.stop()
        stats.stop()
        settle(self.c, self.auditor, d.id)
        if victim == QDRANT:  # the purge retried after the server came back: nothing of the deployment left in it
            deadline = time.monotonic() + 60
            while not final.purged_at.seconds and time.monotonic() < deadline:
                time.sleep(0.5)
                final = call(self.c.watchlist.GetDeployment, watchlist_pb2.GetDeploymentRequest(deployment_id=d.id))
            row["vectors_left_after_purge"] = vectors_left(self.qdrant.url, self.qdrant.api_key, d.id)
            row["restarted_by"] = "the benchmark" if self.qdrant.command else "its own supervisor"
        if t_kill is not None and victim not in PURGE_ROUNDS:
            matched = stats.matched_after(t_kill + (row.get("serving_s") or 0.0))
            row["matching_again_s"] = _round(matched - t_kill if matched else None)
            after = [t for a, t in officer.alerts.values() if t > t_kill]
            row["first_alert_after_kill_s"] = _round(min(after) - t_kill if after else None)
        else:
            row["first_alert_s"] = _round(min((t for _, t in officer.alerts.values()), default=0.0) - camera.first_start
                                          if officer.alerts else None)
        row["restarts"] = (self.system.restarts.get(target, 0) - restarts0) if target and target != QDRANT else 0
        row["deployment_status"] = watchlist_pb2.DeploymentStatus.Name(final.status).removeprefix("DEPLOYMENT_STATUS_")
        row["camera_starts"] = camera.started
        transitions = ["created", "started", "ended"] + (["purged"] if final.purged_at.seconds else [])
        row.update(account(self.c, self.auditor, d.id, expected if expected is not None else Counter(), officer,
                           transitions))
        row["nonmatch_disposal_max_ms"] = round(stats.disposal_max_ms, 1)
        row["seconds"] = round(time.monotonic() - t_round, 1)
        if expected is None:  # the baseline defines what is expected
            row["alerts_lost"] = row["alerts_duplicated"] = 0
            row["expected_per_entry"] = dict(_entries(self.auditor, d.id))
        row["failures"] = failures(row)
        return row


def _entries(auditor: Clients, deployment_id: str) -> Counter:
    out = Counter()
    for r in {r.subject: r for r in audit_records(auditor, deployment_id) if r.type == "alert.raised"}.values():
        out[json.loads(r.summary_json).get("subject_ref", "")] += 1
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _nats_answers(system: EmbeddedSystem) -> bool:
    try:
        with socket.create_connection((system.nats.host, system.nats.port), timeout=0.5) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def verify(auditor: Clients, settle_s: float = 30.0) -> dict:
    """The full chain check (index against the durable stream), once every durable fact is recorded."""
    deadline = time.monotonic() + settle_s
    while True:
        v = call(auditor.audit.Verify, audit_pb2.VerifyRequest())
        if v.unrecorded == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {"ok": v.ok, "records": v.records, "stream_records": v.stream_records, "unrecorded": v.unrecorded,
            "reason": v.reason}


def choose_victims(args, env=None) -> tuple[list[str], QdrantServer | None]:
    """The rounds to run, in order, and the Qdrant server when it is one of them (LFR_QDRANT_URL set)."""
    from lfr.runtime.config import Config

    cfg = Config.from_env(env)
    victims = [v.strip() for v in args.victims.split(",") if v.strip()] or [*VICTIMS, *([QDRANT] if cfg.qdrant_url
                                                                                        else [])]
    unknown = [v for v in victims if v not in (*VICTIMS, QDRANT)]
    if unknown:
        raise SystemExit(f"unknown victims {unknown}; choose from {', '.join((*VICTIMS, QDRANT))}")
    if QDRANT not in victims:
        return victims, None
    if not cfg.qdrant_url:
        raise SystemExit("victim qdrant: needs LFR_QDRANT_URL (a Qdrant server); in local mode the watchlist's store "
                         "is a folder inside the watchlist process and dies with it (victim watchlist)")
    if not (args.qdrant_pid or args.qdrant_command):
        raise SystemExit("victim qdrant: give the server's --qdrant-pid PID and/or the --qdrant-command that starts it")
    return victims, QdrantServer(cfg.qdrant_url, cfg.qdrant_api_key, args.qdrant_pid, args.qdrant_command)


def run(args) -> dict:
    video, subjects = default_inputs(args)
    if args.power_loss:
        return run_power_loss(args, video, subjects)
    victims, qdrant = choose_victims(args)
    from lfr.cli.demo import temporary_state

    t0 = time.monotonic()
    with temporary_state("lfr-chaos-", keep=args.state_dir) as state, contextlib.ExitStack() as stack:
        if qdrant is not None:
            qdrant.log = Path(state) / "qdrant-server.log"
            stack.callback(qdrant.stop)
            if not qdrant.pid:
                qdrant.start(wait_s=60)
        system = EmbeddedSystem(state, media_roots=[Path(video).resolve().parent], supervise=True)
        with system:
            c = Clients.connect(system.endpoints(), access=system.access(user="operator", follow_actor=True))
            auditor = Clients.connect(system.endpoints(), access=system.access(user="auditor"))
            r = Round(system, c, auditor, str(Path(video).resolve()), subjects, args.fps, args.round_s, qdrant=qdrant)
            baseline = r.run(None, None)
            expected = Counter(baseline["expected_per_entry"])
            first = baseline.get("first_alert_s") or 2.0
            r.kill_at_s = max(0.3, round(first / 2, 2))
            rounds = [r.run(v, expected) for v in victims]
            chain = verify(auditor)
            c.close()
            auditor.close()
    problems = [f"{row['victim']}: {f}" for row in rounds for f in row["failures"]]
    if not chain["ok"] or chain["records"] != chain["stream_records"]:
        problems.append(f"audit chain: {chain}")
    not_back = [row["victim"] for row in rounds if row.get("killed_pid") and row.get("serving_s") is None]
    problems += [f"{v}: not SERVING again" for v in not_back]
    return {
        "video": video, "fps": args.fps, "round_s": args.round_s, "subjects": sorted(subjects),
        "baseline": baseline, "kills": rounds, "audit_chain": chain,
        "nonmatch_disposal_max_ms": max([baseline["nonmatch_disposal_max_ms"]]
                                        + [row["nonmatch_disposal_max_ms"] for row in rounds]),
        "totals": {k: sum(row.get(k) or 0 for row in rounds) for k in (
            "alerts_expected", "alerts_raised", "alerts_lost", "alerts_duplicated", "alerts_unpublished",
            "adjudications_acknowledged", "adjudications_lost", "audit_records_doubled")},
        "problems": problems, "ok": not problems, "seconds": round(time.monotonic() - t0, 1),
    }


# Power loss -------------------------------------------------------------------------------------------
LFR = [sys.executable, "-m", "lfr.cli.main"]


def start_up(state: Path, log: Path, timeout_s: float = 240.0) -> tuple[subprocess.Popen, dict]:
    """`lfr up` on `state` in a session of its own; returns it with its endpoints once every service SERVES."""
    (state / "endpoints.json").unlink(missing_ok=True)
    out = open(log, "ab")
    proc = subprocess.Popen([*LFR, "up", "--state-dir", str(state)], stdout=out, stderr=out,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lfr up exited with {proc.returncode}; see {log}")
        try:
            eps = json.loads((state / "endpoints.json").read_text())
            return proc, eps
        except (OSError, ValueError):
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"lfr up not SERVING after {timeout_s:.0f} s")


def alive(pid: int, start: int | None) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X") and int(fields[19]) == start


def proc_start(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def integrity(state: Path) -> dict[str, str]:
    """PRAGMA integrity_check of every SQLite file in the state folder (the stores, the outboxes, Qdrant local)."""
    out = {}
    for path in sorted(state.rglob("*")):
        if not path.is_file() or path.suffix in (".wal", ".shm", ".log", ".json", ".tmp") or path.name.endswith(
                ("-wal", "-shm", "-journal")):
            continue
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            out[str(path.relative_to(state))] = db.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.Error as exc:
            out[str(path.relative_to(state))] = f"error: {exc}"
        finally:
            db.close()
    return out


@dataclass
class Ledger:
    """What clients were told happened (acknowledged): checked after every restart."""

    transitions: dict[str, set] = field(default_factory=dict)  # deployment -> acknowledged lifecycle actions
    adjudications: set = field(default_factory=set)  # alert ids
    alerts: dict[str, str] = field(default_factory=dict)  # alert id -> deployment (seen on StreamAlerts)


def power_loss_round(proc: subprocess.Popen, eps: dict, state: Path, video: str, subjects: dict, fps: float,
                     ledger: Ledger, rng: random.Random, mode: str, active_s: float = 20.0) -> dict:
    """On a running system (`lfr up` as `proc`): run deployments with alerts and adjudications, and SIGKILL
    everything at a random moment. mode: 'group' (the system's process group, then the supervisor) or
    'supervisor' (only it: its children die by their parent-death signal). Records what was acknowledged."""
    recorded = {"supervisor": proc.pid, **{n: p["pid"] for n, p in eps["supervisor"]["processes"].items()}}
    started = {n: proc_start(p) for n, p in recorded.items()}
    kill_after = rng.uniform(0.0, active_s)
    killed = threading.Event()
    c = Clients.connect(eps, access=_access(state)("operator"))
    phase = "starting"

    def ready_deployment(n: int) -> watchlist_pb2.Deployment:
        nonlocal phase
        phase = "create"
        d = create_deployment(c, f"power loss {n}", [CAMERA])
        ledger.transitions.setdefault(d.id, set()).add("created")
        phase = "enroll"
        enroll(c, d.id, subjects)
        phase = "start"
        c.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"),
                                    timeout=30)
        ledger.transitions[d.id].add("started")
        return d

    def killer() -> None:
        time.sleep(kill_after)
        if mode == "group":
            os.killpg(eps["supervisor"]["pgid"], signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        killed.set()

    try:
        n = 1
        d = ready_deployment(n)  # an active deployment first: the moments fall while frames and alerts flow
        threading.Thread(target=killer, daemon=True).start()
        while not killed.is_set():
            phase = "stream"
            c.ingest.StartSource(ingest_pb2.StartSourceRequest(deployment_id=d.id, camera_id=CAMERA, url=video,
                                                               target_fps=fps, realtime=True), timeout=10)
            seen: set[str] = set()
            stream = c.match.StreamAlerts(match_pb2.StreamAlertsRequest(deployment_id=d.id, from_start=True))
            timer = threading.Timer(6, stream.cancel)
            timer.start()
            try:
                for alert in stream:
                    ledger.alerts[alert.alert_id] = d.id
                    if alert.alert_id in seen:
                        continue
                    seen.add(alert.alert_id)
                    phase = "adjudicate"
                    c.match.Adjudicate(match_pb2.AdjudicateRequest(
                        alert_id=alert.alert_id, outcome=match_pb2.OUTCOME_NOT_ENGAGED, note="power loss",
                        actor="operator"), timeout=30)
                    ledger.adjudications.add(alert.alert_id)
                    phase = "stream"
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise
            finally:
                timer.cancel()
            phase = "end"
            c.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator",
                                                                      reason="round over"), timeout=60)
            ledger.transitions[d.id].add("ended")
            n += 1
            d = ready_deployment(n)
    except grpc.RpcError:
        pass  # the power went
    finally:
        c.close()
    killed.wait(active_s + 5)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p, started[n]) for n, p in recorded.items()):
        time.sleep(0.1)
    left = [f"{n} ({p})" for n, p in recorded.items() if alive(p, started[n])]
    return {"mode": mode, "killed_after_s": round(kill_after, 2), "phase": phase, "processes_left": left}


def _access(state: Path):
    from lfr.runtime.access import Access

    return lambda user: Access.dev(state, user=user, follow_actor=True)


def check_after_restart(eps: dict, state: Path, ledger: Ledger) -> dict:
    """On the system restarted on the same state folder: every store opened (every service SERVING), the
    outboxes of the killed run are published and recorded, and every acknowledged fact is in the record."""
    access = _access(state)
    auditor = Clients.connect(eps, access=access("auditor"))
    c = Clients.connect(eps, access=access("operator"))
    try:
        serving = {s: check_health(eps[s], access=access("operator")) for s in SERVICES}
        deadline = time.monotonic() + 60
        while True:
            v = call(auditor.audit.Verify, audit_pb2.VerifyRequest(index_only=True))
            if v.unrecorded == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        missing: list[str] = []
        for _ in range(20):  # facts still in an outbox reach the audit within seconds of the restart
            missing = []
            for dep, acts in ledger.transitions.items():
                have = {r.type.removeprefix("deployment.") for r in audit_records(auditor, dep)}
                missing += [f"{dep[:8]} {a}" for a in sorted(acts - have)]
            adjudicated: set[str] = set()
            raised: set[str] = set()
            for dep in set(ledger.alerts.values()):
                recs = audit_records(auditor, dep)
                adjudicated |= {r.subject for r in recs if r.type == "alert.adjudicated"}
                raised |= {r.subject for r in recs if r.type == "alert.raised"}
            missing += [f"adjudication of {a[:8]}" for a in sorted(ledger.adjudications - adjudicated)]
            missing += [f"alert {a[:8]}" for a in sorted(set(ledger.alerts) - raised)]
            if not missing:
                break
            time.sleep(0.5)
        book_missing = [a[:8] for a in sorted(ledger.adjudications) if not call(
            c.match.GetAlert, match_pb2.GetAlertRequest(alert_id=a, actor="operator")).adjudicated]
        chain = verify(auditor)
    finally:
        c.close()
        auditor.close()
    return {"serving": serving, "missing": missing, "adjudications_not_in_book": book_missing, "chain": chain}


def power_loss(state: Path, video: str, subjects: dict, fps: float, rounds: int, seed: int, log: Path,
               active_s: float = 20.0, progress=None) -> dict:
    """`rounds` whole-system SIGKILLs, each checked on the next start (the last on a final start)."""
    rng = random.Random(seed)
    ledger = Ledger()
    rows: list[dict] = []
    t0 = time.monotonic()
    for i in range(rounds + 1):
        checks = integrity(state) if i else {}
        proc, eps = start_up(state, log)
        try:
            if i:
                rows[-1].update(check_after_restart(eps, state, ledger))
                rows[-1]["sqlite_files"] = len(checks)
                rows[-1]["sqlite_not_ok"] = {k: v for k, v in checks.items() if v != "ok"}
                if progress:
                    progress(rows[-1])
            if i == rounds:
                break
            mode = "group" if i % 2 == 0 else "supervisor"
            rows.append({"round": i + 1, **power_loss_round(proc, eps, state, video, subjects, fps, ledger, rng,
                                                             mode, active_s)})
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
    problems = []
    for row in rows:
        problems += [f"round {row['round']}: {p}" for p in (
            [f"sqlite {row['sqlite_not_ok']}"] if row["sqlite_not_ok"] else []) + row["missing"] + (
            [f"left running: {row['processes_left']}"] if row["processes_left"] else []) + (
            [f"not SERVING: {row['serving']}"] if any(v != "SERVING" for v in row["serving"].values()) else []) + (
            [f"chain: {row['chain']}"] if not row["chain"]["ok"] else []) + (
            [f"adjudications not in match's book: {row['adjudications_not_in_book']}"]
            if row["adjudications_not_in_book"] else [])]
    return {"power_loss_rounds": len(rows), "acknowledged": {
        "deployments": len(ledger.transitions), "transitions": sum(len(v) for v in ledger.transitions.values()),
        "alerts": len(ledger.alerts), "adjudications": len(ledger.adjudications)},
        "phases_hit": dict(Counter(r["phase"] for r in rows)), "rounds": rows, "problems": problems,
        "ok": not problems, "seconds": round(time.monotonic() - t0, 1)}


def run_power_loss(args, video: str, subjects: dict) -> dict:
    from lfr.cli.demo import temporary_state

    with temporary_state("lfr-power-", keep=args.state_dir) as state:
        fd, log = tempfile.mkstemp(prefix="lfr-power-", suffix=".log")
        os.close(fd)
        try:
            out = power_loss(Path(state), str(Path(video).resolve()), subjects, args.fps, args.power_loss, args.seed,
                             Path(log), progress=lambda row: print(json.dumps(
                                 {k: row[k] for k in ("round", "mode", "phase", "killed_after_s", "missing")}),
                                 file=sys.stderr, flush=True))
        finally:
            Path(log).unlink(missing_ok=True)
    return {"video": video, **out}
