"""Watchlist service: deployments, bespoke watchlists, enrollment through detection/embedding, search."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from lfr.pb import (
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    watchlist_pb2_grpc,
)
from lfr.pb import (
    watchlist_pb2 as pb,
)
from lfr.runtime import events, subjects
from lfr.runtime.rpc import abort, channel
from lfr.runtime.service import Runtime, Service
from lfr.watchlist.core import DeploymentRecord, Refused, enrollment_verdict, validate_new_deployment
from lfr.watchlist.store import MetadataStore, VectorIndex, collection_name

MIN_ENROLL_INTER_EYE_PX = 20.0


def _ts(ns: int) -> Timestamp:
    return events.ts_from_ns(ns) if ns else Timestamp()


def deployment_pb(d: DeploymentRecord, size: int) -> pb.Deployment:
    return pb.Deployment(
        id=d.id, name=d.name, purpose=d.purpose, site=d.site, planned_start=_ts(d.planned_start_ns),
        planned_end=_ts(d.planned_end_ns), cameras=list(d.cameras), threshold=d.threshold, model_id=d.model_id,
        model_version=d.model_version, status=d.status, watchlist_size=size, created_by=d.created_by,
        created_at=_ts(d.created_at_ns),
    )


class WatchlistServicer(watchlist_pb2_grpc.WatchlistServiceServicer):
    def __init__(self, svc: WatchlistService):
        self.svc = svc

    async def _deployment(self, deployment_id: str, context) -> DeploymentRecord:
        if not deployment_id:
            await abort(context, "INVALID_ARGUMENT", "deployment_id is required")
        d = self.svc.meta.get_deployment(deployment_id)
        if d is None:
            await abort(context, "NOT_FOUND", f"no deployment {deployment_id!r}")
        return d

    async def CreateDeployment(self, request, context):
        model = await self.svc.model()
        error, threshold = validate_new_deployment(request, model.default_threshold)
        if error:
            await abort(context, "INVALID_ARGUMENT", error)
        d = DeploymentRecord(
            id=events.new_id()[:16], name=request.name, purpose=request.purpose, site=request.site,
            planned_start_ns=request.planned_start.ToNanoseconds() if request.planned_start.seconds else 0,
            planned_end_ns=request.planned_end.ToNanoseconds() if request.planned_end.seconds else 0,
            cameras=tuple(request.cameras), threshold=threshold, model_id=model.model_id,
            model_version=model.model_version, created_by=request.actor,
        )
        self.svc.meta.put_deployment(d)
        return self.svc.lifecycle(d, "created", request.actor)

    async def GetDeployment(self, request, context):
        d = await self._deployment(request.deployment_id, context)
        return deployment_pb(d, self.svc.meta.entry_count(d.id))

    async def ListDeployments(self, request, context):
        return pb.ListDeploymentsResponse(deployments=[
            deployment_pb(d, self.svc.meta.entry_count(d.id)) for d in self.svc.meta.list_deployments()])

    async def _transition(self, request, context, action: str, done: str):
        d = await self._deployment(request.deployment_id, context)
        try:
            d = d.transition(action)
        except Refused as exc:
            await abort(context, exc.code, exc.message)
        self.svc.meta.put_deployment(d)
        return self.svc.lifecycle(d, done, request.actor)

    async def StartDeployment(self, request, context):
        return await self._transition(request, context, "start", "started")

    async def EndDeployment(self, request, context):
        return await self._transition(request, context, "end", "ended")

    async def EnrollEntry(self, request, context):
        d = await self._deployment(request.deployment_id, context)
        if not request.subject_ref:
            await abort(context, "INVALID_ARGUMENT", "subject_ref is required")
        if not request.images:
            await abort(context, "INVALID_ARGUMENT", "at least one image is required")
        if request.category == pb.CATEGORY_UNSPECIFIED:
            await abort(context, "INVALID_ARGUMENT", "category is required")
        return await self.svc.enroll(d, request)

    async def ListEntries(self, request, context):
        d = await self._deployment(request.deployment_id, context)
        return pb.ListEntriesResponse(entries=[
            pb.Entry(entry_id=e["entry_id"], subject_ref=e["subject_ref"], category=e["category"],
                     source_system=e["source_system"] or "", legal_basis=e["legal_basis"] or "",
                     vectors=e["vectors"], added_by=e["added_by"] or "", added_at=_ts(e["added_at_ns"]))
            for e in self.svc.meta.entries(d.id)])

    async def Search(self, request, context):
        d = await self._deployment(request.deployment_id, context)
        if not request.probes:
            await abort(context, "INVALID_ARGUMENT", "at least one probe is required")
        k = request.k or 1
        if not 1 <= k <= 100:
            await abort(context, "INVALID_ARGUMENT", "k must be between 1 and 100")
        try:
            results = await self.svc.search(d, list(request.probes), k)
        except Refused as exc:
            await abort(context, exc.code, exc.message)
        return pb.SearchResponse(results=results, model_id=d.model_id, model_version=d.model_version)


class WatchlistService(Service):
    name = "watchlist"

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.meta = MetadataStore(cfg.state_path("watchlist.sqlite"))
        self.index = await rt.run_cpu(lambda: VectorIndex(cfg.state_path("qdrant") if not cfg.qdrant_url else None,
                                                           cfg.qdrant_url, cfg.qdrant_api_key))
        self.detection = detection_pb2_grpc.DetectionServiceStub(channel(cfg.detection_target, cfg))
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel(cfg.embedding_target, cfg))
        self._model: embedding_pb2.ModelDescription | None = None
        rt.add_servicer(watchlist_pb2_grpc.add_WatchlistServiceServicer_to_server, WatchlistServicer(self),
                        pb.DESCRIPTOR.services_by_name["WatchlistService"])

    async def warmup(self) -> None:
        await self.model()

    async def model(self) -> embedding_pb2.ModelDescription:
        """The live model, described by the embedding service (the watchlist needs no torch)."""
        while self._model is None:
            try:
                self._model = await self.embedding.GetModel(embedding_pb2.GetModelRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.log.warning("watchlist.embedding_unavailable", code=exc.code().name)
                await asyncio.sleep(0.5)
        return self._model

    def lifecycle(self, d: DeploymentRecord, action: str, actor: str) -> pb.Deployment:
        msg = deployment_pb(d, self.meta.entry_count(d.id))
        env = events.envelope(self.name, deployment_id=d.id, model_id=d.model_id, model_version=d.model_version)
        self.rt.bus.publish_durable(subjects.lifecycle(d.id),
                                    pb.DeploymentEvent(envelope=env, deployment=msg, action=action, actor=actor),
                                    msg_id=env.event_id)
        self.log.info("deployment." + action, deployment_id=d.id, actor=actor)
        return msg

    async def enroll(self, d: DeploymentRecord, req: pb.EnrollEntryRequest) -> pb.EnrollEntryResponse:
        model = await self.model()
        if (d.model_id, d.model_version) != (model.model_id, model.model_version):
            raise Refused("FAILED_PRECONDITION", f"deployment uses {d.model_id} {d.model_version}; "
                          f"the embedding service runs {model.model_id} {model.model_version}")
        results, chips = [], []
        for i, image in enumerate(req.images):
            try:
                det = await self.detection.Detect(detection_pb2.DetectRequest(image=image, include_chips=True),
                                                  timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                results.append(pb.ImageResult(index=i, accepted=False, reason=exc.details()))
                continue
            iod = det.faces[0].quality.inter_eye_px if len(det.faces) == 1 else 0.0
            reason = enrollment_verdict(len(det.faces), iod, MIN_ENROLL_INTER_EYE_PX)
            results.append(pb.ImageResult(index=i, accepted=not reason, reason=reason,
                                          quality=det.faces[0].quality if det.faces else None))
            if not reason:
                chips.append(list(det.faces[0].chips))
        entry_id = ""
        if chips:
            emb = await self.embedding.Embed(embedding_pb2.EmbedRequest(chips=[c for cs in chips for c in cs]),
                                             timeout=30)
            entry_id = events.new_id()[:16]
            payload = {"deployment_id": d.id, "entry_id": entry_id, "subject_ref": req.subject_ref,
                       "category": int(req.category)}
            by_component: dict[str, list[list[float]]] = {}
            for v in emb.vectors:
                by_component.setdefault((v.model_id, v.model_version), []).append(list(v.values))
            components = {(c.model_id, c.model_version): c for c in model.components}
            for key, vectors in by_component.items():
                comp = components[key]
                name = collection_name(*key)
                await self.rt.run_cpu(self.index.ensure_collection, name, comp.dim, comp.metric)
                await self.rt.run_cpu(self.index.upsert, name, vectors, payload)
            self.meta.add_entry({
                "entry_id": entry_id, "deployment_id": d.id, "subject_ref": req.subject_ref,
                "category": int(req.category), "source_system": req.source_system, "legal_basis": req.legal_basis,
                "vectors": len(chips), "added_by": req.actor, "added_at_ns": time.time_ns()})
            env = events.envelope(self.name, deployment_id=d.id)
            self.rt.bus.publish_durable(subjects.watchlist(d.id), pb.WatchlistEvent(
                envelope=env, action="entry_added", entry_id=entry_id, subject_ref=req.subject_ref,
                category=req.category, actor=req.actor, images_accepted=len(chips),
                images_refused=len(results) - len(chips)), msg_id=env.event_id)
        return pb.EnrollEntryResponse(entry_id=entry_id, results=results)

    async def search(self, d: DeploymentRecord, probes: list[pb.Probe], k: int) -> list[pb.CandidateList]:
        model = await self.model()
        components = {(c.model_id, c.model_version): c for c in model.components}
        # entry_id -> per probe -> per component -> best score
        per_probe: list[dict[str, dict]] = [{} for _ in probes]
        for key, comp in components.items():
            queries = []
            for p in probes:
                vec = next((v for v in p.vectors if (v.model_id, v.model_version) == key), None)
                if vec is None or len(vec.values) != comp.dim:
                    raise Refused("INVALID_ARGUMENT", f"each probe needs a {comp.dim}-d vector of {key[0]} {key[1]}")
                queries.append(list(vec.values))
            # Several vectors may belong to one entry: fetch more than k and keep each entry's best.
            hits = await self.rt.run_cpu(self.index.search, collection_name(*key), queries, d.id, k * 4)
            for i, plist in enumerate(hits):
                for payload, raw in plist:
                    score = raw if comp.metric == "cosine" else 1.0 - raw
                    slot = per_probe[i].setdefault(payload["entry_id"], {"payload": payload, "scores": {}})
                    slot["scores"][key] = max(slot["scores"].get(key, -9.0), score)
        out = []
        for cands in per_probe:
            ranked = []
            for entry_id, slot in cands.items():
                scores = [slot["scores"].get(key) for key in components]
                if model.fusion_weights:
                    if any(s is None for s in scores):
                        continue  # fusion needs both engines' scores: no agreement, no candidate
                    z = model.fusion_bias + sum(w * s for w, s in zip(model.fusion_weights, scores, strict=True))
                    score = 1.0 / (1.0 + math.exp(-z))
                else:
                    score = scores[0]
                p = slot["payload"]
                ranked.append(pb.Candidate(entry_id=entry_id, subject_ref=p["subject_ref"],
                                           category=p["category"], score=score))
            ranked.sort(key=lambda c: -c.score)
            out.append(pb.CandidateList(candidates=ranked[:k]))
        return out

    async def close(self) -> None:
        if hasattr(self, "index"):
            self.index.close()
        if hasattr(self, "meta"):
            self.meta.close()
