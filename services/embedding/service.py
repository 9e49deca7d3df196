"""Embedding service: faces (NATS queue group) -> embeddings tagged with model id/version; unary Embed."""

from __future__ import annotations

import asyncio

from lfr.embedding.core import ChipError, embed_chips
from lfr.pb import detection_pb2, embedding_pb2_grpc
from lfr.pb import embedding_pb2 as pb
from lfr.runtime import events, limits, metrics, subjects
from lfr.runtime.rpc import abort
from lfr.runtime.service import Runtime, Service
from lfr.runtime.stage import BUDGET_SHARE, Stage


def describe(engine) -> pb.ModelDescription:
    """The served model's whole scoring recipe (`lfr.models.scoring`): what every consumer of its vectors uses."""
    return engine.scorer.describe(pb.ModelDescription())


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, svc: EmbeddingService):
        self.svc = svc

    async def Embed(self, request, context):
        if not request.chips:
            await abort(context, "INVALID_ARGUMENT", "at least one chip is required")
        try:  # each chip's size is checked against the model's before any array is built (ChipError)
            limits.check_count(len(request.chips), limits.MAX_CHIPS_PER_REQUEST, "chips")
        except limits.InputError as exc:
            await abort(context, exc.code, exc.message)
        try:
            vectors = await self.svc.rt.run_cpu(embed_chips, self.svc.engine, list(request.chips))
        except ChipError as exc:
            await abort(context, "INVALID_ARGUMENT", str(exc))
        return pb.EmbedResponse(vectors=vectors)

    async def GetModel(self, request, context):
        return self.svc.description


class EmbeddingService(Service):
    name = "embedding"
    runs_models = True

    async def start(self, rt: Runtime) -> None:
        from lfr.models.engines import EMBEDDING_PARTS, get_engine

        cfg = self.config
        flip = {"on": True, "off": False, "model": None}[cfg.flip]
        # the model's embedders only: no detector, no alignment here
        self.engine = await rt.run_cpu(lambda: get_engine(cfg.model or None, device=cfg.device or None, flip=flip,
                                                          parts=EMBEDDING_PARTS))
        self.log.info("models.built", **self.engine.built())
        self.description = describe(self.engine)
        # Batches are counted in faces (chips), not frames, so one batch's latency stays bounded.
        self.stage = Stage(self.name, "embed", cfg.queue_size, cfg.embedding_batch, self._process,
                           lambda f: events.age_ms(f.envelope), cfg.freshness_ms * BUDGET_SHARE["embed"],
                           on_drop=self._dropped, weight=lambda m: sum(len(f.chips) for f in m.faces))
        rt.add_servicer(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, EmbeddingServicer(self),
                        pb.DESCRIPTOR.services_by_name["EmbeddingService"])

    async def warmup(self) -> None:
        await self.rt.run_cpu(self.engine.warmup)
        self.worker = asyncio.create_task(self.stage.run(), name="embed-stage")
        self.sub = await self.rt.bus.subscribe(subjects.faces(), detection_pb2.FacesEvent, self._on_faces,
                                               queue=subjects.QUEUE["embedding"], stage="embed")

    def _dropped(self, msg: detection_pb2.FacesEvent, _reason: str) -> None:
        """Faces dropped here are never matched: disposed of now, and timed like match's non-matches."""
        ms = events.age_ms(msg.envelope)
        for _ in msg.faces:
            metrics.DISPOSAL.labels(self.name).observe(ms / 1000)

    def _on_faces(self, msg: detection_pb2.FacesEvent, _subject: str) -> None:
        self.stage.offer(msg)

    async def _process(self, batch: list[detection_pb2.FacesEvent]) -> None:
        chips = [c for msg in batch for f in msg.faces for c in f.chips]
        vectors = await self.rt.run_cpu(embed_chips, self.engine, chips) if chips else []
        it = iter(vectors)
        info = self.engine.info
        for msg in batch:
            env = msg.envelope
            out = pb.EmbeddingsEvent(envelope=events.derive(env, self.name, info.model_id, info.version),
                                     frame_index=msg.frame_index, video_time_s=msg.video_time_s,
                                     faces_detected=msg.faces_detected, faces_new=msg.faces_new)
            for i, f in enumerate(msg.faces):
                out.faces.append(pb.FaceEmbedding(face_index=i, box=f.box, quality=f.quality,
                                                  vectors=[next(it) for _ in f.chips], crop_jpeg=f.crop_jpeg,
                                                  track_id=f.track_id))
            await self.rt.bus.publish(subjects.embeddings(env.deployment_id, env.camera_id), out)

    async def stop_intake(self) -> None:
        if hasattr(self, "sub"):
            await self.sub.unsubscribe()
            await self.stage.drain(self.config.grace_s)
            self.worker.cancel()
