"""The identification service's work: galleries (import, search, re-embedding), Identify, and the job runner.
The decisions are in the pure cores (`identify.py`, `jobs.py`); gallery storage is `gallery.py` over
`lfr.galleryindex`; media are opened by `lfr.media`; faces and vectors come from the detection and embedding
services (`lfr.runtime.faces`), a deployment's watchlist from the watchlist service (GetDeployment, Search).

Privacy: a probe (Identify's image, a job's frames, faces and vectors) lives in memory only, except a running
job's open appearances, checkpointed to `<state>/identification/jobs/<job>/` so a restart resumes the job; that
folder is deleted when the job ends (succeeded, failed or cancelled). Results keep candidate ids, scores, times
and boxes, no image and no vector. Every search and every job is a durable event (who, when, why, case
reference, counts).

Not starving the live path: a job sends one frame at a time to detection, so live frames queue behind at most
one; gallery reads and writes run on their own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from lfr.errors import Refused
from lfr.galleryindex import EmbeddedIndex
from lfr.identification import jobs as J
from lfr.identification.gallery import Component, GalleryRecord, GalleryStore, ImageRow, check_gallery_name
from lfr.identification.identify import SEARCHED, Ranked, candidate_pb, choose_face, rank
from lfr.media import FrameReader, check_media, resolve_items
from lfr.models import scoring
from lfr.models.face_choice import central_index
from lfr.pb import common_pb2, watchlist_pb2
from lfr.pb import identification_pb2 as pb
from lfr.runtime import events, limits, subjects
from lfr.runtime.faces import EmbeddingUnavailable, model_mismatch

if TYPE_CHECKING:
    from lfr.identification.service import IdentificationService

TOKEN = "identification"  # the watchlist-event subject token of searches and jobs about no deployment
JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_results (job_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
                                        PRIMARY KEY (job_id, seq));
"""


def _ts(ns: int):
    return events.ts_from_ns(ns) if ns else None


def checked_threshold(requested: float, default: float, model_id: str) -> float:
    """A request's threshold (0 = the target's default), refused unless valid for the target's model."""
    if not requested:
        return default
    error = scoring.recipe(model_id).threshold_error(requested)
    if error:
        raise Refused("INVALID_ARGUMENT", error)
    return requested


def _box(b: common_pb2.Box) -> tuple[float, float, float, float]:
    return (b.x1, b.y1, b.x2, b.y2)


def _central(det) -> int:
    return central_index(det.width, det.height, [_box(f.box) for f in det.faces])


class JobCancelled(Exception):
    pass


