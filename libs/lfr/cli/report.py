"""Published records, the audit, and alerts: `lfr report …`, `lfr audit …`, `lfr alerts …`.

- `lfr report deployments [--from DATE] [--to DATE] --format json|csv|html [--out FILE]`: the published record
  of every deployment that started in the period (no names, no images); the HTML page is self-contained (a
  table and two charts, inline SVG, no script) for a member of the public, and anyone may make it (the chain
  is verified on it only when an auditor makes it). DATE: YYYY-MM-DD (UTC), `today` or `-30d`; an end left
  out is open.
- `lfr report totals [--from DATE] [--to DATE]`, `lfr report deployment ID`.
- `lfr audit verify [--json] [--index-only]`: recompute the chain, compare it with the durable stream.
- `lfr audit query [--deployment ID] [--type PREFIX]`.
- `lfr alerts list DEPLOYMENT`, `lfr alerts show ALERT [--probe FILE] [--reference FILE]`, `lfr alerts adjudicate
  ALERT ...`; `lfr alerts watch DEPLOYMENT` (lfr/cli/liveops.py).

They talk gRPC to the audit (or match) service of a running system, found through the state folder `lfr up`
used (--state-dir, else $LFR_STATE_DIR, else ./state) or named with --target HOST:PORT. The caller is
authenticated as for the other commands (lfr.cli.ops): --as NAME on an embedded system, LFR_TOKEN in production.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from lfr.pb import audit_pb2, audit_pb2_grpc, match_pb2, match_pb2_grpc
from lfr.runtime.paths import state_dir

FIELDS = ("deployment_id", "date", "start_time", "end_time", "site", "purpose_category", "watchlist_size",
          "faces_seen", "alerts", "confirmed_alerts", "false_alerts", "not_engaged", "unadjudicated", "arrests",
          "threshold", "model", "false_alert_rate", "false_alert_rate_1_in", "status")
OUTCOMES = {"confirmed": match_pb2.OUTCOME_CONFIRMED_MATCH, "false": match_pb2.OUTCOME_FALSE_ALERT,
            "not-engaged": match_pb2.OUTCOME_NOT_ENGAGED}
ENGAGEMENTS = {"arrest": match_pb2.ENGAGEMENT_ARREST, "other": match_pb2.ENGAGEMENT_OTHER_ACTION,
               "none": match_pb2.ENGAGEMENT_NO_ACTION, "words-of-advice": match_pb2.ENGAGEMENT_WORDS_OF_ADVICE}


class Failure(Exception):
    """A refusal or error: one line on stderr, exit code 1."""


# Connection ------------------------------------------------------------------------------------------
def target_of(args, service: str) -> str:
    if args.target:
        return args.target
    path = state_dir(args.state_dir) / "endpoints.json"
    if not path.is_file():
        raise Failure(f"no running system found: {path} is missing (start one with `lfr up`, or pass --target)")
    return json.loads(path.read_text())[service]


def channel(args, service: str) -> grpc.Channel:
    from lfr.cli.client import cli_access
    from lfr.runtime.access import AccessError

    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    target = target_of(args, service)
    try:
        return cli_access(args).channel(target, options=opts)
    except AccessError as exc:
        raise Failure(str(exc)) from None


# Published records -------------------------------------------------------------------------------------
def iso(ts) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def one_in_text(n: int) -> str:
    return f"1 in {n}" if n else "none"


def record_row(r: audit_pb2.PublishedRecord) -> dict:
    return {"deployment_id": r.deployment_id, "date": r.date, "start_time": iso(r.start_time),
            "end_time": iso(r.end_time), "site": r.site, "purpose_category": r.purpose_category,
            "watchlist_size": r.watchlist_size, "faces_seen": r.faces_seen, "alerts": r.alerts,
            "confirmed_alerts": r.confirmed_alerts, "false_alerts": r.false_alerts, "not_engaged": r.not_engaged,
            "unadjudicated": r.unadjudicated, "arrests": r.arrests, "threshold": round(r.threshold, 4),
            "model": r.model, "false_alert_rate": r.false_alert_rate,
            "false_alert_rate_1_in": one_in_text(r.false_alert_one_in), "status": r.status}


def totals_row(t: audit_pb2.PeriodTotals) -> dict:
    return {"from": t.from_date, "to": t.to_date, "deployments": t.deployments, "faces_seen": t.faces_seen,
            "alerts": t.alerts, "confirmed_alerts": t.confirmed_alerts, "false_alerts": t.false_alerts,
            "not_engaged": t.not_engaged, "unadjudicated": t.unadjudicated, "arrests": t.arrests,
            "false_alert_rate": t.false_alert_rate, "false_alert_rate_1_in": one_in_text(t.false_alert_one_in)}


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def axis_ticks(peak: float, integer: bool) -> list[float]:
    """0 and up to 5 evenly spaced round values (a step of 1, 2 or 5 times a power of ten) whose last is at or
    above `peak`: each tick label distinct (a peak of 1 alert gives 0, 1 — never 0, 0, 0, 1, 1)."""
    import math

    peak = max(float(peak), 1.0 if integer else 1e-12)
    raw = peak / 4
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    n = math.ceil(peak / step - 1e-9)
    return [float(f"{k * step:.12g}") for k in range(n + 1)]


def tick_text(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def x_labels(rows: list[dict]) -> list[list[str]]:
    """One label per deployment: its date, and its start time (UTC) under it where several started that day."""
    per_day: dict[str, int] = {}
    for r in rows:
        per_day[r["date"]] = per_day.get(r["date"], 0) + 1
    minutes = [r["start_time"][11:16] for r in rows]
    out = []
    for r, hm in zip(rows, minutes, strict=True):
        if per_day[r["date"]] > 1 and r["start_time"]:  # the minute, or the second where a minute is shared
            t = r["start_time"][11:19] if sum(m == hm and q["date"] == r["date"]
                                              for q, m in zip(rows, minutes, strict=True)) > 1 else hm
            out.append([r["date"], f"{t} UTC"])
        else:
            out.append([r["date"]])
    return out


def _x_label(x: float, y: float, lines: list[str]) -> str:
    spans = "".join(f'<tspan x="{x:.1f}" dy="{0 if i == 0 else 12}">{html.escape(t)}</tspan>'
                    for i, t in enumerate(lines))
    return f'<text class="x-label" x="{x:.1f}" y="{y}" text-anchor="middle" font-size="11">{spans}</text>'


def _bars(rows: list[dict], width: int, height: int) -> str:
    """Alerts per deployment, in time order, stacked by outcome."""
    parts = [("confirmed_alerts", "#1b7837", "confirmed"), ("false_alerts", "#c51b7d", "false alert"),
             ("not_engaged", "#878787", "not engaged"), ("unadjudicated", "#d9d9d9", "not yet adjudicated")]
    left, bottom, top = 48, 56, 16
    plot_h = height - bottom - top
    ticks = axis_ticks(max([r["alerts"] for r in rows] + [1]), integer=True)
    peak = ticks[-1]
    step = (width - left - 8) / max(len(rows), 1)
    out = [f'<svg class="chart" id="alerts-chart" viewBox="0 0 {width} {height}" role="img" '
           f'aria-labelledby="alerts-title" xmlns="http://www.w3.org/2000/svg">',
           '<title id="alerts-title">Alerts per deployment, by outcome</title>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 4}" y2="{top + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for v in ticks:
        y = top + plot_h - plot_h * v / peak
        out.append(f'<text class="y-tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                   f'{tick_text(v)}</text>')
    labels = x_labels(rows)
    for i, r in enumerate(rows):
        x = left + i * step + step * 0.15
        y = top + plot_h
        for key, colour, label in parts:
            h = plot_h * r[key] / peak
            if h > 0:
                y -= h
                out.append(f'<rect class="bar" data-deployment="{html.escape(r["deployment_id"])}" x="{x:.1f}" '
                           f'y="{y:.1f}" width="{step * 0.7:.1f}" height="{h:.1f}" fill="{colour}">'
                           f'<title>{html.escape(r["date"])} {html.escape(r["site"])}: {r[key]} {label}</title></rect>')
        if not r["alerts"]:
            out.append(f'<rect class="bar" data-deployment="{html.escape(r["deployment_id"])}" x="{x:.1f}" '
                       f'y="{top + plot_h - 1}" width="{step * 0.7:.1f}" height="1" fill="#333">'
                       f'<title>{html.escape(r["date"])} {html.escape(r["site"])}: no alerts</title></rect>')
        out.append(_x_label(x + step * 0.35, top + plot_h + 16, labels[i]))
    lx = left
    for _key, colour, label in parts:
        out.append(f'<rect x="{lx}" y="{height - 18}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{height - 9}" font-size="11">{label}</text>')
        lx += 30 + 7 * len(label)
    out.append("</svg>")
    return "\n".join(out)


def _rate_chart(rows: list[dict], width: int, height: int) -> str:
    """False alert rate per deployment over time, as false alerts per million faces seen."""
    left, bottom, top = 56, 40, 16
    plot_h = height - bottom - top
    per_million = [r["false_alert_rate"] * 1e6 for r in rows]
    ticks = axis_ticks(max(per_million + [1.0]), integer=False)
    peak = ticks[-1]
    step = (width - left - 8) / max(len(rows), 1)
    out = [f'<svg class="chart" id="rate-chart" viewBox="0 0 {width} {height}" role="img" '
           f'aria-labelledby="rate-title" xmlns="http://www.w3.org/2000/svg">',
           '<title id="rate-title">False alert rate per deployment (false alerts per million faces seen)</title>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 4}" y2="{top + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for v in ticks:
        y = top + plot_h - plot_h * v / peak
        out.append(f'<text class="y-tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                   f'{tick_text(v)}</text>')
    labels = x_labels(rows)
    points = []
    for i, (r, v) in enumerate(zip(rows, per_million, strict=True)):
        x = left + i * step + step / 2
        y = top + plot_h - plot_h * v / peak
        points.append(f"{x:.1f},{y:.1f}")
        out.append(f'<circle class="point" data-deployment="{html.escape(r["deployment_id"])}" cx="{x:.1f}" '
                   f'cy="{y:.1f}" r="4" fill="#c51b7d"><title>{html.escape(r["date"])} {html.escape(r["site"])}: '
                   f'{r["false_alerts"]} false alerts in {r["faces_seen"]} faces '
                   f'({html.escape(r["false_alert_rate_1_in"])})</title></circle>')
        out.append(_x_label(x, top + plot_h + 16, labels[i]))
    if len(points) > 1:
        out.insert(4, f'<polyline points="{" ".join(points)}" fill="none" stroke="#c51b7d" stroke-width="1.5"/>')
    out.append("</svg>")
    return "\n".join(out)


def to_html(rows: list[dict], totals: dict, period: str, chain: str) -> str:
    e = html.escape
    head = "".join(f"<th scope='col'>{e(f.replace('_', ' '))}</th>" for f in FIELDS)
    body = "\n".join("<tr>" + "".join(f"<td>{e(str(r[f]))}</td>" for f in FIELDS) + "</tr>" for r in rows)
    t = totals
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Live facial recognition deployments: {e(period)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #111; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.85rem; }}
th, td {{ border: 1px solid #bbb; padding: 0.3rem 0.4rem; text-align: left; }}
th {{ background: #eee; }}
figure {{ margin: 1.5rem 0; }}
.chart {{ width: 100%; max-width: 60rem; height: auto; }}
.totals {{ font-size: 1.05rem; }}
</style>
</head>
<body>
<h1>Live facial recognition deployments</h1>
<p>Period: {e(period)}. One row per deployment. A camera compares passing faces with a watchlist prepared for
that deployment. When a face is similar enough (above the threshold), an <em>alert</em> is sent to an officer,
who decides whether it is the person on the watchlist (<em>confirmed</em>) or not (a <em>false alert</em>), or
could not engage (<em>not engaged</em>). Faces that match nobody are deleted at once and only counted
(<em>faces seen</em>). The <em>false alert rate</em> is false alerts divided by faces seen.
No names and no images are published.</p>
<p class="totals" id="totals">Totals: {t['deployments']} deployments, {t['faces_seen']} faces seen, {t['alerts']}
alerts, {t['confirmed_alerts']} confirmed, {t['false_alerts']} false alerts, {t['not_engaged']} not engaged,
{t['arrests']} arrests; false alert rate {e(t['false_alert_rate_1_in'])}.</p>
<figure>
{_bars(rows, 760, 300)}
<figcaption>Alerts per deployment, by the officers' decision.</figcaption>
</figure>
<figure>
{_rate_chart(rows, 760, 260)}
<figcaption>False alert rate per deployment, in false alerts per million faces seen (hover a point for
"1 in N").</figcaption>
</figure>
<table id="deployments">
<caption>Deployment records</caption>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<p><small>Computed from the force's tamper-evident audit record ({e(chain)}).
Generated {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}.</small></p>
</body>
</html>
"""


