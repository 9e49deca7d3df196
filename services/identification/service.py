"""Identification service: galleries (large searchable sets of reference images), operator-initiated
identification (Identify: a photo -> ranked candidates) and retrospective identification (jobs with progress,
resumed after a restart), against a gallery or a deployment's watchlist.

It owns its stores under `<state>/identification/` (gallery metadata and images, the gallery indexes, the jobs'
records and results) and asks the other services for the rest over gRPC: detection and embedding for faces and
vectors, the watchlist service for a deployment (GetDeployment, Search). The gRPC servicer only checks request
fields (a refusal becomes its status in the shared ErrorInterceptor); the work is in `runner.py` over the pure
cores (`identify.py`, `jobs.py`).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

from lfr.errors import Refused
from lfr.galleryindex import IndexParams
from lfr.identification.gallery import GalleryStore
from lfr.identification.identify import validate_identify
from lfr.identification.jobs import FINISHED
from lfr.identification.runner import Identification
from lfr.pb import identification_pb2 as pb
from lfr.pb import identification_pb2_grpc, watchlist_pb2_grpc
from lfr.runtime import limits
from lfr.runtime.faces import FaceStages
from lfr.runtime.rpc import abort, channel
from lfr.runtime.service import Runtime, Service

_SUBJECT_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:-]{0,63}$")
# What the watchlist service kept in its state folder before identification was a service of its own, moved into
# <state>/identification/ at this service's first start (`migrate_from_watchlist`): per store, its files and
# folder first and its database last, so a start interrupted part way finishes the move the next time.
LEGACY = (("galleries", "galleries.sqlite-wal", "galleries.sqlite-shm", "galleries.sqlite"),
          ("jobs", "jobs.sqlite-wal", "jobs.sqlite-shm", "jobs.sqlite"))


def migrate_from_watchlist(state_dir: Path, folder: Path) -> list[str]:
    """Move the galleries and jobs the watchlist service kept in `state_dir` into `folder` (same file system: each
    a rename). A store whose database is already in `folder` is left alone. Returns the names moved."""
    moved = []
    for names in LEGACY:
        if (folder / names[-1]).exists() or not any((state_dir / n).exists() for n in names):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            src, dst = state_dir / name, folder / name
            if src.exists() and not dst.exists():
                shutil.move(str(src), str(dst))
                moved.append(name)
    return moved


def _provenance(request) -> None:
    """Images held outside a deployment must say whose, from where and on what basis."""
    if not _SUBJECT_REF.match(request.subject_ref or ""):
        raise Refused("INVALID_ARGUMENT", "subject_ref is required: a nominal id of 1-64 letters, digits "
                      "or . _ / : -")
    for name in ("source_system", "legal_basis", "actor"):
        if not getattr(request, name).strip():
            raise Refused("INVALID_ARGUMENT", f"{name} is required")


class IdentificationServicer(identification_pb2_grpc.IdentificationServiceServicer):
    def __init__(self, work: Identification):
        self.work = work

    async def AddGalleryImages(self, request, context):
        _provenance(request)
        captured = limits.images_captured(request)
        return await self.work.add_gallery_images(request, captured)

    async def FindGalleryImages(self, request, context):
        limits.check_count(len(request.sha256), limits.MAX_DIGESTS_PER_REQUEST, "digests")
        g = self.work.gallery(request.gallery)
        present = self.work.store.known_sha256(g.name, list(request.sha256))
        return pb.FindGalleryImagesResponse(present=[x for x in request.sha256 if x in present])

    async def GetGallery(self, request, context):
        return self.work.gallery_pb(self.work.gallery(request.gallery))

    async def ListGalleries(self, request, context):
        w = self.work
        return pb.ListGalleriesResponse(galleries=[w.gallery_pb(w.store.get(n)) for n in w.store.names()])

    async def Identify(self, request, context):
        error = validate_identify(request)
        if error:
            raise Refused("INVALID_ARGUMENT", error)
        return await self.work.identify(request)

    async def ReembedGallery(self, request, context):
        return await self.work.reembed_gallery(request)

    async def SubmitJob(self, request, context):
        return await self.work.submit(request)

    async def GetJob(self, request, context):
        return self.work.job_pb(self.work.get_job(request.job_id))

    async def ListJobs(self, request, context):
        return pb.ListJobsResponse(jobs=[self.work.job_pb(j) for j in self.work.list_jobs()])

    async def StreamResults(self, request, context):
        work = self.work
        try:
            work.get_job(request.job_id)
        except Refused as exc:
            await abort(context, exc.code, exc.message)
        seq = request.after_seq
        while True:
            finished = work.get_job(request.job_id).state in FINISHED  # read before the results: none missed
            for r in work.results(request.job_id, seq):
                seq = r.seq
                yield r
            if finished or not request.follow:
                return
            await asyncio.sleep(0.25)

    async def CancelJob(self, request, context):
        return await self.work.cancel(request.job_id, request.actor, request.reason)


class IdentificationService(Service):
    name = "identification"

    def now_ns(self) -> int:
        return time.time_ns()

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        folder = cfg.state_path("identification")
        moved = migrate_from_watchlist(cfg.state_path(), folder)
        if moved:
            self.log.info("identification.migrated", moved=moved, to=str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        params = IndexParams(connectivity=cfg.gallery_connectivity, expansion_add=cfg.gallery_expansion_add,
                             expansion_search=cfg.gallery_ef)
        qdrant = None
        if cfg.qdrant_url:  # a Qdrant server: one collection per gallery and component (lfr.galleryindex)
            from qdrant_client import QdrantClient

            qdrant = QdrantClient(url=cfg.qdrant_url, api_key=cfg.qdrant_api_key or None)
        self.faces = FaceStages(cfg, self.log)
        self.watchlist = watchlist_pb2_grpc.WatchlistServiceStub(channel(cfg.watchlist_target, cfg))
        store = GalleryStore(folder / "galleries.sqlite", folder / "galleries", params, qdrant)
        self.work = Identification(self, store, folder)
        rt.add_servicer(identification_pb2_grpc.add_IdentificationServiceServicer_to_server,
                        IdentificationServicer(self.work), pb.DESCRIPTOR.services_by_name["IdentificationService"])

    async def warmup(self) -> None:
        await self.faces.model()
        await self.work.start()  # galleries loaded, unfinished jobs resumed

    async def stop_intake(self) -> None:
        if hasattr(self, "work"):
            await self.work.stop()  # a running job stops at once; it resumes from its checkpoint at the next start

    async def close(self) -> None:
        if hasattr(self, "work"):
            self.work.close()