class Identification:
    def __init__(self, svc: IdentificationService, store: GalleryStore, folder: Path):
        """`store`: the galleries; `folder`: the service's state folder (galleries/, jobs.sqlite, jobs/)."""
        self.svc = svc
        self.faces = svc.faces
        self.store = store
        self.image_root = folder / "galleries"
        self.reads = ThreadPoolExecutor(1, thread_name_prefix="gallery-read")
        self.writes = ThreadPoolExecutor(1, thread_name_prefix="gallery-write")
        self.gallery_locks: dict[str, asyncio.Lock] = {}
        self.jobs_db = sqlite3.connect(str(folder / "jobs.sqlite"), check_same_thread=False, isolation_level=None)
        self.jobs_db.execute("PRAGMA journal_mode=WAL")
        self.jobs_db.executescript(JOBS_SCHEMA)
        self.jobs_dir = folder / "jobs"
        self.jobs_lock = threading.Lock()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.cancelled: dict[str, str] = {}  # running job -> who cancelled it
        self.run_stats: dict[str, tuple[float, int, float]] = {}  # job -> (t0, frames then, media s then)
        self._last_tick: dict[str, float] = {}
        self.runner: asyncio.Task | None = None
        self.log = svc.log

    async def model(self, fresh: bool = False):
        try:
            return await self.faces.model(fresh)
        except EmbeddingUnavailable as exc:
            raise Refused("UNAVAILABLE", str(exc)) from None

    async def _read(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.reads, fn, *args)

    async def _write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.writes, fn, *args)

    async def start(self) -> None:
        """Open the galleries (their graphs load or catch up), then resume unfinished jobs."""
        for name in self.store.names():
            g = self.store.get(name)
            await self._write(self.store.truncate_vectors, g)
            for c in g.components:
                await self._write(self.store.index, g, c)
        for job in self._jobs():
            if job.state in (J.QUEUED, J.RUNNING):
                if job.state == J.RUNNING:
                    job.resumes += 1
                    self._save_job(job)
                    self.log.info("job.resuming", job_id=job.job_id, item=job.cursor.item_index)
                self.queue.put_nowait(job.job_id)
        self.runner = asyncio.create_task(self._run_jobs(), name="identification-jobs")

    async def stop(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.runner

    def close(self) -> None:
        self.reads.shutdown(wait=True)
        self.writes.shutdown(wait=True)
        self.store.close()
        self.jobs_db.close()

    def event(self, action: str, actor: str, deployment_id: str = "", **fields) -> None:
        """A durable identification fact (no image, no vector) for the audit record."""
        env = events.envelope(self.svc.name, deployment_id=deployment_id)
        self.svc.rt.bus.publish_durable(subjects.watchlist(deployment_id or TOKEN), watchlist_pb2.WatchlistEvent(
            envelope=env, action=action, actor=actor, **fields), msg_id=env.event_id)
        self.log.info("identification." + action, actor=actor, deployment_id=deployment_id)

    # Galleries ---------------------------------------------------------------------------------------------
    def gallery(self, name: str) -> GalleryRecord:
        try:
            check_gallery_name(name)
        except ValueError as exc:
            raise Refused("INVALID_ARGUMENT", f"gallery: {exc}") from None
        g = self.store.get(name)
        if g is None:
            raise Refused("NOT_FOUND", f"no gallery {name!r}")
        return g

    def gallery_pb(self, g: GalleryRecord) -> pb.Gallery:
        images, subjects_ = self.store.counts(g.name)
        kind = "qdrant server" if self.store.qdrant is not None else "embedded HNSW (usearch) + exact re-scoring"
        jobs = self._reembed_jobs(g.name)
        return pb.Gallery(name=g.name, model_id=g.model_id, model_version=g.model_version, images=images,
                          subjects=subjects_, created_by=g.created_by, created_at=_ts(g.created_at_ns),
                          default_threshold=g.default_threshold, index=kind,
                          reembed_job=self.job_pb(jobs[-1]) if jobs else None)

    async def _gallery_model(self, g: GalleryRecord, what: str):
        model = await self.model(fresh=True)
        job = self._reembedding(g.name)
        then = (f"re-embedding with {job.model_id} {job.model_version} is under way (job {job.job_id}: "
                f"{J.reembed_progress(job.progress.items_done, job.progress.items_total)}), the gallery "
                "swaps to it when every image is done" if job else
                f"re-embed it first (ReembedGallery, `lfr gallery reembed {g.name}`)")
        refusal = model_mismatch(model, g.model_id, g.model_version, what, f"gallery {g.name}", then)
        if refusal:
            raise Refused("FAILED_PRECONDITION", refusal)
        return model

    def _reembed_jobs(self, gallery: str) -> list[J.JobRecord]:
        rows = self.jobs_db.execute("SELECT record FROM jobs WHERE record LIKE ? ORDER BY rowid",
                                    (f'%"kind": "{J.REEMBED}"%',)).fetchall()
        return [job for job in (J.JobRecord.from_json(json.loads(r[0])) for r in rows)
                if job.reembed and job.gallery == gallery]

    def _reembedding(self, gallery: str) -> J.JobRecord | None:
        """The gallery's queued or running re-embedding job, if any."""
        return next((job for job in self._reembed_jobs(gallery) if job.state not in J.FINISHED), None)

    # Re-embedding a gallery after a model change (#17) -------------------------------------------------------
    async def reembed_gallery(self, req: pb.ReembedGalleryRequest) -> pb.Job:
        """Queue a job that re-embeds every stored image of the gallery with the embedding service's model."""
        if not req.actor.strip():
            raise Refused("INVALID_ARGUMENT", "actor is required")
        g = self.gallery(req.gallery)
        model = await self.model(fresh=True)
        if (model.model_id, model.model_version) == (g.model_id, g.model_version):
            raise Refused("FAILED_PRECONDITION", f"gallery {g.name} is already embedded with {g.model_id} "
                          f"{g.model_version}, the embedding service's model")
        running = self._reembedding(g.name)
        if running is not None:
            raise Refused("FAILED_PRECONDITION", f"gallery {g.name} is already being re-embedded (job "
                          f"{running.job_id})")
        if self.queue.qsize() >= limits.MAX_QUEUED_JOBS:
            raise limits.InputTooLarge(f"{self.queue.qsize()} jobs are waiting to run; at most "
                                       f"{limits.MAX_QUEUED_JOBS} may wait (submit later)")
        job = J.JobRecord(job_id=events.new_id()[:16], media=[], gallery=g.name, deployment_id="", case_reference="",
                          justification=req.reason, actor=req.actor, k=0, threshold=model.default_threshold,
                          investigation=False, fps=0.0, model_id=model.model_id, model_version=model.model_version,
                          submitted_at_ns=self.svc.now_ns(), kind=J.REEMBED)
        images = self.store.next_image_id(g.name)
        job.progress.items_total = job.progress.frames_total = images
        self._save_job(job)
        self.event("gallery_reembed_submitted", req.actor, gallery=g.name, job_id=job.job_id,
                   reason=f"{g.model_id} {g.model_version} -> {model.model_id} {model.model_version}"
                          + (f": {req.reason}" if req.reason else ""))
        self.queue.put_nowait(job.job_id)
        return self.job_pb(job)

    def _staged(self, g: GalleryRecord, job: J.JobRecord, model) -> GalleryRecord:
        """The gallery as it will be once re-embedded: the job's model, the next generation's index."""
        return dataclasses.replace(
            g, model_id=job.model_id, model_version=job.model_version,
            components=tuple(Component(c.model_id, c.model_version, c.dim, c.metric) for c in model.components),
            default_threshold=model.default_threshold, generation=g.generation + 1)

    async def _same_as_job(self, job: J.JobRecord):
        model = await self.model(fresh=True)
        if (model.model_id, model.model_version) != (job.model_id, job.model_version):
            raise RuntimeError(f"the embedding service now runs {model.model_id} {model.model_version}, not "
                               f"{job.model_id} {job.model_version}: re-embed again with the model it runs")
        return model

    async def _reembed(self, job: J.JobRecord) -> None:
        """Every stored image of the gallery (image ids 0..n-1, in batches) through detection (the face the photo
        is about, chips for the new model) and embedding into the next generation's index; a restart resumes at
        the cursor. Searches keep the old index meanwhile; the swap is one metadata update under the gallery's
        lock, then the old vectors are deleted. An image the new model finds no face in (or a deleted image)
        holds its id with a removed placeholder, so ids stay the gallery's image ids."""
        g = self.gallery(job.gallery)
        if (g.model_id, g.model_version) == (job.model_id, job.model_version):  # swapped before a restart
            await self._write(self.store.drop_generation, g.name, g.generation - 1)  # if not yet deleted
            self._finish(job, J.SUCCEEDED)
            return
        model = await self._same_as_job(job)
        new = self._staged(g, job, model)
        indexes = [await self._write(self.store.index, new, c) for c in new.components]
        for idx in indexes:  # vectors written after the last checkpoint (a restart) are done again
            if isinstance(idx, EmbeddedIndex):
                await self._write(idx.truncate, job.cursor.item_index)
        folder = self.image_root / g.name / "images"
        lock = self.gallery_locks.setdefault(g.name, asyncio.Lock())
        while True:
            self._check(job)
            total = self.store.next_image_id(g.name)  # images added meanwhile (the old model back) are included
            job.progress.items_total = job.progress.frames_total = total
            start = job.cursor.item_index
            if start >= total:
                async with lock:
                    if self.store.next_image_id(g.name) == total:
                        await self._write(self.store.save_all)
                        self.store.replace(new)
                        break
                continue
            ids = list(range(start, min(total, start + self.svc.config.job_batch)))
            rows = self.store.images(g.name, ids)
            todo: list[tuple[int, list]] = []
            for image_id in ids:
                row = rows.get(image_id)
                if row is None:
                    continue  # deleted
                try:
                    data = await asyncio.to_thread((folder / row.file).read_bytes)
                    det = await self.faces.detect(data, timeout=120)
                except OSError as exc:
                    self._note(job, f"image {image_id}: cannot read the stored image ({type(exc).__name__})")
                    continue
                except grpc.aio.AioRpcError as exc:
                    if exc.code().name not in limits.IMAGE_REFUSALS:
                        raise
                    self._note(job, f"image {image_id}: {exc.details()[:100]}")
                    continue
                if not det.faces:
                    self._note(job, f"image {image_id}: no face found")
                    continue
                todo.append((image_id, list(det.faces[_central(det)].chips)))
            vectors = await self._embed([chips for _, chips in todo]) if todo else {}
            await self._same_as_job(job)  # vectors of one model only: the service did not change meanwhile
            done = {image_id: n for n, (image_id, _) in enumerate(todo)}
            batch_ids = np.arange(start, start + len(ids), dtype=np.int64)
            missing = np.array([x for x in ids if x not in done], dtype=np.int64)
            for c, idx in zip(new.components, indexes, strict=True):
                block = np.zeros((len(ids), c.dim), dtype=np.float32)
                block[:, 0] = 1.0  # a unit placeholder for an image not embedded (removed below)
                for i, image_id in enumerate(ids):
                    if image_id in done:
                        block[i] = vectors[c.model_id][done[image_id]]
                if isinstance(idx, EmbeddedIndex):  # its rows are image ids: a placeholder holds the place
                    await self._write(idx.add, batch_ids, block)
                    if len(missing):
                        await self._write(idx.remove, missing)
                else:  # Qdrant: points by id, only the embedded ones
                    keep = np.array([image_id in done for image_id in ids], dtype=bool)
                    if keep.any():
                        await self._write(idx.add, batch_ids[keep], block[keep])
            job.progress.faces_found += len(todo)
            job.progress.frames_done += len(ids)
            job.progress.items_done += len(ids)
            job.cursor = J.Cursor(item_index=start + len(ids))
            self._tick(job)
            self._save_job(job)
        self.log.info("gallery.reembedded", gallery=g.name, job_id=job.job_id)
        await self._write(self.store.drop_indexes, g)  # the old model's vectors
        self._finish(job, J.SUCCEEDED)

    def _reembed_finished(self, job: J.JobRecord, state: int) -> None:
        g = self.store.get(job.gallery)
        if state != J.SUCCEEDED and g is not None and (g.model_id, g.model_version) != (job.model_id,
                                                                                       job.model_version):
            self.store.drop_generation(g.name, g.generation + 1)  # the unfinished index: the gallery keeps its own
        action = {J.SUCCEEDED: "gallery_reembedded", J.FAILED: "gallery_reembed_failed",
                  J.CANCELLED: "gallery_reembed_cancelled"}[state]
        p = job.progress
        self.event(action, job.cancelled_by if state == J.CANCELLED else job.actor, gallery=job.gallery,
                   job_id=job.job_id, images_accepted=p.faces_found, images_refused=p.results,
                   reason=(f"to {job.model_id} {job.model_version}" + (f"; {job.error}" if job.error else ""))[:500])
        self.log.info("job." + action, job_id=job.job_id, images=p.faces_found)

    @staticmethod
    def _note(job: J.JobRecord, what: str) -> None:
        job.progress.results += 1  # of a re-embedding: images it could not embed (they are not searchable)
        if len(job.error) < 400:
            job.error = "; ".join(x for x in (job.error, what) if x)[:500]

    def _tick(self, job: J.JobRecord) -> None:
        now = time.monotonic()
        job.progress.run_seconds += now - self._last_tick.get(job.job_id, now)
        self._last_tick[job.job_id] = now

    async def add_gallery_images(self, req: pb.AddGalleryImagesRequest, captured: list[int]
                                 ) -> pb.AddGalleryImagesResponse:
        try:
            check_gallery_name(req.gallery)
        except ValueError as exc:
            raise Refused("INVALID_ARGUMENT", f"gallery: {exc}") from None
        lock = self.gallery_locks.setdefault(req.gallery, asyncio.Lock())
        async with lock:
            g = self.store.get(req.gallery)
            if g is None:
                model = await self.model(fresh=True)
                g = GalleryRecord(req.gallery, model.model_id, model.model_version,
                                  tuple(Component(c.model_id, c.model_version, c.dim, c.metric)
                                        for c in model.components),
                                  req.actor, self.svc.now_ns(), model.default_threshold)
                self.store.create(g)
            else:
                await self._gallery_model(g, "add images")
            digests = [hashlib.sha256(x).hexdigest() for x in req.images]
            known = self.store.known_sha256(g.name, digests)
            results: list[pb.GalleryImageResult] = []
            todo: list[tuple[int, list, int]] = []  # (index, chips of the chosen face, faces found)
            seen: set[str] = set()
            for i, image in enumerate(req.images):
                r = pb.GalleryImageResult(index=i, sha256=digests[i])
                if digests[i] in known or digests[i] in seen:
                    r.duplicate, r.reason = True, "already in the gallery"
                    results.append(r)
                    continue
                try:
                    limits.check_image(image, self.svc.config)  # size and declared pixels, before detection
                    det = await self.faces.detect(image, timeout=60)
                except limits.InputError as exc:
                    r.reason = exc.message
                    results.append(r)
                    continue
                except grpc.aio.AioRpcError as exc:
                    if exc.code().name not in limits.IMAGE_REFUSALS:
                        raise
                    r.reason = exc.details()
                    results.append(r)
                    continue
                r.faces_found = len(det.faces)
                if not det.faces:
                    r.reason = "no face found"
                    results.append(r)
                    continue
                seen.add(digests[i])
                todo.append((i, list(det.faces[_central(det)].chips), len(det.faces)))
                results.append(r)
            if todo:
                vectors = await self._embed([chips for _, chips, _ in todo])  # component -> (n, dim)
                rows = []
                first = self.store.next_image_id(g.name)
                folder = self.image_root / g.name / "images"
                for n, (i, _chips, _faces) in enumerate(todo):
                    image_id = first + n
                    await asyncio.to_thread(_write_file, folder / f"{image_id}.img", req.images[i])
                    rows.append(ImageRow(image_id, req.subject_ref, digests[i], f"{image_id}.img", captured[i],
                                         req.source_system, req.legal_basis, req.actor, self.svc.now_ns(),
                                         results[i].faces_found))
                    results[i].accepted, results[i].image_id = True, image_id
                ids = np.arange(first, first + len(todo), dtype=np.int64)
                for c in g.components:
                    idx = await self._write(self.store.index, g, c)
                    await self._write(idx.add, ids, vectors[c.model_id])
                self.store.put_images(g.name, rows)
                await self._write(self.store.save_all, 20_000)
            added = sum(r.accepted for r in results)
            self.event("gallery_images_added", req.actor, gallery=g.name, subject_ref=req.subject_ref,
                       images_accepted=added, images_refused=sum(not r.accepted and not r.duplicate for r in results),
                       source_system=req.source_system, legal_basis=req.legal_basis)
            return pb.AddGalleryImagesResponse(gallery=g.name, subject_ref=req.subject_ref, images_added=added,
                                               results=results)

    async def _embed(self, chips_per_face: list[list]) -> dict[str, np.ndarray]:
        """One vector per face and component: component model id -> (faces, dim), in face order."""
        return {mid: v for (mid, _version), v in (await self.faces.embed(chips_per_face)).items()}

    # Search --------------------------------------------------------------------------------------------------
    def _gallery_hits(self, g: GalleryRecord, probes: dict[str, np.ndarray], k: int
                      ) -> list[list[tuple[str, float, dict]]]:
        """Per probe: (subject_ref, score, info) of the best images, scored exactly by the model's rule."""
        n = len(next(iter(probes.values())))
        fetch = max(4 * k, 40)
        cand: list[set[int]] = [set() for _ in range(n)]
        sims: dict[str, list[dict[int, float]]] = {}
        for c in g.components:
            ids, s = self.store.index(g, c).search(probes[c.model_id], fetch)
            sims[c.model_id] = [{int(a): float(b) for a, b in zip(ids[i], s[i], strict=True) if a >= 0}
                                for i in range(n)]
            for i in range(n):
                cand[i] |= sims[c.model_id][i].keys()
        recipe = scoring.recipe(g.model_id)
        rows = self.store.images(g.name, sorted(set().union(*cand)))
        out = []
        for i in range(n):
            ids = sorted(x for x in cand[i] if x in rows)
            if not ids:
                out.append([])
                continue
            if not recipe.fused:
                scores = np.array([sims[g.components[0].model_id][i][x] for x in ids])
            else:  # fusion: every component's similarity for the union, exactly, then the model's combination
                per = {}
                for c in g.components:
                    vecs = self.store.index(g, c).vectors(np.array(ids))
                    per[c.model_id] = recipe.similarity(c.model_id, probes[c.model_id][i], vecs)[0]
                scores = recipe.combine(per)
            hits = []
            for x, s in zip(ids, scores, strict=True):
                r = rows[x]
                hits.append((r.subject_ref, float(s), {"subject_ref": r.subject_ref, "image_id": x,
                                                       "source_system": r.source_system,
                                                       "legal_basis": r.legal_basis, "captured_ns": r.captured_ns}))
            out.append(hits)
        return out

    async def target(self, gallery: str, deployment_id: str):
        """(gallery record or deployment record, default threshold, size, model id, model version)."""
        if gallery:
            g = self.gallery(gallery)
            await self._gallery_model(g, "search it")
            images, _ = self.store.counts(g.name)
            return g, g.default_threshold, images, g.model_id, g.model_version
        d = await self._watchlist_call(self.svc.watchlist.GetDeployment,
                                       watchlist_pb2.GetDeploymentRequest(deployment_id=deployment_id))
        if d.purged_at.seconds or d.purged_at.nanos:  # (the field is always present: zero when not purged)
            raise Refused("FAILED_PRECONDITION", f"the watchlist of deployment {d.id} has been purged")
        refusal = model_mismatch(await self.model(fresh=True), d.model_id, d.model_version, "search its watchlist",
                                 f"deployment {d.id}'s watchlist", "re-embed the watchlist (ReembedWatchlist) first")
        if refusal:
            raise Refused("FAILED_PRECONDITION", refusal)
        return d, d.threshold, d.watchlist_size, d.model_id, d.model_version

    @staticmethod
    async def _watchlist_call(method, request):
        """A call to the watchlist service; its refusal (no such deployment, ...) is passed on as it is."""
        try:
            return await method(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE):
                raise Refused(exc.code().name, exc.details() or "the watchlist service refused") from None
            raise

    async def hits(self, target, probes: dict[str, np.ndarray], k: int) -> list[list[tuple[str, float, dict]]]:
        if isinstance(target, GalleryRecord):
            return await self._read(self._gallery_hits, target, probes, k)
        n = len(next(iter(probes.values())))
        model = await self.model()
        probe_pbs = [watchlist_pb2.Probe(vectors=[common_pb2.Vector(model_id=c.model_id, model_version=c.model_version,
                                                         values=probes[c.model_id][i].tolist())
                                       for c in model.components]) for i in range(n)]
        lists = []
        for start in range(0, n, limits.MAX_PROBES_PER_REQUEST):  # a job's batch may hold more faces than one call
            found = await self._watchlist_call(self.svc.watchlist.Search, watchlist_pb2.SearchRequest(
                deployment_id=target.id, probes=probe_pbs[start: start + limits.MAX_PROBES_PER_REQUEST],
                k=min(100, k)))
            lists.extend(found.results)
        return [[(c.entry_id, c.score, {"entry_id": c.entry_id, "subject_ref": c.subject_ref,
                                        "category": c.category}) for c in cl.candidates] for cl in lists]

    # Operator-initiated identification ------------------------------------------------------------------------
    async def identify(self, req: pb.IdentifyRequest) -> pb.IdentifyResponse:
        limits.check_image(req.image, self.svc.config, what="probe image")  # size and pixels, before anything
        target, default_thr, size, model_id, model_version = await self.target(req.gallery, req.deployment_id)
        k = req.k or 10
        threshold = checked_threshold(req.threshold, default_thr, model_id)
        search_id = events.new_id()[:16]
        try:
            det = await self.faces.detect(req.image, crops=True, timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code().name in limits.IMAGE_REFUSALS:
                raise Refused(exc.code().name, exc.details()) from None
            raise
        faces = [pb.FoundFace(face=i + 1, box=f.box, quality=f.quality, crop_jpeg=f.crop_jpeg)
                 for i, f in enumerate(det.faces)]
        outcome, index, message = choose_face(len(det.faces), req.face)
        if outcome == -1:
            raise Refused("INVALID_ARGUMENT", message)
        resp = pb.IdentifyResponse(outcome=outcome, message=message, faces=faces, threshold=threshold,
                                   model_id=model_id, model_version=model_version, gallery_size=size,
                                   search_id=search_id, width=det.width, height=det.height)
        if outcome == SEARCHED:
            vectors = await self._embed([list(det.faces[index].chips)])
            hits = (await self.hits(target, vectors, k))[0]
            ranked = rank(hits, k, threshold, req.investigation)
            resp.face = index + 1
            resp.candidates.extend(candidate_pb(n + 1, r) for n, r in enumerate(ranked))
            above = sum(r.above for r in ranked)
            resp.message = (f"{len(ranked)} candidate(s), {above} at or above the threshold {threshold:.3f}"
                            if req.investigation else f"{len(ranked)} candidate(s) at or above the threshold "
                            f"{threshold:.3f}")
        del det  # the probe and its face are not kept
        self.event("identification_search", req.actor, deployment_id=req.deployment_id,
                   gallery=req.gallery, case_reference=req.case_reference, justification=req.justification,
                   candidates_returned=len(resp.candidates), search_id=search_id, faces_found=len(faces), k=k,
                   investigation=req.investigation, threshold=threshold,
                   reason=pb.IdentifyOutcome.Name(resp.outcome).removeprefix("IDENTIFY_OUTCOME_").lower())
        return resp

    # Jobs ----------------------------------------------------------------------------------------------------
    def _jobs(self) -> list[J.JobRecord]:
        return [J.JobRecord.from_json(json.loads(r[0]))
                for r in self.jobs_db.execute("SELECT record FROM jobs ORDER BY rowid")]

    def get_job(self, job_id: str) -> J.JobRecord:
        row = self.jobs_db.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise Refused("NOT_FOUND", f"no job {job_id!r}")
        return J.JobRecord.from_json(json.loads(row[0]))

    def _save_job(self, job: J.JobRecord, results: list[pb.JobResult] = ()) -> None:
        """The job record and the results found since the last save, in one transaction."""
        with self.jobs_lock:
            self.jobs_db.execute("BEGIN")
            self.jobs_db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (job.job_id, json.dumps(job.to_json())))
            self.jobs_db.executemany("INSERT OR REPLACE INTO job_results VALUES (?, ?, ?)",
                                     [(job.job_id, r.seq, r.SerializeToString()) for r in results])
            self.jobs_db.execute("COMMIT")

    def results(self, job_id: str, after_seq: int) -> list[pb.JobResult]:
        rows = self.jobs_db.execute("SELECT data FROM job_results WHERE job_id = ? AND seq > ? ORDER BY seq",
                                    (job_id, after_seq)).fetchall()
        return [pb.JobResult.FromString(r[0]) for r in rows]

    def job_pb(self, job: J.JobRecord) -> pb.Job:
        p = job.progress
        prog = pb.JobProgress(items_total=p.items_total, items_done=p.items_done, frames_total=p.frames_total,
                              frames_done=p.frames_done, faces_found=p.faces_found, appearances=p.appearances,
                              results=p.results, media_seconds_done=p.media_seconds_done)
        if job.state == J.RUNNING and job.job_id in self.run_stats:
            t0, frames0, _media0 = self.run_stats[job.job_id]
            prog.eta_s = J.eta_s(p.frames_total - p.frames_done, p.frames_done - frames0, time.monotonic() - t0)
        if p.run_seconds > 0:
            prog.realtime_factor = p.media_seconds_done / p.run_seconds
        if job.items and job.state == J.RUNNING and job.cursor.item_index < len(job.items):
            prog.current_item = job.items[job.cursor.item_index].location
        if job.reembed and job.state == J.RUNNING:
            prog.current_item = f"image {job.cursor.item_index}"
        media = [pb.MediaSource(url=m["url"]) if "url" in m else pb.MediaSource(path=m["path"]) for m in job.media]
        return pb.Job(job_id=job.job_id, state=job.state, media=media, gallery=job.gallery,
                      deployment_id=job.deployment_id, case_reference=job.case_reference,
                      justification=job.justification, actor=job.actor, k=job.k, threshold=job.threshold,
                      investigation=job.investigation, fps=job.fps, model_id=job.model_id,
                      model_version=job.model_version, progress=prog, submitted_at=_ts(job.submitted_at_ns),
                      started_at=_ts(job.started_at_ns), finished_at=_ts(job.finished_at_ns), error=job.error,
                      resumes=job.resumes, cancelled_by=job.cancelled_by, kind=job.kind)

    def list_jobs(self) -> list[J.JobRecord]:
        return self._jobs()

    async def submit(self, req: pb.SubmitJobRequest) -> pb.Job:
        error = J.validate_job(req)
        if error:
            raise Refused("INVALID_ARGUMENT", error)
        cfg = self.svc.config
        media = [{"url": m.url} if m.WhichOneof("source") == "url" else {"path": m.path} for m in req.media]
        await asyncio.to_thread(check_media, media, cfg.media_roots, cfg.source_hosts)
        if self.queue.qsize() >= limits.MAX_QUEUED_JOBS:
            raise limits.InputTooLarge(f"{self.queue.qsize()} jobs are waiting to run; at most "
                                       f"{limits.MAX_QUEUED_JOBS} may wait (submit later)")
        _target, default_thr, _size, model_id, model_version = await self.target(req.gallery, req.deployment_id)
        job = J.JobRecord(job_id=events.new_id()[:16], media=media, gallery=req.gallery,
                          deployment_id=req.deployment_id, case_reference=req.case_reference,
                          justification=req.justification, actor=req.actor, k=req.k or 5,
                          threshold=checked_threshold(req.threshold, default_thr, model_id),
                          investigation=req.investigation,
                          fps=req.fps or self.svc.config.job_fps, model_id=model_id, model_version=model_version,
                          submitted_at_ns=self.svc.now_ns())
        self._save_job(job)
        self.event("identification_job_submitted", req.actor, deployment_id=req.deployment_id, gallery=req.gallery,
                   case_reference=req.case_reference, justification=req.justification, job_id=job.job_id, k=job.k,
                   investigation=job.investigation, media_items=len(media), threshold=job.threshold)
        self.queue.put_nowait(job.job_id)
        return self.job_pb(job)

    async def cancel(self, job_id: str, actor: str, reason: str) -> pb.Job:
        if not actor.strip():
            raise Refused("INVALID_ARGUMENT", "actor is required")
        job = self.get_job(job_id)
        if job.state in J.FINISHED:
            raise Refused("FAILED_PRECONDITION", f"job {job_id} has already ended: {J.state_name(job.state)}")
        if job.state == J.QUEUED:
            job.cancelled_by = actor
            self._finish(job, J.CANCELLED, reason or "cancelled")
        else:
            self.cancelled[job_id] = actor
            for _ in range(600):  # the runner stops at the end of its current batch
                await asyncio.sleep(0.05)
                job = self.get_job(job_id)
                if job.state in J.FINISHED:
                    break
        return self.job_pb(self.get_job(job_id))

    def _work_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _finish(self, job: J.JobRecord, state: int, error: str = "") -> None:
        job.state, job.finished_at_ns = state, self.svc.now_ns()
        if error:
            job.error = error
        self._save_job(job)
        shutil.rmtree(self._work_dir(job.job_id), ignore_errors=True)  # the job's biometric intermediates
        self.cancelled.pop(job.job_id, None)
        self.run_stats.pop(job.job_id, None)
        self._last_tick.pop(job.job_id, None)
        if job.reembed:
            self._reembed_finished(job, state)
            return
        action = {J.SUCCEEDED: "finished", J.FAILED: "failed", J.CANCELLED: "cancelled"}[state]
        self.event(f"identification_job_{action}", job.cancelled_by if state == J.CANCELLED else job.actor,
                   deployment_id=job.deployment_id, gallery=job.gallery, case_reference=job.case_reference,
                   justification=job.justification, job_id=job.job_id, media_items=job.progress.items_total,
                   frames_processed=job.progress.frames_done, faces_found=job.progress.faces_found,
                   results=job.progress.results, reason=job.error[:500])
        self.log.info("job." + action, job_id=job.job_id, results=job.progress.results)

    async def _run_jobs(self) -> None:
        while True:
            job_id = await self.queue.get()
            try:
                await self._run(job_id)
            except asyncio.CancelledError:
                raise
            except JobCancelled:
                job = self.get_job(job_id)
                job.cancelled_by = self.cancelled.get(job_id, "")
                self._finish(job, J.CANCELLED, "cancelled")
            except Exception as exc:  # a failing job never stops the runner
                self.log.error("job.failed", job_id=job_id, error=type(exc).__name__, detail=str(exc)[:300])
                with contextlib.suppress(Exception):
                    self._finish(self.get_job(job_id), J.FAILED, f"{type(exc).__name__}: {exc}"[:500])

    def _check(self, job: J.JobRecord) -> None:
        if job.job_id in self.cancelled:
            raise JobCancelled()

    async def _run(self, job_id: str) -> None:
        job = self.get_job(job_id)
        if job.state in J.FINISHED:
            return
        self._check(job)
        job.state = J.RUNNING
        job.started_at_ns = job.started_at_ns or self.svc.now_ns()
        if job.reembed:
            self._save_job(job)
            self.run_stats[job.job_id] = (time.monotonic(), job.progress.frames_done, 0.0)
            self._last_tick[job.job_id] = time.monotonic()
            await self._reembed(job)
            return
        target, *_ = await self.target(job.gallery, job.deployment_id)
        if job.items is None:
            cfg = self.svc.config
            job.items = await asyncio.to_thread(resolve_items, job.media, job.fps, cfg.media_roots,
                                                cfg.source_hosts, cfg.max_image_pixels)
            job.progress.items_total = len(job.items)
            job.progress.frames_total = sum(i.frames_est for i in job.items)
            bad = [f"{i.location}: {i.error}" for i in job.items if i.error]
            if bad:
                job.error = "; ".join(bad)[:500]
        self._save_job(job)
        self.run_stats[job.job_id] = (time.monotonic(), job.progress.frames_done, job.progress.media_seconds_done)
        self._last_tick[job.job_id] = time.monotonic()
        tracker = self._tracker(target)
        work = self._work_dir(job.job_id)
        if job.cursor.checkpoint and (work / f"tracks-{job.cursor.checkpoint}.json").is_file():
            tracker.restore(json.loads((work / f"tracks-{job.cursor.checkpoint}.json").read_text()))
        while job.cursor.item_index < len(job.items):
            self._check(job)
            idx = job.cursor.item_index
            item = job.items[idx]
            if item.error:
                self._advance(job, idx + 1, tracker, [])
            elif item.video:
                await self._video(job, target, idx, item, tracker)
            else:  # consecutive images go through in batches
                batch = [idx]
                while (len(batch) < self.svc.config.job_batch and batch[-1] + 1 < len(job.items)
                       and not job.items[batch[-1] + 1].video and not job.items[batch[-1] + 1].error):
                    batch.append(batch[-1] + 1)
                frames = []
                for i in batch:
                    try:
                        data = await asyncio.to_thread(limits.read_image_file, job.items[i].location,
                                                       self.svc.config)
                    except (limits.InputError, OSError) as exc:
                        self._item_failed(job, job.items[i], exc.message if isinstance(exc, limits.InputError)
                                          else f"cannot read: {type(exc).__name__}")
                        continue
                    frames.append((i, 0.0, 0, data))
                found = await self._frames(job, target, frames, tracker, images=True) if frames else []
                self._advance(job, batch[-1] + 1, tracker, found)
        if job.items and all(i.error for i in job.items):
            self._finish(job, J.FAILED, job.error or "no media item could be read")
        else:
            self._finish(job, J.SUCCEEDED)

    def _tracker(self, target) -> J.AppearanceTracker:
        if isinstance(target, GalleryRecord):
            c = target.components[0]
            cid, metric = c.model_id, c.metric
        else:
            m = self.faces.current
            cid, metric = m.components[0].model_id, m.components[0].metric
        known = scoring.COMPONENTS.get(cid)
        link = known.threshold_1to1 if known else 0.4  # the engine's one-to-one threshold links one person's faces
        return J.AppearanceTracker(lambda a, b: float(scoring.similarity_rows(metric, a, b)),
                                   link, gap_s=2.0, normalise=metric == scoring.COSINE)

    async def _video(self, job: J.JobRecord, target, idx: int, item: J.Item, tracker: J.AppearanceTracker):
        after = job.cursor.item_time_s
        try:
            reader = await asyncio.to_thread(FrameReader, item.location, job.fps, after,
                                             self.svc.config.max_image_pixels)
        except Exception as exc:
            self._item_failed(job, item, exc.message if isinstance(exc, limits.InputError)
                              else f"cannot open: {type(exc).__name__}: {exc}")
            self._advance(job, idx + 1, tracker, [])
            return
        try:
            while True:
                self._check(job)
                try:
                    batch = await asyncio.to_thread(reader.next_batch, self.svc.config.job_batch)
                except limits.InputError as exc:  # frames over the pixel limit part way through
                    self._item_failed(job, item, exc.message)
                    break
                if not batch:
                    break
                frames = [(idx, t, fi, data) for t, fi, data in batch]
                found = await self._frames(job, target, frames, tracker, images=False)
                job.progress.media_seconds_done += batch[-1][0] - max(0.0, job.cursor.item_time_s)
                job.cursor.item_time_s, job.cursor.frame_index = batch[-1][0], batch[-1][1]
                self._checkpoint(job, tracker, found)
        finally:
            await asyncio.to_thread(reader.close)
        self._advance(job, idx + 1, tracker, self._report(job, tracker.close_all()))

    @staticmethod
    def _item_failed(job: J.JobRecord, item: J.Item, error: str) -> None:
        item.error = error[:200]
        job.error = "; ".join(x for x in (job.error, f"{item.location}: {item.error}") if x)[:500]

    def _advance(self, job: J.JobRecord, next_index: int, tracker: J.AppearanceTracker, found: list) -> None:
        job.progress.items_done += next_index - job.cursor.item_index
        job.cursor = J.Cursor(item_index=next_index, checkpoint=job.cursor.checkpoint)
        self._checkpoint(job, tracker, found)

    def _checkpoint(self, job: J.JobRecord, tracker: J.AppearanceTracker, found: list[pb.JobResult]) -> None:
        """Open appearances to the job's folder first, then progress and results in one transaction."""
        now = time.monotonic()
        job.progress.run_seconds += now - self._last_tick.get(job.job_id, now)
        self._last_tick[job.job_id] = now
        work = self._work_dir(job.job_id)
        old = job.cursor.checkpoint
        job.cursor.checkpoint = old + 1
        if tracker.open:
            work.mkdir(parents=True, exist_ok=True)
            _write_file(work / f"tracks-{job.cursor.checkpoint}.json", json.dumps(tracker.state()).encode())
        self._save_job(job, found)
        if old:
            (work / f"tracks-{old}.json").unlink(missing_ok=True)

    async def _frames(self, job: J.JobRecord, target, frames: list[tuple[int, float, int, bytes]],
                      tracker: J.AppearanceTracker, images: bool) -> list[pb.JobResult]:
        """Detect (one frame at a time), embed (one call per batch), search, track; returns the results of the
        appearances that closed."""
        detected = []
        for item_index, t, fi, data in frames:
            try:
                det = await self.faces.detect(data, timeout=120)
                faces = [f for f in det.faces if f.quality.inter_eye_px >= self.svc.config.min_face_px]
            except grpc.aio.AioRpcError as exc:
                if exc.code().name not in limits.IMAGE_REFUSALS:
                    raise
                faces = []
                if images:
                    item = job.items[item_index]
                    item.error = exc.details()[:200]
            detected.append((item_index, t, fi, faces))
        all_faces = [f for *_, faces in detected for f in faces]
        found: list[pb.JobResult] = []
        hits: list = []
        vectors: dict[str, np.ndarray] = {}
        if all_faces:
            vectors = await self._embed([list(f.chips) for f in all_faces])
            hits = await self.hits(target, vectors, job.k)
        link = next(iter(vectors)) if vectors else ""
        n = 0
        for item_index, t, fi, faces in detected:
            sightings = []
            for f in faces:
                sightings.append(J.Sighting(t, fi, _box(f.box), vectors[link][n],
                                            [J.Hit(key, score, info) for key, score, info in hits[n]]))
                n += 1
            job.progress.faces_found += len(faces)
            job.progress.frames_done += 1
            found += self._report(job, tracker.observe(item_index, t, sightings))
            if images:
                found += self._report(job, tracker.close_all())
        return found

    def _report(self, job: J.JobRecord, closed: list[J.Appearance]) -> list[pb.JobResult]:
        out = []
        for a in closed:
            job.progress.appearances += 1
            ranked = a.ranked(job.k, job.threshold, job.investigation)
            if not ranked:
                continue  # nobody of the gallery: the appearance is dropped here
            job.progress.results += 1
            top = ranked[0][1]
            item = job.items[a.item_index]
            out.append(pb.JobResult(
                job_id=job.job_id, seq=job.progress.results, item=item.location, item_index=a.item_index,
                video=item.video, start_s=a.start_t, end_s=a.last_t, best_time_s=top.t,
                best_frame_index=top.frame_index,
                best_box=common_pb2.Box(x1=top.box[0], y1=top.box[1], x2=top.box[2], y2=top.box[3]),
                sightings=a.sightings,
                candidates=[candidate_pb(i + 1, Ranked(key, b.score, b.score >= job.threshold, b.info))
                            for i, (key, b) in enumerate(ranked)]))
        return out


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)

