"""Issue 16 in the records: engagements and the equitability breakdown (with suppression) in the published record,
the threshold-floor and urgent flags, match's engagement rules and its purge of alert images on lapsed urgent
use, and the CLI's usage export, subject lookup and post-deployment page read back with a parser."""

from __future__ import annotations

import json
from dataclasses import replace
from html.parser import HTMLParser

from lfr.audit import chain, report
from lfr.audit.core import record_from_event
from lfr.audit.service import published_pb, totals_pb
from lfr.cli import governance
from lfr.match.alerts import AlertBook
from lfr.match.core import engagement_refusal
from lfr.pb import match_pb2, watchlist_pb2
from lfr.runtime import events
from lfr.runtime.clock import ManualClock

T0 = 1_760_000_000 * 10**9
M = match_pb2
ATTRS = {"perceived_sex": ["female", "male"], "age_band": ["18-24", "25-34"]}


def lifecycle(dep: str, action: str, t_ns: int, reason: str = "", **fields) -> bytes:
    d = watchlist_pb2.Deployment(id=dep, site="Station Square", purpose="wanted offenders", threshold=0.40,
                                 model_id="sface-2021dec", model_version="1", **fields)
    return watchlist_pb2.DeploymentEvent(envelope=events.envelope("watchlist", dep, capture_ns=t_ns), deployment=d,
                                         action=action, actor="op", reason=reason).SerializeToString()


def chain_of(*facts: tuple[str, bytes]) -> list[chain.ChainRecord]:
    recs, head = [], None
    for n, (subject, payload) in enumerate(facts, 1):
        r = record_from_event(subject, payload)
        head = chain.link(head, replace(r, time_ns=r.time_ns or T0), f"S:{n}")
        recs.append(head)
    return recs


# (outcome, engagement, minutes, informed, attributes) of six alerts
ADJUDICATIONS = [
    (M.OUTCOME_CONFIRMED_MATCH, M.ENGAGEMENT_ARREST, 20, False, {"perceived_sex": "male", "age_band": "18-24"}),
    (M.OUTCOME_CONFIRMED_MATCH, M.ENGAGEMENT_WORDS_OF_ADVICE, 5, False, {"perceived_sex": "male"}),
    (M.OUTCOME_CONFIRMED_MATCH, M.ENGAGEMENT_OTHER_ACTION, 10, False, {"perceived_sex": "male"}),
    (M.OUTCOME_FALSE_ALERT, M.ENGAGEMENT_NO_ACTION, 3, True, {"perceived_sex": "female"}),
    (M.OUTCOME_FALSE_ALERT, M.ENGAGEMENT_WORDS_OF_ADVICE, 2, False, {}),
    (M.OUTCOME_NOT_ENGAGED, M.ENGAGEMENT_NO_ACTION, 0, False, {}),
]


def deployment_records(dep: str = "d1") -> list[chain.ChainRecord]:
    facts = [(f"lfr.v1.lifecycle.{dep}", lifecycle(
        dep, "started", T0, watchlist_size=7, started_at=events.ts_from_ns(T0), threshold_floor=0.467,
        threshold_below_floor=True, threshold_reason="missing child; old custody image", urgent=True,
        urgent_by="supt", urgent_rank="superintendent", equitability_attributes=sorted(ATTRS),
        equitability_min_count=3, expected_false_alerts_per_10k=12.5, authorised_digest="ab" * 32))]
    for i, (outcome, engagement, minutes, informed, attrs) in enumerate(ADJUDICATIONS):
        env = events.envelope("match", dep, f"cam-{i % 2}")
        facts.append((f"lfr.v1.alerts.{dep}.cam-{i % 2}", M.Alert(
            envelope=env, alert_id=f"{dep}-a{i}", subject_ref=f"N{i}", revision=0, score=0.6,
            raised_at=events.ts_from_ns(T0 + i * 10**9)).SerializeToString()))
        facts.append((f"lfr.v1.adjudications.{dep}", M.AlertAdjudicated(
            envelope=env, alert_id=f"{dep}-a{i}", adjudication=M.Adjudication(
                outcome=outcome, engagement=engagement, actor=f"pc{i}", engagement_minutes=minutes,
                person_informed=informed, attributes=attrs)).SerializeToString()))
    facts.append((f"lfr.v1.lifecycle.{dep}", lifecycle(dep, "urgent_confirmed", T0 + 3600 * 10**9)))
    return chain_of(*facts)


