"""Pure core of the watchlist service: deployment records and their lifecycle, watchlist entries, the
composition digest, authorisation, and what the sweeper must do. No I/O: the caller passes the time.

    DRAFT --authorise--> AUTHORISED --start--> ACTIVE --end--> ENDED --purge--> PURGED
      ^                      |                                   (also automatic past the planned end)
      +---- any change ------+         DRAFT | AUTHORISED --cancel--> CANCELLED (purged, status kept)

    Urgent use (policy "urgent"): DRAFT --start_urgent--> ACTIVE (urgent), confirmed by the authorisations
    it lacked (`confirm`) before urgent_confirm_by_ns; else the sweeper stops it and purges its watchlist and
    its alerts' images ('urgent_lapsed').
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace

from lfr.errors import FailedPrecondition, Invalid, PermissionDenied
from lfr.models.scoring import Recipe
from lfr.pb import watchlist_pb2 as pb
from lfr.policy import Policy

S = pb.DeploymentStatus
DRAFT, AUTHORISED, ACTIVE = S.DEPLOYMENT_STATUS_DRAFT, S.DEPLOYMENT_STATUS_AUTHORISED, S.DEPLOYMENT_STATUS_ACTIVE
ENDED, PURGED, CANCELLED = S.DEPLOYMENT_STATUS_ENDED, S.DEPLOYMENT_STATUS_PURGED, S.DEPLOYMENT_STATUS_CANCELLED

# Explicit transitions: action -> (statuses it is allowed from, status it leads to).
TRANSITIONS: dict[str, tuple[set[int], int]] = {
    "authorise": ({DRAFT}, AUTHORISED),
    "start": ({AUTHORISED}, ACTIVE),
    "end": ({ACTIVE}, ENDED),
    "cancel": ({DRAFT, AUTHORISED}, CANCELLED),
    "purge": ({ENDED, CANCELLED}, PURGED),
    "start_urgent": ({DRAFT, AUTHORISED}, ACTIVE),
}
CHANGEABLE = {DRAFT, AUTHORISED}  # the watchlist may change only before the deployment starts

SWEEPER = "system:sweeper"


def status_name(status: int) -> str:
    return S.Name(status).removeprefix("DEPLOYMENT_STATUS_")


@dataclass(frozen=True)
class Approval:
    actor: str
    at_ns: int
    digest: str


@dataclass(frozen=True)
class DeploymentRecord:
    id: str
    name: str
    purpose: str
    site: str
    planned_start_ns: int
    planned_end_ns: int
    cameras: tuple[str, ...]
    threshold: float
    model_id: str
    model_version: str
    status: int = DRAFT
    created_by: str = ""
    created_at_ns: int = field(default_factory=time.time_ns)
    legal_basis: str = ""
    site_lat: float = 0.0
    site_lon: float = 0.0
    site_approved: bool = False
    threshold_from_model: bool = False  # the threshold is the model's default (follows a re-embedding)
    policy_version: str = ""
    policy_digest: str = ""
    builders: tuple[str, ...] = ()
    approvals: tuple[Approval, ...] = ()
    authorisers_required: int = 1
    second_reasons: tuple[str, ...] = ()
    authorised_digest: str = ""
    started_at_ns: int = 0
    ended_at_ns: int = 0
    end_reason: str = ""
    purged_at_ns: int = 0
    # #16: the written authority (policy authority_fields), part of the authorised digest
    authority: dict = field(default_factory=dict)
    # urgent use: started before its authorisation, to be confirmed by urgent_confirm_by_ns
    urgent: bool = False
    urgent_by: str = ""
    urgent_rank: str = ""
    urgent_reason: str = ""
    urgent_confirm_by_ns: int = 0
    urgent_confirmed_at_ns: int = 0
    urgent_lapsed_at_ns: int = 0
    # the threshold against the policy's floor for the model, and the expected false-alert rate shown
    threshold_floor: float = 0.0
    threshold_reason: str = ""
    threshold_below_floor: bool = False
    expected_false_alerts_per_10k: float = -1.0
    false_alert_table: str = ""
    nonmated_match_rate: float = 0.0
    equitability_attributes: tuple[str, ...] = ()
    equitability_min_count: int = 0

    # Lifecycle -------------------------------------------------------------------------------------
    def check(self, action: str) -> None:
        allowed, _ = TRANSITIONS[action]
        if self.status not in allowed:
            allowed_names = " or ".join(sorted(status_name(s) for s in allowed))
            raise FailedPrecondition(f"cannot {action} deployment {self.id}: it is {status_name(self.status)}"
                                     f" (it must be {allowed_names})")

    def transition(self, action: str, **changes) -> DeploymentRecord:
        self.check(action)
        return replace(self, status=TRANSITIONS[action][1], **changes)

    def start(self, now_ns: int, current_digest: str) -> DeploymentRecord:
        self.check("start")
        if current_digest != self.authorised_digest:
            raise FailedPrecondition(f"deployment {self.id}: the watchlist differs from the one "
                                     "authorised; it needs authorisation again")
        if now_ns < self.planned_start_ns:
            raise FailedPrecondition(f"deployment {self.id}: its window opens at "
                                     f"{iso(self.planned_start_ns)}; it cannot start before")
        if now_ns >= self.planned_end_ns:
            raise FailedPrecondition(f"deployment {self.id}: its window closed at "
                                     f"{iso(self.planned_end_ns)}; it cannot start")
        return self.transition("start", started_at_ns=now_ns)

    def end(self, now_ns: int, reason: str) -> DeploymentRecord:
        return self.transition("end", ended_at_ns=now_ns, end_reason=reason)

    def cancel(self, now_ns: int, reason: str) -> DeploymentRecord:
        return self.transition("cancel", ended_at_ns=now_ns, end_reason=reason)

    def purged(self, now_ns: int) -> DeploymentRecord:
        """ENDED -> PURGED; a CANCELLED deployment keeps its status and records the purge."""
        self.check("purge")
        status = PURGED if self.status == ENDED else self.status
        return replace(self, status=status, purged_at_ns=now_ns)

    def purge_due_ns(self, purge_after_ns: int) -> int:
        """When the watchlist must be purged (0 = not due: not ended, or already purged)."""
        if self.status in (ENDED, CANCELLED) and not self.purged_at_ns:
            return self.ended_at_ns + purge_after_ns
        return 0

    def due_action(self, now_ns: int, purge_after_ns: int) -> str:
        """What the sweeper must do now: 'urgent_lapsed' (urgent use not confirmed in time: stop, purge the
        watchlist and the alerts' images), 'end' (past the planned end), 'purge', or ''."""
        if self.urgent_unconfirmed and not self.urgent_lapsed_at_ns and now_ns >= self.urgent_confirm_by_ns:
            return "urgent_lapsed"
        if self.status == ACTIVE and now_ns >= self.planned_end_ns:
            return "end"
        due = self.purge_due_ns(purge_after_ns)
        if due and now_ns >= due:
            return "purge"
        return ""

    # Urgent use ------------------------------------------------------------------------------------
    @property
    def urgent_unconfirmed(self) -> bool:
        return self.urgent and not self.urgent_confirmed_at_ns

    def start_urgent(self, now_ns: int, actor: str, rank: str, reason: str, confirm_within_ns: int,
                     current_digest: str) -> DeploymentRecord:
        """Start before authorisation, under urgency: the list started is pinned (its digest), and the
        authorisations it lacks must confirm it within `confirm_within_ns`."""
        self.check("start_urgent")
        if not actor:
            raise Invalid("actor is required")
        if not reason.strip():
            raise Invalid("urgent use needs a reason (why it cannot wait for authorisation)")
        if actor in self.builders:
            raise PermissionDenied(f"{actor} built the watchlist of deployment {self.id} and cannot "
                                   "start it under urgency: another officer must")
        if now_ns < self.planned_start_ns or now_ns >= self.planned_end_ns:
            raise FailedPrecondition(f"deployment {self.id}: now is outside its window "
                                     f"{iso(self.planned_start_ns)} - {iso(self.planned_end_ns)}")
        return replace(self, status=ACTIVE, started_at_ns=now_ns, urgent=True, urgent_by=actor, urgent_rank=rank,
                       urgent_reason=reason.strip(), urgent_confirm_by_ns=now_ns + confirm_within_ns,
                       authorised_digest=current_digest,
                       approvals=tuple(a for a in self.approvals if a.digest == current_digest))

    def confirm(self, actor: str, digest: str, reviewed_digest: str, required: int, reasons: list[str],
                now_ns: int) -> DeploymentRecord:
        """An authorisation of an urgent deployment's list after its start; confirmed once `required` are in
        (the officer who started it under urgency does not count)."""
        if not self.urgent_unconfirmed or self.urgent_lapsed_at_ns or self.status not in (ACTIVE, ENDED):
            raise FailedPrecondition(f"deployment {self.id} is {status_name(self.status)} and not "
                                     "awaiting confirmation of urgent use")
        if now_ns >= self.urgent_confirm_by_ns:
            raise FailedPrecondition(f"deployment {self.id}: urgent use had to be confirmed by "
                                     f"{iso(self.urgent_confirm_by_ns)}")
        if not actor:
            raise Invalid("actor (the authorising officer) is required")
        if actor in self.builders or actor == self.urgent_by:
            raise PermissionDenied(f"{actor} built the watchlist or started deployment {self.id} "
                                   "under urgency and cannot confirm it: another officer must")
        if digest != self.authorised_digest or (reviewed_digest and reviewed_digest != digest):
            raise FailedPrecondition(f"the watchlist of deployment {self.id} differs from the one "
                                     "started under urgency")
        kept = tuple(a for a in self.approvals if a.digest == digest and a.actor != self.urgent_by)
        d, complete = self._approved(kept, actor, digest, required, reasons, now_ns)
        return replace(d, urgent_confirmed_at_ns=now_ns) if complete else d

    # Watchlist changes and authorisation -----------------------------------------------------------
    def changed_by(self, actor: str) -> DeploymentRecord:
        """The record after a change of its watchlist by `actor`: back to DRAFT, approvals void."""
        if self.status not in CHANGEABLE:
            raise FailedPrecondition(f"the watchlist of deployment {self.id} cannot change: it is "
                                     f"{status_name(self.status)} (only DRAFT or AUTHORISED)")
        if not actor:
            raise Invalid("actor is required")
        builders = self.builders if actor in self.builders else (*self.builders, actor)
        return replace(self, status=DRAFT, approvals=(), authorised_digest="", builders=builders)

    def approve(self, actor: str, digest: str, reviewed_digest: str, required: int, reasons: list[str],
                now_ns: int) -> DeploymentRecord:
        """Record `actor`'s approval of the composition `digest`; AUTHORISED once `required` are in."""
        self.check("authorise")
        if not actor:
            raise Invalid("actor (the authorising officer) is required")
        if actor in self.builders:
            raise PermissionDenied(f"{actor} built the watchlist of deployment {self.id} and "
                                   "cannot authorise it: another officer must")
        if reviewed_digest and reviewed_digest != digest:
            raise FailedPrecondition(f"the watchlist of deployment {self.id} changed since it was "
                                     "reviewed: review it again")
        kept = tuple(a for a in self.approvals if a.digest == digest)
        d, complete = self._approved(kept, actor, digest, required, reasons, now_ns)
        return d.transition("authorise", authorised_digest=digest) if complete else d

    def _approved(self, kept: tuple, actor: str, digest: str, required: int, reasons: list[str],
                  now_ns: int) -> tuple[DeploymentRecord, bool]:
        """The record with `actor`'s approval added to the approvals `kept`, and whether `required` are now in;
        one officer approves a list once."""
        if any(a.actor == actor for a in kept):
            raise FailedPrecondition(f"{actor} has already approved this watchlist; "
                                     f"a second authoriser is required ({'; '.join(reasons)})")
        approvals = (*kept, Approval(actor, now_ns, digest))
        d = replace(self, approvals=approvals, authorisers_required=required, second_reasons=tuple(reasons))
        return d, len(approvals) >= required


@dataclass(frozen=True)
class ImageRecord:
    sha256: str
    captured_ns: int
    quality: dict  # FaceQuality fields
    file: str = ""  # name in the deployment's image folder ('' once purged)
    face: int = 0  # which face of the image was enrolled (1-based) when it showed several (#14)
    face_choice: str = ""  # how: "face 2 of 3, chosen by the enroller", or the policy's dominant-face rule


@dataclass(frozen=True)
class EntryRecord:
    entry_id: str
    deployment_id: str
    subject_ref: str
    category: int
    source_system: str
    legal_basis: str
    under_18: bool
    added_by: str
    added_at_ns: int
    images: tuple[ImageRecord, ...]
    vectors: int
    from_reference: bool = False
    image_count: int = 0  # kept after the purge

    def purged(self) -> EntryRecord:
        """What the record keeps after the purge: the nominal id, the category and counts."""
        return EntryRecord(self.entry_id, self.deployment_id, self.subject_ref, self.category, "", "",
                           self.under_18, "", 0, (), 0, self.from_reference, self.image_count)


def composition_digest(d: DeploymentRecord, entries: list[EntryRecord]) -> str:
    """Digest of exactly what an authorising officer approves: every entry with its provenance and images,
    the model the list is embedded with, and the threshold."""
    body = {
        "model": [d.model_id, d.model_version], "threshold": round(float(d.threshold), 6),
        "entries": sorted([e.entry_id, e.subject_ref, e.category, e.source_system, e.legal_basis, e.under_18,
                           sorted([i.sha256, i.captured_ns] for i in e.images)] for e in entries),
    }
    if d.authority:  # the written authority (#16) is approved with the list
        body["authority"] = {k: v for k, v in sorted(d.authority.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def watchlist_violations(policy: Policy, entries: list[EntryRecord], now_ns: int) -> list[str]:
    """Every reason the watchlist breaks the policy now (checked again at authorisation)."""
    out = []
    if not entries:
        out.append("the watchlist is empty")
    if len(entries) > policy.max_watchlist_size:
        out.append(f"{len(entries)} entries: policy {policy.version} allows at most {policy.max_watchlist_size}")
    for e in entries:
        reason = policy.entry_refusal(e.category, 0)
        if reason:
            out.append(f"entry {e.subject_ref}: {reason}")
        for n, img in enumerate(e.images):
            q = img.quality
            reason = policy.image_refusal(1, q.get("inter_eye_px", 0.0), q.get("sharpness", 0.0),
                                          q.get("yaw_deg", 0.0), q.get("pitch_deg", 0.0), img.captured_ns, now_ns)
            if reason:
                out.append(f"entry {e.subject_ref} image {n}: {reason}")
    return out


def validate_new_deployment(req: pb.CreateDeploymentRequest, recipe: Recipe) -> tuple[str, float]:
    """Returns (error, threshold): error is '' when the request's fields are acceptable. The threshold is the
    request's or the model's default, and must be in the model's valid range (`lfr.models.scoring`)."""
    from lfr.runtime.subjects import token

    if not req.name.strip():
        return "name is required", 0.0
    if not req.cameras:
        return "at least one camera is required", 0.0
    for cam in req.cameras:
        try:
            token(cam, "camera id")
        except ValueError as exc:
            return f"camera {cam!r}: {exc}", 0.0
    if len(set(req.cameras)) != len(req.cameras):
        return "camera ids must be unique", 0.0
    threshold = req.threshold or recipe.threshold
    error = recipe.threshold_error(threshold)
    if error:
        return error, 0.0
    for name in ("planned_start", "planned_end"):
        try:
            getattr(req, name).ToNanoseconds()
        except ValueError:  # protobuf's own range: years 0001 to 9999
            return f"{name}: not a valid time (years 0001 to 9999 UTC)", 0.0
    if req.planned_end.seconds and req.planned_end.ToNanoseconds() <= req.planned_start.ToNanoseconds():
        return "planned_end must be after planned_start", 0.0
    return "", threshold


def validate_governance(req: pb.CreateDeploymentRequest, now_ns: int, policy: Policy | None = None,
                        model_id: str = "", threshold: float = 0.0) -> str:
    """What a deployment needs beyond its technical fields: an actor, a place, a purpose and a window; with
    the policy, its written authority, its time limits and the threshold floor of its model."""
    if not req.actor.strip():
        return "actor is required"
    if not req.site.strip():
        return "site is required"
    if not req.purpose.strip():
        return "purpose is required"
    if not req.planned_start.seconds or not req.planned_end.seconds:
        return "planned_start and planned_end are required: a deployment is time-limited"
    if req.planned_end.ToNanoseconds() <= now_ns:
        return "planned_end is in the past"
    if req.HasField("site_location"):
        loc = req.site_location
        if not (-90 <= loc.latitude <= 90 and -180 <= loc.longitude <= 180):
            return "site_location: latitude must be in [-90, 90] and longitude in [-180, 180]"
    if policy is not None:
        return (policy.authority_refusal(dict(req.authority))
                or policy.time_refusal(req.planned_start.ToNanoseconds(), req.planned_end.ToNanoseconds(), now_ns)
                or policy.threshold_refusal(model_id, threshold, req.threshold_reason))
    return ""


def iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))
