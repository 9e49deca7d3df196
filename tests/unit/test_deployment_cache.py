"""The deployments cache every stage reads: a watchlist restart does not stop live cameras, an end does."""

from __future__ import annotations

import asyncio

import grpc
from grpc.aio import AioRpcError, Metadata

from lfr.pb import watchlist_pb2
from lfr.runtime.deployments import DeploymentCache


class Watchlist:
    def __init__(self):
        self.down = False
        self.calls = 0

    async def GetDeployment(self, request, timeout=None):
        self.calls += 1
        if self.down:
            raise AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), "connection refused")
        return watchlist_pb2.Deployment(id=request.deployment_id, status=watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE)


def test_a_watchlist_restart_keeps_the_last_read_and_an_event_still_drops_it():
    async def run():
        wl = Watchlist()
        cache = DeploymentCache(wl, ttl_s=0.0, recheck_s=0.0)  # re-read on every use
        assert (await cache.get("d1")).status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE
        wl.down = True
        assert (await cache.get("d1")).id == "d1" and wl.calls == 2  # unreachable: the last read stands
        cache._on_event(watchlist_pb2.DeploymentEvent(deployment=watchlist_pb2.Deployment(id="d1")), "")
        try:  # an event (e.g. its end) dropped it: nothing stale is used, the caller sees the outage
            await cache.get("d1")
            raise AssertionError("expected UNAVAILABLE")
        except AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(run())