def report_deployments(args) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(channel(args, "audit"))
    resp = stub.PublicRecords(audit_pb2.PeriodRequest(from_date=args.from_date, to_date=args.to_date),
                              timeout=60)
    rows = [record_row(r) for r in resp.records]
    if args.format == "json":
        text = json.dumps(rows, indent=2) + "\n"
    elif args.format == "csv":
        text = to_csv(rows)
    else:
        chain = chain_text(stub)
        period = f"{args.from_date or 'the start'} to {args.to_date or 'today'}"
        text = to_html(rows, totals_row(resp.totals), period, chain)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({len(rows)} deployments)", file=sys.stderr)
    else:
        sys.stdout.write(text)


def chain_text(stub) -> str:
    """The page's line on the audit chain. Verifying it is an auditor's right; anyone else (the public
    role publishing the page) gets a page that says the chain was not verified for it, and a note on stderr."""
    try:
        v = stub.Verify(audit_pb2.VerifyRequest(), timeout=120)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        print("lfr: note: the audit chain was not verified for this page: verifying it needs the auditor role "
              "(publish as an auditor, or run `lfr audit verify --as auditor`)", file=sys.stderr)
        return "the chain was not verified when this page was made"
    return f"chain verified: {v.records} records, intact" if v.ok else \
        f"chain verification FAILED at record {v.first_bad_sequence}: {v.reason}"


