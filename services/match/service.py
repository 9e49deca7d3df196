"""Match service: embeddings -> watchlist search -> one alert per person per pass (durable) or disposal
(counted, timed); officers' adjudications; the adjudication-due and retention rules on the alert book."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np

from lfr.match.alerts import AlertBook
from lfr.match.core import Counters, check_adjudication, decide_top, engagement_refusal, reference_refusal
from lfr.match.replicas import Replicas, add_stats, alert_db_name, id_prefix
from lfr.match.seen import SPLIT_FRACTION, FacesSeen
from lfr.match.tracker import Action, AlertState, Sighting, Tracker
from lfr.models import scoring
from lfr.pb import (
    audit_pb2,
    common_pb2,
    detection_pb2,
    embedding_pb2,
    match_pb2_grpc,
    watchlist_pb2,
    watchlist_pb2_grpc,
)
from lfr.pb import match_pb2 as pb
from lfr.runtime import clock, events, metrics, subjects
from lfr.runtime.config import ConfigError
from lfr.runtime.deployments import DeploymentCache, live_refusal
from lfr.runtime.rpc import abort, channel
from lfr.runtime.service import Runtime, Service
from lfr.runtime.stage import BUDGET_SHARE, Stage

TICK_S = 0.25


@dataclass
class Probe:
    """What an alert revision needs from the frame its best face came from."""

    envelope: common_pb2.Envelope
    box: common_pb2.Box
    crop_jpeg: bytes
    frame_index: int
    video_time_s: float
    threshold: float


class MatchServicer(match_pb2_grpc.MatchServiceServicer):
    def __init__(self, svc: MatchService):
        self.svc = svc

    async def StreamAlerts(self, request, context):
        if not request.deployment_id:
            await abort(context, "INVALID_ARGUMENT", "deployment_id is required")
        if await self.svc.deployments.get(request.deployment_id) is None:
            await abort(context, "NOT_FOUND", f"no deployment {request.deployment_id!r}")
        replicas = self.svc.replicas
        own = self._own_alerts(request)
        async for alert in (own if replicas.local_only(context) else replicas.stream(request, context, own)):
            yield alert

    async def _own_alerts(self, request):
        """The deployment's alerts this replica owns, from the durable stream, each as its latest revision with
        its probe crop from the alert book."""
        subject = subjects.alerts(request.deployment_id, "*")
        async for _seq, data in self.svc.rt.bus.replay(subjects.ALERTS.name, subject, request.from_start):
            alert = pb.Alert.FromString(data)
            if not self.svc.replicas.owns(alert.alert_id):
                continue  # another replica's: it sends it with its crop
            current = self.svc.book.current(alert.alert_id)
            if current is not None:
                revision, probe, deleted = current
                if alert.revision < revision:
                    continue  # superseded: the newer revision follows in the stream
                alert.probe_jpeg, alert.probe_deleted = probe, deleted
            yield alert

    async def GetStats(self, request, context):
        c = self.svc.counters.get(request.deployment_id)
        if c is None:
            if not request.deployment_id or await self.svc.deployments.get(request.deployment_id) is None:
                await abort(context, "NOT_FOUND", f"no deployment {request.deployment_id!r}")
            c = Counters()  # nothing seen yet
        stats = self.svc.stats_pb(request.deployment_id, c)
        stats.pending_adjudications, stats.overdue = self.svc.book.pending_counts(request.deployment_id)
        if not self.svc.replicas.local_only(context):  # every replica's counts added up
            for part in await self.svc.replicas.gather("GetStats", request, context):
                add_stats(stats, part)
        return stats

    async def GetAlert(self, request, context):
        if not request.alert_id or not request.actor.strip():
            await abort(context, "INVALID_ARGUMENT", "alert_id and actor (who views the crops) are required")
        forwarded = await self.svc.replicas.owner_call("GetAlert", request, request.alert_id, context)
        if forwarded is not None:  # another replica's alert: its owner answered (and recorded the access)
            return forwarded
        review = self.svc.book.get(request.alert_id)
        if review is None:
            await abort(context, "NOT_FOUND", f"no alert {request.alert_id!r}")
        self.svc.accessed(context, "GetAlert", request.actor, request.alert_id, review.alert.envelope.deployment_id)
        if not review.HasField("crops_deleted_at"):  # after the retention period the review images are gone
            await self.svc.attach_reference(review, request.actor, context)
        return review

    async def ListAlerts(self, request, context):
        if not request.deployment_id:
            await abort(context, "INVALID_ARGUMENT", "deployment_id is required")
        replicas = self.svc.replicas
        local = replicas.local_only(context)
        if not local or not replicas.peers:  # once per request, by the replica the caller called
            self.svc.accessed(context, "ListAlerts", request.actor, request.deployment_id, request.deployment_id)
        alerts = self.svc.book.list(request.deployment_id, request.unadjudicated_only, request.overdue_only)
        if not local:  # every replica's alerts, in the order they were raised
            for part in await replicas.gather("ListAlerts", request, context):
                alerts.extend(part.alerts)
            alerts.sort(key=lambda r: r.alert.raised_at.ToNanoseconds())
        return pb.ListAlertsResponse(alerts=alerts)

    async def Adjudicate(self, request, context):
        if not request.alert_id:
            await abort(context, "INVALID_ARGUMENT", "alert_id is required")
        forwarded = await self.svc.replicas.owner_call("Adjudicate", request, request.alert_id, context)
        if forwarded is not None:  # another replica's alert: adjudicated in its owner's book
            return forwarded
        book = self.svc.book
        if book.current(request.alert_id) is None:
            await abort(context, "NOT_FOUND", f"no alert {request.alert_id!r}")
        check_adjudication(request.outcome, request.engagement, request.note, request.actor,
                           book.adjudication(request.alert_id) is not None, request.amend)
        attributes = {k: v for k, v in request.attributes.items() if v}
        reason = engagement_refusal(request.outcome, request.engagement_minutes, request.person_informed,
                                    attributes, await self.svc.equitability_attributes() if attributes else {})
        if reason:
            await abort(context, "INVALID_ARGUMENT", reason)
        engagement = request.engagement or pb.ENGAGEMENT_NO_ACTION
        ev = book.adjudicate(request.alert_id, pb.Adjudication(
            outcome=request.outcome, engagement=engagement, note=request.note, actor=request.actor.strip(),
            engagement_minutes=request.engagement_minutes, person_informed=request.person_informed,
            attributes=attributes))
        self.svc.log.info("alert.adjudicated", deployment_id=ev.envelope.deployment_id, alert_id=ev.alert_id,
                          outcome=pb.Outcome.Name(request.outcome), engagement=pb.Engagement.Name(engagement))
        return book.get(request.alert_id, with_images=False)


def faces_seen(seen: FacesSeen, msg: embedding_pb2.EmbeddingsEvent, probes: dict[str, np.ndarray] | None = None,
               recipe: scoring.Recipe | None = None, threshold: float = 0.0) -> int:
    """The faces an event adds to "faces seen" (#14): once per face followed by detection's tracker, and once more
    when the face on a track becomes someone else (`lfr.match.seen`; the deployment's model decides, from the
    vectors `probes` scored by its `recipe`)."""
    env = msg.envelope
    same = None
    if probes is not None and recipe is not None:
        def same(a, b) -> bool:
            return float(recipe.score({c: a[c] for c in recipe.components},
                                      {c: b[c][None] for c in recipe.components})[0]) >= SPLIT_FRACTION * threshold
    return seen.count(env.deployment_id, env.camera_id, env.capture_time.ToNanoseconds(),
                      [f.track_id for f in msg.faces], probes, same)


def _component(recipe: scoring.Recipe, model_id: str) -> scoring.Component | None:
    try:
        return recipe.part(model_id)
    except KeyError:
        return None


class MatchService(Service):
    name = "match"

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.instance_id = events.new_id()
        self.watchlist = watchlist_pb2_grpc.WatchlistServiceStub(channel(cfg.watchlist_target, cfg))
        self.counters: dict[str, Counters] = {}
        self.seen = FacesSeen()  # faces seen per track (#14)
        self.unrecorded: list[Action] = []  # alerts waiting for the alert book's disk to take writes again
        self.deployments = DeploymentCache(self.watchlist)
        self.watchlists: dict[str, tuple] = {}  # deployment -> (what was loaded, ExactIndex, entry -> subject_ref)
        # replica i of R: its partitions of the embeddings, its alert book, alert ids that name it (lfr.match.replicas)
        self.replicas = Replicas(cfg, self.log)
        prefix = id_prefix(cfg.match_replica, cfg.match_replicas)
        self.tracker = Tracker(track_gap_s=cfg.track_gap_s, realert_window_s=cfg.realert_window_s,
                               update_interval_s=cfg.alert_update_interval_s, min_frames=cfg.alert_min_frames,
                               strong_margin=cfg.alert_strong_margin, evidence_gap_s=cfg.alert_evidence_gap_ms / 1000,
                               new_id=lambda: prefix + uuid.uuid4().hex)
        if not cfg.alert_db and not cfg.state_dir:
            raise ConfigError("LFR_ALERT_DB (or LFR_STATE_DIR): match keeps its alert book (alerts, their crops while "
                              "retained, adjudications) in a file; name one on a persistent volume")
        self.book = AlertBook(cfg.alert_db or cfg.state_path(alert_db_name(cfg.match_replica)), clock.from_config(cfg),
                              cfg.adjudication_due_s, cfg.alert_retention_s)
        rt.bus.use_outbox(self.book.outbox)  # every durable fact of match leaves through the book's outbox
        self.stage = Stage(self.name, "match", cfg.queue_size * 4, 1, self._process,
                           lambda e: events.age_ms(e.envelope), cfg.freshness_ms * BUDGET_SHARE["match"],
                           on_drop=self._dropped)
        rt.add_servicer(match_pb2_grpc.add_MatchServiceServicer_to_server, MatchServicer(self),
                        pb.DESCRIPTOR.services_by_name["MatchService"])

    def _restore_alerts(self) -> int:
        """Alerts of a previous run still inside their re-alert window go back into the tracker, so a restart
        (a crash, a deployment of a new version) does not raise a second alert for a person already alerted."""
        window_ns = int(self.config.realert_window_s * 1e9)
        if window_ns <= 0:
            return 0
        now = time.time_ns()
        restored = 0
        # an alert raised earlier may still be open (a long pass): look back a day, keep those seen in the window
        for a in self.book.raised_since(self.book.clock.now_ns() - 86400 * 10**9):
            last = a.last_seen.ToNanoseconds()
            if now - last > window_ns:
                continue
            b = a.box
            self.tracker.restore(AlertState(
                a.alert_id, a.envelope.deployment_id, a.entry_id, a.subject_ref, a.raised_at.ToNanoseconds(),
                a.envelope.camera_id, a.score, last, (b.x1, b.y1, b.x2, b.y2), None, last, sightings=a.sightings,
                revision=a.revision, published_ns=now, raised_wall_ns=a.raised_at.ToNanoseconds()))
            restored += 1
        if restored:
            self.log.info("match.alerts_restored", alerts=restored)
        return restored

    async def warmup(self) -> None:
        self._restore_alerts()
        self.worker = asyncio.create_task(self.stage.run(), name="match-stage")
        self.tasks = [asyncio.create_task(coro, name=name) for coro, name in (
            (self._publish_stats(), "match-stats"), (self._tick(), "match-tracker"),
            (self._apply_rules(), "match-rules"))]
        await self.deployments.follow(self.rt.bus)
        # urgent use not confirmed in time: the watchlist announces it, and the alerts' images go at once; the
        # rules loop catches up on an announcement missed while match was down (lapsed_deployments)
        self.lifecycle_sub = await self.rt.bus.subscribe(subjects.lifecycle(), watchlist_pb2.DeploymentEvent,
                                                         self._on_lifecycle, stage="lifecycle")
        # this replica's partitions of the embeddings (the server maps each camera to one: its passes stay here)
        parts = subjects.match_partitions(self.config.match_replica, self.config.match_replicas)
        self.subs = [await self.rt.bus.subscribe(subjects.embeddings_partition(k), embedding_pb2.EmbeddingsEvent,
                                                 lambda m, _s: self.stage.offer(m), queue=subjects.QUEUE["match"],
                                                 stage="match")
                     for k in (parts if self.config.match_replicas > 1 else ["*"])]
        self.log.info("match.partitions", replica=self.config.match_replica, replicas=self.config.match_replicas,
                      partitions=parts)
        self.tasks.append(asyncio.create_task(self._load_live_watchlists(), name="match-watchlists"))

    def _counters(self, deployment_id: str) -> Counters:
        return self.counters.setdefault(deployment_id, Counters())

    def _dropped(self, msg: embedding_pb2.EmbeddingsEvent, reason: str) -> None:
        """A dropped event's faces are never matched: they are disposed of, and counted as such."""
        c = self._counters(msg.envelope.deployment_id)
        c.faces_seen += faces_seen(self.seen, msg)
        c.stale_dropped += len(msg.faces)
        for _ in msg.faces:
            ms = events.age_ms(msg.envelope)
            c.disposed(ms)
            metrics.DISPOSAL.labels(self.name).observe(ms / 1000)

    async def _process(self, batch: list[embedding_pb2.EmbeddingsEvent]) -> None:
        for msg in batch:
            await self._match(msg)

    async def _match(self, msg: embedding_pb2.EmbeddingsEvent) -> None:
        env = common_pb2.Envelope()
        env.CopyFrom(msg.envelope)  # a copy: a kept sub-message would keep the whole event (every face) alive
        d = await self.deployments.get(env.deployment_id)
        c = self._counters(env.deployment_id)
        if not msg.faces:  # a frame whose faces were all followed from earlier frames: nothing to match
            return
        decisions, probes = [], None
        if not live_refusal(d, env.camera_id) and d.watchlist_size > 0:  # the one rule: ACTIVE, in window, its camera
            index, refs = await self._watchlist(d)  # the live watchlist's vectors, in memory: no call per frame
            probes = {}
            for comp in index.recipe.components:
                rows = [next((v.values for v in f.vectors if v.model_id == comp), None) for f in msg.faces]
                if any(r is None for r in rows):
                    raise ValueError(f"a face without a {comp} vector (the model is {index.recipe.model_id})")
                probes[comp] = np.asarray(rows, dtype=np.float32)
            decisions = decide_top(index.search(probes, 1), refs, d.threshold)
        matched = {dec.face_index: dec for dec in decisions if dec.matched}
        c.faces_seen += faces_seen(self.seen, msg, probes, index.recipe if probes else None, d.threshold if d else 0.0)
        sightings, track_ids = [], []
        for i, face in enumerate(msg.faces):
            dec = matched.get(i)
            if dec is None:
                continue
            track_ids.append(face.track_id)
            b = common_pb2.Box()
            b.CopyFrom(face.box)
            probe = Probe(env, b, face.crop_jpeg, msg.frame_index, msg.video_time_s, d.threshold)
            link = face.vectors[0] if face.vectors else None  # faces link by this vector, by its model's metric
            sightings.append(Sighting((b.x1, b.y1, b.x2, b.y2), list(link.values) if link else None,
                                      dec.entry_id, dec.subject_ref, dec.score, probe,
                                      _component(index.recipe, link.model_id) if link else None))
        # Everything that matched nobody is disposed of now: the message is dropped and only counted.
        n_nonmatch = len(msg.faces) - len(matched)
        del msg
        ms = events.age_ms(env)
        for _ in range(n_nonmatch):
            c.disposed(ms)
            metrics.DISPOSAL.labels(self.name).observe(ms / 1000)
        if sightings:
            for action in self.tracker.observe(d.id, env.camera_id, env.capture_time.ToNanoseconds(), sightings):
                self._publish_alert(action)
            wanted = [track_ids[i] for i in self.tracker.waiting if track_ids[i]]
            if wanted:  # a pass waits for evidence: detection embeds those faces' next frames soon
                await self.rt.bus.publish(subjects.evidence(env.deployment_id, env.camera_id),
                                          detection_pb2.EvidenceWanted(envelope=events.derive(env, self.name),
                                                                       track_ids=wanted))

    def _publish_alert(self, action: Action) -> None:
        """Raise or update an alert; while the alert book's disk refuses writes, the alert waits (in order) and
        is written once the disk takes writes again (the tracker's tick retries): it is never dropped."""
        if self.unrecorded:
            self.unrecorded.append(action)
            return
        try:
            self._write_alert(action)
        except Exception as exc:
            if self.rt.storage.failed(exc, "alert") is None:
                raise
            self.unrecorded.append(action)
            self.log.warning("alert.waiting_for_storage", alert_id=action.alert.alert_id, waiting=len(self.unrecorded))

    def _retry_unrecorded(self) -> None:
        waiting, self.unrecorded = self.unrecorded, []
        for i, action in enumerate(waiting):
            try:
                self._write_alert(action)
            except Exception as exc:
                if self.rt.storage.failed(exc, "alert") is None:
                    raise
                self.unrecorded = waiting[i:] + self.unrecorded
                return

    def _write_alert(self, action: Action) -> None:
        """The alert book first (with the crop), then the durable stream (without), in one transaction."""
        a = action.alert
        p: Probe = a.best_probe
        if action.kind == "raise":
            a.raised_wall_ns = time.time_ns()
        alert = pb.Alert(envelope=events.derive(p.envelope, self.name), alert_id=a.alert_id, entry_id=a.entry_id,
                         subject_ref=a.subject_ref, score=a.best_score, threshold=p.threshold, box=p.box,
                         frame_index=p.frame_index, video_time_s=p.video_time_s,
                         raised_at=events.ts_from_ns(a.raised_wall_ns), revision=a.revision,
                         updated_at=events.now_ts(), last_seen=events.ts_from_ns(a.last_seen_ns),
                         sightings=a.sightings)
        env = alert.envelope
        with self.book.outbox.transaction():  # the book's revision and the durable fact commit together
            self.book.record(alert, p.crop_jpeg)
            self.rt.bus.publish_durable(subjects.alerts(env.deployment_id, env.camera_id), alert,
                                        f"{alert.alert_id}.{alert.revision}")
        c = self._counters(env.deployment_id)
        if action.kind == "raise":
            c.alerts += 1
            metrics.ALERT_LATENCY.labels(self.name).observe(events.age_ms(env) / 1000)
        else:
            c.alert_updates += 1
        self.log.info(f"alert.{'raised' if action.kind == 'raise' else 'updated'}", deployment_id=env.deployment_id,
                      camera_id=env.camera_id, alert_id=alert.alert_id, entry_id=alert.entry_id,
                      revision=alert.revision, score=round(alert.score, 4))

    async def _watchlist(self, d) -> tuple[scoring.ExactIndex, dict[str, str]]:
        """A live deployment's watchlist vectors in memory (exact search by its model's recipe): fetched from the
        watchlist once, at the first frame this process sees for it (a start, or this process's restart), again
        if its authorised watchlist or model changes; dropped when it is no longer live (`_drop_watchlists`)."""
        key = (d.authorised_digest, d.model_id, d.model_version)
        held = self.watchlists.get(d.id)
        if held is None or held[0] != key:
            wv = await self.watchlist.GetWatchlistVectors(
                watchlist_pb2.GetWatchlistVectorsRequest(deployment_id=d.id), timeout=10)
            # scored by the recipe the vectors came with (also an engine installed by manifest, unknown here)
            index, refs = scoring.ExactIndex(scoring.Recipe.from_description(wv.model)), {}
            for e in wv.entries:
                vectors: dict[str, list] = {}
                for v in e.vectors:
                    vectors.setdefault(v.model_id, []).append(v.values)
                try:
                    index.add(e.entry_id, {c: np.asarray(x, dtype=np.float32) for c, x in vectors.items()})
                except ValueError as exc:  # an entry without every engine's vector cannot be scored
                    self.log.error("match.entry_skipped", deployment_id=d.id, entry_id=e.entry_id, error=str(exc))
                    continue
                refs[e.entry_id] = e.subject_ref
            held = self.watchlists[d.id] = (key, index, refs)
            self.log.info("match.watchlist_loaded", deployment_id=d.id, entries=len(index), model=wv.model_id)
        return held[1], held[2]

    async def _load_live_watchlists(self, deployment_id: str = "") -> None:
        """The vectors of the live deployments (or of one just started) loaded now: at this replica's start and
        at a deployment's start, not at the first frame. Every replica loads every live deployment: which
        cameras land on which replica is the server's hash, and a watchlist is small (128 floats per vector)."""
        try:
            if deployment_id:
                found = [await self.deployments.get(deployment_id)]
            else:
                found = list((await self.watchlist.ListDeployments(watchlist_pb2.ListDeploymentsRequest(),
                                                                   timeout=10)).deployments)
            for d in found:
                if d is not None and not live_refusal(d, "", check_camera=False) and d.watchlist_size > 0:
                    await self._watchlist(d)
        except grpc.aio.AioRpcError as exc:  # the watchlist is unreachable: the first frame loads it
            self.log.warning("match.watchlist_prefetch_failed", code=exc.code().name)
        self.tasks = [t for t in self.tasks if not t.done()]

    async def _drop_watchlists(self) -> None:
        """Forget the vectors of every deployment that is no longer live (ended, purged, expired)."""
        for dep in list(self.watchlists):
            try:
                d = await self.deployments.get(dep)
            except grpc.aio.AioRpcError:
                continue  # the watchlist is unreachable: decided at the next tick
            if live_refusal(d, "", check_camera=False):
                self.watchlists.pop(dep, None)
                self.log.info("match.watchlist_dropped", deployment_id=dep)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await self._drop_watchlists()
            if self.unrecorded and not self.rt.storage.reason:
                self._retry_unrecorded()
            self.seen.forget(time.time_ns())  # tracks' vectors held for faces seen: gone within the disposal bound
            for action in self.tracker.tick(time.time_ns()):
                self._publish_alert(action)

    async def _apply_rules(self) -> None:
        while True:
            flagged, deleted = self.book.sweep()
            for ev in flagged:
                self.log.warning("alert.overdue", deployment_id=ev.envelope.deployment_id, alert_id=ev.alert_id)
            for ev in deleted:
                self.log.info("alert.crops_deleted", deployment_id=ev.envelope.deployment_id,
                              alerts=len(ev.alert_ids), probe_crops=ev.probe_crops_deleted,
                              reference_copies=ev.reference_copies_deleted)
            await self._catch_up_lapsed()
            await asyncio.sleep(self.config.alert_sweep_interval_s)

    def _on_lifecycle(self, ev: watchlist_pb2.DeploymentEvent, _subject: str) -> None:
        if ev.action == "urgent_lapsed":
            self._purge_lapsed(ev.deployment.id, ev.reason)
        elif ev.action == "started":  # its watchlist's vectors in memory before its first frame
            self.tasks.append(asyncio.create_task(self._load_live_watchlists(ev.deployment.id)))

    def _purge_lapsed(self, deployment_id: str, reason: str) -> None:
        deleted = self.book.delete_deployment_images(deployment_id, reason or "urgent use was not confirmed in time")
        if deleted is not None:
            self.log.warning("alert.images_purged_urgent_lapsed", deployment_id=deployment_id,
                             alerts=len(deleted.alert_ids), probe_crops=deleted.probe_crops_deleted)

    async def _catch_up_lapsed(self) -> None:
        """Deployments with retained alert images whose urgent use the watchlist has let lapse (an announcement
        missed while match was down): their images go now."""
        for dep in self.book.deployments_with_images():
            try:
                d = await self.deployments.get(dep)
            except grpc.aio.AioRpcError:
                return  # the watchlist is unreachable: next round
            if (d is not None and d.urgent and not d.urgent_confirmed_at.seconds
                    and d.status != watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE
                    and d.urgent_confirm_by.ToNanoseconds() <= self.book.clock.now_ns()):
                self._purge_lapsed(dep, "urgent use was not confirmed by "
                                   f"{d.urgent_confirm_by.ToJsonString()[:19]}Z (found by match's sweep)")

    async def equitability_attributes(self) -> dict[str, list[str]]:
        """The policy's equitability attributes (name -> allowed values), asked of the watchlist service (the
        policy's owner), kept for a minute."""
        cached = getattr(self, "_attributes", None)
        if cached is None or time.monotonic() - cached[0] > 60:
            try:
                policy = await self.watchlist.GetPolicy(watchlist_pb2.GetPolicyRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return cached[1] if cached else {}
            attrs = json.loads(policy.json or "{}").get("equitability", {}).get("attributes", {})
            cached = self._attributes = (time.monotonic(), {k: list(v) for k, v in attrs.items()})
        return cached[1]

    async def attach_reference(self, review: pb.AlertReview, actor: str, context) -> None:
        """The alert's entry's first enrolled image, asked of the watchlist service as the officer (their bearer
        token forwarded, over match's own certificate), so the watchlist's audit names the officer and its role
        table and purge rule decide; a refusal leaves the image empty and says why. Never stored here."""
        a = review.alert
        forwarded = tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k == "authorization")
        try:
            resp = await self.watchlist.GetEntryImages(watchlist_pb2.GetEntryImagesRequest(
                deployment_id=a.envelope.deployment_id, entry_id=a.entry_id, actor=actor.strip()),
                metadata=forwarded, timeout=5)
        except grpc.aio.AioRpcError as exc:
            review.reference_status = reference_refusal(exc.code().name, exc.details() or "")
            return
        if not resp.images:
            review.reference_status = f"the watchlist holds no image of entry {a.entry_id}"
            return
        review.reference_jpeg, review.reference_media_type = resp.images[0].data, resp.images[0].media_type

    def accessed(self, context, method: str, actor: str, subject: str, deployment_id: str = "") -> None:
        """An API access, as a durable fact for the audit."""
        ev = audit_pb2.AccessEvent(envelope=events.envelope(self.name, deployment_id=deployment_id),
                                   service=self.name, method=method, actor=actor.strip() or "anonymous",
                                   subject=subject, peer=context.peer() or "")
        self.rt.bus.publish_durable(subjects.access(self.name), ev, ev.envelope.event_id)

    def stats_pb(self, deployment_id: str, c: Counters) -> pb.MatchStats:
        return pb.MatchStats(envelope=events.envelope(self.name, deployment_id=deployment_id),
                             faces_seen=c.faces_seen, alerts=c.alerts, nonmatches_disposed=c.nonmatches_disposed,
                             stale_dropped=c.stale_dropped, disposal_ms_max=c.disposal_ms_max,
                             disposal_ms_p50=c.disposal_ms_p50, instance_id=self.instance_id,
                             alert_updates=c.alert_updates)

    async def _publish_stats(self) -> None:
        published: dict[str, int] = {}
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            self.flush_stats(published)

    def flush_stats(self, published: dict[str, int]) -> None:
        for dep, c in self.counters.items():
            mark = c.changed_ns + c.alerts + c.alert_updates + c.faces_seen
            if published.get(dep) != mark:
                msg = self.stats_pb(dep, c)
                self.rt.bus.publish_durable(subjects.matchstats(dep), msg, msg.envelope.event_id)
                published[dep] = mark

    async def stop_intake(self) -> None:
        if hasattr(self, "lifecycle_sub"):
            await self.lifecycle_sub.unsubscribe()
        if hasattr(self, "subs"):
            for sub in self.subs:
                await sub.unsubscribe()
            await self.stage.drain(self.config.grace_s)
            self.worker.cancel()
            for task in self.tasks:
                task.cancel()
            for action in self.tracker.close(time.time_ns()):  # every pass's best probe is published
                self._publish_alert(action)
            self.flush_stats({})  # the runtime's NATS drain publishes what the outbox holds (else the next run)

    async def close(self) -> None:
        if hasattr(self, "book"):
            self.book.close()
