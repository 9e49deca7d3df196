"""Operator commands: `lfr deployment …`, `lfr watchlist …`, `lfr reference …`, `lfr policy …`.

They talk gRPC to the watchlist service of a running system, found through the state folder `lfr up` used
(--state-dir, else $LFR_STATE_DIR, else ./state) or named with --target HOST:PORT. Every call is mutual
TLS plus a bearer token: against an embedded system `--as NAME` (default $LFR_ACTOR) obtains a short-lived token
for a user of its development identity provider; in production LFR_TLS_DIR and LFR_TOKEN (or LFR_TOKEN_FILE)
are used and `--as` is refused. --json prints machine output; a refusal exits non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from lfr.cli.client import IMAGE_FORMATS_TEXT, IMAGE_SUFFIXES, cli_access, subject_images
from lfr.cli.live import capture_date
from lfr.pb import watchlist_pb2 as pb
from lfr.pb import watchlist_pb2_grpc
from lfr.policy import CATEGORY_BY_VALUE, CATEGORY_NAMES
from lfr.runtime.access import AccessError
from lfr.runtime.events import ts_from_ns
from lfr.runtime.paths import state_dir

CATEGORIES = CATEGORY_NAMES  # wanted-by-court, wanted-by-police, court-conditions, missing-vulnerable, risk-of-harm
CATEGORY_NAME = CATEGORY_BY_VALUE


class Failure(Exception):
    """A refusal or error: one line on stderr, exit code 1 (or `code`: `watchlist import` exits with the number
    of subjects refused)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# Arguments -------------------------------------------------------------------------------------------
RELATIVE = re.compile(r"([+-])(\d+(?:\.\d+)?)([smhd])")  # +4h from now, -1h ago


def parse_time(text: str) -> int:
    """ISO 8601 (a time without a zone is local time), `now`, `+N[smhd]` from now or `-N[smhd]` ago -> ns
    since the epoch."""
    text = text.strip()
    if text == "now":
        return time.time_ns()
    m = RELATIVE.fullmatch(text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(3)]
        delta = timedelta(**{unit: float(m.group(2))})
        return int((datetime.now(UTC) + (delta if m.group(1) == "+" else -delta)).timestamp() * 1e9)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time, 'now', '+4h' or '-1h': {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp() * 1e9)