def test_published_record_counts_engagements_and_flags_floor_and_urgency():
    recs = deployment_records()
    p = report.published_record([r for r in recs if r.type in report.TYPES])
    assert (p.confirmed_alerts, p.false_alerts, p.not_engaged) == (3, 2, 1)
    assert (p.arrests, p.words_of_advice, p.other_outcome, p.engagements_none) == (1, 2, 1, 1)
    assert p.engagement_minutes == 40 and p.false_alerts_informed == 1
    assert p.threshold_below_floor and p.threshold_floor == 0.467 and "missing child" in p.threshold_reason
    assert p.urgent and p.urgent_confirmed and p.expected_false_alerts_per_10k == 12.5
    out = published_pb(p)
    assert out.threshold_below_floor and out.engagements.words_of_advice == 2 and out.engagements.minutes == 40


def test_equitability_breakdown_suppresses_small_counts():
    p = report.published_record([r for r in deployment_records() if r.type in report.TYPES])
    rows = {(r["attribute"], r["value"]): r for r in p.equitability.rows()}
    # male: 3 confirmed, 0 false -> shown (3 is not under the minimum 3; 0 is not suppressed)
    assert rows[("perceived_sex", "male")] == {"attribute": "perceived_sex", "value": "male", "confirmed": 3,
                                               "false_alerts": 0, "suppressed": False}
    # female: 1 false alert -> suppressed; age band 18-24: 1 confirmed -> suppressed
    assert rows[("perceived_sex", "female")]["suppressed"] and rows[("perceived_sex", "female")]["false_alerts"] == 0
    assert rows[("age_band", "18-24")]["suppressed"]
    # not recorded: sex missing on one false alert (1: suppressed); age band missing on 2 confirmed + 2 false
    assert rows[("perceived_sex", report.NOT_RECORDED)]["suppressed"]
    assert rows[("age_band", report.NOT_RECORDED)]["suppressed"]  # 2 confirmed, 2 false: both under 3
    # the period: two such deployments sum their raw counts before suppression
    p2 = report.published_record([r for r in deployment_records("d2") if r.type in report.TYPES])
    total = report.breakdown([p, p2])
    rows = {(r["attribute"], r["value"]): r for r in total.rows()}
    assert rows[("perceived_sex", "male")]["confirmed"] == 6
    assert not rows[("age_band", report.NOT_RECORDED)]["suppressed"]  # 4 and 4 now
    assert rows[("age_band", report.NOT_RECORDED)]["confirmed"] == 4
    assert rows[("perceived_sex", "female")]["suppressed"]  # 2 false alerts: still under 3
    n, t = report.totals([p, p2])
    pb_totals = totals_pb("", "", n, t, total)
    assert pb_totals.suppress_below == 3 and pb_totals.below_floor == 2 and pb_totals.urgent == 2
    assert pb_totals.engagements.arrests == 2 and pb_totals.engagements.false_alerts_informed == 2


def test_engagement_rules():
    assert engagement_refusal(M.OUTCOME_CONFIRMED_MATCH, 15, False, {"perceived_sex": "male"}, ATTRS) == ""
    assert "between 0 and 1440" in engagement_refusal(M.OUTCOME_CONFIRMED_MATCH, 2000, False, {}, ATTRS)
    assert "no engagement duration" in engagement_refusal(M.OUTCOME_NOT_ENGAGED, 5, False, {}, ATTRS)
    assert "false alerts only" in engagement_refusal(M.OUTCOME_CONFIRMED_MATCH, 0, True, {}, ATTRS)
    assert "'ethnicity' is not one the policy names" in engagement_refusal(
        M.OUTCOME_FALSE_ALERT, 0, True, {"ethnicity": "x"}, ATTRS)
    assert "not one of female, male" in engagement_refusal(M.OUTCOME_FALSE_ALERT, 0, False,
                                                           {"perceived_sex": "x"}, ATTRS)