def report_totals(args) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(channel(args, "audit"))
    t = stub.Totals(audit_pb2.PeriodRequest(from_date=args.from_date, to_date=args.to_date), timeout=60)
    print(json.dumps(totals_row(t), indent=2))


def report_deployment(args) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(channel(args, "audit"))
    r = stub.DeploymentReport(audit_pb2.DeploymentReportRequest(deployment_id=args.deployment), timeout=60)
    print(json.dumps(record_row(r), indent=2))


# The audit ---------------------------------------------------------------------------------------------
def audit_verify(args) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(channel(args, "audit"))
    v = stub.Verify(audit_pb2.VerifyRequest(index_only=args.index_only), timeout=300)
    out = {"ok": v.ok, "records": v.records, "stream_records": v.stream_records,
           "first_bad_sequence": v.first_bad_sequence, "reason": v.reason, "head_hash": v.head_hash,
           "unrecorded": v.unrecorded}
    if args.json:
        print(json.dumps(out))
    elif v.ok:
        print(f"audit chain intact: {v.records} records (durable copy: {v.stream_records}), head {v.head_hash[:16]}…"
              + (f"\n{unrecorded_text(v.unrecorded)}" if v.unrecorded else ""))
    else:
        print(f"audit chain BROKEN at record {v.first_bad_sequence}: {v.reason}")
    if not v.ok:
        raise SystemExit(3)


