"""Watchlist service: deployments and their lifecycle, the reference collection, bespoke watchlists with the
policy and quality gate, authorisation, the sweeper (automatic end, purge), and search. (Galleries,
operator-initiated identification and retrospective jobs are the identification service's.)

The gRPC servicer only checks request fields (a refusal becomes its status in the shared ErrorInterceptor); the decisions are in the pure
core (`core.py`, `policy.py`). Every decision is published as a durable event (lifecycle or watchlist).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from lfr.errors import Refused
from lfr.models import nonmated, scoring
from lfr.models.face_choice import Candidate
from lfr.pb import (
    audit_pb2,
    common_pb2,
    embedding_pb2,
    watchlist_pb2_grpc,
)
from lfr.pb import (
    watchlist_pb2 as pb,
)
from lfr.policy import Policy, PolicyError, parse_policy
from lfr.runtime import clock, events, limits, subjects
from lfr.runtime.config import ConfigError
from lfr.runtime.faces import EmbeddingUnavailable, FaceStages, model_mismatch
from lfr.runtime.outbox import Outbox
from lfr.runtime.security import caller_name
from lfr.runtime.service import Runtime, Service
from lfr.vectorindex import VectorIndex, collection_name
from lfr.watchlist.core import (
    ACTIVE,
    AUTHORISED,
    SWEEPER,
    DeploymentRecord,
    EntryRecord,
    ImageRecord,
    composition_digest,
    status_name,
    validate_governance,
    validate_new_deployment,
    watchlist_violations,
)
from lfr.watchlist.store import ImageStore, MetadataStore

REFERENCE = "reference"  # the watchlist-event subject token of the reference collection
_SUBJECT_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:-]{0,63}$")
QUALITY_FIELDS = ("inter_eye_px", "sharpness", "yaw_deg", "pitch_deg", "roll_deg", "detector_score")


def load_policy(path: str) -> Policy:
    """The policy file named by LFR_POLICY_FILE, or the example shipped with the package."""
    try:
        if path:
            text = Path(path).read_text()
        else:
            from importlib.resources import files

            text = (files("lfr.watchlist") / "default_policy.json").read_text()
        return parse_policy(text)
    except OSError as exc:
        raise ConfigError(f"LFR_POLICY_FILE: cannot read the file ({exc.strerror})") from None
    except PolicyError as exc:
        raise ConfigError(f"LFR_POLICY_FILE: invalid policy: {exc}") from None


def _ts(ns: int) -> Timestamp:
    return events.ts_from_ns(ns) if ns else Timestamp()


def _images_faces(request) -> list[int]:
    """The face to enroll in each image (``face``: none, one for all, or one per image; 1-based, 0 = the
    policy decides)."""
    n, chosen = len(request.images), list(request.face)
    if any(f < 0 for f in chosen):
        raise Refused("INVALID_ARGUMENT", "face: faces are numbered from 1 (0 = the policy decides)")
    if not chosen:
        return [0] * n
    if len(chosen) == 1:
        return chosen * n
    if len(chosen) == n:
        return chosen
    raise Refused("INVALID_ARGUMENT", "face: give none, one for all images, or one per image")


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"


def quality_pb(q: dict) -> common_pb2.FaceQuality:
    return common_pb2.FaceQuality(**{k: q.get(k, 0.0) for k in QUALITY_FIELDS})


def entry_pb(e: EntryRecord) -> pb.Entry:
    return pb.Entry(
        entry_id=e.entry_id, subject_ref=e.subject_ref, category=e.category, source_system=e.source_system,
        legal_basis=e.legal_basis, vectors=e.vectors, added_by=e.added_by, added_at=_ts(e.added_at_ns),
        under_18=e.under_18, image_count=e.image_count, from_reference=e.from_reference,
        images=[pb.EntryImage(captured_at=_ts(i.captured_ns), quality=quality_pb(i.quality), sha256=i.sha256,
                              face=i.face, face_choice=i.face_choice) for i in e.images])


class WatchlistServicer(watchlist_pb2_grpc.WatchlistServiceServicer):
    def __init__(self, svc: WatchlistService):
        self.svc = svc

    # Deployments -----------------------------------------------------------------------------------
    async def CreateDeployment(self, request, context):
        model = await self.svc.model()
        error, threshold = validate_new_deployment(request, self.svc.recipe(model))
        error = error or validate_governance(request, self.svc.now_ns(), self.svc.policy, model.model_id, threshold)
        if error:
            raise Refused("INVALID_ARGUMENT", error)
        return await self.svc.create(request, threshold, model)

    async def GetDeployment(self, request, context):
        return self.svc.deployment_pb(await self.svc.current(request.deployment_id))

    async def ListDeployments(self, request, context):
        out = []
        for d in self.svc.meta.list_deployments():
            out.append(self.svc.deployment_pb(await self.svc.current(d.id)))
        return pb.ListDeploymentsResponse(deployments=out)

    async def AuthoriseDeployment(self, request, context):
        return await self.svc.authorise(request.deployment_id, request.actor, request.watchlist_digest)

    async def StartDeployment(self, request, context):
        if request.urgent:
            return await self.svc.start_urgent(request.deployment_id, request.actor, request.rank, request.reason)
        return await self.svc.start_deployment(request.deployment_id, request.actor)

    async def EndDeployment(self, request, context):
        return await self.svc.end(request.deployment_id, request.actor, request.reason or "ended by an officer")

    async def CancelDeployment(self, request, context):
        return await self.svc.cancel(request.deployment_id, request.actor, request.reason or "cancelled")

    async def ReembedWatchlist(self, request, context):
        return await self.svc.reembed(request.deployment_id, request.actor)

    # Watchlists ------------------------------------------------------------------------------------
    @staticmethod
    def _subject_ref(subject_ref: str) -> None:
        if not _SUBJECT_REF.match(subject_ref or ""):
            raise Refused("INVALID_ARGUMENT", "subject_ref is required: a nominal id of 1-64 letters, digits "
                          "or . _ / : -")

    def _provenance(self, request) -> None:
        """Images held outside a deployment (references, galleries) must say whose, from where and on what basis."""
        self._subject_ref(request.subject_ref)
        for name in ("source_system", "legal_basis", "actor"):
            if not getattr(request, name).strip():
                raise Refused("INVALID_ARGUMENT", f"{name} is required")

    def _entry_fields(self, subject_ref: str, category: int) -> None:
        self._subject_ref(subject_ref)
        if category == pb.CATEGORY_UNSPECIFIED:
            raise Refused("INVALID_ARGUMENT", "category is required")
        if category not in pb.Category.values():
            raise Refused("INVALID_ARGUMENT", f"unknown category {category}")

    async def EnrollEntry(self, request, context):
        d = await self.svc.current(request.deployment_id)
        self._entry_fields(request.subject_ref, request.category)
        captured = limits.images_captured(request)
        return await self.svc.enroll(
            d.id, subject_ref=request.subject_ref, category=request.category, source_system=request.source_system,
            legal_basis=request.legal_basis, images=list(request.images), captured=captured,
            under_18=request.under_18, actor=request.actor, faces=_images_faces(request))

    async def AddFromReference(self, request, context):
        d = await self.svc.current(request.deployment_id)
        if not request.subject_refs:
            raise Refused("INVALID_ARGUMENT", "at least one subject_ref is required")
        limits.check_count(len(request.subject_refs), limits.MAX_REFS_PER_REQUEST, "subject_refs")
        self._entry_fields(request.subject_refs[0], request.category)
        out = []
        for ref in request.subject_refs:
            out.append(await self.svc.add_from_reference(d.id, ref, request.category, request.legal_basis,
                                                         request.actor))
        return pb.AddFromReferenceResponse(entries=out)

    async def RemoveEntry(self, request, context):
        return await self.svc.remove_entry(request.deployment_id, request.entry_id, request.actor, request.reason)

    async def ListEntries(self, request, context):
        d = await self.svc.current(request.deployment_id)
        entries = self.svc.meta.entries(d.id)
        return pb.ListEntriesResponse(entries=[entry_pb(e) for e in entries], purged=bool(d.purged_at_ns),
                                      purged_at=_ts(d.purged_at_ns),
                                      watchlist_digest=composition_digest(d, entries))

    async def GetEntryImages(self, request, context):
        return await self.svc.entry_images(request.deployment_id, request.entry_id,
                                           request.actor.strip() or caller_name(), context.peer() or "")

    # Reference collection --------------------------------------------------------------------------
    async def AddReference(self, request, context):
        self._provenance(request)
        captured = limits.images_captured(request)
        return await self.svc.add_reference(request, captured)

    async def ListReferences(self, request, context):
        out = []
        for r in self.svc.meta.references():
            last = r["images"][-1] if r["images"] else {}
            out.append(pb.ReferenceSubject(
                subject_ref=r["subject_ref"], source_system=last.get("source_system", ""),
                legal_basis=last.get("legal_basis", ""), under_18=r["under_18"],
                captured_at=[_ts(i["captured_ns"]) for i in r["images"]], added_by=last.get("added_by", ""),
                added_at=_ts(last.get("added_at_ns", 0))))
        return pb.ListReferencesResponse(subjects=out)

    async def GetPolicy(self, request, context):
        p = self.svc.policy
        return pb.Policy(version=p.version, digest=p.digest, json=p.canonical_json)

    # Search ----------------------------------------------------------------------------------------
    async def Search(self, request, context):
        d = await self.svc.current(request.deployment_id)
        if not request.probes:
            raise Refused("INVALID_ARGUMENT", "at least one probe is required")
        limits.check_count(len(request.probes), limits.MAX_PROBES_PER_REQUEST, "probes")
        k = request.k or 1
        if not 1 <= k <= 100:
            raise Refused("INVALID_ARGUMENT", "k must be between 1 and 100")
        results = await self.svc.search(d, list(request.probes), k)
        return pb.SearchResponse(results=results, model_id=d.model_id, model_version=d.model_version)

    async def GetWatchlistVectors(self, request, context):
        d = await self.svc.current(request.deployment_id)
        if d.status != ACTIVE:
            raise Refused("FAILED_PRECONDITION", f"deployment {d.id} is {status_name(d.status)}: only an ACTIVE "
                          "deployment's watchlist is handed out for matching")
        return await self.svc.watchlist_vectors(d)


class WatchlistService(Service):
    name = "watchlist"

    def now_ns(self) -> int:
        """The one clock of the service's time rules (LFR_CLOCK_OFFSET_FILE moves it in drills and tests)."""
        rules = getattr(self, "clock", None)
        return rules.now_ns() if rules is not None else time.time_ns()

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.policy = load_policy(cfg.policy_file)
        self.clock = clock.from_config(cfg)
        self.purge_after_ns = int(cfg.purge_after_s * 1e9)
        cfg.watchlist_path().mkdir(parents=True, exist_ok=True)  # LFR_WATCHLIST_DIR, else the state dir
        self.meta = MetadataStore(cfg.watchlist_path("watchlist.sqlite"))
        # durable facts are written to the metadata database, in the transaction of the change they report
        self.outbox = rt.bus.use_outbox(Outbox(self.meta.db, self.meta.lock, self.name))
        self.images = ImageStore(cfg.watchlist_path("watchlist-images"))
        self.index = await rt.run_cpu(lambda: VectorIndex(cfg.watchlist_path("qdrant") if not cfg.qdrant_url else None,
                                                           cfg.qdrant_url, cfg.qdrant_api_key))
        self.faces = FaceStages(cfg, self.log)  # detection and embedding, over gRPC
        self._recipe: tuple[tuple[str, str], scoring.Recipe] | None = None
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.sweeper: asyncio.Task | None = None
        self.log.info("watchlist.policy", version=self.policy.version, digest=self.policy.digest)
        rt.add_servicer(watchlist_pb2_grpc.add_WatchlistServiceServicer_to_server, WatchlistServicer(self),
                        pb.DESCRIPTOR.services_by_name["WatchlistService"])

    async def warmup(self) -> None:
        await self.sweep()  # what came due while the service was down (automatic end, purge) is done first
        self.sweeper = asyncio.create_task(self._sweep_forever(), name="watchlist-sweeper")
        await self.model()

    async def stop_intake(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            try:
                await self.sweeper
            except asyncio.CancelledError:
                pass

    async def model(self, fresh: bool = False) -> embedding_pb2.ModelDescription:
        """The live model, described by the embedding service (the watchlist needs no torch). `fresh` asks
        again: the embedding service may have been restarted with another model."""
        try:
            return await self.faces.model(fresh)
        except EmbeddingUnavailable as exc:
            raise Refused("UNAVAILABLE", str(exc)) from None

    async def _same_model(self, d: DeploymentRecord, what: str) -> embedding_pb2.ModelDescription:
        model = await self.model(fresh=True)
        refusal = model_mismatch(model, d.model_id, d.model_version, what, f"deployment {d.id}'s watchlist",
                                 "re-embed the watchlist (ReembedWatchlist) first")
        if refusal:
            raise Refused("FAILED_PRECONDITION", refusal)
        return model

    # Records and events ----------------------------------------------------------------------------
    def get(self, deployment_id: str) -> DeploymentRecord:
        if not deployment_id:
            raise Refused("INVALID_ARGUMENT", "deployment_id is required")
        d = self.meta.get_deployment(deployment_id)
        if d is None:
            raise Refused("NOT_FOUND", f"no deployment {deployment_id!r}")
        return d

    async def current(self, deployment_id: str) -> DeploymentRecord:
        """The deployment as it stands now: one past its planned end is ended before anyone reads it."""
        d = self.get(deployment_id)
        action = d.due_action(self.now_ns(), self.purge_after_ns)
        if action == "end":
            await self.auto_end(d.id)
            d = self.get(deployment_id)
        elif action == "urgent_lapsed":
            await self.urgent_lapse(d.id)
            d = self.get(deployment_id)
        return d

    def deployment_pb(self, d: DeploymentRecord, entries: list[EntryRecord] | None = None) -> pb.Deployment:
        entries = self.meta.entries(d.id) if entries is None else entries
        return pb.Deployment(
            id=d.id, name=d.name, purpose=d.purpose, site=d.site, planned_start=_ts(d.planned_start_ns),
            planned_end=_ts(d.planned_end_ns), cameras=list(d.cameras), threshold=d.threshold,
            model_id=d.model_id, model_version=d.model_version, status=d.status, watchlist_size=len(entries),
            created_by=d.created_by, created_at=_ts(d.created_at_ns), legal_basis=d.legal_basis,
            site_location=pb.GeoPoint(latitude=d.site_lat, longitude=d.site_lon), site_approved=d.site_approved,
            policy_version=d.policy_version, policy_digest=d.policy_digest,
            watchlist_digest=composition_digest(d, entries), authorised_digest=d.authorised_digest,
            approvals=[pb.Approval(actor=a.actor, at=_ts(a.at_ns), watchlist_digest=a.digest) for a in d.approvals],
            authorisers_required=d.authorisers_required, second_authoriser_reasons=list(d.second_reasons),
            builders=list(d.builders), started_at=_ts(d.started_at_ns), ended_at=_ts(d.ended_at_ns),
            purged_at=_ts(d.purged_at_ns), purge_due=_ts(d.purge_due_ns(self.purge_after_ns)),
            end_reason=d.end_reason, **self.governance_fields(d, len(entries)))

    @staticmethod
    def governance_fields(d: DeploymentRecord, size: int) -> dict:
        """#16: the written authority, urgent use, the threshold floor, and the expected false alerts per 10,000
        faces for this list size and threshold (from the model's shipped non-mated table)."""
        per_10k, rate, table = nonmated.expected(d.model_id, d.threshold, size)
        return dict(
            authority=d.authority, urgent=d.urgent, urgent_by=d.urgent_by, urgent_rank=d.urgent_rank,
            urgent_reason=d.urgent_reason, urgent_started_at=_ts(d.started_at_ns if d.urgent else 0),
            urgent_confirm_by=_ts(d.urgent_confirm_by_ns), urgent_confirmed_at=_ts(d.urgent_confirmed_at_ns),
            expected_false_alerts_per_10k=per_10k, nonmated_match_rate=rate, false_alert_table=table,
            threshold_floor=d.threshold_floor, threshold_reason=d.threshold_reason,
            threshold_below_floor=d.threshold_below_floor, equitability_attributes=list(d.equitability_attributes),
            equitability_min_count=d.equitability_min_count)

    def lifecycle(self, d: DeploymentRecord, action: str, actor: str, reason: str = "") -> pb.Deployment:
        msg = self.deployment_pb(d)
        env = events.envelope(self.name, deployment_id=d.id, model_id=d.model_id, model_version=d.model_version)
        self.rt.bus.publish_durable(subjects.lifecycle(d.id), pb.DeploymentEvent(
            envelope=env, deployment=msg, action=action, actor=actor, reason=reason), msg_id=env.event_id)
        self.log.info("deployment." + action, deployment_id=d.id, actor=actor, status=d.status)
        return msg

    def watchlist_event(self, deployment_id: str, action: str, actor: str, **fields) -> None:
        env = events.envelope(self.name, deployment_id=deployment_id if deployment_id != REFERENCE else "")
        self.rt.bus.publish_durable(subjects.watchlist(deployment_id), pb.WatchlistEvent(
            envelope=env, action=action, actor=actor, policy_version=self.policy.version, **fields),
            msg_id=env.event_id)
        self.log.info("watchlist." + action, deployment_id=deployment_id, actor=actor)

    def refused(self, d: DeploymentRecord, action: str, actor: str, exc: Refused) -> Refused:
        """A refused lifecycle decision is recorded too."""
        self.lifecycle(d, f"{action}_refused", actor, exc.message)
        return exc

    def save_change(self, before: DeploymentRecord, after: DeploymentRecord, actor: str, what: str) -> None:
        self.meta.put_deployment(after)
        if before.status == AUTHORISED:
            self.lifecycle(after, "returned_to_draft", actor, f"the watchlist changed ({what}): it needs "
                           "authorisation again")

    # Lifecycle -------------------------------------------------------------------------------------
    async def create(self, req: pb.CreateDeploymentRequest, threshold: float, model) -> pb.Deployment:
        site = self.policy.approved_site(req.site)
        lat, lon = (req.site_location.latitude, req.site_location.longitude) if req.HasField("site_location") \
            else ((site.latitude, site.longitude) if site else (0.0, 0.0))
        d = DeploymentRecord(
            id=events.new_id()[:16], name=req.name, purpose=req.purpose, site=site.name if site else req.site.strip(),
            planned_start_ns=limits.timestamp_ns(req.planned_start, "planned_start"), planned_end_ns=limits.timestamp_ns(req.planned_end, "planned_end"),
            cameras=tuple(req.cameras), threshold=threshold, model_id=model.model_id,
            model_version=model.model_version, created_by=req.actor, created_at_ns=self.now_ns(),
            legal_basis=req.legal_basis, site_lat=lat, site_lon=lon, site_approved=site is not None,
            threshold_from_model=not req.threshold, policy_version=self.policy.version,
            policy_digest=self.policy.digest, builders=(req.actor,),
            authorisers_required=1 + bool(self.policy.second_authoriser_reasons(req.site, False)),
            second_reasons=tuple(self.policy.second_authoriser_reasons(req.site, False)),
            **self.policy_fields(model.model_id, threshold, dict(req.authority), req.threshold_reason))
        with self.outbox.transaction():  # the record and its fact commit together (lfr.runtime.outbox)
            self.meta.put_deployment(d)
            msg = self.lifecycle(d, "created", req.actor)
            if d.threshold_below_floor:  # audited on its own, with the reason
                msg = self.lifecycle(d, "threshold_below_floor", req.actor,
                                     f"threshold {d.threshold:g} under the floor {d.threshold_floor:g} of policy "
                                     f"{self.policy.version}: {d.threshold_reason}")
            return msg

    def policy_fields(self, model_id: str, threshold: float, authority: dict, reason: str) -> dict:
        """What the policy adds to a new deployment record (#16)."""
        floor = self.policy.floor(model_id)
        below = floor is not None and threshold < floor.floor
        return dict(authority={k: v.strip() for k, v in authority.items()},
                    threshold_floor=floor.floor if floor else 0.0, threshold_below_floor=below,
                    threshold_reason=reason.strip() if below else "",
                    equitability_attributes=tuple(name for name, _ in self.policy.equitability),
                    equitability_min_count=self.policy.equitability_min_count)

    async def authorise(self, deployment_id: str, actor: str, reviewed_digest: str) -> pb.Deployment:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            entries = self.meta.entries(d.id)
            if d.urgent_unconfirmed:
                return await self._confirm_urgent(d, entries, actor, reviewed_digest)
            try:
                d.check("authorise")
                await self._same_model(d, "authorise")
                from lfr.models.onnx_engine import authorisation_refusal

                # an engine plugged in by manifest needs its completed check (lfr model check)
                unchecked = authorisation_refusal(d.model_id, d.model_version)
                if unchecked:
                    raise Refused("FAILED_PRECONDITION", unchecked)
                violations = watchlist_violations(self.policy, entries, self.now_ns())
                if violations:
                    raise Refused("FAILED_PRECONDITION", f"policy {self.policy.version} refuses the watchlist: "
                                  + "; ".join(violations[:5]) + (" ..." if len(violations) > 5 else ""))
                reasons = self.policy.second_authoriser_reasons(d.site, any(e.under_18 for e in entries))
                after = d.approve(actor, composition_digest(d, entries), reviewed_digest, 1 + bool(reasons),
                                  reasons, self.now_ns())
            except Refused as exc:
                raise self.refused(d, "authorisation", actor, exc) from None
            after = self._replace(after, policy_version=self.policy.version, policy_digest=self.policy.digest,
                                  expected_false_alerts_per_10k=nonmated.expected(d.model_id, d.threshold,
                                                                                  len(entries))[0])
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                msg = self.lifecycle(after, "approved", actor,
                                     f"approval {len(after.approvals)} of {after.authorisers_required}")
                if after.status == AUTHORISED:
                    msg = self.lifecycle(after, "authorised", actor)
            return msg

    async def _confirm_urgent(self, d: DeploymentRecord, entries: list[EntryRecord], actor: str,
                              reviewed_digest: str) -> pb.Deployment:
        """An authorisation of a deployment started under urgency: it confirms the urgent use once the
        authorisers it needs (other than the officer who started it) are in. Call with the lock held."""
        try:
            reasons = self.policy.second_authoriser_reasons(d.site, any(e.under_18 for e in entries))
            after = d.confirm(actor, composition_digest(d, entries), reviewed_digest, 1 + bool(reasons), reasons,
                              self.now_ns())
        except Refused as exc:
            raise self.refused(d, "urgent_confirmation", actor, exc) from None
        with self.outbox.transaction():
            self.meta.put_deployment(after)
            msg = self.lifecycle(after, "approved", actor,
                                 f"approval {len(after.approvals)} of {after.authorisers_required} (urgent use)")
            if after.urgent_confirmed_at_ns:
                msg = self.lifecycle(after, "urgent_confirmed", actor,
                                     f"urgent use by {after.urgent_by} ({after.urgent_rank}) confirmed")
        return msg

    async def start_urgent(self, deployment_id: str, actor: str, rank: str, reason: str) -> pb.Deployment:
        """Start before authorisation under urgency (policy 'urgent'): by an officer of a named rank, with a
        reason; to be confirmed within the policy's limit."""
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            try:
                refusal = self.policy.urgent_refusal(rank)
                if refusal:
                    raise Refused("PERMISSION_DENIED", refusal)
                d.check("start_urgent")
                await self._same_model(d, "start")
                entries = self.meta.entries(d.id)
                violations = watchlist_violations(self.policy, entries, self.now_ns())
                if violations:
                    raise Refused("FAILED_PRECONDITION", f"policy {self.policy.version} refuses the watchlist: "
                                  + "; ".join(violations[:5]))
                within = int(self.policy.urgent_confirm_hours * 3600 * 1e9)
                after = d.start_urgent(self.now_ns(), actor, rank.strip(), reason, within,
                                       composition_digest(d, entries))
                reasons = self.policy.second_authoriser_reasons(d.site, any(e.under_18 for e in entries))
                after = self._replace(after, authorisers_required=1 + bool(reasons), second_reasons=tuple(reasons),
                                      expected_false_alerts_per_10k=nonmated.expected(
                                          d.model_id, d.threshold, len(entries))[0])
            except Refused as exc:
                raise self.refused(d, "urgent_start", actor, exc) from None
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                return self.lifecycle(after, "started", actor,
                                      f"urgent use by {actor} ({after.urgent_rank}): {after.urgent_reason}; to be "
                                      f"confirmed by {_iso(after.urgent_confirm_by_ns)} "
                                      f"({self.policy.rule('urgent.confirm_within_hours')})")

    async def urgent_lapse(self, deployment_id: str) -> None:
        """Urgent use not confirmed in time: stop the deployment, purge its watchlist now, and announce the lapse
        (match deletes the images of its alerts on it). Each step is a durable, audited fact."""
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            if d.due_action(self.now_ns(), self.purge_after_ns) != "urgent_lapsed":
                return
            why = (f"urgent use by {d.urgent_by} ({d.urgent_rank}) was not confirmed by "
                   f"{_iso(d.urgent_confirm_by_ns)} ({self.policy.rule('urgent.confirm_within_hours')})")
            after = d.end(self.now_ns(), why) if d.status == pb.DEPLOYMENT_STATUS_ACTIVE else d
            after = self._replace(after, urgent_lapsed_at_ns=self.now_ns())
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                if d.status == pb.DEPLOYMENT_STATUS_ACTIVE:
                    self.lifecycle(after, "ended", SWEEPER, why)
                self.lifecycle(after, "urgent_lapsed", SWEEPER, why + ": its watchlist and its alerts' images are "
                               "purged")
        if not after.purged_at_ns:
            await self.purge(after.id)

    @staticmethod
    def _replace(d: DeploymentRecord, **changes) -> DeploymentRecord:
        from dataclasses import replace

        return replace(d, **changes)

    async def start_deployment(self, deployment_id: str, actor: str) -> pb.Deployment:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            try:
                d.check("start")
                if not actor:
                    raise Refused("INVALID_ARGUMENT", "actor is required")
                await self._same_model(d, "start")
                after = d.start(self.now_ns(), composition_digest(d, self.meta.entries(d.id)))
            except Refused as exc:
                raise self.refused(d, "start", actor, exc) from None
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                return self.lifecycle(after, "started", actor)

    async def end(self, deployment_id: str, actor: str, reason: str) -> pb.Deployment:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            try:
                d.check("end")
                if not actor:
                    raise Refused("INVALID_ARGUMENT", "actor is required")
            except Refused as exc:
                raise self.refused(d, "end", actor, exc) from None
            after = d.end(self.now_ns(), reason)
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                msg = self.lifecycle(after, "ended", actor, reason)
        return await self._purge_if_due(after) or msg

    async def cancel(self, deployment_id: str, actor: str, reason: str) -> pb.Deployment:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            try:
                d.check("cancel")
                if not actor:
                    raise Refused("INVALID_ARGUMENT", "actor is required")
            except Refused as exc:
                raise self.refused(d, "cancel", actor, exc) from None
            after = d.cancel(self.now_ns(), reason)
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                msg = self.lifecycle(after, "cancelled", actor, reason)
        return await self._purge_if_due(after) or msg

    async def auto_end(self, deployment_id: str) -> None:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            if d.due_action(self.now_ns(), self.purge_after_ns) != "end":
                return  # someone else ended it meanwhile
            after = d.end(self.now_ns(), "planned end passed")
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                self.lifecycle(after, "ended", SWEEPER, "planned end passed")
        await self._purge_if_due(after)

    async def _purge_if_due(self, d: DeploymentRecord) -> pb.Deployment | None:
        if d.due_action(self.now_ns(), self.purge_after_ns) == "purge":
            return await self.purge(d.id)
        return None

    async def purge(self, deployment_id: str) -> pb.Deployment | None:
        """Delete the watchlist's vectors (Qdrant) and images (file store); keep nominal ids, categories and
        counts. Idempotent: a purge interrupted by a crash is completed by the next sweep."""
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            if d.purged_at_ns:
                return None
            d.check("purge")
            vectors = await self.rt.run_cpu(self.index.delete_points, d.id)
            images = await self.rt.run_cpu(self.images.delete_deployment, d.id)
            entries = [e.purged() for e in self.meta.entries(d.id)]
            left = await self.rt.run_cpu(self.index.count_deployment, d.id)
            if left or self.images.count(d.id):
                raise RuntimeError(f"purge of deployment {d.id} incomplete: {left} vectors left")
            after = d.purged(self.now_ns())
            with self.outbox.transaction():
                for e in entries:
                    self.meta.put_entry(e)
                self.meta.put_deployment(after)
                self.watchlist_event(d.id, "watchlist_purged", SWEEPER, vectors_deleted=vectors,
                                     images_deleted=images, kept_subject_refs=[e.subject_ref for e in entries],
                                     watchlist_digest=composition_digest(after, entries))
                return self.lifecycle(after, "purged", SWEEPER, f"{vectors} vectors and {images} images deleted; "
                                      f"{len(entries)} nominal ids kept")

    async def sweep(self) -> None:
        """End deployments past their planned end; purge ended ones whose purge is due."""
        for d in self.meta.list_deployments():
            action = d.due_action(self.now_ns(), self.purge_after_ns)
            try:
                if action == "end":
                    await self.auto_end(d.id)
                elif action == "urgent_lapsed":
                    await self.urgent_lapse(d.id)
                elif action == "purge":
                    await self.purge(d.id)
            except Exception as exc:  # one failing deployment must not stop the others; retried next sweep
                self.log.error("watchlist.sweep_failed", deployment_id=d.id, action=action,
                               error=type(exc).__name__, detail=str(exc))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            await self.sweep()

    # Watchlist changes -----------------------------------------------------------------------------
    async def _detect(self, images: list[bytes], captured: list[int], faces: list[int] | None = None
                      ) -> tuple[list[pb.ImageResult], list[tuple[int, list, dict]]]:
        """Quality gate: per image a result; the accepted ones as (index, chips, quality). An image with several
        faces enrolls the one `faces[i]` names (1-based), else the policy decides (`Policy.enrollment_face`);
        the result says which face and how it was chosen."""
        results, accepted = [], []
        faces = faces or [0] * len(images)
        now = self.now_ns()
        for i, image in enumerate(images):
            try:
                limits.check_image(image, self.config)  # size and declared pixels, before detection decodes
                det = await self.faces.detect(image, timeout=30)
            except limits.InputError as exc:
                results.append(pb.ImageResult(index=i, accepted=False, reason=exc.message))
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code().name not in limits.IMAGE_REFUSALS:
                    raise
                results.append(pb.ImageResult(index=i, accepted=False, reason=exc.details()))
                continue
            found = [Candidate((f.box.x1, f.box.y1, f.box.x2, f.box.y2), f.quality.inter_eye_px, f.score)
                     for f in det.faces]
            chosen, reason, how = self.policy.enrollment_face(det.width, det.height, found, faces[i])
            face = det.faces[chosen] if chosen >= 0 else None
            q = face.quality if face is not None else common_pb2.FaceQuality()
            if face is not None:
                reason = self.policy.image_refusal(1, q.inter_eye_px, q.sharpness, q.yaw_deg, q.pitch_deg,
                                                   captured[i], now)
            shown = face if face is not None else (det.faces[0] if det.faces else None)
            results.append(pb.ImageResult(
                index=i, accepted=not reason, reason=reason, quality=shown.quality if shown is not None else None,
                faces=[pb.FoundFace(face=n + 1, box=f.box, quality=f.quality) for n, f in enumerate(det.faces)]
                if len(det.faces) > 1 else [],
                face=chosen + 1 if not reason else 0, face_choice=how if not reason else ""))
            if not reason:
                accepted.append((i, list(face.chips), {k: getattr(q, k) for k in QUALITY_FIELDS}))
        return results, accepted

    async def _embed(self, chips_per_image: list[list], model) -> dict[tuple[str, str], list[list[float]]]:
        """One vector per accepted image and model component (the face's chips through the embedding service)."""
        return {key: v.tolist() for key, v in (await self.faces.embed(chips_per_image, timeout=60)).items()}

    async def _upsert(self, by_component: dict, model, payload: dict) -> None:
        components = {(c.model_id, c.model_version): c for c in model.components}
        for key, vectors in by_component.items():
            comp = components[key]
            name = collection_name(*key)
            await self.rt.run_cpu(self.index.ensure_collection, name, comp.dim, comp.metric)
            await self.rt.run_cpu(self.index.upsert, name, vectors, payload)

    def _refuse_entry(self, d: DeploymentRecord, subject_ref: str, category: int, actor: str, reason: str,
                      results: list[pb.ImageResult], n_images: int) -> pb.EnrollEntryResponse:
        if not results:
            results = [pb.ImageResult(index=i, accepted=False, reason=reason) for i in range(n_images)]
        self.watchlist_event(d.id, "entry_refused", actor, subject_ref=subject_ref, category=category,
                             reason=reason, images_accepted=0, images_refused=n_images)
        return pb.EnrollEntryResponse(subject_ref=subject_ref, results=results, reason=reason)

    async def enroll(self, deployment_id: str, *, subject_ref: str, category: int, source_system: str,
                     legal_basis: str, images: list[bytes], captured: list[int], under_18: bool, actor: str,
                     from_reference: bool = False, faces: list[int] | None = None) -> pb.EnrollEntryResponse:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            after = d.changed_by(actor)  # refuses a started or finished deployment, and a missing actor
            for name, value in (("source_system", source_system), ("legal_basis", legal_basis)):
                if not value.strip():
                    raise Refused("INVALID_ARGUMENT", f"{name} is required: every entry states its provenance")
            model = await self._same_model(d, "change the watchlist")
            size = self.meta.entry_count(d.id)
            reason = self.policy.entry_refusal(category, size)
            if reason:
                return self._refuse_entry(d, subject_ref, category, actor, reason, [], len(images))
            results, accepted = await self._detect(images, captured, faces)
            if not accepted:
                return self._refuse_entry(d, subject_ref, category, actor, "no image passed the quality gate",
                                          results, len(images))
            by_component = await self._embed([chips for _, chips, _ in accepted], model)
            entry_id = events.new_id()[:16]
            await self._upsert(by_component, model, {"deployment_id": d.id, "entry_id": entry_id,
                                                     "subject_ref": subject_ref, "category": int(category)})
            kept = []
            for i, _chips, quality in accepted:
                name = await self.rt.run_cpu(self.images.put, d.id, images[i])
                kept.append(ImageRecord(hashlib.sha256(images[i]).hexdigest(), captured[i], quality, name,
                                        results[i].face if results[i].faces else 0, results[i].face_choice))
            entry = EntryRecord(entry_id, d.id, subject_ref, int(category), source_system, legal_basis, under_18,
                                actor, self.now_ns(), tuple(kept), len(accepted), from_reference, len(kept))
            with self.outbox.transaction():
                self.meta.put_entry(entry)
                self.save_change(d, after, actor, f"entry {subject_ref} added")
                self.watchlist_event(
                    d.id, "entry_added", actor, entry_id=entry_id, subject_ref=subject_ref, category=category,
                    images_accepted=len(accepted), images_refused=len(results) - len(accepted),
                    source_system=source_system, legal_basis=legal_basis, under_18=under_18,
                    watchlist_digest=composition_digest(after, self.meta.entries(d.id)))
            return pb.EnrollEntryResponse(entry_id=entry_id, results=results, subject_ref=subject_ref)

    async def add_from_reference(self, deployment_id: str, subject_ref: str, category: int, legal_basis: str,
                                 actor: str) -> pb.EnrollEntryResponse:
        ref = self.meta.get_reference(subject_ref)
        if ref is None or not ref["images"]:
            d = self.get(deployment_id)
            return self._refuse_entry(d, subject_ref, category, actor,
                                      f"{subject_ref!r} is not in the reference collection", [], 0)
        images = [self.images.read(None, i["file"]) for i in ref["images"]]
        sources = sorted({i["source_system"] for i in ref["images"]})
        bases = sorted({i["legal_basis"] for i in ref["images"]})
        return await self.enroll(
            deployment_id, subject_ref=subject_ref, category=category, source_system="; ".join(sources),
            legal_basis=legal_basis or "; ".join(bases), images=images,
            captured=[i["captured_ns"] for i in ref["images"]], under_18=ref["under_18"], actor=actor,
            from_reference=True)

    async def remove_entry(self, deployment_id: str, entry_id: str, actor: str, reason: str) -> pb.Deployment:
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            after = d.changed_by(actor)
            entry = next((e for e in self.meta.entries(d.id) if e.entry_id == entry_id), None)
            if entry is None:
                raise Refused("NOT_FOUND", f"no entry {entry_id!r} in deployment {d.id}")
            await self.rt.run_cpu(self.index.delete_points, d.id, entry_id)
            for img in entry.images:
                self.images.delete(d.id, img.file)
            with self.outbox.transaction():
                self.meta.delete_entry(entry_id)
                self.save_change(d, after, actor, f"entry {entry.subject_ref} removed")
                self.watchlist_event(d.id, "entry_removed", actor, entry_id=entry_id, subject_ref=entry.subject_ref,
                                     category=entry.category, reason=reason,
                                     watchlist_digest=composition_digest(after, self.meta.entries(d.id)))
            return self.deployment_pb(after)

    async def reembed(self, deployment_id: str, actor: str) -> pb.ReembedResponse:
        """Re-embed every entry from its stored images with the embedding service's current model."""
        async with self.locks[deployment_id]:
            d = self.get(deployment_id)
            after = d.changed_by(actor)
            model = await self.model(fresh=True)
            threshold = model.default_threshold if d.threshold_from_model else d.threshold
            after = self._replace(after, model_id=model.model_id, model_version=model.model_version,
                                  threshold=threshold)
            await self.rt.run_cpu(self.index.delete_points, d.id)
            responses = []
            for e in self.meta.entries(d.id):
                images = [self.images.read(d.id, i.file) for i in e.images]
                results, accepted = await self._detect(
                    images, [i.captured_ns for i in e.images],
                    [i.face if "enroller" in i.face_choice else 0 for i in e.images])  # the enroller's choice holds
                responses.append(pb.EnrollEntryResponse(entry_id=e.entry_id if accepted else "", results=results,
                                                        subject_ref=e.subject_ref,
                                                        reason="" if accepted else "no image passed the quality gate"))
                if not accepted:  # the entry cannot be embedded with the new model: it leaves the watchlist
                    for img in e.images:
                        self.images.delete(d.id, img.file)
                    with self.outbox.transaction():
                        self.meta.delete_entry(e.entry_id)
                        self.watchlist_event(d.id, "entry_removed", actor, entry_id=e.entry_id,
                                             subject_ref=e.subject_ref, category=e.category,
                                             reason="re-embedding: no image passed the quality gate")
                    continue
                by_component = await self._embed([chips for _, chips, _ in accepted], model)
                await self._upsert(by_component, model, {"deployment_id": d.id, "entry_id": e.entry_id,
                                                         "subject_ref": e.subject_ref, "category": e.category})
                keep = {i for i, _, _ in accepted}
                quality = {i: q for i, _, q in accepted}
                for n, img in enumerate(e.images):
                    if n not in keep:
                        self.images.delete(d.id, img.file)
                imgs = tuple(self._replace(img, quality=quality[n]) for n, img in enumerate(e.images) if n in keep)
                self.meta.put_entry(self._replace(e, images=imgs, vectors=len(accepted), image_count=len(imgs)))
            with self.outbox.transaction():
                self.meta.put_deployment(after)
                msg = self.lifecycle(after, "reembedded", actor, f"re-embedded with {model.model_id} "
                                     f"{model.model_version}; it needs authorisation again")
            return pb.ReembedResponse(deployment=msg, entries=responses)

    # Review ----------------------------------------------------------------------------------------
    async def entry_images(self, deployment_id: str, entry_id: str, actor: str,
                           peer: str) -> pb.GetEntryImagesResponse:
        """An entry's enrolled images for an officer's review, while the watchlist is not purged; each call (and
        each refusal after the purge) is an access record naming the officer and the entry."""
        if not entry_id:
            raise Refused("INVALID_ARGUMENT", "entry_id is required")
        d = await self.current(deployment_id)
        async with self.locks[d.id]:  # not while a purge deletes the files
            d = self.get(d.id)
            entry = next((e for e in self.meta.entries(d.id) if e.entry_id == entry_id), None)
            if entry is None:
                raise Refused("NOT_FOUND", f"no entry {entry_id[:80]!r} in deployment {d.id}")
            if d.purged_at_ns:
                when = _iso(d.purged_at_ns)
                reason = (f"deployment {d.id}'s watchlist was purged at {when}: its images are deleted and can no "
                          "longer be shown")
                self.accessed("GetEntryImages", actor, entry_id, d.id, peer, refusal=reason)
                raise Refused("FAILED_PRECONDITION", reason)
            images = []
            for n, img in enumerate(entry.images):
                data = await self.rt.run_cpu(self.images.read, d.id, img.file)
                images.append(pb.EntryImage(captured_at=_ts(img.captured_ns), quality=quality_pb(img.quality),
                                            sha256=img.sha256, image_id=f"{entry_id}-{n}", data=data,
                                            media_type=_media_type(data), face=img.face,
                                            face_choice=img.face_choice))
            self.accessed("GetEntryImages", actor, entry_id, d.id, peer)
        return pb.GetEntryImagesResponse(
            deployment_id=d.id, entry_id=entry_id, images=images, subject_ref=entry.subject_ref,
            category=entry.category, source_system=entry.source_system, legal_basis=entry.legal_basis,
            added_by=entry.added_by, added_at=_ts(entry.added_at_ns), from_reference=entry.from_reference)

    def accessed(self, method: str, actor: str, subject: str, deployment_id: str, peer: str,
                 refusal: str = "") -> None:
        """What a person was shown (or refused), as a durable access fact for the audit."""
        ev = audit_pb2.AccessEvent(
            envelope=events.envelope(self.name, deployment_id=deployment_id), service=self.name, method=method,
            actor=actor or "anonymous", subject=subject, peer=peer, reason=refusal,
            decision=audit_pb2.ACCESS_DECISION_DENIED if refusal else audit_pb2.ACCESS_DECISION_ALLOWED)
        self.rt.bus.publish_durable(subjects.access(self.name), ev, ev.envelope.event_id)

    # Reference collection --------------------------------------------------------------------------
    async def add_reference(self, req: pb.AddReferenceRequest, captured: list[int]) -> pb.AddReferenceResponse:
        record = self.meta.get_reference(req.subject_ref) or {"subject_ref": req.subject_ref, "under_18": False,
                                                              "images": []}
        record["under_18"] = record["under_18"] or req.under_18
        results = []
        for i, data in enumerate(req.images):
            try:  # decoded in full under the limits (a stored reference must be a whole, sane image)
                await self.rt.run_cpu(limits.decode, data, self.config, ("JPEG", "PNG"))
            except limits.InputError as exc:
                results.append(pb.ImageResult(index=i, accepted=False, reason=exc.message))
                continue
            name = await self.rt.run_cpu(self.images.put, None, data)
            record["images"].append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                     "captured_ns": captured[i], "source_system": req.source_system,
                                     "legal_basis": req.legal_basis, "added_by": req.actor,
                                     "added_at_ns": self.now_ns()})
            results.append(pb.ImageResult(index=i, accepted=True))
        stored = sum(r.accepted for r in results)
        with self.outbox.transaction():
            if stored:
                self.meta.put_reference(req.subject_ref, record)
            self.watchlist_event(REFERENCE, "reference_added", req.actor, subject_ref=req.subject_ref,
                                 images_accepted=stored, images_refused=len(results) - stored,
                                 source_system=req.source_system, legal_basis=req.legal_basis,
                                 under_18=req.under_18)
        return pb.AddReferenceResponse(subject_ref=req.subject_ref, images_stored=stored, results=results)

    # Search ----------------------------------------------------------------------------------------
    def recipe(self, model: embedding_pb2.ModelDescription) -> scoring.Recipe:
        """The scoring recipe of the embedding service's model, as its description carries it."""
        key = (model.model_id, model.model_version)
        if self._recipe is None or self._recipe[0] != key:
            try:
                self._recipe = (key, scoring.Recipe.from_description(model))
            except ValueError as exc:
                raise Refused("FAILED_PRECONDITION", f"the embedding service describes an unusable model: {exc}") \
                    from None
        return self._recipe[1]

    async def watchlist_vectors(self, d: DeploymentRecord) -> pb.WatchlistVectors:
        """Every vector of a live deployment's watchlist, grouped by entry, with the recipe that scores them (match
        decides with them in memory)."""
        model = await self._same_model(d, "match against its watchlist")
        out = pb.WatchlistVectors(deployment_id=d.id, model_id=d.model_id, model_version=d.model_version,
                                  authorised_digest=d.authorised_digest, model=model)
        entries: dict[str, pb.EntryVectors] = {}
        for comp in model.components:
            points = await self.rt.run_cpu(self.index.vectors_of, collection_name(comp.model_id, comp.model_version),
                                           d.id)
            for payload, vector in points:
                e = entries.get(payload["entry_id"])
                if e is None:
                    e = entries[payload["entry_id"]] = out.entries.add(
                        entry_id=payload["entry_id"], subject_ref=payload["subject_ref"], category=payload["category"])
                e.vectors.add(model_id=comp.model_id, model_version=comp.model_version, values=vector)
        return out

    async def search(self, d: DeploymentRecord, probes: list[pb.Probe], k: int) -> list[pb.CandidateList]:
        """Each probe's k best entries, scored by the model's recipe (`lfr.models.scoring`): an entry's score per
        engine is its best vector's; a fused model combines them with its floors (one engine under its floor
        vetoes), so the live decision is the library's decision."""
        model = await self.model()
        recipe = self.recipe(model)
        queries: dict[str, list[list[float]]] = {}
        for comp in model.components:
            key = (comp.model_id, comp.model_version)
            rows = []
            for p in probes:
                vec = next((v for v in p.vectors if (v.model_id, v.model_version) == key), None)
                if vec is None or len(vec.values) != comp.dim:
                    raise Refused("INVALID_ARGUMENT", f"each probe needs a {comp.dim}-d vector of {key[0]} {key[1]}")
                rows.append(list(vec.values))
            queries[comp.model_id] = rows
        best: list[dict[str, dict[str, float]]] = [{} for _ in probes]  # probe -> entry -> engine -> similarity
        payloads: dict[str, dict] = {}

        def keep(i: int, mid: str, hits) -> None:
            for payload, raw in hits:
                payloads[payload["entry_id"]] = payload
                slot = best[i].setdefault(payload["entry_id"], {})
                slot[mid] = max(slot.get(mid, -math.inf), float(recipe.from_hit(mid, raw)))

        for comp in model.components:  # several vectors may belong to one entry: fetch more than k
            coll = collection_name(comp.model_id, comp.model_version)
            hits = await self.rt.run_cpu(self.index.search, coll, queries[comp.model_id], d.id, k * 4)
            for i, plist in enumerate(hits):
                keep(i, comp.model_id, plist)
        if recipe.fused:  # an entry one engine found is scored exactly by the others too
            for comp in model.components:
                coll = collection_name(comp.model_id, comp.model_version)
                for i in range(len(probes)):
                    missing = [e for e, slot in best[i].items() if comp.model_id not in slot]
                    if missing:
                        keep(i, comp.model_id, await self.rt.run_cpu(
                            self.index.search_entries, coll, queries[comp.model_id][i], d.id, missing))
        out = []
        for cands in best:
            entries = [e for e, slot in cands.items() if len(slot) == len(model.components)]
            scores = recipe.combine({c: np.array([cands[e][c] for e in entries]) for c in recipe.components}) \
                if entries else []
            ranked = sorted(zip(entries, scores, strict=True), key=lambda t: -t[1])[:k]
            out.append(pb.CandidateList(candidates=[
                pb.Candidate(entry_id=e, subject_ref=payloads[e]["subject_ref"], category=payloads[e]["category"],
                             score=float(s)) for e, s in ranked]))
        return out

    async def close(self) -> None:
        if hasattr(self, "index"):
            self.index.close()
        if hasattr(self, "meta"):
            self.meta.close()