def test_lapsed_urgent_use_deletes_the_alerts_images_with_a_fact(tmp_path):
    book = AlertBook(tmp_path / "alerts.sqlite", ManualClock(T0), due_s=900, retention_s=31 * 86400)
    for i in range(2):
        book.record(M.Alert(envelope=events.envelope("match", "d1", "c1"), alert_id=f"a{i}", revision=0,
                            raised_at=events.now_ts()), b"\xff\xd8\xffcrop", b"\xff\xd8\xffref")
    book.record(M.Alert(envelope=events.envelope("match", "d2", "c1"), alert_id="other", revision=0), b"\xff\xd8x")
    ev = book.delete_deployment_images("d1", "urgent use not confirmed")
    assert ev.reason == "urgent use not confirmed" and list(ev.alert_ids) == ["a0", "a1"]
    assert ev.probe_crops_deleted == 2 and ev.reference_copies_deleted == 2
    assert book.current("a0") == (0, b"", True) and book.current("other")[1]  # the other deployment keeps its own
    assert book.delete_deployment_images("d1", "again") is None
    facts = [M.CropsDeleted.FromString(r.data) for r in book.pending(100) if ".retention." in r.subject]
    assert [f.reason for f in facts] == ["urgent use not confirmed"]
    book.close()


def dicts(recs: list[chain.ChainRecord]) -> list[dict]:
    return [{"sequence": r.sequence, "time_ns": r.time_ns, "type": r.type, "actor": r.actor,
             "deployment_id": r.deployment_id, "subject": r.subject, "summary": json.loads(r.summary_json)}
            for r in recs]


def test_usage_export_per_use_from_the_records():
    recs = dicts(deployment_records())
    started = recs[0]["time_ns"]  # a use belongs to the period its start was recorded in
    uses = governance.usage(recs, started - 10**9, started + 10**9)
    assert len(uses) == 1
    u = uses[0]
    assert u["reference_database"] == {"watchlist_digest": "ab" * 32, "entries": 7, "model": "sface-2021dec 1",
                                       "threshold": u["reference_database"]["threshold"]}
    assert u["urgent"] and u["period"]["start"].startswith("2025-10-09")  # the deployment's own started_at
    assert [m["alert_id"] for m in u["matches"]] == [f"d1-a{i}" for i in range(6)]
    assert [m["camera"] for m in u["matches"][:2]] == ["cam-0", "cam-1"]
    assert u["matches"][3]["verifications"][0]["verified_by"] == "pc3"
    assert u["matches"][3]["verifications"][0]["outcome"] == "false_alert"
    assert "probe_jpeg" not in json.dumps(uses)
    assert governance.usage(recs, started + 10**9, started + 2 * 10**9) == []  # outside the period


def test_subject_lookup_lists_each_deployment_and_its_course():
    recs = chain_of(
        ("lfr.v1.watchlist.d1", watchlist_pb2.WatchlistEvent(
            envelope=events.envelope("watchlist", "d1"), action="entry_added", actor="dc", entry_id="e1",
            subject_ref="N7", category=watchlist_pb2.CATEGORY_WANTED_BY_COURT, legal_basis="warrant")
         .SerializeToString()),
        ("lfr.v1.watchlist.d2", watchlist_pb2.WatchlistEvent(
            envelope=events.envelope("watchlist", "d2"), action="entry_added", actor="dc", entry_id="e2",
            subject_ref="N8").SerializeToString()),
        ("lfr.v1.lifecycle.d1", lifecycle("d1", "started", T0, watchlist_size=1)),
        ("lfr.v1.alerts.d1.c1", M.Alert(envelope=events.envelope("match", "d1", "c1"), alert_id="a1",
                                        subject_ref="N7", revision=0).SerializeToString()),
        ("lfr.v1.adjudications.d1", M.AlertAdjudicated(
            envelope=events.envelope("match", "d1"), alert_id="a1", adjudication=M.Adjudication(
                outcome=M.OUTCOME_CONFIRMED_MATCH, engagement=M.ENGAGEMENT_ARREST, actor="pc")).SerializeToString()),
        ("lfr.v1.watchlist.d1", watchlist_pb2.WatchlistEvent(
            envelope=events.envelope("watchlist", "d1"), action="watchlist_purged", actor="system:sweeper",
            kept_subject_refs=["N7"], vectors_deleted=1, images_deleted=1).SerializeToString()),
        ("lfr.v1.lifecycle.d1", lifecycle("d1", "purged", T0)),
    )
    h = governance.subject_history(dicts(recs), "N7")
    assert [d["deployment_id"] for d in h["deployments"]] == ["d1"]
    d = h["deployments"][0]
    assert [x["event"] for x in d["list"]] == ["entry_added", "watchlist_purged"]
    assert d["alerts"][0]["alert_id"] == "a1" and d["alerts"][0]["verifications"][0]["engagement"] == "arrest"
    assert [c["event"] for c in d["course"]] == ["started", "purged"]
    assert governance.subject_history(dicts(recs), "N9")["deployments"] == []


