"""The published deployment records, computed from the audit's own records. Pure: no I/O.

Per deployment that started: its date, start and end, site, purpose, watchlist size and threshold at the
start, model, faces seen (summed over match instances: each instance's counters are cumulative), alerts
(distinct alert ids), and from officers' latest adjudication of each alert: confirmed, false, not engaged,
arrests; the false alert rate is false alerts / faces seen, also as "1 in N". No names, no images.

#16 adds: the threshold against the policy's floor (flagged with the stated reason), urgent use and whether it was
confirmed, the expected false alerts per 10,000 faces shown at authorisation, engagements as forces report them
(none, words of advice, arrest, other; minutes; false alerts where the person was informed), and the
equitability breakdown of confirmed and false alerts by each attribute the policy names, a count under the
policy's minimum (but not zero) suppressed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from lfr.audit.chain import ChainRecord

TYPES = ("deployment.started", "deployment.ended", "alert.raised", "alert.adjudicated", "alert.amended",
         "match.stats", "deployment.urgent_confirmed", "deployment.urgent_lapsed")
NOT_RECORDED = "not recorded"
ENGAGEMENT_KEYS = {"ENGAGEMENT_NO_ACTION": "none", "ENGAGEMENT_WORDS_OF_ADVICE": "words_of_advice",
                   "ENGAGEMENT_ARREST": "arrests", "ENGAGEMENT_OTHER_ACTION": "other_outcome"}


def _ns(text: str | None, default: int) -> int:
    if not text:
        return default
    ts = Timestamp()
    ts.FromJsonString(text)
    return ts.ToNanoseconds()


def date_of(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d")


def one_in(faces_seen: int, false_alerts: int) -> int:
    return round(faces_seen / false_alerts) if false_alerts else 0


@dataclass
class Counts:
    faces_seen: int = 0
    alerts: int = 0
    confirmed_alerts: int = 0
    false_alerts: int = 0
    not_engaged: int = 0
    unadjudicated: int = 0
    arrests: int = 0
    # engagements as forces report them (arrests above)
    engagements_none: int = 0
    words_of_advice: int = 0
    other_outcome: int = 0
    engagement_minutes: int = 0
    false_alerts_informed: int = 0
    below_floor: int = 0
    urgent_uses: int = 0

    @property
    def false_alert_rate(self) -> float:
        return self.false_alerts / self.faces_seen if self.faces_seen else 0.0

    @property
    def false_alert_one_in(self) -> int:
        return one_in(self.faces_seen, self.false_alerts)

    def add(self, other: Counts) -> None:
        for f in fields(Counts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Breakdown:
    """Confirmed and false alerts by (attribute, value); raw counts (suppressed only when shown)."""

    counts: dict = field(default_factory=dict)  # (attribute, value) -> [confirmed, false]
    min_count: int = 0

    def count(self, attribute: str, value: str, outcome: str) -> None:
        cell = self.counts.setdefault((attribute, value), [0, 0])
        cell[0] += outcome == "OUTCOME_CONFIRMED_MATCH"
        cell[1] += outcome == "OUTCOME_FALSE_ALERT"

    def add(self, other: Breakdown) -> None:
        for key, (c, f) in other.counts.items():
            cell = self.counts.setdefault(key, [0, 0])
            cell[0] += c
            cell[1] += f
        self.min_count = max(self.min_count, other.min_count)

    def rows(self) -> list[dict]:
        """The breakdown as shown: a row whose confirmed or false count is under the minimum (but not zero) is
        suppressed (its counts hidden), so a small group cannot be singled out."""
        out = []
        for (attribute, value), (c, f) in sorted(self.counts.items()):
            small = any(0 < n < self.min_count for n in (c, f))
            out.append({"attribute": attribute, "value": value, "confirmed": 0 if small else c,
                        "false_alerts": 0 if small else f, "suppressed": small})
        return out


@dataclass
class Published(Counts):
    deployment_id: str = ""
    date: str = ""
    start_ns: int = 0
    end_ns: int = 0  # 0 while active
    site: str = ""
    purpose_category: str = ""
    watchlist_size: int = 0
    threshold: float = 0.0
    model: str = ""
    status: str = "active"
    threshold_below_floor: bool = False
    threshold_floor: float = 0.0
    threshold_reason: str = ""
    urgent: bool = False
    urgent_confirmed: bool = False
    expected_false_alerts_per_10k: float = -1.0
    equitability: Breakdown = field(default_factory=Breakdown)


def published_record(records: Iterable[ChainRecord]) -> Published | None:
    """The published record of one deployment from its records (of TYPES), or None if it never started."""
    records = list(records)
    started = next((r for r in records if r.type == "deployment.started"), None)
    if started is None:
        return None
    d = json.loads(started.summary_json).get("deployment", {})
    p = Published(deployment_id=started.deployment_id, site=d.get("site", ""), purpose_category=d.get("purpose", ""),
                  watchlist_size=int(d.get("watchlist_size", 0)), threshold=float(d.get("threshold", 0.0)),
                  model=" ".join(x for x in (d.get("model_id", ""), d.get("model_version", "")) if x))
    p.start_ns = _ns(d.get("started_at"), started.time_ns)
    p.date = date_of(p.start_ns)
    p.threshold_below_floor, p.threshold_reason = bool(d.get("threshold_below_floor")), d.get("threshold_reason", "")
    p.threshold_floor = float(d.get("threshold_floor", 0.0))
    p.below_floor = int(p.threshold_below_floor)
    p.urgent = bool(d.get("urgent"))
    p.urgent_uses = int(p.urgent)
    p.urgent_confirmed = any(r.type == "deployment.urgent_confirmed" for r in records)
    p.expected_false_alerts_per_10k = float(d.get("expected_false_alerts_per_10k", 0.0))
    attributes = list(d.get("equitability_attributes", []))
    p.equitability.min_count = int(d.get("equitability_min_count", 0))
    ended = next((r for r in records if r.type == "deployment.ended"), None)
    if ended is not None:
        p.end_ns = _ns(json.loads(ended.summary_json).get("deployment", {}).get("ended_at"), ended.time_ns)
        p.status = "ended"
    faces: dict[str, int] = {}
    alerts: set[str] = set()
    latest: dict[str, dict] = {}
    for r in records:
        if r.type == "match.stats":
            s = json.loads(r.summary_json)
            instance = s.get("instance_id", "")
            faces[instance] = max(faces.get(instance, 0), int(s.get("faces_seen", 0)))
        elif r.type == "alert.raised":
            alerts.add(r.subject)
        elif r.type in ("alert.adjudicated", "alert.amended"):
            latest[r.subject] = json.loads(r.summary_json).get("adjudication", {})
    p.faces_seen = sum(faces.values())
    p.alerts = len(alerts)
    for alert_id in alerts:
        adj = latest.get(alert_id)
        if adj is None:
            p.unadjudicated += 1
            continue
        outcome = adj.get("outcome", "")
        p.confirmed_alerts += outcome == "OUTCOME_CONFIRMED_MATCH"
        p.false_alerts += outcome == "OUTCOME_FALSE_ALERT"
        p.not_engaged += outcome == "OUTCOME_NOT_ENGAGED"
        if outcome not in ("OUTCOME_CONFIRMED_MATCH", "OUTCOME_FALSE_ALERT"):
            continue
        key = ENGAGEMENT_KEYS.get(adj.get("engagement", ""), "")
        if key:
            attr = "engagements_none" if key == "none" else key
            setattr(p, attr, getattr(p, attr) + 1)
        p.engagement_minutes += int(adj.get("engagement_minutes", 0))
        p.false_alerts_informed += outcome == "OUTCOME_FALSE_ALERT" and bool(adj.get("person_informed"))
        given = adj.get("attributes", {})
        for name in dict.fromkeys([*attributes, *sorted(given)]):
            p.equitability.count(name, given.get(name, NOT_RECORDED), outcome)
    return p


def totals(records: Iterable[Published]) -> tuple[int, Counts]:
    total, n = Counts(), 0
    for p in records:
        n += 1
        total.add(p)
    return n, total


def breakdown(records: Iterable[Published]) -> Breakdown:
    """The equitability breakdown of a period: raw counts summed, then suppressed with the largest minimum."""
    out = Breakdown()
    for p in records:
        out.add(p.equitability)
    return out


def period_ns(from_date: str, to_date: str) -> tuple[int, int]:
    """[start, end) in ns of a period of UTC dates, inclusive at both ends; empty = open. ValueError if bad."""
    def day(text: str) -> int:
        try:
            return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() * 1e9)
        except ValueError:
            raise ValueError(f"not a date (YYYY-MM-DD): {text!r}") from None

    start = day(from_date) if from_date else 0
    end = day(to_date) + 86400 * 10**9 if to_date else 2**63 - 1
    if end <= start:
        raise ValueError("the period ends before it starts")
    return start, end
