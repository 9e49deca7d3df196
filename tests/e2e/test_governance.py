"""Issue 16 through the whole system (real nats-server, six services, real models) under a force's policy file:
the written authority and time limits refused naming the rule, a threshold under the floor refused without a
reason and flagged with one, urgent use confirmed in time (continues) and not confirmed (stopped, watchlist and
alert images purged at the limit on a moved clock, all audited), engagements and equitability attributes recorded
by officers, and the post-deployment page, the usage export, the equitability table and the subject lookup read
back and cross-checked against the audit records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import grpc
import pytest

from lfr.cli.live import AlertCollector, capture_date, stream_video
from lfr.models import nonmated
from lfr.pb import audit_pb2, match_pb2, watchlist_pb2
from lfr.runtime import events
from lfr.runtime.clock import wait_for
from lfr.runtime.embedded import EmbeddedSystem

SITE = "Queen Street, Cardiff"
CAMERA = "cam-gov"
LIMIT_H = 1.0  # urgent use must be confirmed within an hour under this policy
LFR = [sys.executable, "-m", "lfr.cli.main"]
AUTHORITY = {"policing_purpose": "locate people wanted on warrant", "place_and_time_reasons": "match day crowd",
             "community_impact": "low: consulted", "dpia_reference": "DPIA-2026-014", "public_notice": "yes"}
POLICY = {
    "version": "force-16", "categories": ["wanted-by-court", "wanted-by-police", "missing-vulnerable"],
    "max_watchlist_size": 50,
    "enrollment": {"min_inter_eye_px": 10, "min_sharpness": 0, "max_abs_yaw_deg": 60, "max_abs_pitch_deg": 60,
                   "max_image_age_days": 0},
    "approved_sites": [{"name": SITE, "latitude": 51.4817, "longitude": -3.1745}],
    "authority_fields": [{"name": k, "label": k.replace("_", " "), "required": True} for k in AUTHORITY],
    "time_limits": {"max_deployment_hours": 12, "max_days_ahead": 14},
    "urgent": {"ranks": ["superintendent"], "confirm_within_hours": LIMIT_H},
    "threshold_floors": {"sface-2021dec": {"floor": 0.467, "reason": "NPL 2023: no differences at or above"}},
    "equitability": {"attributes": {"perceived_sex": ["female", "male"], "age_band": ["18-24", "25-34"]},
                     "min_count": 2},
}


@pytest.fixture(scope="module")
def clock_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clock") / "offset_s"


@pytest.fixture(scope="module")
def system(tmp_path_factory, clock_file):
    policy = tmp_path_factory.mktemp("policy") / "policy.json"
    policy.write_text(json.dumps(POLICY))
    env = {"LFR_POLICY_FILE": str(policy), "LFR_CLOCK_OFFSET_FILE": str(clock_file), "LFR_SWEEP_INTERVAL_S": "0.5",
           "LFR_ALERT_SWEEP_INTERVAL_S": "0.5", "LFR_ADJUDICATION_DUE_S": "86400"}
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env=env) as s:
        yield s


def request(**kw) -> watchlist_pb2.CreateDeploymentRequest:
    now = time.time_ns()
    base = dict(name="match day", purpose="wanted on warrant", legal_basis="common law", site=SITE,
                planned_start=events.ts_from_ns(now - 60 * 10**9), planned_end=events.ts_from_ns(now + 4 * 3600 * 10**9),
                cameras=[CAMERA], actor="builder", authority=AUTHORITY)
    base.update(kw)
    return watchlist_pb2.CreateDeploymentRequest(**base)


def refusal(fn, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(req, timeout=30)
    return info.value


def records(clients, deployment_id: str = "", prefix: str = "") -> list[audit_pb2.Record]:
    return list(clients.audit.Query(audit_pb2.QueryRequest(deployment_id=deployment_id, type_prefix=prefix,
                                                           limit=10000), timeout=30).records)


def lfr(system, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*LFR, *args, "--state-dir", str(system.state_dir), "--as", system.add_dev_user("gov-e2e")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_authority_time_limits_and_the_threshold_floor_are_enforced(clients, system):
    create = clients.watchlist.CreateDeployment
    missing = dict(AUTHORITY)
    del missing["dpia_reference"]
    err = refusal(create, request(authority=missing))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "authority field dpia_reference" in err.details() and "authority_fields of policy force-16" in err.details()
    now = time.time_ns()
    err = refusal(create, request(planned_end=events.ts_from_ns(now + 400 * 86400 * 10**9)))
    assert "time_limits.max_deployment_hours of policy force-16" in err.details()
    err = refusal(create, request(threshold=0.40))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "under the floor 0.467" in err.details()
    d = create(request(threshold=0.40, threshold_reason="a missing child; only an old custody image"), timeout=30)
    assert d.threshold_below_floor and d.threshold_floor == pytest.approx(0.467)
    assert dict(d.authority) == AUTHORITY
    flagged = wait_for(lambda: records(clients, d.id, "deployment.threshold_below_floor"))
    assert "a missing child" in json.loads(flagged[0].summary_json)["reason"]
    shown = json.loads(lfr(system, "deployment", "show", d.id, "--json").stdout)
    assert shown["authority"] == AUTHORITY and shown["threshold_below_floor"]


def enroll(clients, d, people: dict[str, Path]) -> None:
    for ref, photo in people.items():
        r = clients.watchlist.EnrollEntry(watchlist_pb2.EnrollEntryRequest(
            deployment_id=d.id, subject_ref=ref, category=watchlist_pb2.CATEGORY_WANTED_BY_COURT,
            source_system="custody", legal_basis="warrant", images=[photo.read_bytes()],
            captured_at=[events.ts_from_ns(capture_date(photo)[0])], actor="builder"), timeout=120)
        assert r.entry_id, r


@pytest.fixture(scope="module")
def urgent(clients, ground_truth, system):
    """Two deployments started under urgency: one confirmed in time, one with alerts on the ground-truth video
    that nobody confirms."""
    video = system.state_dir / "media" / "gt.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(ground_truth.video.read_bytes())
    out = {}
    for name in ("confirmed", "lapsing"):
        d = clients.watchlist.CreateDeployment(request(name=name), timeout=30)
        enroll(clients, d, ground_truth.enrolled)
        err = refusal(clients.watchlist.StartDeployment, watchlist_pb2.TransitionRequest(
            deployment_id=d.id, actor="supt", urgent=True, rank="inspector", reason="child at risk"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "urgent.ranks" in err.details()
        d = clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(
            deployment_id=d.id, actor="supt", urgent=True, rank="superintendent", reason="child at risk"), timeout=30)
        assert d.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE and d.urgent and not d.urgent_confirmed_at.seconds
        assert d.urgent_confirm_by.ToNanoseconds() - d.urgent_started_at.ToNanoseconds() == int(LIMIT_H * 3600e9)
        out[name] = d
    d = clients.watchlist.AuthoriseDeployment(watchlist_pb2.AuthoriseRequest(
        deployment_id=out["confirmed"].id, actor="ao"), timeout=30)
    assert d.urgent_confirmed_at.seconds and d.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE
    # the expected false alerts shown at authorisation are the shipped table's for this list size and threshold
    table = nonmated.load_table(d.model_id)
    assert table is not None and d.false_alert_table == table.name
    rate = table.rate_at(d.threshold)
    assert d.nonmated_match_rate == pytest.approx(rate)
    assert d.expected_false_alerts_per_10k == pytest.approx(nonmated.expected_per_10k(rate, d.watchlist_size))
    out["confirmed"] = d
    lapsing = out["lapsing"]
    collector = AlertCollector(clients, lapsing.id)
    stream_video(clients, lapsing.id, CAMERA, str(video), fps=10, realtime=True)
    wait_for(lambda: (s := clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=lapsing.id)))
             and s.alerts >= len(ground_truth.enrolled), timeout_s=60)
    time.sleep(2.0)
    collector.close()
    alerts = sorted({a.alert_id for a, _ in collector.alerts})
    assert len(alerts) >= 2, alerts
    # officers record engagements and the policy's equitability attributes
    sexes = ["male", "male", "female", "male"]
    for i, alert_id in enumerate(alerts):
        clients.match.Adjudicate(match_pb2.AdjudicateRequest(
            alert_id=alert_id, outcome=match_pb2.OUTCOME_CONFIRMED_MATCH,
            engagement=(match_pb2.ENGAGEMENT_WORDS_OF_ADVICE if i else match_pb2.ENGAGEMENT_ARREST),
            engagement_minutes=10 + i, actor=f"pc{i}", attributes={"perceived_sex": sexes[i % 4]}), timeout=30)
    err = refusal(clients.match.Adjudicate, match_pb2.AdjudicateRequest(
        alert_id=alerts[0], outcome=match_pb2.OUTCOME_CONFIRMED_MATCH, engagement=match_pb2.ENGAGEMENT_ARREST,
        actor="pc", amend=True, attributes={"ethnicity": "x"}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ethnicity" in err.details()
    out["alerts"] = alerts
    return out


def test_urgent_use_unconfirmed_stops_and_purges_at_the_limit_confirmed_continues(clients, urgent, clock_file):
    lapsing, confirmed, alerts = urgent["lapsing"], urgent["confirmed"], urgent["alerts"]
    review = clients.match.GetAlert(match_pb2.GetAlertRequest(alert_id=alerts[0], actor="pc0"), timeout=30)
    assert review.alert.probe_jpeg  # the crop is there before the limit
    clock_file.write_text(str(LIMIT_H * 3600 - 120))  # two minutes before the limit: nothing happens
    time.sleep(2.0)
    d = clients.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=lapsing.id), timeout=30)
    assert d.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE
    clock_file.write_text(str(LIMIT_H * 3600 + 60))  # past it
    d = wait_for(lambda: (x := clients.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(
        deployment_id=lapsing.id), timeout=30)) and x.purged_at.seconds and x, timeout_s=30)
    assert d.status == watchlist_pb2.DEPLOYMENT_STATUS_PURGED and "not confirmed" in d.end_reason
    # the alerts' images are deleted too, and every step is in the audit chain
    gone = wait_for(lambda: all(clients.match.GetAlert(match_pb2.GetAlertRequest(alert_id=a, actor="pc0"),
                                                       timeout=30).alert.probe_deleted for a in alerts), timeout_s=30)
    assert gone
    expected = {"deployment.started", "deployment.ended", "deployment.urgent_lapsed", "watchlist.watchlist_purged",
                "deployment.purged", "retention.crops_deleted"}  # each fact's subject has its own audit consumer
    types = wait_for(lambda: expected <= (t := {r.type for r in records(clients, lapsing.id)}) and t, timeout_s=30)
    assert types and expected <= types, sorted(types or ())
    deleted = [json.loads(r.summary_json) for r in records(clients, lapsing.id, "retention.crops_deleted")]
    assert "not confirmed" in deleted[0]["reason"] and sorted(deleted[0]["alert_ids"]) == alerts
    still = clients.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=confirmed.id), timeout=30)
    assert still.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE and still.urgent_confirmed_at.seconds
    assert records(clients, confirmed.id, "deployment.urgent_confirmed")


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: dict[str, str] = {}
        self._t = self._c = None
        self._open: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._t = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._t is not None:
            self._t.append([])
        elif tag in ("td", "th"):
            self._c = ""
        if "id" in a:
            self._open.append(a["id"])
            self.ids[a["id"]] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._t is not None:
            self._t[-1].append(self._c)
            self._c = None
        if tag == "table":
            self._t = None

    def handle_data(self, data):
        if self._c is not None:
            self._c += data
        for i in self._open:
            self.ids[i] += data


def test_reports_read_back_and_match_the_audit(clients, urgent, system, tmp_path):
    lapsing, alerts = urgent["lapsing"], urgent["alerts"]
    raised = [r.subject for r in records(clients, lapsing.id, "alert.raised")]
    adjudicated = {r.subject: r.actor for r in records(clients, lapsing.id, "alert.adjudicated")}
    purged = records(clients, lapsing.id, "deployment.purged")[0]
    # the post-deployment page
    page_file = tmp_path / "post.html"
    lfr(system, "report", "post-deployment", lapsing.id, "--out", str(page_file))
    page = Page()
    page.feed(page_file.read_text())
    assert sorted(r[0] for r in page.tables["alerts"][1:]) == sorted(raised) == alerts
    assert {r[0]: r[5] for r in page.tables["alerts"][1:]} == adjudicated
    outcomes = dict(zip(page.tables["outcomes"][0], page.tables["outcomes"][1], strict=True))
    assert int(outcomes["alerts"]) == len(raised) and int(outcomes["confirmed"]) == len(alerts)
    assert int(outcomes["arrests"]) == 1 and int(outcomes["words of advice"]) == len(alerts) - 1
    assert "DPIA-2026-014" in page.ids["authority"] and "NOT confirmed" in page.ids["urgent-flag"]
    shown = clients.audit.DeploymentReport(audit_pb2.DeploymentReportRequest(deployment_id=lapsing.id), timeout=30)
    assert f"{shown.expected_false_alerts_per_10k:.2f} per 10,000" in page.ids["expected"]
    assert page.tables["composition"][1:] == [["wanted-by-court", str(lapsing.watchlist_size)]]
    purge_time = json.loads(purged.summary_json)["deployment"]["purged_at"][:19]
    assert purge_time in page.ids["purge"]
    assert "intact" in page.ids["chain"]
    # the usage export
    usage = json.loads(lfr(system, "report", "usage").stdout)
    assert usage["chain_verification"]["ok"]
    use = next(u for u in usage["uses"] if u["deployment_id"] == lapsing.id)
    assert sorted(m["alert_id"] for m in use["matches"]) == sorted(raised)
    assert {m["alert_id"]: m["verifications"][-1]["verified_by"] for m in use["matches"]} == adjudicated
    assert all(m["camera"] == CAMERA for m in use["matches"]) and use["urgent"]
    assert use["reference_database"]["entries"] == lapsing.watchlist_size and "probe_jpeg" not in json.dumps(usage)
    # the equitability table (min count 2: 'female' seen once is suppressed)
    eq = json.loads(lfr(system, "report", "equitability", "--json").stdout)
    rows = {(r["attribute"], r["value"]): r for r in eq["rows"]}
    males = sum(1 for i in range(len(alerts)) if ["male", "male", "female", "male"][i % 4] == "male")
    assert rows[("perceived_sex", "male")]["confirmed"] >= males and not rows[("perceived_sex", "male")]["suppressed"]
    assert rows[("perceived_sex", "female")]["suppressed"] and rows[("perceived_sex", "female")]["confirmed"] is None
    assert eq["suppress_below"] == 2
    text = lfr(system, "report", "equitability").stdout
    assert "perceived_sex" in text and "<2" in text
    # the subject lookup
    subject = sorted(urgent_subjects(clients, lapsing.id))[0]
    history = json.loads(lfr(system, "audit", "subject", subject).stdout)
    deps = {d["deployment_id"] for d in history["deployments"]}
    assert {lapsing.id, urgent["confirmed"].id} <= deps
    mine = next(d for d in history["deployments"] if d["deployment_id"] == lapsing.id)
    assert {"entry_added", "watchlist_purged"} <= {x["event"] for x in mine["list"]}
    assert "urgent_lapsed" in {c["event"] for c in mine["course"]}


def urgent_subjects(clients, deployment_id: str) -> list[str]:
    return [e.subject_ref for e in clients.watchlist.ListEntries(
        watchlist_pb2.ListEntriesRequest(deployment_id=deployment_id), timeout=30).entries]