def unrecorded_text(n: int) -> str:
    facts = "1 fact waits" if n == 1 else f"{n} facts wait"
    return (f"{facts} in the durable event streams to be recorded: published (a deployment change, an alert, an "
            "API access such as this verification) but not appended to the chain yet. The audit service records "
            "each within seconds; run again to see it in the chain. Not an error: a count that stays above 0 "
            "means the audit service is behind or stopped.")


def audit_query(args) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(channel(args, "audit"))
    resp = stub.Query(audit_pb2.QueryRequest(deployment_id=args.deployment, type_prefix=args.type,
                                             after_sequence=args.after, limit=args.limit),
                      timeout=60)
    for r in resp.records:
        print(json.dumps({"sequence": r.sequence, "time": iso(r.time), "type": r.type, "actor": r.actor,
                          "deployment_id": r.deployment_id, "subject": r.subject, "hash": r.hash}))


# Alerts ------------------------------------------------------------------------------------------------
def review_json(r: match_pb2.AlertReview) -> dict:
    a = r.alert
    out = {"alert_id": a.alert_id, "deployment_id": a.envelope.deployment_id, "camera_id": a.envelope.camera_id,
           "entry_id": a.entry_id, "subject_ref": a.subject_ref, "score": round(a.score, 4),
           "threshold": round(a.threshold, 4), "revision": a.revision, "raised_at": iso(a.raised_at),
           "sightings": a.sightings, "adjudicated": r.adjudicated, "overdue": r.overdue, "due_at": iso(r.due_at),
           "retain_until": iso(r.retain_until), "crops_deleted_at": iso(r.crops_deleted_at),
           "reference_status": r.reference_status}
    if r.adjudicated:
        adj = r.adjudication
        out["adjudication"] = {"outcome": match_pb2.Outcome.Name(adj.outcome).removeprefix("OUTCOME_").lower(),
                               "engagement": match_pb2.Engagement.Name(adj.engagement).removeprefix(
                                   "ENGAGEMENT_").lower(), "note": adj.note, "actor": adj.actor, "at": iso(adj.at),
                               "amendments": adj.amendments}
    return out


