"""Governance reports (#16), made from the services' own records; no image in any of them.

- `lfr report post-deployment ID [--out FILE]`: one self-contained HTML page for the authorising officer: the
  written authority, the list's composition by category, the cameras, the timeline, the alerts and their
  outcomes and engagements, the purge confirmation with its time; the figures from the audit's published record.
- `lfr report equitability --from --to [--json]`: confirmed and false alerts by each attribute the policy names,
  counts under the policy's minimum suppressed (the audit computes and suppresses them).
- `lfr report usage --from --to [--out FILE]`: per use, its period, the reference database (the list's digest
  and size), each match's input (alert id, camera, time), who verified each result, from the audit chain with
  the chain's verification result (auditor).
- `lfr audit subject NOMINAL_ID`: every deployment whose list held the nominal id, and what happened to it.

The pure parts (`usage`, `subject_history`, `post_deployment_html`) take plain records and are unit-tested.
"""

from __future__ import annotations

import html
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc

from lfr.pb import audit_pb2, audit_pb2_grpc, watchlist_pb2, watchlist_pb2_grpc

PAGE = 10_000


def _ns(text: str | None) -> int:
    if not text:
        return 0
    return int(datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()) * 10**9


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ns else ""


def period_ns(from_date: str, to_date: str) -> tuple[int, int]:
    """[start, end) of a period of UTC dates, both inclusive (as the audit's published records count them)."""
    start = int(datetime.strptime(from_date, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()) * 10**9 if from_date else 0
    end = (int(datetime.strptime(to_date, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()) + 86400) * 10**9 \
        if to_date else 2**63 - 1
    return start, end


def record_dict(r: audit_pb2.Record) -> dict:
    return {"sequence": r.sequence, "time_ns": r.time.ToNanoseconds(), "type": r.type, "actor": r.actor,
            "deployment_id": r.deployment_id, "subject": r.subject, "summary": json.loads(r.summary_json or "{}")}


def all_records(stub, deployment_id: str = "", type_prefix: str = "") -> list[dict]:
    """Every record of the chain (of a deployment, of a type prefix), oldest first, page by page."""
    out, after = [], 0
    while True:
        resp = stub.Query(audit_pb2.QueryRequest(deployment_id=deployment_id, type_prefix=type_prefix,
                                                 after_sequence=after, limit=PAGE), timeout=120)
        out.extend(record_dict(r) for r in resp.records)
        if len(resp.records) < PAGE:
            return out
        after = resp.records[-1].sequence


def verification(stub) -> dict:
    v = stub.Verify(audit_pb2.VerifyRequest(), timeout=300)
    return {"ok": v.ok, "records": v.records, "stream_records": v.stream_records,
            "first_bad_sequence": v.first_bad_sequence, "reason": v.reason, "head_hash": v.head_hash,
            "unrecorded": v.unrecorded}


# 7. Usage logs ----------------------------------------------------------------------------------------
def _latest_adjudications(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["type"] in ("alert.adjudicated", "alert.amended"):
            adj = r["summary"].get("adjudication", {})
            out.setdefault(r["subject"], []).append({
                "verified_by": r["actor"], "at": adj.get("at", _iso(r["time_ns"])),
                "outcome": adj.get("outcome", "").removeprefix("OUTCOME_").lower(),
                "engagement": adj.get("engagement", "").removeprefix("ENGAGEMENT_").lower(),
                "amended": r["type"] == "alert.amended"})
    return out


def usage(records: list[dict], start_ns: int, end_ns: int) -> list[dict]:
    """Per deployment started in [start_ns, end_ns): the period of use, the reference database, each match's
    input and who verified each result."""
    adjudications = _latest_adjudications(records)
    uses = []
    for r in records:
        if r["type"] != "deployment.started" or not start_ns <= r["time_ns"] < end_ns:
            continue
        dep = r["deployment_id"]
        d = r["summary"].get("deployment", {})
        mine = [x for x in records if x["deployment_id"] == dep]
        ended = next((x for x in mine if x["type"] == "deployment.ended"), None)
        purged = next((x for x in mine if x["type"] == "deployment.purged"), None)
        matches = []
        for a in mine:
            if a["type"] != "alert.raised":
                continue
            s = a["summary"]
            matches.append({"alert_id": a["subject"], "camera": s.get("envelope", {}).get("camera_id", ""),
                            "time": s.get("raised_at", _iso(a["time_ns"])),
                            "captured": s.get("envelope", {}).get("capture_time", ""),
                            "score": s.get("score"), "threshold": s.get("threshold"),
                            "verifications": adjudications.get(a["subject"], [])})
        uses.append({
            "deployment_id": dep, "site": d.get("site", ""), "purpose": d.get("purpose", ""),
            "period": {"start": d.get("started_at", _iso(r["time_ns"])),
                       "end": (ended["summary"].get("deployment", {}).get("ended_at") if ended else None)},
            "started_by": r["actor"], "urgent": bool(d.get("urgent")),
            "authorised_by": [a.get("actor", "") for a in d.get("approvals", [])],
            "reference_database": {"watchlist_digest": d.get("authorised_digest") or d.get("watchlist_digest", ""),
                                   "entries": int(d.get("watchlist_size", 0)),
                                   "model": f"{d.get('model_id', '')} {d.get('model_version', '')}".strip(),
                                   "threshold": d.get("threshold")},
            "purged_at": purged["summary"].get("deployment", {}).get("purged_at") if purged else None,
            "matches": matches,
        })
    return uses


# 8. Subject lookup ------------------------------------------------------------------------------------
def subject_history(records: list[dict], nominal_id: str) -> dict:
    """Every deployment whose list held `nominal_id` (added, refused or removed), and what happened to it there:
    the deployment's course, the alerts on it and their outcomes. No image: the records hold none."""
    deployments: dict[str, dict] = {}
    alerts: set[str] = set()
    references = []
    for r in records:
        s, t = r["summary"], r["type"]
        if t.startswith("watchlist.") and s.get("subject_ref") == nominal_id:
            d = deployments.setdefault(r["deployment_id"], {"deployment_id": r["deployment_id"], "list": [],
                                                            "alerts": []})
            d["list"].append({"event": t.removeprefix("watchlist."), "at": _iso(r["time_ns"]), "by": r["actor"],
                              "entry_id": s.get("entry_id", ""), "category": s.get("category", ""),
                              "reason": s.get("reason", ""), "legal_basis": s.get("legal_basis", "")})
        elif t == "watchlist.watchlist_purged" and nominal_id in s.get("kept_subject_refs", []):
            d = deployments.setdefault(r["deployment_id"], {"deployment_id": r["deployment_id"], "list": [],
                                                            "alerts": []})
            d["list"].append({"event": "watchlist_purged", "at": _iso(r["time_ns"]), "by": r["actor"],
                              "vectors_deleted": s.get("vectors_deleted", 0),
                              "images_deleted": s.get("images_deleted", 0)})
        elif t.startswith("reference.") and s.get("subject_ref") == nominal_id:
            references.append({"event": t, "at": _iso(r["time_ns"]), "by": r["actor"],
                               "source_system": s.get("source_system", ""), "legal_basis": s.get("legal_basis", "")})
        elif t == "alert.raised" and s.get("subject_ref") == nominal_id:
            alerts.add(r["subject"])
    adjudications = _latest_adjudications(records)
    for r in records:
        dep = deployments.get(r["deployment_id"])
        if dep is None:
            continue
        if r["type"] == "alert.raised" and r["subject"] in alerts:
            s = r["summary"]
            dep["alerts"].append({"alert_id": r["subject"], "camera": s.get("envelope", {}).get("camera_id", ""),
                                  "time": s.get("raised_at", _iso(r["time_ns"])), "score": s.get("score"),
                                  "verifications": adjudications.get(r["subject"], [])})
        elif r["type"] in ("deployment.started", "deployment.ended", "deployment.purged", "deployment.cancelled",
                           "deployment.urgent_lapsed", "deployment.urgent_confirmed"):
            d = r["summary"].get("deployment", {})
            dep.setdefault("course", []).append({"event": r["type"].removeprefix("deployment."),
                                                 "at": _iso(r["time_ns"]), "by": r["actor"],
                                                 "reason": r["summary"].get("reason", "")})
            dep.update(site=d.get("site", ""), purpose=d.get("purpose", ""))
    return {"nominal_id": nominal_id, "deployments": list(deployments.values()), "reference_collection": references}


# 1. The post-deployment report --------------------------------------------------------------------------
CSS = ("body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111}"
       "h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:1.8rem;border-bottom:1px solid #999}"
       "table{border-collapse:collapse;width:100%}th,td{border:1px solid #bbb;padding:.3rem .5rem;text-align:left;"
       "vertical-align:top}th{background:#eee}td.n{text-align:right}.flag{background:#fde2e2;padding:.4rem;"
       "border-left:4px solid #b00}dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}"
       "dt{font-weight:600}")


def _table(head: list[str], rows: list[list], table_id: str) -> str:
    e = html.escape
    out = [f'<table id="{table_id}"><thead><tr>' + "".join(f"<th scope=\"col\">{e(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(f'<td class="n">{v}</td>' if isinstance(v, int | float) and not isinstance(v, bool)
                        else f"<td>{e(str(v))}</td>" for v in row)
        out.append(f"<tr>{cells}</tr>")
    if not rows:
        out.append(f'<tr><td colspan="{len(head)}">none</td></tr>')
    return "".join(out) + "</tbody></table>"


def post_deployment_html(d: dict, entries: list[dict], published: dict | None, alerts: list[dict],
                         timeline: list[dict], chain: str) -> str:
    """The authorising officer's page. `d` is `lfr deployment show --json`'s object, `entries` the list's entries
    (nominal ids are not shown: only the composition by category), `published` the audit's published record (or
    None when it never started), `alerts` the per-alert outcomes, `timeline` the lifecycle events."""
    e = html.escape
    by_category: dict[str, int] = {}
    for x in entries:
        by_category[x["category"]] = by_category.get(x["category"], 0) + 1
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Post-deployment report: {e(d['name'])} ({e(d['id'])})</title>",
             f"<style>{CSS}</style></head><body><main>",
             f"<h1>Post-deployment report: {e(d['name'])}</h1>",
             f"<p>Deployment <code>{e(d['id'])}</code>, {e(d['status'])}, at {e(d['site'])}. For the authorising "
             "officer. No names and no images appear in this report.</p>"]
    if d.get("threshold_below_floor"):
        parts.append(f'<p class="flag" id="floor-flag">The threshold {d["threshold"]:.3f} was under the policy\'s '
                     f"floor {d['threshold_floor']:.3f} for this model. Reason stated: "
                     f"{e(d.get('threshold_reason', ''))}</p>")
    if d.get("urgent"):
        u = d["urgent"]
        state = (f"confirmed at {u['confirmed_at']}" if u.get("confirmed_at")
                 else f"NOT confirmed by {u['confirm_by']}: stopped and purged")
        parts.append(f'<p class="flag" id="urgent-flag">Urgent use started by {e(u["by"])} ({e(u["rank"])}) at '
                     f"{e(u['started_at'] or '')}: {e(u['reason'])}; {e(state)}.</p>")
    parts.append('<h2>The written authority</h2><dl id="authority">')
    parts.append(f"<dt>Purpose</dt><dd>{e(d['purpose'])}</dd><dt>Legal basis</dt><dd>{e(d['legal_basis'])}</dd>")
    for k, v in d.get("authority", {}).items():
        parts.append(f"<dt>{e(k.replace('_', ' '))}</dt><dd>{e(v)}</dd>")
    approvals = ", ".join(f"{a['actor']} at {a['at']}" for a in d.get("approvals", [])) or "none"
    parts.append(f"<dt>Authorised by</dt><dd>{e(approvals)}</dd><dt>Policy</dt><dd>{e(d['policy_version'])}</dd>"
                 f"<dt>Authorised list digest</dt><dd><code>{e(d['authorised_digest'])}</code></dd>"
                 f"<dt>Threshold</dt><dd>{d['threshold']:.3f} ({e(d['model']['id'])})</dd>")
    exp = d.get("expected_false_alerts_per_10k")
    parts.append("<dt>Expected false alerts</dt><dd id=\"expected\">"
                 + (f"{exp:.2f} per 10,000 faces ({e(d.get('false_alert_table', ''))})" if exp is not None
                    else "not known (no non-mated table for the model)") + "</dd></dl>")
    parts.append("<h2>The watchlist's composition</h2>"
                 + _table(["category", "entries"], [[k, v] for k, v in sorted(by_category.items())], "composition")
                 + f"<p>{len(entries)} entries in all.</p>")
    parts.append(f"<h2>Cameras</h2><ul id=\"cameras\">{''.join(f'<li>{e(c)}</li>' for c in d['cameras'])}</ul>")
    parts.append(f"<h2>Window and timeline</h2><p>Planned {e(d['start'] or '')} to {e(d['end'] or '')}.</p>"
                 + _table(["time", "event", "by", "detail"],
                          [[t["at"], t["event"], t["by"], t.get("detail", "")] for t in timeline], "timeline"))
    if published:
        p, g = published, published.get("engagements", {})
        parts.append("<h2>Alerts and outcomes</h2>" + _table(
            ["faces seen", "alerts", "confirmed", "false", "not engaged", "not adjudicated", "arrests",
             "words of advice", "no engagement", "other outcome", "engagement minutes", "false alerts informed"],
            [[p["faces_seen"], p["alerts"], p["confirmed_alerts"], p["false_alerts"], p["not_engaged"],
              p["unadjudicated"], g.get("arrests", 0), g.get("words_of_advice", 0), g.get("none", 0),
              g.get("other_outcome", 0), g.get("minutes", 0), g.get("false_alerts_informed", 0)]], "outcomes"))
    else:
        parts.append("<h2>Alerts and outcomes</h2><p>The deployment never started: no alerts.</p>")
    parts.append(_table(["alert", "camera", "raised", "outcome", "engagement", "verified by"],
                        [[a["alert_id"], a["camera"], a["time"],
                          (a["verifications"][-1]["outcome"] if a["verifications"] else "not adjudicated"),
                          (a["verifications"][-1]["engagement"] if a["verifications"] else ""),
                          ", ".join(v["verified_by"] for v in a["verifications"])] for a in alerts], "alerts"))
    purged = d.get("purged_at")
    parts.append('<h2>Purge</h2><p id="purge">' + (
        f"The watchlist was purged at {e(purged)}: its images and vectors are deleted; nominal ids and categories "
        "are kept for the record." if purged else
        f"Not purged yet{(': due ' + e(d['purge_due'])) if d.get('purge_due') else ''}.") + "</p>")
    parts.append(f'<p id="chain">Audit: {e(chain)}</p>')
    parts.append(f"<p>Made {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p></main></body></html>")
    return "\n".join(parts)


def timeline_of(d: dict, records: list[dict] | None) -> list[dict]:
    """The lifecycle events: from the audit records when the caller may read them, else from the record."""
    if records is not None:
        return [{"at": _iso(r["time_ns"]), "event": r["type"].removeprefix("deployment."), "by": r["actor"],
                 "detail": r["summary"].get("reason", "")}
                for r in records if r["type"].startswith("deployment.") or r["type"] == "watchlist.watchlist_purged"]
    out = [{"at": d["created_at"], "event": "created", "by": d["created_by"]}]
    out += [{"at": a["at"], "event": "approved", "by": a["actor"]} for a in d.get("approvals", [])]
    for key, event in (("started_at", "started"), ("ended_at", "ended"), ("purged_at", "purged")):
        if d.get(key):
            out.append({"at": d[key], "event": event, "by": "", "detail": d["end_reason"] if event == "ended" else ""})
    return sorted(out, key=lambda t: t["at"] or "")


# Commands --------------------------------------------------------------------------------------------------
def _audit(args):
    from lfr.cli.report import channel

    return audit_pb2_grpc.AuditServiceStub(channel(args, "audit"))


def _write(args, text: str, what: str) -> None:
    if getattr(args, "out", ""):
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({what})", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def report_post_deployment(args) -> None:
    from lfr.cli.ops import deployment_json, entry_json
    from lfr.cli.report import chain_text, channel, record_row

    wl = watchlist_pb2_grpc.WatchlistServiceStub(channel(args, "watchlist"))
    d = wl.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=args.deployment), timeout=30)
    entries = [entry_json(x) for x in wl.ListEntries(watchlist_pb2.ListEntriesRequest(deployment_id=d.id),
                                                       timeout=30).entries]
    audit = _audit(args)
    try:
        p = audit.DeploymentReport(audit_pb2.DeploymentReportRequest(deployment_id=d.id), timeout=60)
        published = record_row(p) | {"engagements": {
            "none": p.engagements.none, "words_of_advice": p.engagements.words_of_advice,
            "arrests": p.engagements.arrests, "other_outcome": p.engagements.other_outcome,
            "minutes": p.engagements.minutes, "false_alerts_informed": p.engagements.false_alerts_informed}}
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        published = None
    try:  # the per-alert table and the timeline from the chain: an auditor's right
        records = all_records(audit, deployment_id=d.id)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        print("lfr: note: per-alert outcomes and the audited timeline need the auditor role; the page shows the "
              "deployment's own record and the published counts", file=sys.stderr)
        records = None
    dj = deployment_json(d)
    uses = usage(records, 0, 2**63 - 1) if records else []
    alerts = uses[0]["matches"] if uses else []
    page = post_deployment_html(dj, entries, published, alerts, timeline_of(dj, records), chain_text(audit))
    _write(args, page, f"post-deployment report of {d.id}")


def report_usage(args) -> None:
    stub = _audit(args)
    start, end = period_ns(args.from_date, args.to_date)
    records = all_records(stub)
    out = {"period": {"from": args.from_date or None, "to": args.to_date or None},
           "chain_verification": verification(stub), "uses": usage(records, start, end)}
    _write(args, json.dumps(out, indent=2), f"{len(out['uses'])} uses")


def report_equitability(args) -> None:
    stub = _audit(args)
    t = stub.Totals(audit_pb2.PeriodRequest(from_date=args.from_date, to_date=args.to_date), timeout=60)
    rows = [{"attribute": r.attribute, "value": r.value, "confirmed": None if r.suppressed else r.confirmed,
             "false_alerts": None if r.suppressed else r.false_alerts, "suppressed": r.suppressed}
            for r in t.equitability]
    if args.json:
        print(json.dumps({"from": t.from_date, "to": t.to_date, "deployments": t.deployments,
                          "suppress_below": t.suppress_below, "rows": rows}, indent=2))
        return
    print(f"equitability of {t.deployments} deployments, {args.from_date or 'the start'} to {args.to_date or 'today'}"
          f": confirmed and false alerts by officer-recorded attribute (counts under {t.suppress_below} suppressed)")
    print(f"{'attribute':<16} {'value':<20} {'confirmed':>10} {'false':>8}")
    for r in rows:
        c = "<" + str(t.suppress_below) if r["suppressed"] else str(r["confirmed"])
        f = "<" + str(t.suppress_below) if r["suppressed"] else str(r["false_alerts"])
        print(f"{r['attribute']:<16} {r['value']:<20} {c:>10} {f:>8}")
    if not rows:
        print("no adjudicated alert in the period")


def audit_subject(args) -> None:
    records = all_records(_audit(args))
    print(json.dumps(subject_history(records, args.nominal_id), indent=2))


def add_parsers(rsub, asub, common, period) -> None:
    """`lfr report post-deployment|equitability|usage` and `lfr audit subject` (called by lfr.cli.report)."""
    p = rsub.add_parser("post-deployment", parents=[common], help="one HTML page for the authorising officer: "
                        "authority, composition, cameras, timeline, alerts and outcomes, purge")
    p.add_argument("deployment")
    p.add_argument("--out", default="", help="write the page to this file instead of stdout")
    p.set_defaults(run=report_post_deployment)
    p = rsub.add_parser("equitability", parents=[common], help="confirmed and false alerts by recorded attribute "
                        "(small counts suppressed)")
    period(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=report_equitability)
    p = rsub.add_parser("usage", parents=[common], help="per use: period, reference database, each match's input "
                        "and its verifiers, from the audit chain with its verification (auditor)")
    period(p)
    p.add_argument("--out", default="", help="write the JSON to this file instead of stdout")
    p.set_defaults(run=report_usage)
    p = asub.add_parser("subject", parents=[common], help="every deployment whose list held a nominal id, and "
                        "what happened to it there (auditor; no images)")
    p.add_argument("nominal_id")
    p.set_defaults(run=audit_subject)
