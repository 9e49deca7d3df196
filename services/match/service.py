"""Match service: embeddings -> watchlist search -> alert (durable) or disposal (counted, timed)."""

from __future__ import annotations

import asyncio

from lfr.match.core import Counters, decide
from lfr.pb import embedding_pb2, match_pb2_grpc, watchlist_pb2, watchlist_pb2_grpc
from lfr.pb import match_pb2 as pb
from lfr.runtime import events, metrics, subjects
from lfr.runtime.deployments import DeploymentCache
from lfr.runtime.rpc import abort, channel
from lfr.runtime.service import Runtime, Service
from lfr.runtime.stage import BUDGET_SHARE, Stage


class MatchServicer(match_pb2_grpc.MatchServiceServicer):
    def __init__(self, svc: MatchService):
        self.svc = svc

    async def StreamAlerts(self, request, context):
        if not request.deployment_id:
            await abort(context, "INVALID_ARGUMENT", "deployment_id is required")
        if await self.svc.deployments.get(request.deployment_id) is None:
            await abort(context, "NOT_FOUND", f"no deployment {request.deployment_id!r}")
        subject = subjects.alerts(request.deployment_id, "*")
        async for _seq, data in self.svc.rt.bus.replay(subjects.ALERTS.name, subject, request.from_start):
            yield pb.Alert.FromString(data)

    async def GetStats(self, request, context):
        c = self.svc.counters.get(request.deployment_id)
        if c is None:
            if not request.deployment_id or await self.svc.deployments.get(request.deployment_id) is None:
                await abort(context, "NOT_FOUND", f"no deployment {request.deployment_id!r}")
            c = Counters()  # nothing seen yet
        return self.svc.stats_pb(request.deployment_id, c)


class MatchService(Service):
    name = "match"

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.watchlist = watchlist_pb2_grpc.WatchlistServiceStub(channel(cfg.watchlist_target, cfg))
        self.counters: dict[str, Counters] = {}
        self.deployments = DeploymentCache(self.watchlist)
        self.stage = Stage(self.name, "match", cfg.queue_size * 4, 1, self._process,
                           lambda e: events.age_ms(e.envelope), cfg.freshness_ms * BUDGET_SHARE["match"],
                           on_drop=self._dropped)
        rt.add_servicer(match_pb2_grpc.add_MatchServiceServicer_to_server, MatchServicer(self),
                        pb.DESCRIPTOR.services_by_name["MatchService"])

    async def warmup(self) -> None:
        self.worker = asyncio.create_task(self.stage.run(), name="match-stage")
        self.stats_task = asyncio.create_task(self._publish_stats(), name="match-stats")
        await self.deployments.follow(self.rt.bus)
        self.sub = await self.rt.bus.subscribe(subjects.embeddings(), embedding_pb2.EmbeddingsEvent,
                                               lambda m, _s: self.stage.offer(m), queue=subjects.QUEUE["match"],
                                               stage="match")

    def _counters(self, deployment_id: str) -> Counters:
        return self.counters.setdefault(deployment_id, Counters())

    def _dropped(self, msg: embedding_pb2.EmbeddingsEvent, reason: str) -> None:
        """A dropped event's faces are never matched: they are disposed of, and counted as such."""
        c = self._counters(msg.envelope.deployment_id)
        c.faces_seen += len(msg.faces)
        c.stale_dropped += len(msg.faces)
        for _ in msg.faces:
            ms = events.age_ms(msg.envelope)
            c.disposed(ms)
            metrics.DISPOSAL.labels(self.name).observe(ms / 1000)

    async def _process(self, batch: list[embedding_pb2.EmbeddingsEvent]) -> None:
        for msg in batch:
            await self._match(msg)

    async def _match(self, msg: embedding_pb2.EmbeddingsEvent) -> None:
        env = msg.envelope
        d = await self.deployments.get(env.deployment_id)
        c = self._counters(env.deployment_id)
        if not msg.faces:
            return
        decisions = []
        if d is not None and d.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE and d.watchlist_size > 0:
            probes = [watchlist_pb2.Probe(vectors=f.vectors) for f in msg.faces]
            resp = await self.watchlist.Search(
                watchlist_pb2.SearchRequest(deployment_id=d.id, probes=probes, k=1), timeout=2)
            decisions = decide(resp.results, d.threshold)
        matched = {dec.face_index: dec for dec in decisions if dec.matched}
        c.faces_seen += len(msg.faces)
        for i, face in enumerate(msg.faces):
            dec = matched.get(i)
            if dec is None:
                continue
            alert = pb.Alert(envelope=events.derive(env, self.name), alert_id=events.new_id(),
                             entry_id=dec.entry_id, subject_ref=dec.subject_ref, score=dec.score,
                             threshold=d.threshold, box=face.box, probe_jpeg=face.crop_jpeg,
                             frame_index=msg.frame_index, video_time_s=msg.video_time_s, raised_at=events.now_ts())
            self.rt.bus.publish_durable(subjects.alerts(env.deployment_id, env.camera_id), alert, alert.alert_id)
            c.alerts += 1
            metrics.ALERT_LATENCY.labels(self.name).observe(events.age_ms(env) / 1000)
            self.log.info("alert.raised", deployment_id=d.id, camera_id=env.camera_id, alert_id=alert.alert_id,
                          entry_id=dec.entry_id, score=round(dec.score, 4))
        # Everything that matched nobody is disposed of now: the message is dropped and only counted.
        n_nonmatch = len(msg.faces) - len(matched)
        del msg
        ms = events.age_ms(env)
        for _ in range(n_nonmatch):
            c.disposed(ms)
            metrics.DISPOSAL.labels(self.name).observe(ms / 1000)

    def stats_pb(self, deployment_id: str, c: Counters) -> pb.MatchStats:
        return pb.MatchStats(envelope=events.envelope(self.name, deployment_id=deployment_id),
                             faces_seen=c.faces_seen, alerts=c.alerts, nonmatches_disposed=c.nonmatches_disposed,
                             stale_dropped=c.stale_dropped, disposal_ms_max=c.disposal_ms_max,
                             disposal_ms_p50=c.disposal_ms_p50)

    async def _publish_stats(self) -> None:
        published: dict[str, int] = {}
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            self.flush_stats(published)

    def flush_stats(self, published: dict[str, int]) -> None:
        for dep, c in self.counters.items():
            if published.get(dep) != c.changed_ns + c.alerts + c.faces_seen:
                msg = self.stats_pb(dep, c)
                self.rt.bus.publish_durable(subjects.matchstats(dep), msg, msg.envelope.event_id)
                published[dep] = c.changed_ns + c.alerts + c.faces_seen

    async def stop_intake(self) -> None:
        if hasattr(self, "sub"):
            await self.sub.unsubscribe()
            await self.stage.drain(self.config.grace_s)
            self.worker.cancel()
            self.stats_task.cancel()
            self.flush_stats({})
