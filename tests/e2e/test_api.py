"""Every service answers health and reflection; bad input gets a precise status and the service keeps serving."""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lfr.cli.live import create_deployment, enroll
from lfr.pb import (
    common_pb2,
    detection_pb2,
    embedding_pb2,
    identification_pb2,
    ingest_pb2,
    match_pb2,
    watchlist_pb2,
)
from lfr.runtime import events
from lfr.runtime.embedded import SERVICES, check_health

EXPECTED = {
    "ingest": "lfr.ingest.v1.IngestService", "detection": "lfr.detection.v1.DetectionService",
    "embedding": "lfr.embedding.v1.EmbeddingService", "watchlist": "lfr.watchlist.v1.WatchlistService",
    "match": "lfr.match.v1.MatchService", "audit": "lfr.audit.v1.AuditService",
    "identification": "lfr.identification.v1.IdentificationService",
}


def list_services(target: str, access) -> set[str]:
    with access.channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {s.name for r in responses for s in r.list_services_response.service}


@pytest.mark.parametrize("service", SERVICES)
def test_health_and_reflection(system, service):
    target = system.endpoint(service)
    assert check_health(target, access=system.access()) == "SERVING"
    assert check_health(target, EXPECTED[service], access=system.access()) == "SERVING"
    names = list_services(target, system.access(user="auditor"))
    assert {EXPECTED[service], "grpc.health.v1.Health"} <= names


def code_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=30, **kw)
    return info.value.code(), info.value.details()