def alerts_list(args) -> None:
    stub = match_pb2_grpc.MatchServiceStub(channel(args, "match"))
    resp = stub.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=args.deployment, actor=args.actor,
                                                       unadjudicated_only=args.pending, overdue_only=args.overdue),
                           timeout=30)
    if not resp.alerts:  # none, or no such deployment: say which (an unknown id is not an empty list)
        from lfr.pb import watchlist_pb2, watchlist_pb2_grpc

        watchlist = watchlist_pb2_grpc.WatchlistServiceStub(channel(args, "watchlist"))
        watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=args.deployment), timeout=30)
    if args.ids:
        print("\n".join(r.alert.alert_id for r in resp.alerts), flush=True)
        return
    print(json.dumps([review_json(r) for r in resp.alerts], indent=2))


def alerts_show(args) -> None:
    stub = match_pb2_grpc.MatchServiceStub(channel(args, "match"))
    r = stub.GetAlert(match_pb2.GetAlertRequest(alert_id=args.alert, actor=args.actor), timeout=30)
    for path, data, what, why in ((args.probe, r.alert.probe_jpeg, "probe crop", "deleted at the end of the "
                                   "retention period"), (args.reference, r.reference_jpeg, "reference image",
                                                         r.reference_status)):
        if path and data:
            Path(path).write_bytes(data)
        elif path:
            print(f"lfr: no {what} to write to {path}: {why}", file=sys.stderr)
    print(json.dumps(review_json(r), indent=2))


def alerts_adjudicate(args) -> None:
    stub = match_pb2_grpc.MatchServiceStub(channel(args, "match"))
    r = stub.Adjudicate(match_pb2.AdjudicateRequest(
        alert_id=args.alert, outcome=OUTCOMES[args.outcome], engagement=ENGAGEMENTS.get(args.engagement, 0),
        note=args.note, actor=args.actor, amend=args.amend, engagement_minutes=args.minutes,
        person_informed=args.informed, attributes=dict(args.attribute or ())), timeout=30)
    print(json.dumps(review_json(r), indent=2))


# Parsers -----------------------------------------------------------------------------------------------
def _date(text: str) -> str:
    """YYYY-MM-DD, `today`, or `-Nd` (N days before today), in UTC; "" (the default) leaves that end open."""
    text = text.strip()
    if not text:
        return ""
    today = datetime.now(UTC).date()
    if text == "today":
        return today.isoformat()
    m = re.fullmatch(r"-(\d+)d", text)
    if m:
        return (today - timedelta(days=int(m.group(1)))).isoformat()
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD, 'today' or '-30d'): {text!r}") from None
    return text


def key_value(text: str) -> tuple[str, str]:
    from lfr.cli.ops import key_value as parse

    return parse(text)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--state-dir", default="", help="state folder of the running system (default $LFR_STATE_DIR "
                   "or ./state)")
    p.add_argument("--target", default="", help="HOST:PORT of the service, instead of the state folder")
    p.add_argument("--as", dest="actor", default=None, help="who is acting: a development user of an embedded "
                   "system (default $LFR_ACTOR); refused with a production token (LFR_TOKEN)")
    return p


def _period(p: argparse.ArgumentParser) -> None:
    from lfr.cli.ops import allow_relative_values

    allow_relative_values(p)  # --from -30d
    p.add_argument("--from", dest="from_date", type=_date, default="",
                   help="first day: YYYY-MM-DD (UTC), 'today' or '-30d' (default: the first record)")
    p.add_argument("--to", dest="to_date", type=_date, default="",
                   help="last day, inclusive: YYYY-MM-DD (UTC), 'today' or '-1d' (default: no end)")


