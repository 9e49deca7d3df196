"""A read-through cache of deployments (owned by the watchlist service), refreshed by lifecycle events."""

from __future__ import annotations

import time

import grpc

from lfr.pb import watchlist_pb2, watchlist_pb2_grpc
from lfr.runtime import subjects
from lfr.runtime.bus import Bus


class DeploymentCache:
    def __init__(self, stub: watchlist_pb2_grpc.WatchlistServiceStub, ttl_s: float = 5.0, recheck_s: float = 0.25):
        self.stub = stub
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
            # An ACTIVE deployment is trusted for the TTL (its end arrives as an event at once); anything else
            # is re-read soon, so a start takes effect even before its event has arrived.
            active = cached[1] is not None and cached[1].status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE
            if time.monotonic() - cached[0] < (self.ttl_s if active else self.recheck_s):
                return cached[1]
        try:
            d = await self.stub.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=deployment_id),
                                              timeout=2)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            d = None
        self._items[deployment_id] = (time.monotonic(), d)
        return d


def is_live(d: watchlist_pb2.Deployment | None, camera_id: str) -> str:
    """'' if frames from this camera may be processed for this deployment, else the reason they may not."""
    if d is None:
        return "unknown deployment"
    if d.status != watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE:
        status = watchlist_pb2.DeploymentStatus.Name(d.status).removeprefix("DEPLOYMENT_STATUS_")
        return f"deployment {d.id} is {status}, not ACTIVE"
    if camera_id not in d.cameras:
        return f"camera {camera_id!r} is not part of deployment {d.id}"
    return ""
