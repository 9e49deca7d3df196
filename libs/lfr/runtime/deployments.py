"""A read-through cache of deployments (owned by the watchlist service), refreshed by lifecycle events."""

from __future__ import annotations

import time

import grpc

from lfr.pb import watchlist_pb2, watchlist_pb2_grpc
from lfr.runtime import subjects
from lfr.runtime.bus import Bus


class DeploymentCache:
    def __init__(self, stub: watchlist_pb2_grpc.WatchlistServiceStub, ttl_s: float = 5.0, recheck_s: float = 0.25,
                 now_ns=time.time_ns):
        self.stub = stub
        self.now_ns = now_ns
        self.ttl_s = ttl_s
        self.recheck_s = recheck_s
        self._items: dict[str, tuple[float, watchlist_pb2.Deployment | None]] = {}

    async def follow(self, bus: Bus) -> None:
        """Follow lifecycle events, so a start or end takes effect at once."""
        self.sub = await bus.subscribe(subjects.lifecycle(), watchlist_pb2.DeploymentEvent, self._on_event,
                                       stage="lifecycle")

    def _on_event(self, ev: watchlist_pb2.DeploymentEvent, _subject: str) -> None:
        # Events only invalidate: they may arrive after a newer state was read, so the watchlist stays the
        # authority and the next use re-reads it.
        self._items.pop(ev.deployment.id, None)

    async def get(self, deployment_id: str) -> watchlist_pb2.Deployment | None:
        """The deployment, or None if it does not exist. Raises AioRpcError if the watchlist is unreachable."""
        cached = self._items.get(deployment_id)
        if cached:
            # A live deployment is trusted for the TTL (its end arrives as an event at once) but never past its
            # planned end; anything else is re-read soon, so a start takes effect even before its event arrives.
            live = not live_refusal(cached[1], "", self.now_ns(), check_camera=False)
            if time.monotonic() - cached[0] < (self.ttl_s if live else self.recheck_s):
                return cached[1]
        try:
            d = await self.stub.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=deployment_id),
                                              timeout=2)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and cached:
                # The watchlist is restarting: keep what was read last, so live cameras keep matching. Safe: a
                # lifecycle event (an end, a cancel) drops the cached value, and live_refusal still applies the window.
                return cached[1]
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            d = None
        self._items[deployment_id] = (time.monotonic(), d)
        return d


def _iso(ts) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts.seconds))


def live_refusal(d: watchlist_pb2.Deployment | None, camera_id: str, now_ns: int | None = None,
            check_camera: bool = True) -> str:
    """'' if frames from this camera may be processed for this deployment now, else the reason they may not.

    The one rule for every stage: the deployment is ACTIVE, inside its planned window, and the camera is one
    of its cameras. (The watchlist ends a deployment past its planned end by itself; this check does not wait
    for that.)"""
    if d is None:
        return "unknown deployment"
    if d.status != watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE:
        status = watchlist_pb2.DeploymentStatus.Name(d.status).removeprefix("DEPLOYMENT_STATUS_")
        why = f" ({d.end_reason})" if d.end_reason else ""
        return f"deployment {d.id} is {status}{why}, not ACTIVE"
    now_ns = time.time_ns() if now_ns is None else now_ns
    if d.HasField("planned_end") and now_ns >= d.planned_end.ToNanoseconds():
        return f"deployment {d.id} is past its planned end ({_iso(d.planned_end)}): it has expired"
    if d.HasField("planned_start") and now_ns < d.planned_start.ToNanoseconds():
        return f"deployment {d.id} has not reached its planned start ({_iso(d.planned_start)})"
    if check_camera and camera_id not in d.cameras:
        return f"camera {camera_id!r} is not part of deployment {d.id}"
    return ""