def add_parsers(sub) -> None:
    common = _common()
    r = sub.add_parser("report", help="published deployment records: deployments, totals, deployment")
    rsub = r.add_subparsers(dest="report", required=True)
    p = rsub.add_parser("deployments", parents=[common], help="one record per deployment started in a period")
    _period(p)
    p.add_argument("--format", choices=("json", "csv", "html"), default="json")
    p.add_argument("--out", default="", help="write to this file instead of stdout")
    p.set_defaults(run=report_deployments)
    p = rsub.add_parser("totals", parents=[common], help="totals of the deployments started in a period")
    _period(p)
    p.set_defaults(run=report_totals)
    p = rsub.add_parser("deployment", parents=[common], help="the published record of one deployment")
    p.add_argument("deployment")
    p.set_defaults(run=report_deployment)

    a = sub.add_parser("audit", help="the tamper-evident audit record: verify, query")
    asub = a.add_subparsers(dest="audit", required=True)
    p = asub.add_parser("verify", parents=[common], help="recompute the chain and compare it with the durable copy")
    p.add_argument("--json", action="store_true", help="one line of JSON (records, ok, first_bad_sequence, ...)")
    p.add_argument("--index-only", action="store_true", help="skip the comparison with the durable stream")
    p.set_defaults(run=audit_verify)
    p = asub.add_parser("query", parents=[common], help="records as JSON lines")
    p.add_argument("--deployment", default="")
    p.add_argument("--type", default="", help="type prefix, e.g. alert. or deployment.")
    p.add_argument("--after", type=int, default=0, help="only records after this sequence")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(run=audit_query)

    al = sub.add_parser("alerts", help="alerts for officers: list, show (probe crop beside reference), adjudicate")
    alsub = al.add_subparsers(dest="alerts", required=True)
    p = alsub.add_parser("list", parents=[common], help="a deployment's alerts and their state (no images)")
    p.add_argument("deployment")
    p.add_argument("--pending", action="store_true", help="only alerts not adjudicated")
    p.add_argument("--overdue", action="store_true", help="only alerts flagged overdue")
    p.add_argument("--ids", action="store_true", help="only the alert ids, one a line, oldest first (for scripts)")
    p.set_defaults(run=alerts_list)
    p = alsub.add_parser("show", parents=[common], help="one alert; --probe/--reference write the images")
    p.add_argument("alert")
    p.add_argument("--probe", default="", help="write the probe crop (JPEG) here")
    p.add_argument("--reference", default="", help="write the reference image (JPEG) here")
    p.set_defaults(run=alerts_show)
    p = alsub.add_parser("adjudicate", parents=[common], help="record an officer's decision on an alert")
    p.add_argument("alert")
    p.add_argument("--outcome", choices=tuple(OUTCOMES), required=True)
    p.add_argument("--engagement", choices=tuple(ENGAGEMENTS), default="",
                   help="required for confirmed and false; not-engaged is none")
    p.add_argument("--note", default="", help="free text")
    p.add_argument("--amend", action="store_true", help="replace an earlier adjudication")
    p.add_argument("--minutes", type=int, default=0, help="how long the engagement lasted")
    p.add_argument("--informed", action="store_true", help="a false alert: the person was told of the wrong match")
    p.add_argument("--attribute", action="append", type=key_value, metavar="NAME=VALUE",
                   help="an equitability attribute the policy names (e.g. perceived_sex=female); optional")
    p.set_defaults(run=alerts_adjudicate)
    from lfr.cli.liveops import add_watch_parser

    add_watch_parser(alsub, common)  # lfr alerts watch
    from lfr.cli import governance

    governance.add_parsers(rsub, asub, common, _period)  # report post-deployment|equitability|usage; audit subject

    for parser in (r, a, al):
        parser.set_defaults(func=run)


def run(args) -> None:
    """Run a parsed command: a refusal prints one line on stderr and exits 1."""
    try:
        args.run(args)
    except Failure as exc:
        print(f"lfr: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except grpc.RpcError as exc:
        from lfr.cli.ops import rpc_error_text

        print(f"lfr: {rpc_error_text(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C while following a stream: no traceback
        raise SystemExit(130) from None
