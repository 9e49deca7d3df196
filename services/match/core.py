"""Pure core of the match service: decide match / no match per face, keep the counters. No I/O."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lfr.errors import FailedPrecondition, Invalid
from lfr.pb import match_pb2


@dataclass
class Decision:
    face_index: int
    matched: bool
    entry_id: str = ""
    subject_ref: str = ""
    score: float = 0.0


def decide_top(tops: list[list[tuple[str, float]]], subject_refs: dict[str, str], threshold: float
               ) -> list[Decision]:
    """Per face, its best (entry id, score) from the in-memory watchlist against the deployment threshold."""
    out = []
    for i, top in enumerate(tops):
        if top and top[0][1] >= threshold:
            out.append(Decision(i, True, top[0][0], subject_refs.get(top[0][0], ""), top[0][1]))
        else:
            out.append(Decision(i, False, score=top[0][1] if top else 0.0))
    return out


@dataclass
class Counters:
    """Per-deployment counts. Disposal times are kept as a bounded sample of numbers, nothing else."""

    faces_seen: int = 0
    alerts: int = 0
    alert_updates: int = 0
    nonmatches_disposed: int = 0
    stale_dropped: int = 0
    disposal_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))
    disposal_ms_max: float = 0.0
    changed_ns: int = 0

    def disposed(self, ms: float) -> None:
        self.nonmatches_disposed += 1
        self.disposal_ms.append(ms)
        self.disposal_ms_max = max(self.disposal_ms_max, ms)
        self.changed_ns = time.time_ns()

    @property
    def disposal_ms_p50(self) -> float:
        if not self.disposal_ms:
            return 0.0
        s = sorted(self.disposal_ms)
        return s[len(s) // 2]


NOTE_MAX = 4000


def check_adjudication(outcome: int, engagement: int, note: str, actor: str, already: bool, amend: bool) -> None:
    """Nothing if an adjudication may be recorded, else raises Invalid or FailedPrecondition (lfr.errors) with the
    reason. Enums as match_pb2 numbers."""
    if not actor.strip():
        raise Invalid("actor is required: the officer who adjudicates")
    if outcome not in (match_pb2.OUTCOME_CONFIRMED_MATCH, match_pb2.OUTCOME_FALSE_ALERT,
                       match_pb2.OUTCOME_NOT_ENGAGED):
        raise Invalid("outcome is required: confirmed match, false alert or not engaged")
    if engagement not in match_pb2.Engagement.values():
        raise Invalid(f"unknown engagement {engagement}")
    if outcome == match_pb2.OUTCOME_NOT_ENGAGED:
        if engagement not in (match_pb2.ENGAGEMENT_UNSPECIFIED, match_pb2.ENGAGEMENT_NO_ACTION):
            raise Invalid("a not-engaged alert has no engagement result (no action)")
    elif engagement == match_pb2.ENGAGEMENT_UNSPECIFIED:
        raise Invalid("engagement is required for a confirmed match or a false alert: arrest, other action or no "
                      "action")
    if len(note) > NOTE_MAX:
        raise Invalid(f"note is longer than {NOTE_MAX} characters")
    if already and not amend:
        raise FailedPrecondition("the alert is already adjudicated; set amend to replace the outcome")


MAX_ENGAGEMENT_MINUTES = 24 * 60


def engagement_refusal(outcome: int, minutes: int, informed: bool, attributes: dict[str, str],
                       allowed: dict[str, list[str]]) -> str:
    """'' if the engagement's duration, the informed flag and the equitability attributes may be recorded with
    this outcome; `allowed` is the policy's equitability.attributes (name -> values)."""
    if not 0 <= minutes <= MAX_ENGAGEMENT_MINUTES:
        return f"engagement_minutes must be between 0 and {MAX_ENGAGEMENT_MINUTES}"
    if outcome == match_pb2.OUTCOME_NOT_ENGAGED and minutes:
        return "a not-engaged alert has no engagement duration"
    if informed and outcome != match_pb2.OUTCOME_FALSE_ALERT:
        return "person_informed is recorded for false alerts only (the person was told of the wrong match)"
    for name, value in sorted(attributes.items()):
        if name not in allowed:
            return (f"attribute {name!r} is not one the policy names "
                    f"(equitability.attributes: {', '.join(sorted(allowed)) or 'none'})")
        if value not in allowed[name]:
            return f"attribute {name}: {value!r} is not one of {', '.join(allowed[name])}"
    return ""


def reference_refusal(code: str, details: str) -> str:
    """AlertReview.reference_status for a refused or failed fetch of the reference image (status name, message)."""
    if code == "FAILED_PRECONDITION":  # the watchlist was purged: its message says when
        return details
    if code == "PERMISSION_DENIED":
        return f"the watchlist service refuses this caller its images: {details}"
    if code == "NOT_FOUND":
        return f"the entry is no longer on the watchlist: {details}"
    return f"the reference image could not be fetched from the watchlist service ({code}); try again"
