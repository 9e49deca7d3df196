"""Ingest service: frames pushed by camera gateways or pulled from file/RTSP sources -> frame events."""

from __future__ import annotations

import asyncio
import os
import time

import grpc

from lfr.ingest.core import check_frame
from lfr.ingest.sources import I420, SourceState, start_thread
from lfr.pb import ingest_pb2 as pb
from lfr.pb import ingest_pb2_grpc, watchlist_pb2_grpc
from lfr.runtime import events, framering, metrics, subjects
from lfr.runtime.deployments import DeploymentCache, live_refusal
from lfr.runtime.limits import MAX_SOURCES, InputError, InputInvalid, InputTooLarge, check_source_url
from lfr.runtime.rpc import abort, channel
from lfr.runtime.service import Runtime, Service

FINISHED_SOURCES_KEPT = 256  # ended sources still listed by ListSources
STATES = {"RUNNING": pb.SOURCE_STATE_RUNNING, "STOPPED": pb.SOURCE_STATE_STOPPED,
          "FINISHED": pb.SOURCE_STATE_FINISHED, "FAILED": pb.SOURCE_STATE_FAILED}


def source_pb(s: SourceState) -> pb.Source:
    return pb.Source(source_id=s.source_id, deployment_id=s.deployment_id, camera_id=s.camera_id, url=s.url,
                     target_fps=s.target_fps, state=STATES[s.state], frames_published=s.frames_published,
                     error=s.error)


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, svc: IngestService):
        self.svc = svc

    async def _check_live(self, deployment_id: str, camera_id: str, context) -> None:
        if not deployment_id or not camera_id:
            await abort(context, "INVALID_ARGUMENT", "deployment_id and camera_id are required")
        try:
            d = await self.svc.deployments.get(deployment_id)
        except grpc.aio.AioRpcError as exc:
            await abort(context, "UNAVAILABLE", f"cannot check the deployment: watchlist {exc.code().name}")
        reason = live_refusal(d, camera_id)
        if reason:
            await abort(context, "FAILED_PRECONDITION", reason)

    async def PushFrames(self, request_iterator, context):
        cfg = self.svc.config
        accepted = 0
        async for req in request_iterator:
            await self._check_live(req.deployment_id, req.camera_id, context)
            try:
                w, h = check_frame(req.image, cfg.max_image_bytes, cfg.max_image_pixels)
            except InputError as exc:
                await abort(context, exc.code, f"frame {req.frame_index}: {exc.message}")
            try:
                capture_ns = req.capture_time.ToNanoseconds() if req.capture_time.seconds else time.time_ns()
            except ValueError:  # outside years 1-9999: the caller's mistake, never an internal error
                await abort(context, "INVALID_ARGUMENT",
                            f"frame {req.frame_index}: capture_time is not a valid time (years 0001 to 9999 UTC)")
            await self.svc.publish(req.deployment_id, req.camera_id, req.image, w, h, capture_ns,
                                   req.video_time_s, req.frame_index)
            accepted += 1
        return pb.PushFramesResponse(frames_accepted=accepted)

    async def StartSource(self, request, context):
        await self._check_live(request.deployment_id, request.camera_id, context)
        cfg = self.svc.config
        if not request.url:
            await abort(context, "INVALID_ARGUMENT", "url is required")
        try:  # rtsp(s):// on an allowed host, or a file inside the media roots (links resolved)
            url = check_source_url(request.url, cfg.source_hosts, cfg.media_roots)
            if "://" not in url and not os.path.isfile(url):
                raise InputInvalid(f"{request.url} is not a file")
            running = sum(s.state == "RUNNING" for s in self.svc.sources.values())
            if running >= MAX_SOURCES:
                raise InputTooLarge(f"{running} sources are running; at most {MAX_SOURCES} at once (stop one)")
        except InputError as exc:
            await abort(context, exc.code, exc.message)
        fps = request.target_fps or cfg.ingest_fps
        if not 0 < fps <= 60:
            await abort(context, "INVALID_ARGUMENT", "target_fps must be in (0, 60]")
        src = SourceState(events.new_id()[:12], request.deployment_id, request.camera_id, url, fps,
                          request.realtime)
        self.svc.add_source(src)
        await start_thread(asyncio.get_running_loop(), src, cfg.jpeg_quality, self.svc.emitter(src),
                           cfg.max_image_pixels, cfg.frame_encoding, self.svc.raw_limit(),
                           linger_s=cfg.freshness_ms / 1000 + 0.5)
        return source_pb(src)

    async def StopSource(self, request, context):
        src = self.svc.sources.get(request.source_id)
        if src is None:
            await abort(context, "NOT_FOUND", f"no source {request.source_id!r}")
        src.stop.set()
        if src.state == "RUNNING":
            src.state = "STOPPED"
        return source_pb(src)

    async def ListSources(self, request, context):
        return pb.ListSourcesResponse(sources=[source_pb(s) for s in self.svc.sources.values()])