def test_bad_input_gets_precise_status(system, clients, data, tmp_path):
    C = grpc.StatusCode
    jpeg = (data / "faces/misc/obama.jpg").read_bytes()
    push = clients.ingest.PushFrames
    # unknown deployment
    code, msg = code_of(push, iter([ingest_pb2.PushFrameRequest(deployment_id="nope", camera_id="c", image=jpeg)]))
    assert code == C.FAILED_PRECONDITION and "unknown deployment" in msg
    # missing fields
    code, msg = code_of(push, iter([ingest_pb2.PushFrameRequest(image=jpeg)]))
    assert code == C.INVALID_ARGUMENT and "required" in msg
    # a deployment that is not active, then a corrupt frame for an active one
    d = create_deployment(clients, "bad", ["c1"])
    code, msg = code_of(push, iter([ingest_pb2.PushFrameRequest(deployment_id=d.id, camera_id="c1", image=jpeg)]))
    assert code == C.FAILED_PRECONDITION and "DRAFT" in msg
    enroll(clients, d.id, {"S0": [data / "faces/misc/obama2.jpg"]})  # enrolled, then authorised by another officer
    clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    code, msg = code_of(push, iter([ingest_pb2.PushFrameRequest(deployment_id=d.id, camera_id="c1",
                                                                image=jpeg[: len(jpeg) // 2])]))
    assert code == C.INVALID_ARGUMENT and "truncated" in msg
    code, msg = code_of(push, iter([ingest_pb2.PushFrameRequest(deployment_id=d.id, camera_id="c1", image=b"xx")]))
    assert code == C.INVALID_ARGUMENT
    code, msg = code_of(push, iter([ingest_pb2.PushFrameRequest(deployment_id=d.id, camera_id="other", image=jpeg)]))
    assert code == C.FAILED_PRECONDITION and "camera" in msg
    # a good frame is accepted
    ok = push(iter([ingest_pb2.PushFrameRequest(deployment_id=d.id, camera_id="c1", image=jpeg)]), timeout=30)
    assert ok.frames_accepted == 1
    # oversized message (limit 8 MiB by default)
    code, _ = code_of(clients.detection.Detect, detection_pb2.DetectRequest(image=b"\0" * (9 << 20)))
    assert code == C.RESOURCE_EXHAUSTED
    # corrupt image, wrong chip, unknown ids, invalid transitions, bad arguments
    code, msg = code_of(clients.detection.Detect, detection_pb2.DetectRequest(image=b"not an image"))
    assert code == C.INVALID_ARGUMENT and "image refused" in msg
    code, msg = code_of(clients.embedding.Embed, embedding_pb2.EmbedRequest(
        chips=[common_pb2.Chip(model_id="sface-2021dec", size=3, rgb=b"\0" * 27)]))
    assert code == C.INVALID_ARGUMENT
    code, _ = code_of(clients.embedding.Embed, embedding_pb2.EmbedRequest())
    assert code == C.INVALID_ARGUMENT
    code, _ = code_of(clients.watchlist.GetDeployment, watchlist_pb2.GetDeploymentRequest(deployment_id="nope"))
    assert code == C.NOT_FOUND
    code, msg = code_of(clients.watchlist.StartDeployment, watchlist_pb2.TransitionRequest(deployment_id=d.id))
    assert code == C.FAILED_PRECONDITION and "ACTIVE" in msg
    code, _ = code_of(clients.watchlist.CreateDeployment, watchlist_pb2.CreateDeploymentRequest(name="x"))
    assert code == C.INVALID_ARGUMENT
    code, _ = code_of(clients.watchlist.EnrollEntry, watchlist_pb2.EnrollEntryRequest(deployment_id=d.id))
    assert code == C.INVALID_ARGUMENT
    code, _ = code_of(clients.watchlist.Search, watchlist_pb2.SearchRequest(deployment_id=d.id, probes=[
        watchlist_pb2.Probe(vectors=[common_pb2.Vector(model_id="x", values=[1.0])])]))
    assert code == C.INVALID_ARGUMENT
    code, msg = code_of(clients.ingest.StartSource, ingest_pb2.StartSourceRequest(
        deployment_id=d.id, camera_id="c1", url="/no/such/file.mp4"))
    assert code == C.PERMISSION_DENIED and "LFR_MEDIA_ROOTS" in msg  # outside the media roots: never looked at
    code, _ = code_of(clients.ingest.StartSource, ingest_pb2.StartSourceRequest(
        deployment_id=d.id, camera_id="c1", url=str(tmp_path / "no-such-file.mp4")))
    assert code == C.NOT_FOUND  # inside them, but missing
    code, _ = code_of(clients.ingest.StopSource, ingest_pb2.StopSourceRequest(source_id="nope"))
    assert code == C.NOT_FOUND
    code, _ = code_of(lambda **kw: next(clients.match.StreamAlerts(match_pb2.StreamAlertsRequest(), **kw)))
    assert code == C.INVALID_ARGUMENT
    # enrollment (into a DRAFT deployment: an active one's watchlist cannot change): an image with no face is
    # refused per image, with a reason; others still accepted
    d2 = create_deployment(clients, "enroll", ["c1"])
    r = clients.watchlist.EnrollEntry(watchlist_pb2.EnrollEntryRequest(
        deployment_id=d2.id, subject_ref="S1", category=watchlist_pb2.CATEGORY_WANTED_BY_POLICE,
        images=[jpeg, (data / "crowd/multiface.jpg").read_bytes(), b"junk"], source_system="test",
        legal_basis="test", captured_at=[events.ts_from_ns(time.time_ns() - 86_400 * 10**9)], actor="builder"),
        timeout=60)
    assert [x.accepted for x in r.results] == [True, False, False]
    assert "faces found" in r.results[1].reason and r.entry_id
    hostile_input(clients, d.id, tmp_path)
    # every service is still serving
    for s in SERVICES:
        assert system.procs[s].poll() is None
        assert check_health(system.endpoint(s), access=system.access()) == "SERVING"


def png_bomb(width: int, height: int, rows: int) -> bytes:
    """A greyscale PNG declaring width x height, with only `rows` zero rows compressed: a few KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" * (width + 1)) for _ in range(rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def hostile_input(clients, live_deployment: str, tmp_path) -> None:
    """Over-limit images, too many items, paths outside LFR_MEDIA_ROOTS and disallowed URLs: each refused with
    its precise status (the system runs with pytest's temporary folder and the shared data as media roots)."""
    C = grpc.StatusCode
    bomb = png_bomb(50_000, 50_000, 64)  # 2.5 Gpx declared in a few KB: refused from its header
    code, msg = code_of(clients.detection.Detect, detection_pb2.DetectRequest(image=bomb))
    assert code == C.RESOURCE_EXHAUSTED and "too_many_pixels" in msg and "limit of 40000000 pixels" in msg
    code, msg = code_of(clients.ingest.PushFrames, iter([ingest_pb2.PushFrameRequest(
        deployment_id=live_deployment, camera_id="c1", image=bomb)]))
    assert code == C.RESOURCE_EXHAUSTED and "pixels" in msg
    code, msg = code_of(clients.identification.Identify, identification_pb2.IdentifyRequest(
        image=bomb, gallery="g", case_reference="C-1", justification="test", actor="op"))
    assert code == C.RESOURCE_EXHAUSTED and "probe image refused (too_many_pixels)" in msg
    d = create_deployment(clients, "bomb", ["c1"])
    r = clients.watchlist.EnrollEntry(watchlist_pb2.EnrollEntryRequest(
        deployment_id=d.id, subject_ref="S9", category=watchlist_pb2.CATEGORY_WANTED_BY_POLICE, images=[bomb],
        source_system="test", legal_basis="test", actor="builder"), timeout=60)
    assert not r.entry_id and "too_many_pixels" in r.results[0].reason
    chips = [common_pb2.Chip(model_id="sface-2021dec", size=3, rgb=b"\0" * 27)] * 100_000
    code, msg = code_of(clients.embedding.Embed, embedding_pb2.EmbedRequest(chips=chips))
    assert code == C.RESOURCE_EXHAUSTED and "100000 chips" in msg
    # file inputs: outside the roots, or a link inside them pointing outside; URLs: only rtsp(s) on allowed hosts
    outside = Path(tempfile.mkdtemp(prefix="lfr-outside-"))  # not under pytest's temporary folder
    try:
        (outside / "secret.mp4").write_bytes(b"not for you")
        (tmp_path / "escape.mp4").symlink_to(outside / "secret.mp4")
        for url, why in [("/etc/passwd", "outside the media roots"), (str(tmp_path / "escape.mp4"), "link"),
                         (f"{tmp_path}/../../../etc/passwd", "'..'"), ("http://example.com/v.mp4", "not allowed"),
                         ("rtsp://camera.example/live", "LFR_SOURCE_HOSTS")]:
            code, msg = code_of(clients.ingest.StartSource, ingest_pb2.StartSourceRequest(
                deployment_id=live_deployment, camera_id="c1", url=url))
            assert code == C.PERMISSION_DENIED and why in msg, (url, code, msg)
        job = dict(gallery="g", case_reference="C-1", justification="test", actor="op")
        for media, why in [(identification_pb2.MediaSource(path=str(outside)), "outside the media roots"),
                           (identification_pb2.MediaSource(path=str(tmp_path / "escape.mp4")), "link"),
                           (identification_pb2.MediaSource(url="ftp://example.com/v.mp4"), "not allowed")]:
            code, msg = code_of(clients.identification.SubmitJob, identification_pb2.SubmitJobRequest(media=[media], **job))
            assert code == C.PERMISSION_DENIED and why in msg, (media, code, msg)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_timestamp_outside_years_1_to_9999_is_invalid_argument(clients, data):
    """Found by the fuzzer: protobuf refuses to convert such a time (ValueError), which reached callers as
    INTERNAL from AddGalleryImages; the watchlist's request timestamps are INVALID_ARGUMENT naming the field."""
    C = grpc.StatusCode
    jpeg = (data / "faces/misc/obama.jpg").read_bytes()
    far = Timestamp(seconds=-(2**63))
    code, msg = code_of(clients.identification.AddGalleryImages, identification_pb2.AddGalleryImagesRequest(
        gallery="ts-gallery", subject_ref="s", source_system="test", legal_basis="test", images=[jpeg],
        captured_at=[far], actor="e2e"))
    assert code == C.INVALID_ARGUMENT and "captured_at" in msg, (code, msg)
    now = time.time_ns()
    code, msg = code_of(clients.watchlist.CreateDeployment, watchlist_pb2.CreateDeploymentRequest(
        name="ts", purpose="test", legal_basis="test", site="demo site", planned_start=far,
        planned_end=events.ts_from_ns(now + 3600 * 10**9), cameras=["c"], actor="e2e"))
    assert code == C.INVALID_ARGUMENT and "planned_start" in msg, (code, msg)