class Tables(HTMLParser):
    """Reads each table (by id) into rows of cell texts, and each element with an id into its text."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.texts: dict[str, str] = {}
        self._table = self._cell = None
        self._ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        if "id" in a:
            self._ids.append(a["id"])
            self.texts.setdefault(a["id"], "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table is not None:
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        for i in self._ids:
            self.texts[i] += data


def test_post_deployment_page_reads_back():
    recs = dicts(deployment_records())
    d = {"id": "d1", "name": "Station op", "status": "PURGED", "site": "Station Square", "purpose": "warrants",
         "legal_basis": "common law", "authority": {"dpia_reference": "DPIA-7", "public_notice": "yes"},
         "approvals": [{"actor": "ao", "at": "2025-10-09T10:00:00Z"}], "policy_version": "p-1",
         "authorised_digest": "ab" * 32, "threshold": 0.4, "model": {"id": "sface-2021dec"},
         "expected_false_alerts_per_10k": 12.5, "false_alert_table": "nonmated_sface-2021dec.json",
         "cameras": ["cam-0", "cam-1"], "start": "s", "end": "e", "purged_at": "2025-10-09T12:00:00Z",
         "threshold_below_floor": True, "threshold_floor": 0.467, "threshold_reason": "old custody image",
         "urgent": {"by": "supt", "rank": "superintendent", "reason": "child at risk", "started_at": "x",
                    "confirm_by": "y", "confirmed_at": "z"}}
    entries = [{"category": "wanted-by-court"}] * 4 + [{"category": "missing-vulnerable"}] * 3
    published = {"faces_seen": 900, "alerts": 6, "confirmed_alerts": 3, "false_alerts": 2, "not_engaged": 1,
                 "unadjudicated": 0, "engagements": {"arrests": 1, "words_of_advice": 2}}
    alerts = governance.usage(recs, 0, 2**63 - 1)[0]["matches"]
    page = governance.post_deployment_html(d, entries, published, alerts, governance.timeline_of(d, recs),
                                           "chain verified: 14 records, intact")
    t = Tables()
    t.feed(page)
    assert t.tables["composition"][1:] == [["missing-vulnerable", "3"], ["wanted-by-court", "4"]]
    assert t.tables["outcomes"][1][:6] == ["900", "6", "3", "2", "1", "0"]
    assert [r[0] for r in t.tables["alerts"][1:]] == [f"d1-a{i}" for i in range(6)]
    assert t.tables["alerts"][4][3] == "false_alert" and t.tables["alerts"][4][5] == "pc3"
    assert "DPIA-7" in t.texts["authority"] and "12.50 per 10,000" in t.texts["expected"]
    assert "under the policy's floor 0.467" in t.texts["floor-flag"]
    assert "purged at 2025-10-09T12:00:00Z" in t.texts["purge"]
    assert {r[1] for r in t.tables["timeline"][1:]} >= {"started", "urgent_confirmed"}
    assert "<script" not in page and "src=" not in page  # self-contained: nothing fetched