class IngestService(Service):
    name = "ingest"

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.deployments = DeploymentCache(watchlist_pb2_grpc.WatchlistServiceStub(channel(cfg.watchlist_target, cfg)))
        self.sources: dict[str, SourceState] = {}
        self.loop = asyncio.get_running_loop()
        rt.add_servicer(ingest_pb2_grpc.add_IngestServiceServicer_to_server, IngestServicer(self),
                        pb.DESCRIPTOR.services_by_name["IngestService"])

    async def warmup(self) -> None:
        if self.config.frame_encoding == "shm":
            orphans = framering.remove_orphans()  # frame rings left by an ingest that died
            if orphans:
                self.log.warning("frames.orphan_rings_removed", rings=len(orphans))
        await self.deployments.follow(self.rt.bus)

    def add_source(self, src: SourceState) -> None:
        """Keep the source; the oldest ended ones are forgotten beyond FINISHED_SOURCES_KEPT (a bounded list)."""
        self.sources[src.source_id] = src
        ended = [k for k, s in self.sources.items() if s.state != "RUNNING"]
        for k in ended[: max(0, len(ended) - FINISHED_SOURCES_KEPT)]:
            del self.sources[k]

    def raw_limit(self) -> int:
        """The largest frame published as raw planes: what the NATS server takes in one message, less room for
        the rest of the event."""
        return max(0, int(getattr(self.rt.bus.nc, "max_payload", 0) or 0) - 16384)

    async def publish(self, deployment_id, camera_id, image, w, h, capture_ns, video_time_s, index) -> None:
        env = events.envelope(self.name, deployment_id, camera_id, capture_ns)
        frame = pb.FrameEvent(envelope=env, width=w, height=h, frame_index=index, video_time_s=video_time_s)
        if isinstance(image, framering.FrameRef):
            frame.shared.CopyFrom(pb.SharedFrame(ring=image.ring, slot=image.slot, seq=image.seq, size=image.size))
        elif isinstance(image, I420):
            frame.i420 = image
        else:
            frame.image = image
        if await self.rt.bus.publish(subjects.frames(deployment_id, camera_id), frame):
            metrics.PROCESSED.labels(self.name, "frames").inc()

    def emitter(self, src: SourceState):
        """Called from the source's thread: checks the deployment is still live, then publishes."""

        async def emit_async(jpeg, w, h, capture_ns, t, index):
            try:
                d = await self.deployments.get(src.deployment_id)
            except grpc.aio.AioRpcError:
                d = None
            if live_refusal(d, src.camera_id):
                metrics.DROPPED.labels(self.name, "frames", "not_live").inc()
                return
            await self.publish(src.deployment_id, src.camera_id, jpeg, w, h, capture_ns, t, index)

        def emit(*args) -> None:
            asyncio.run_coroutine_threadsafe(emit_async(*args), self.loop)

        return emit

    async def stop_intake(self) -> None:
        for src in self.sources.values():
            src.stop.set()
        framering.close_all()  # frames still in a ring are gone with the service
