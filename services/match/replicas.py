"""match replicas and its API: each replica answers for the alerts it owns, and any replica answers a client.

NATS partitions the embeddings by camera (`lfr.runtime.subjects.PARTITION_MAPPING`); replica i of R reads the
partitions k with k % R == i, so a camera's passes, alerts and their crops live in one replica's alert book.
An alert id names its owner (`m<i>-...` when R > 1; ids without the prefix are replica 0's, the single
replica's book of before). So a client (CLI, console) may call any replica:

- GetAlert and Adjudicate go to the alert's owner (forwarded with the caller's token: the owner's role table
  and audit see the officer);
- ListAlerts, GetStats and StreamAlerts fan out to every replica and merge; a peer that cannot be reached is
  left out of a list or the counts (logged, and named in the `lfr-unavailable-replicas` trailer), and a stream
  keeps serving the others' alerts and picks the peer's up again when it is back.

A call a replica makes to a peer carries `lfr-replica-local`: the peer answers from its own book only (no
second fan-out, no second access record of the same request). It is honoured only from match's own
certificate (or with no TLS at all, the development mode)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import grpc

from lfr.pb import match_pb2 as pb
from lfr.pb import match_pb2_grpc
from lfr.runtime.config import Config
from lfr.runtime.rpc import abort, channel

LOCAL = "lfr-replica-local"
UNAVAILABLE_TRAILER = "lfr-unavailable-replicas"
_OWNER = re.compile(r"^m(\d+)-")
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A peer that comes back is reached again within 2 s (gRPC's default reconnect backoff grows to 120 s)
PEER_CHANNEL = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000))


def id_prefix(replica: int, replicas: int) -> str:
    """The prefix of the alert ids replica `replica` raises ('' for a single replica)."""
    return f"m{replica}-" if replicas > 1 else ""


def alert_owner(alert_id: str) -> int:
    """The replica whose alert book holds an alert."""
    m = _OWNER.match(alert_id or "")
    return int(m.group(1)) if m else 0


def alert_db_name(replica: int) -> str:
    """A replica's alert book in a shared state folder (the embedded default; in Kubernetes each replica has
    its own volume anyway)."""
    return "match-alerts.sqlite" if replica == 0 else f"match-alerts-{replica}.sqlite"


def add_stats(total: pb.MatchStats, part: pb.MatchStats) -> None:
    """Counts add up; the disposal times are the worst replica's (p50 too: an upper bound, not a median)."""
    for name in ("faces_seen", "alerts", "nonmatches_disposed", "stale_dropped", "alert_updates",
                 "pending_adjudications", "overdue"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.disposal_ms_max = max(total.disposal_ms_max, part.disposal_ms_max)
    total.disposal_ms_p50 = max(total.disposal_ms_p50, part.disposal_ms_p50)


class Replicas:
    def __init__(self, config: Config, log):
        self.index, self.count = config.match_replica, config.match_replicas
        self.log = log
        targets = [t.strip() for t in config.match_peers.split(",") if t.strip()] if self.count > 1 else []
        self.targets = targets
        self.peers = {i: match_pb2_grpc.MatchServiceStub(channel(t, config, PEER_CHANNEL))
                      for i, t in enumerate(targets) if i != self.index}

    def owns(self, alert_id: str) -> bool:
        return self.count == 1 or alert_owner(alert_id) == self.index

    def local_only(self, context) -> bool:
        """A peer's call (answer from this replica's own book), or a single replica."""
        if not self.peers:
            return True
        if not any(k == LOCAL for k, _v in (context.invocation_metadata() or ())):
            return False
        auth = context.auth_context() or {}
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in auth.get("x509_common_name") or []]
        tls = (auth.get("transport_security_type") or [b""])[0] in (b"ssl", "ssl")
        return not tls or "match" in names  # without TLS (LFR_INSECURE) no caller can be told apart

    @staticmethod
    def metadata(context) -> tuple:
        """What a call to a peer carries: the caller's token (the peer decides and audits as for the caller)."""
        forwarded = tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k == "authorization")
        return (*forwarded, (LOCAL, "1"))

    async def owner_call(self, method: str, request, alert_id: str, context):
        """The alert owner's answer to a unary call (its status, if it refuses), or None when this replica owns
        the alert."""
        owner = alert_owner(alert_id)
        if owner == self.index or owner not in self.peers:
            if owner >= self.count:
                await abort(context, "NOT_FOUND", f"no alert {alert_id!r} (no match replica {owner})")
            return None
        try:
            return await getattr(self.peers[owner], method)(request, metadata=self.metadata(context), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _GONE:
                await abort(context, "UNAVAILABLE", f"match replica {owner} ({self.targets[owner]}), which holds "
                        f"alert {alert_id}, is unavailable; its alerts are back when it is")
            await context.abort(exc.code(), exc.details() or "")

    async def gather(self, method: str, request, context) -> list:
        """Every peer's answer to a unary call; unreachable peers are left out, logged and named in a trailer."""
        calls = {i: getattr(stub, method)(request, metadata=self.metadata(context), timeout=10)
                 for i, stub in self.peers.items()}
        out, gone = [], []
        for i, call in calls.items():
            try:
                out.append(await call)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _GONE:
                    await context.abort(exc.code(), exc.details() or "")
                gone.append(i)
        if gone:
            self.log.warning("match.replicas_unavailable", method=method, replicas=gone)
            context.set_trailing_metadata(((UNAVAILABLE_TRAILER, ",".join(map(str, gone))),))
        return out

    async def stream(self, request: pb.StreamAlertsRequest, context,
                     own: AsyncIterator[pb.Alert]) -> AsyncIterator[pb.Alert]:
        """This replica's alerts and every peer's, as they come. A peer that goes away is called again every
        second; when it is back its stream is replayed from the start and what was already sent, or what is
        older than this stream when it asked for new alerts only, is skipped."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        since = time.time_ns()

        async def pump_own() -> None:
            try:
                async for a in own:
                    await queue.put(a)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's stream
                await queue.put(exc)

        async def pump_peer(i: int, stub) -> None:
            seen: set[tuple[str, int]] = set()
            req = pb.StreamAlertsRequest()
            req.CopyFrom(request)
            lost = False
            while True:
                try:
                    async for a in stub.StreamAlerts(req, metadata=self.metadata(context)):
                        if lost:
                            lost = False
                            self.log.info("match.replica_stream_back", replica=i)
                        key = (a.alert_id, a.revision)
                        if key in seen or (not request.from_start and a.updated_at.ToNanoseconds() < since):
                            continue
                        seen.add(key)
                        await queue.put(a)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in _GONE and exc.code() != grpc.StatusCode.CANCELLED:
                        await queue.put(exc)
                        return
                    if not lost:  # once per outage, not once per retry
                        lost = True
                        self.log.warning("match.replica_stream_lost", replica=i, code=exc.code().name)
                await asyncio.sleep(1.0)
                req.from_start = True  # what it raised while away (its outbox publishes after a restart)

        tasks = [asyncio.create_task(pump_own(), name="alerts-own")]
        tasks += [asyncio.create_task(pump_peer(i, s), name=f"alerts-replica-{i}") for i, s in self.peers.items()]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, grpc.aio.AioRpcError):
                    await context.abort(item.code(), item.details() or "")
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            for t in tasks:
                t.cancel()
