"""Detection service: frames (NATS queue group) -> faces with chips; unary Detect for enrollment/search."""

from __future__ import annotations

import asyncio

import numpy as np

from lfr.detection.core import detect_images, frame_image, inter_eye_px
from lfr.detection.tracks import FaceSampler
from lfr.models.images import ImageError
from lfr.pb import detection_pb2 as pb
from lfr.pb import detection_pb2_grpc, ingest_pb2
from lfr.runtime import events, framering, limits, metrics, subjects
from lfr.runtime.rpc import abort
from lfr.runtime.service import Runtime, Service
from lfr.runtime.stage import BUDGET_SHARE, Stage

DETECTOR_ID = "yunet-2023mar-int8bq"


class DetectionServicer(detection_pb2_grpc.DetectionServiceServicer):
    def __init__(self, svc: DetectionService):
        self.svc = svc

    async def Detect(self, request, context):
        cfg = self.svc.config
        try:  # size, then the header's dimensions, before any pixel is decompressed
            image = await self.svc.rt.run_cpu(limits.decode, request.image, cfg)
        except limits.InputError as exc:
            await abort(context, exc.code, exc.message)
        faces = await self.svc.rt.run_cpu(detect_images, self.svc.engine, [image], cfg.detect_max_side,
                                          request.include_chips, request.include_crops)
        return pb.DetectResponse(faces=faces[0], width=image.shape[1], height=image.shape[0],
                                 detector_id=DETECTOR_ID)


class DetectionService(Service):
    name = "detection"
    runs_models = True

    async def start(self, rt: Runtime) -> None:
        from lfr.models.engines import DETECTION_PARTS, get_engine

        cfg = self.config
        # the detector and the chip makers of the model's components: no embedder weights here
        self.engine = await rt.run_cpu(lambda: get_engine(cfg.model or None, device=cfg.device or None,
                                                          parts=DETECTION_PARTS))
        self.log.info("models.built", **self.engine.built())
        self.stage = Stage(self.name, "detect", cfg.queue_size, cfg.detection_batch, self._process,
                           lambda f: events.age_ms(f.envelope), cfg.freshness_ms * BUDGET_SHARE["detect"])
        self.sampler = FaceSampler(interval_s=cfg.live_embed_interval_ms / 1000, max_per_s=cfg.live_embed_max_per_s,
                                   follow=cfg.alert_min_frames - 1 if cfg.live_embed_follow_ms > 0 else 0,
                                   follow_s=cfg.live_embed_follow_ms / 1000)
        self.rings = framering.RingReader()  # frames ingest put in shared memory (LFR_FRAME_ENCODING=shm)
        self.frame_counts: dict[tuple[str, str], int] = {}  # per camera: frames since its last full-scale look
        self.skipped = metrics.SKIPPED.labels(self.name, "tracked")
        rt.add_servicer(detection_pb2_grpc.add_DetectionServiceServicer_to_server, DetectionServicer(self),
                        pb.DESCRIPTOR.services_by_name["DetectionService"])

    async def warmup(self) -> None:
        await self.rt.run_cpu(self.engine.warmup)
        await self.rt.run_cpu(self._warm_live_scales)
        self.worker = asyncio.create_task(self.stage.run(), name="detect-stage")
        self.sub = await self.rt.bus.subscribe(subjects.frames(), ingest_pb2.FrameEvent, self._on_frame,
                                               queue=subjects.QUEUE["detection"], stage="detect")
        # every replica hears match ask for more frames of a pass (the replica that tracks the face acts on it)
        self.evidence_sub = await self.rt.bus.subscribe(subjects.evidence(), pb.EvidenceWanted, self._on_evidence,
                                                        stage="evidence")

    def _on_evidence(self, msg: pb.EvidenceWanted, _subject: str) -> None:
        self.sampler.want((msg.envelope.deployment_id, msg.envelope.camera_id), msg.track_ids)

    def _on_frame(self, frame: ingest_pb2.FrameEvent, _subject: str) -> None:
        self.stage.offer(frame)

    def _warm_live_scales(self) -> None:
        """A few detections at the live scales of a 16:9 camera (the detector's first runs at a new image size
        are several times slower), so the first frames of a camera are not dropped as late."""
        cfg = self.config
        frame = np.full((1080, 1920, 3), 127, np.uint8)
        for side in {cfg.detect_max_side, cfg.detect_fast_side or cfg.detect_max_side}:
            for _ in range(3):
                detect_images(self.engine, [frame], side, False, False)

    def _side(self, env) -> int:
        """The scale a live frame is detected at: LFR_DETECT_FAST_SIDE, and LFR_DETECT_MAX_SIDE for one frame in
        LFR_DETECT_FULL_EVERY per camera (at 25 fps and the defaults, 5 full looks a second)."""
        cfg = self.config
        if not 0 < cfg.detect_fast_side < cfg.detect_max_side:
            return cfg.detect_max_side
        key = (env.deployment_id, env.camera_id)
        n = self.frame_counts.get(key, 0)
        self.frame_counts[key] = (n + 1) % cfg.detect_full_every
        return cfg.detect_max_side if n == 0 else cfg.detect_fast_side

    def _decode_batch(self, frames: list[ingest_pb2.FrameEvent]):
        cfg = self.config
        images, kept = [], []
        for f in frames:
            try:
                images.append(frame_image(f, cfg.max_image_bytes, cfg.max_image_pixels, self.rings))
                kept.append(f)
            except ImageError as exc:
                self.stage._drop(f, exc.reason if exc.reason in ("gone", "unreachable") else "bad_image")
        if not images:
            return kept, [], []
        counts = [(0, 0)] * len(images)  # per frame: faces detected, faces new (faces seen)

        def select(k: int, faces) -> list[int | None]:  # the live face sampler: a tracked face every interval
            env = kept[k].envelope
            t = env.capture_time.ToNanoseconds() / 1e9
            keep = self.sampler.select((env.deployment_id, env.camera_id), t, [f.box for f in faces],
                                       [inter_eye_px(f) * f.score for f in faces])
            counts[k] = (len(faces), self.sampler.new)
            self.skipped.inc(keep.count(False))
            return [track if embed else None for embed, track in zip(keep, self.sampler.ids, strict=True)]

        out = detect_images(self.engine, images, [self._side(f.envelope) for f in kept], True, True, cfg.min_face_px,
                            select)
        self.sampler.forget(older_than=max(f.envelope.capture_time.ToNanoseconds() for f in kept) / 1e9 - 5.0)
        return kept, out, counts

    async def _process(self, frames: list[ingest_pb2.FrameEvent]) -> None:
        kept, results, counts = await self.rt.run_cpu(self._decode_batch, frames)
        for frame, faces, (detected, new) in zip(kept, results, counts, strict=True):
            if not faces and not detected:  # no face: nothing to count either
                continue
            env = frame.envelope
            out = pb.FacesEvent(envelope=events.derive(env, self.name), frame_index=frame.frame_index,
                                video_time_s=frame.video_time_s, faces=faces, frame_width=frame.width,
                                frame_height=frame.height, faces_detected=detected, faces_new=new)
            await self.rt.bus.publish(subjects.faces(env.deployment_id, env.camera_id), out)

    async def stop_intake(self) -> None:
        if hasattr(self, "evidence_sub"):
            await self.evidence_sub.unsubscribe()
        if hasattr(self, "sub"):
            await self.sub.unsubscribe()
            await self.stage.drain(self.config.grace_s)
            self.worker.cancel()
        if hasattr(self, "rings"):
            self.rings.close()
