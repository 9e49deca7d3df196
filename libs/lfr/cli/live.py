"""A live run against a running system, shared by `lfr demo`, `lfr bench pipeline` and the tests:
create a deployment, enroll subjects, start it, stream a video through ingest, collect alerts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc

from lfr.cli.client import Clients
from lfr.pb import ingest_pb2, match_pb2, watchlist_pb2


def create_deployment(c: Clients, name: str, cameras: list[str], threshold: float = 0.0,
                      actor: str = "demo-builder") -> watchlist_pb2.Deployment:
    return c.watchlist.CreateDeployment(watchlist_pb2.CreateDeploymentRequest(
        name=name, purpose="demonstration", site="demo site", cameras=cameras, threshold=threshold, actor=actor),
        timeout=30)


def enroll(c: Clients, deployment_id: str, subjects: dict[str, list[Path]], actor: str = "demo-builder",
           category=watchlist_pb2.CATEGORY_WANTED_BY_POLICE) -> dict[str, watchlist_pb2.EnrollEntryResponse]:
    out = {}
    for ref, paths in subjects.items():
        out[ref] = c.watchlist.EnrollEntry(watchlist_pb2.EnrollEntryRequest(
            deployment_id=deployment_id, subject_ref=ref, category=category, source_system="demo",
            legal_basis="demonstration", images=[p.read_bytes() for p in paths], actor=actor), timeout=120)
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
