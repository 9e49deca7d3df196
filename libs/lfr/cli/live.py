"""A live run against a running system, shared by `lfr demo`, `lfr bench pipeline` and the tests:
create a deployment, enroll subjects, have the list authorised, start it, stream a video through ingest,
collect alerts."""

from __future__ import annotations

import calendar
import threading
import time
from pathlib import Path

import grpc

from lfr.cli.client import Clients
from lfr.pb import ingest_pb2, match_pb2, watchlist_pb2
from lfr.runtime import events

DEMO_SITE = "demo site"


def create_deployment(c: Clients, name: str, cameras: list[str], threshold: float = 0.0,
                      actor: str = "builder", hours: float = 4.0, threshold_reason: str = "") -> watchlist_pb2.Deployment:
    """A deployment whose window opens now and lasts `hours`."""
    now = time.time_ns()
    return c.watchlist.CreateDeployment(watchlist_pb2.CreateDeploymentRequest(
        name=name, purpose="demonstration", legal_basis="demonstration on public test data", site=DEMO_SITE,
        planned_start=events.ts_from_ns(now - 60 * 10**9), planned_end=events.ts_from_ns(now + int(hours * 3600e9)),
        cameras=cameras, threshold=threshold, actor=actor, threshold_reason=threshold_reason), timeout=30)


def capture_date(path: Path) -> tuple[int, str]:
    """(ns, where from) of the capture date a file states: its EXIF DateTimeOriginal ('exif'), else its
    modification time ('file')."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            exif = im.getexif()
            raw = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
        if raw:
            t = time.strptime(str(raw).strip().rstrip("\x00"), "%Y:%m:%d %H:%M:%S")
            return calendar.timegm(t) * 10**9, "exif"
    except (OSError, ValueError, SyntaxError):
        pass
    return path.stat().st_mtime_ns, "file"


def authorise(c: Clients, deployment_id: str, officer: str = "inspector",
              second: str = "superintendent") -> watchlist_pb2.Deployment:
    """Have the watchlist authorised by `officer` (not its builder), and by a second officer where the policy
    asks for one (an unapproved site, an entry under 18)."""
    d = c.watchlist.AuthoriseDeployment(watchlist_pb2.AuthoriseRequest(deployment_id=deployment_id, actor=officer),
                                        timeout=30)
    if d.status == watchlist_pb2.DEPLOYMENT_STATUS_DRAFT and len(d.approvals) < d.authorisers_required:
        d = c.watchlist.AuthoriseDeployment(watchlist_pb2.AuthoriseRequest(
            deployment_id=deployment_id, actor=second), timeout=30)
    return d


def enroll(c: Clients, deployment_id: str, subjects: dict[str, list[Path]], actor: str = "builder",
           category=watchlist_pb2.CATEGORY_WANTED_BY_POLICE, authorise_as: str = "inspector"
           ) -> dict[str, watchlist_pb2.EnrollEntryResponse]:
    """Enroll one entry per subject; then, unless `authorise_as` is empty, have the list authorised by that
    officer (as a force must before the start)."""
    out = {}
    for ref, paths in subjects.items():
        out[ref] = c.watchlist.EnrollEntry(watchlist_pb2.EnrollEntryRequest(
            deployment_id=deployment_id, subject_ref=ref, category=category, source_system="demo",
            legal_basis="demonstration", images=[p.read_bytes() for p in paths],
            captured_at=[events.ts_from_ns(capture_date(p)[0]) for p in paths], actor=actor), timeout=120)
    if authorise_as and any(r.entry_id for r in out.values()):
        authorise(c, deployment_id, authorise_as)
    return out


class AlertCollector:
    """Follows StreamAlerts in a thread; records each alert with the time it was received."""

    def __init__(self, c: Clients, deployment_id: str, on_alert=None):
        self.alerts: list[tuple[match_pb2.Alert, int]] = []
        self.on_alert = on_alert
        self.error: str = ""
        self._call = c.match.StreamAlerts(match_pb2.StreamAlertsRequest(deployment_id=deployment_id,
                                                                        from_start=True))
        self._thread = threading.Thread(target=self._run, daemon=True, name="alerts")
        self._thread.start()

    def _run(self) -> None:
        try:
            for alert in self._call:
                self.alerts.append((alert, time.time_ns()))
                if self.on_alert:
                    self.on_alert(alert)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)


def stream_video(c: Clients, deployment_id: str, camera_id: str, video: str, fps: float, realtime: bool = True,
                 timeout_s: float = 600.0) -> ingest_pb2.Source:
    src = c.ingest.StartSource(ingest_pb2.StartSourceRequest(
        deployment_id=deployment_id, camera_id=camera_id, url=str(video), target_fps=fps, realtime=realtime),
        timeout=10)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sources = {s.source_id: s for s in c.ingest.ListSources(ingest_pb2.ListSourcesRequest(), timeout=5).sources}
        s = sources[src.source_id]
        if s.state != ingest_pb2.SOURCE_STATE_RUNNING:
            return s
        time.sleep(0.2)
    c.ingest.StopSource(ingest_pb2.StopSourceRequest(source_id=src.source_id), timeout=5)
    raise TimeoutError(f"video {video} still streaming after {timeout_s:.0f} s")