def allow_relative_values(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let option values such as `-1h` or `-30d` through as values: argparse takes anything starting with '-'
    that is not a plain negative number for an option (`--end -1h` would fail with "expected one argument").
    These parsers have no option that looks like a negative number, so nothing else changes."""
    parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(?:\.\d+)?[smhd]$")
    return parser


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=TEXT, got {text!r}")
    return key.strip(), value.strip()


def category(text: str) -> int:
    if text not in CATEGORIES:
        raise argparse.ArgumentTypeError(f"unknown category {text!r} (one of: {', '.join(CATEGORIES)})")
    return CATEGORIES[text]


def service_stub(args, service: str, stub_class):
    """A stub of `service` of the running system (--target, else its endpoints.json), calling as the CLI's caller."""
    target = args.target
    if not target:
        path = state_dir(args.state_dir) / "endpoints.json"
        if not path.is_file():
            raise Failure(f"no running system found: {path} is missing (start one with `lfr up`, or pass --target)")
        endpoints = json.loads(path.read_text())
        if service not in endpoints:
            raise Failure(f"the running system lists no {service} service in {path} (restart it with this version)")
        target = endpoints[service]
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    try:
        access = cli_access(args)
    except AccessError as exc:
        raise Failure(str(exc)) from None
    return stub_class(access.channel(target, options=opts))


def watchlist_stub(args) -> watchlist_pb2_grpc.WatchlistServiceStub:
    return service_stub(args, "watchlist", watchlist_pb2_grpc.WatchlistServiceStub)


# Output ----------------------------------------------------------------------------------------------
def iso(ts) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_name(status: int) -> str:
    return pb.DeploymentStatus.Name(status).removeprefix("DEPLOYMENT_STATUS_")


def deployment_json(d: pb.Deployment) -> dict:
    return {
        "id": d.id, "name": d.name, "status": status_name(d.status), "purpose": d.purpose,
        "legal_basis": d.legal_basis, "site": d.site,
        "site_location": {"latitude": d.site_location.latitude, "longitude": d.site_location.longitude},
        "site_approved": d.site_approved, "start": iso(d.planned_start), "end": iso(d.planned_end),
        "cameras": list(d.cameras), "threshold": round(d.threshold, 6),
        "model": {"id": d.model_id, "version": d.model_version}, "watchlist_size": d.watchlist_size,
        "watchlist_digest": d.watchlist_digest, "authorised_digest": d.authorised_digest,
        "approvals": [{"actor": a.actor, "at": iso(a.at)} for a in d.approvals],
        "authorisers_required": d.authorisers_required,
        "second_authoriser_reasons": list(d.second_authoriser_reasons),
        "created_by": d.created_by, "created_at": iso(d.created_at), "started_at": iso(d.started_at),
        "ended_at": iso(d.ended_at), "end_reason": d.end_reason, "purge_due": iso(d.purge_due),
        "purged_at": iso(d.purged_at), "policy_version": d.policy_version,
    } | governance_json(d)


def governance_json(d: pb.Deployment) -> dict:
    """#16: the written authority, urgent use, the threshold floor and the expected false-alert rate."""
    return {
        "authority": dict(sorted(d.authority.items())),
        "urgent": {"by": d.urgent_by, "rank": d.urgent_rank, "reason": d.urgent_reason,
                   "started_at": iso(d.urgent_started_at), "confirm_by": iso(d.urgent_confirm_by),
                   "confirmed_at": iso(d.urgent_confirmed_at)} if d.urgent else None,
        "threshold_floor": round(d.threshold_floor, 6) if d.threshold_floor else None,
        "threshold_below_floor": d.threshold_below_floor, "threshold_reason": d.threshold_reason,
        "expected_false_alerts_per_10k": (round(d.expected_false_alerts_per_10k, 4)
                                          if d.expected_false_alerts_per_10k >= 0 else None),
        "nonmated_match_rate": d.nonmated_match_rate, "false_alert_table": d.false_alert_table,
    }


def expected_text(d: pb.Deployment) -> str:
    if d.expected_false_alerts_per_10k < 0:
        return f"no non-mated score table for {d.model_id}: the expected false-alert rate is not known"
    return (f"{d.expected_false_alerts_per_10k:.2f} per 10,000 faces for {d.watchlist_size} entries at threshold "
            f"{d.threshold:.3f} (non-mated rate {d.nonmated_match_rate:.2e}; {d.false_alert_table})")


def governance_lines(d: pb.Deployment) -> list[str]:
    lines = [f"  authority   {k}: {v}" for k, v in sorted(d.authority.items())]
    lines.append(f"  expected false alerts  {expected_text(d)}")
    if d.threshold_below_floor:
        lines.append(f"  THRESHOLD UNDER THE POLICY FLOOR {d.threshold_floor:.3f}: {d.threshold_reason}")
    if d.urgent:
        state = (f"confirmed {iso(d.urgent_confirmed_at)}" if d.urgent_confirmed_at.seconds
                 else f"to be confirmed by {iso(d.urgent_confirm_by)}")
        lines.append(f"  URGENT USE  by {d.urgent_by} ({d.urgent_rank}): {d.urgent_reason}; {state}")
    return lines


def quality_json(q) -> dict:
    return {"inter_eye_px": round(q.inter_eye_px, 1), "sharpness": round(q.sharpness, 1),
            "yaw_deg": round(q.yaw_deg, 1), "pitch_deg": round(q.pitch_deg, 1)}


def entry_json(e: pb.Entry) -> dict:
    return {
        "entry_id": e.entry_id, "subject": e.subject_ref, "category": CATEGORY_NAME.get(e.category, str(e.category)),
        "under_18": e.under_18, "images": e.image_count, "vectors": e.vectors, "from_reference": e.from_reference,
        "added_by": e.added_by, "added_at": iso(e.added_at),
        "provenance": {"source_system": e.source_system, "legal_basis": e.legal_basis,
                       "captured": [iso(i.captured_at) for i in e.images],
                       # which face of each image was enrolled when it showed several, and how it was chosen
                       "faces": [{"face": i.face, "choice": i.face_choice} for i in e.images]},
        "quality": [quality_json(i.quality) for i in e.images],
    }


def emit(args, data, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def describe(d: pb.Deployment) -> str:
    j = deployment_json(d)
    lines = [f"deployment {d.id} {j['status']}: {d.name}",
             f"  site        {d.site}" + ("" if d.site_approved else " (not an approved site)"),
             f"  window      {j['start']} -> {j['end']}",
             f"  cameras     {', '.join(d.cameras)}",
             f"  threshold   {d.threshold:.3f} ({d.model_id} {d.model_version})",
             f"  watchlist   {d.watchlist_size} entries, digest {d.watchlist_digest[:16]}",
             f"  purpose     {d.purpose}"]
    if d.approvals:
        lines.append(f"  approvals   {', '.join(a['actor'] for a in j['approvals'])} "
                     f"({len(d.approvals)} of {d.authorisers_required})")
    if d.authorisers_required > 1:
        lines.append(f"  second authoriser needed: {'; '.join(d.second_authoriser_reasons)}")
    for key in ("started_at", "ended_at", "purge_due", "purged_at"):
        if j[key]:
            lines.append(f"  {key.replace('_', ' '):<11} {j[key]}")
    return "\n".join(lines + governance_lines(d))


class Progress:
    """A one-line progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = total, what, 0
        self.tty = sys.stderr.isatty()

    def step(self, note: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(1, self.total))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.what} {note}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# Deployments -----------------------------------------------------------------------------------------
def deployment_create(args, stub) -> None:
    req = pb.CreateDeploymentRequest(
        name=args.name, purpose=args.purpose, legal_basis=args.legal_basis, site=args.site,
        planned_start=ts_from_ns(args.start), planned_end=ts_from_ns(args.end), cameras=args.camera,
        threshold=args.threshold, actor=args.actor, threshold_reason=args.threshold_reason,
        authority=dict(args.authority or ()))
    if args.lat is not None or args.lon is not None:
        if args.lat is None or args.lon is None:
            raise Failure("--lat and --lon go together")
        req.site_location.CopyFrom(pb.GeoPoint(latitude=args.lat, longitude=args.lon))
    d = stub.CreateDeployment(req, timeout=30)
    if args.id_only:
        print(d.id, flush=True)
        return
    emit(args, deployment_json(d), describe(d))


def deployment_authorise(args, stub) -> None:
    d = stub.AuthoriseDeployment(pb.AuthoriseRequest(deployment_id=args.id, actor=args.actor,
                                                     watchlist_digest=args.digest), timeout=30)
    if d.status == pb.DEPLOYMENT_STATUS_AUTHORISED:
        text = (f"deployment {d.id} AUTHORISED by {', '.join(a.actor for a in d.approvals)}: "
                f"{d.watchlist_size} entries, digest {d.authorised_digest[:16]}")
    elif d.urgent and d.urgent_confirmed_at.seconds:
        text = (f"deployment {d.id}: urgent use CONFIRMED by {', '.join(a.actor for a in d.approvals)}: "
                f"{d.watchlist_size} entries, digest {d.authorised_digest[:16]}")
    else:
        text = (f"approval by {args.actor} recorded ({len(d.approvals)} of {d.authorisers_required}); "
                f"a second authoriser is required: {'; '.join(d.second_authoriser_reasons)}")
    emit(args, deployment_json(d), "\n".join([text, *governance_lines(d)]))


def deployment_transition(rpc: str, verb: str):
    def run(args, stub) -> None:
        d = getattr(stub, rpc)(pb.TransitionRequest(deployment_id=args.id, actor=args.actor,
                                                    reason=getattr(args, "reason", "") or "",
                                                    urgent=getattr(args, "urgent", False),
                                                    rank=getattr(args, "rank", "") or ""), timeout=120)
        text = f"deployment {d.id} {verb}: now {status_name(d.status)}"
        if d.urgent and not d.urgent_confirmed_at.seconds and d.status == pb.DEPLOYMENT_STATUS_ACTIVE:
            text += (f" UNDER URGENCY: it must be authorised by {iso(d.urgent_confirm_by)}, else it stops and its "
                     "watchlist and alerts' images are purged")
        if d.status in (pb.DEPLOYMENT_STATUS_PURGED,) or d.purged_at.seconds:
            text += f" (watchlist purged; {d.watchlist_size} nominal ids kept)"
        elif d.purge_due.seconds:
            text += f" (watchlist purge due {iso(d.purge_due)})"
        emit(args, deployment_json(d), text)

    return run


def deployment_reembed(args, stub) -> None:
    r = stub.ReembedWatchlist(pb.TransitionRequest(deployment_id=args.id, actor=args.actor), timeout=600)
    d = r.deployment
    dropped = [e.subject_ref for e in r.entries if not e.entry_id]
    data = deployment_json(d) | {"dropped_subjects": dropped}
    emit(args, data, f"deployment {d.id} re-embedded with {d.model_id} {d.model_version}: {d.watchlist_size} "
         f"entries, now {status_name(d.status)} (needs authorisation)"
         + (f"; dropped: {', '.join(dropped)}" if dropped else ""))


def deployment_list(args, stub) -> None:
    ds = stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=30).deployments
    lines = [f"{d.id}  {status_name(d.status):<10} {iso(d.planned_start)} -> {iso(d.planned_end)}  "
             f"{d.watchlist_size:>5} entries  {d.site}  {d.name}" for d in ds]
    emit(args, [deployment_json(d) for d in ds], "\n".join(lines) or "no deployments")


def deployment_show(args, stub) -> None:
    d = stub.GetDeployment(pb.GetDeploymentRequest(deployment_id=args.id), timeout=30)
    emit(args, deployment_json(d), describe(d))


# Watchlists ------------------------------------------------------------------------------------------
def image_paths(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise Failure(f"no such image file: {p}")
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise Failure(f"not a {IMAGE_FORMATS_TEXT} file (by its name): {p}")
        out.append(p)
    return out


def captured(args, paths: list[Path]) -> list[tuple[int, str]]:
    if args.captured is not None:
        return [(args.captured, "flag")] * len(paths)
    return [capture_date(p) for p in paths]


def image_results(resp: pb.EnrollEntryResponse, deployment_id: str, paths: list[Path],
                  dates: list[tuple[int, str]]) -> list[dict]:
    out = []
    for r in resp.results:
        item = {"deployment": deployment_id, "subject": resp.subject_ref, "image": str(paths[r.index]),
                "accepted": r.accepted, "reason": r.reason, "entry_id": resp.entry_id,
                "captured": iso(ts_from_ns(dates[r.index][0])), "captured_from": dates[r.index][1]}
        if r.HasField("quality"):
            item["quality"] = quality_json(r.quality)
        if r.faces:  # several faces: every one, numbered as --face takes them
            item["faces"] = [{"face": f.face, "box": [round(v, 1) for v in (f.box.x1, f.box.y1, f.box.x2, f.box.y2)],
                              "inter_eye_px": round(f.quality.inter_eye_px, 1),
                              "detector_score": round(f.quality.detector_score, 3)} for f in r.faces]
        if r.face_choice:
            item["face"], item["face_choice"] = r.face, r.face_choice
        out.append(item)
    return out


def enroll_one(args, stub, subject: str, paths: list[Path]) -> tuple[pb.EnrollEntryResponse, list[dict]]:
    dates = captured(args, paths)
    resp = stub.EnrollEntry(pb.EnrollEntryRequest(
        deployment_id=args.deployment, subject_ref=subject, category=args.category, source_system=args.source,
        legal_basis=args.legal_basis, images=[p.read_bytes() for p in paths],
        captured_at=[ts_from_ns(ns) for ns, _ in dates], under_18=args.under_18, actor=args.actor,
        face=getattr(args, "face", None) or []), timeout=300)
    return resp, image_results(resp, args.deployment, paths, dates)


def watchlist_add(args, stub) -> None:
    paths = image_paths(args.images)
    resp, results = enroll_one(args, stub, args.subject, paths)
    lines = [f"{r['image']}: " + (f"accepted ({r['face_choice']})" if r.get("face_choice") else "accepted"
                                  if r["accepted"] else f"refused: {r['reason']}") for r in results]
    if resp.entry_id:
        lines.append(f"entry {resp.entry_id} added for {args.subject}")
    emit(args, results, "\n".join(lines))
    if not resp.entry_id:
        raise Failure(f"entry {args.subject} refused: {resp.reason}")


def watchlist_import(args, stub) -> None:
    try:
        subjects = subject_images(args.dir)
    except FileNotFoundError as exc:
        raise Failure(str(exc)) from None
    if not subjects:
        raise Failure(f"no <subject>/<image> files in {args.dir}")
    progress = Progress(len(subjects), "subjects")
    results, refused, per_subject = [], [], []
    for subject, paths in subjects.items():
        resp, items = enroll_one(args, stub, subject, paths)
        results.extend(items)
        why = "; ".join(f"{Path(r['image']).name}: {r['reason']}" for r in items if not r["accepted"])
        per_subject.append({"subject": subject, "entry_id": resp.entry_id, "added": bool(resp.entry_id),
                            "reason": resp.reason, "images_accepted": sum(r["accepted"] for r in items),
                            "images_refused": sum(not r["accepted"] for r in items),
                            "refused_images": [{"image": r["image"], "reason": r["reason"],
                                                **({"faces": r["faces"]} if "faces" in r else {})}
                                               for r in items if not r["accepted"]]})
        if not resp.entry_id:
            refused.append(f"{subject}: {resp.reason}" + (f" ({why})" if why else ""))
        ok = sum(r["accepted"] for r in items)
        progress.step(f"{subject}: {ok}/{len(items)} images accepted" + ("" if resp.entry_id else " (refused)")
                      + (f"; refused {why}" if why else ""))
    added = len(subjects) - len(refused)
    summary = {"deployment": args.deployment, "subjects": len(subjects), "entries_added": added,
               "images_accepted": sum(r["accepted"] for r in results),
               "images_refused": sum(not r["accepted"] for r in results), "subjects_refused": len(refused),
               "refused": [s for s in per_subject if not s["added"]], "by_subject": per_subject, "results": results}
    emit(args, summary, f"{added} of {len(subjects)} subjects added to deployment {args.deployment}: "
         f"{summary['images_accepted']} images accepted, {summary['images_refused']} refused"
         + "".join(f"\n  {r['image']}: refused: {r['reason']}" for r in results if not r["accepted"])
         + "".join(f"\n  refused {r}" for r in refused))
    if refused:  # the exit status is the number of subjects refused (at most 100: exit codes end at 255)
        raise Failure(f"{len(refused)} of {len(subjects)} subjects refused (first: {refused[0]})",
                      code=min(len(refused), 100))


def watchlist_select(args, stub) -> None:
    resp = stub.AddFromReference(pb.AddFromReferenceRequest(
        deployment_id=args.deployment, subject_refs=args.subjects, category=args.category,
        legal_basis=args.legal_basis, actor=args.actor), timeout=600)
    data = [{"subject": e.subject_ref, "entry_id": e.entry_id, "accepted": bool(e.entry_id), "reason": e.reason,
             "images": [{"accepted": r.accepted, "reason": r.reason} for r in e.results]} for e in resp.entries]
    emit(args, data, "\n".join(f"{x['subject']}: " + (f"entry {x['entry_id']}" if x["accepted"]
                                                       else f"refused: {x['reason']}") for x in data))
    refused = [x for x in data if not x["accepted"]]
    if refused:
        raise Failure(f"{len(refused)} of {len(data)} subjects refused (first: {refused[0]['subject']}: "
                      f"{refused[0]['reason']})")


def watchlist_remove(args, stub) -> None:
    d = stub.RemoveEntry(pb.RemoveEntryRequest(deployment_id=args.deployment, entry_id=args.entry,
                                               actor=args.actor, reason=args.reason), timeout=60)
    emit(args, deployment_json(d), f"entry {args.entry} removed; deployment {d.id} is {status_name(d.status)}")


def watchlist_show(args, stub) -> None:
    d = stub.GetDeployment(pb.GetDeploymentRequest(deployment_id=args.deployment), timeout=30)
    r = stub.ListEntries(pb.ListEntriesRequest(deployment_id=args.deployment), timeout=30)
    entries = [entry_json(e) for e in r.entries]
    data = {"deployment": d.id, "status": status_name(d.status), "size": len(entries), "digest": r.watchlist_digest,
            "purged": r.purged, "purged_at": iso(r.purged_at), "entries": entries}
    if r.purged:
        data["kept_subjects"] = [e["subject"] for e in entries]
    head = f"watchlist of deployment {d.id} ({status_name(d.status)}): {len(entries)} entries"
    if r.purged:
        head += f", purged at {iso(r.purged_at)}: only nominal ids, categories and counts remain"
    lines = [head] + [f"  {e['subject']:<24} {e['category']:<18} {e['images']} image(s)  "
                      f"{e['provenance']['source_system']}  {e['provenance']['legal_basis']}" for e in entries]
    emit(args, data, "\n".join(lines))


# Reference collection and policy ---------------------------------------------------------------------
def reference_add_one(args, stub, subject: str, paths: list[Path]) -> pb.AddReferenceResponse:
    dates = captured(args, paths)
    return stub.AddReference(pb.AddReferenceRequest(
        subject_ref=subject, source_system=args.source, legal_basis=args.legal_basis,
        images=[p.read_bytes() for p in paths], captured_at=[ts_from_ns(ns) for ns, _ in dates],
        under_18=args.under_18, actor=args.actor), timeout=120)


def reference_add(args, stub) -> None:
    paths = image_paths(args.images)
    r = reference_add_one(args, stub, args.subject, paths)
    data = {"subject": r.subject_ref, "images_stored": r.images_stored,
            "results": [{"image": str(paths[x.index]), "accepted": x.accepted, "reason": x.reason} for x in r.results]}
    emit(args, data, f"{r.images_stored} of {len(paths)} images of {r.subject_ref} stored in the reference collection")
    if not r.images_stored:
        raise Failure(f"no image of {args.subject} stored: {r.results[0].reason if r.results else ''}")


def reference_import(args, stub) -> None:
    try:
        subjects = subject_images(args.dir)
    except FileNotFoundError as exc:
        raise Failure(str(exc)) from None
    progress = Progress(len(subjects), "subjects")
    stored = 0
    for subject, paths in subjects.items():
        r = reference_add_one(args, stub, subject, paths)
        stored += r.images_stored
        progress.step(f"{subject}: {r.images_stored}/{len(paths)} images stored")
    emit(args, {"subjects": len(subjects), "images_stored": stored},
         f"{stored} images of {len(subjects)} subjects stored in the reference collection")


def reference_list(args, stub) -> None:
    subs = stub.ListReferences(pb.ListReferencesRequest(), timeout=30).subjects
    data = [{"subject": s.subject_ref, "images": len(s.captured_at), "source_system": s.source_system,
             "legal_basis": s.legal_basis, "under_18": s.under_18, "captured": [iso(t) for t in s.captured_at]}
            for s in subs]
    emit(args, data, "\n".join(f"{x['subject']:<24} {x['images']} image(s)  {x['source_system']}  "
                               f"{x['legal_basis']}" for x in data) or "the reference collection is empty")


def policy_show(args, stub) -> None:
    p = stub.GetPolicy(pb.GetPolicyRequest(), timeout=30)
    data = {"version": p.version, "digest": p.digest, "policy": json.loads(p.json)}
    emit(args, data, f"policy {p.version} (digest {p.digest[:16]})\n" + json.dumps(data["policy"], indent=2))


# Readiness ---------------------------------------------------------------------------------------------
def system_health(state: Path) -> dict[str, str]:
    """Each service's health (SERVING, NOT_SERVING, UNAVAILABLE, ...) as its endpoints.json names it, over
    mutual TLS with the state folder's development certificate (or LFR_TLS_DIR's); {} when no endpoints.json.
    Health needs no token, so nobody has to be named."""
    from lfr.runtime.access import Access
    from lfr.runtime.embedded import SERVICES, check_health

    path = state / "endpoints.json"
    if not path.is_file():
        return {}
    try:
        endpoints = json.loads(path.read_text())
    except ValueError:
        return {}  # being written
    try:
        access = Access.dev(state) if (state / "security").is_dir() else Access.from_env()
    except AccessError:
        return {s: "NO_CREDENTIALS" for s in SERVICES}
    health = {s: check_health(endpoints[s], access=access, timeout=2.0) for s in SERVICES if s in endpoints}
    for s, targets in (endpoints.get("replicas") or {}).items():  # `lfr up --replicas`: "match-1", ...
        for i, target in enumerate(targets[1:], 1):
            health[f"{s}-{i}"] = check_health(target, access=access, timeout=2.0)
    return health


def supervisor_of(state: Path) -> dict:
    """The supervisor block `lfr up` writes into endpoints.json (pid, processes and their restarts), if any."""
    try:
        return dict(json.loads((state / "endpoints.json").read_text()).get("supervisor") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def supervisor_gone(state: Path) -> int:
    """The pid of the `lfr up` that wrote endpoints.json when it is no longer running on this machine, else 0."""
    pid = int(supervisor_of(state).get("pid") or 0)
    if pid <= 0:
        return 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:  # another user's process: it exists
        return 0
    return 0


def system_status(args) -> None:
    """`lfr status [--wait S]`: exit 0 when every service of the system answers SERVING."""
    state = state_dir(args.state_dir)
    deadline = time.monotonic() + args.wait
    said = ""
    while True:
        health = system_health(state)
        ready = bool(health) and all(v == "SERVING" for v in health.values())
        gone = supervisor_gone(state)
        if ready or gone or time.monotonic() >= deadline:
            break
        waiting = ", ".join(f"{s} {v}" for s, v in health.items() if v != "SERVING") or \
            f"no {state / 'endpoints.json'} yet (`lfr up` writes it once every service is ready)"
        if waiting != said:  # one line per change, not one per poll
            print(f"lfr: waiting for the system in {state}: {waiting}", file=sys.stderr, flush=True)
            said = waiting
        time.sleep(1.0)
    supervisor = supervisor_of(state)
    text = f"system in {state}: " + ("ready, every service SERVING" if ready else "not ready")
    if supervisor:
        procs = supervisor.get("processes", {})
        text += f"\nsupervisor pid {supervisor.get('pid')}: " + ", ".join(
            f"{n} pid {p.get('pid')} restarts {p.get('restarts', 0)}" for n, p in procs.items())
    emit(args, {"state_dir": str(state), "ready": ready, "services": health}
         | ({"supervisor": supervisor} if supervisor else {}), text)
    if not ready:
        why = ", ".join(f"{s} {v}" for s, v in health.items() if v != "SERVING") or \
            f"{state / 'endpoints.json'} is missing"
        if gone:
            why = f"its supervisor, `lfr up` (pid {gone}), is not running; {why}"
        raise Failure(f"the system in {state} is not ready" + (f" after {args.wait:g} s" if args.wait else "")
                      + f": {why} (is `lfr up --state-dir {state}` running? its services log to {state / 'logs'})")


# Parser ----------------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("connection and identity")
    g.add_argument("--state-dir", default="", help="state folder of the running system (default $LFR_STATE_DIR or ./state)")
    g.add_argument("--target", default="", help="the service's HOST:PORT (instead of --state-dir): watchlist, or identification "
                   "for lfr identify|gallery|job")
    g.add_argument("--as", dest="actor", default=None,
                   help="the acting person, a user of the embedded system's development identity provider "
                   "(default $LFR_ACTOR); refused with a production token (LFR_TOKEN), which names the caller")
    g.add_argument("--json", action="store_true", help="machine output (JSON)")
    return c


def _provenance(p: argparse.ArgumentParser, with_category: bool = True) -> None:
    allow_relative_values(p)  # --captured -30d
    if with_category:
        p.add_argument("--category", type=category, required=True, help=", ".join(CATEGORIES))
    p.add_argument("--source", required=True, help="source system of the images (e.g. the custody system)")
    p.add_argument("--legal-basis", required=True, help="legal basis for holding and using the images")
    p.add_argument("--captured", type=parse_time, default=None,
                   help="capture date of the images: ISO 8601 or '-30d' (default: each file's EXIF date, else its "
                   "modification time)")
    p.add_argument("--under-18", action="store_true", help="the subject is under 18 (needs a second authoriser)")


def add_parsers(sub) -> None:
    common = _common()

    d = sub.add_parser("deployment", help="deployments: create, authorise, start, end, cancel, list, show")
    dsub = d.add_subparsers(dest="action", required=True)
    p = allow_relative_values(dsub.add_parser("create", parents=[common], help="create a DRAFT deployment"))
    p.add_argument("--name", required=True)
    p.add_argument("--site", required=True, help="site name (an approved site of the policy, or any other "
                   "with a second authoriser)")
    p.add_argument("--lat", type=float, default=None, help="site latitude (default: the approved site's)")
    p.add_argument("--lon", type=float, default=None, help="site longitude")
    p.add_argument("--start", type=parse_time, required=True, help="planned start: ISO 8601, 'now', '+1h' or '-10m'")
    p.add_argument("--end", type=parse_time, required=True, help="planned end: ISO 8601, '+4h' or '-1h'")
    p.add_argument("--threshold", type=float, default=0.0, help="match threshold (default: the model's)")
    p.add_argument("--camera", action="append", required=True, help="camera id (repeat for several)")
    p.add_argument("--purpose", required=True)
    p.add_argument("--legal-basis", default="", help="legal basis of the deployment")
    p.add_argument("--id-only", action="store_true", help="print only the new deployment's id (for scripts: "
                   "ID=$(lfr deployment create ... --id-only))")
    p.add_argument("--authority", action="append", type=key_value, metavar="FIELD=TEXT",
                   help="the written authority, one field a time (the policy's authority_fields, e.g. "
                   "dpia_reference=DPIA-2026-014); `lfr policy show` lists them")
    p.add_argument("--threshold-reason", default="", help="why a threshold under the policy's floor is needed")
    p.set_defaults(run=deployment_create)
    p = dsub.add_parser("authorise", parents=[common], help="approve the exact watchlist (--as the officer)")
    p.add_argument("id")
    p.add_argument("--digest", default="", help="the watchlist digest you reviewed (refused if it changed)")
    p.set_defaults(run=deployment_authorise)
    for name, rpc, verb in (("start", "StartDeployment", "started"), ("end", "EndDeployment", "ended"),
                            ("cancel", "CancelDeployment", "cancelled")):
        p = dsub.add_parser(name, parents=[common], help=f"{name} a deployment")
        p.add_argument("id")
        if name != "start":
            p.add_argument("--reason", default="")
        else:
            p.add_argument("--urgent", action="store_true", help="urgent use: start before authorisation (an "
                           "officer of a rank the policy names; confirmed within its limit, else stopped and purged)")
            p.add_argument("--rank", default="", help="with --urgent: your rank")
            p.add_argument("--reason", default="", help="with --urgent: why it cannot wait")
        p.set_defaults(run=deployment_transition(rpc, verb))
    p = dsub.add_parser("reembed", parents=[common], help="re-embed the watchlist with the current model")
    p.add_argument("id")
    p.set_defaults(run=deployment_reembed)
    p = dsub.add_parser("list", parents=[common], help="all deployments")
    p.set_defaults(run=deployment_list)
    p = dsub.add_parser("show", parents=[common], help="one deployment")
    p.add_argument("id")
    p.set_defaults(run=deployment_show)

    w = sub.add_parser("watchlist", help="a deployment's bespoke watchlist: add, import, select, remove, show")
    wsub = w.add_subparsers(dest="action", required=True)
    p = wsub.add_parser("add", parents=[common], help="enroll images of one subject as one entry")
    p.add_argument("--deployment", required=True)
    p.add_argument("--subject", required=True, help="nominal id (no name required)")
    _provenance(p)
    p.add_argument("--face", type=int, action="append", metavar="N",
                   help="an image shows several faces: enroll face N (1-based, as the refusal lists them); once for "
                   "all images or once per image (default: the policy decides: refuse, or the dominant face)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(run=watchlist_add)
    p = wsub.add_parser("import", parents=[common], help="enroll a folder of <subject>/<image> files")
    p.add_argument("--deployment", required=True)
    _provenance(p)
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(run=watchlist_import)
    p = wsub.add_parser("select", parents=[common], help="add subjects from the reference collection")
    p.add_argument("--deployment", required=True)
    p.add_argument("--category", type=category, required=True, help=", ".join(CATEGORIES))
    p.add_argument("--legal-basis", default="", help="default: the reference images' own")
    p.add_argument("subjects", nargs="+", metavar="SUBJECT")
    p.set_defaults(run=watchlist_select)
    p = wsub.add_parser("remove", parents=[common], help="remove an entry")
    p.add_argument("--deployment", required=True)
    p.add_argument("--reason", default="")
    p.add_argument("entry", metavar="ENTRY_ID")
    p.set_defaults(run=watchlist_remove)
    p = wsub.add_parser("show", parents=[common], help="the entries and their provenance")
    p.add_argument("--deployment", required=True)
    p.set_defaults(run=watchlist_show)

    r = sub.add_parser("reference", help="the reference collection (lawfully held images): add, import, list")
    rsub = r.add_subparsers(dest="action", required=True)
    p = rsub.add_parser("add", parents=[common], help="store images of one subject")
    p.add_argument("--subject", required=True)
    _provenance(p, with_category=False)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(run=reference_add)
    p = rsub.add_parser("import", parents=[common], help="store a folder of <subject>/<image> files")
    _provenance(p, with_category=False)
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(run=reference_import)
    p = rsub.add_parser("list", parents=[common], help="the subjects held")
    p.set_defaults(run=reference_list)

    st = sub.add_parser("status", help="is the running system ready: every service's health (no --as needed)")
    st.add_argument("--state-dir", default="", help="state folder of the running system (default $LFR_STATE_DIR "
                    "or ./state)")
    st.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for every service to be SERVING (exit 1 if they are not by then)")
    st.add_argument("--json", action="store_true", help="machine output (JSON)")
    st.set_defaults(func=status_main)

    pol = sub.add_parser("policy", help="the policy the watchlist service enforces")
    psub = pol.add_subparsers(dest="action", required=True)
    p = psub.add_parser("show", parents=[common], help="version, digest and rules")
    p.set_defaults(run=policy_show)

    for parser in (d, w, r, pol):
        parser.set_defaults(func=run)


UNAVAILABLE_HINT = "the system is not running, or it stopped: start it with `lfr up`, wait with `lfr status --wait 300`"


def rpc_error_text(exc: grpc.RpcError) -> str:
    """One line for a refusal or a failed call; UNAVAILABLE (the system is down, or stopped while a stream was
    open) says so instead of leaving the transport's words alone."""
    code = exc.code()
    text = f"{code.name}: {exc.details()}"
    if code == grpc.StatusCode.UNAVAILABLE:
        text += f" ({UNAVAILABLE_HINT})"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (exc.details() or ""):
        # gRPC's own refusal names no setting: a request is limited by the service's LFR_MAX_MESSAGE_BYTES
        text += (" (the service accepts requests up to LFR_MAX_MESSAGE_BYTES, and each image up to "
                 "LFR_MAX_IMAGE_BYTES: send fewer or smaller images per call)")
    return text


def status_main(args) -> None:
    try:
        system_status(args)
    except Failure as exc:
        print(f"lfr: {exc}", file=sys.stderr)
        sys.exit(1)


def run(args, stub_of=watchlist_stub) -> None:
    try:
        args.run(args, stub_of(args))
    except grpc.RpcError as exc:
        print(f"lfr: {rpc_error_text(exc)}", file=sys.stderr)
        sys.exit(1)
    except Failure as exc:
        print(f"lfr: {exc}", file=sys.stderr)
        sys.exit(exc.code)
