"""Live operations of a deployment from the command line: its cameras, its alerts as they arrive, its counters.

- `lfr source start --deployment ID --camera CAM (FILE | rtsp://...) [--fps N] [--no-realtime]`: ingest pulls
  a video file or an RTSP stream for one camera of an ACTIVE deployment; `lfr source stop SOURCE_ID`;
  `lfr source list [--deployment ID]`.
- `lfr alerts watch DEPLOYMENT [--from-start]`: alerts as match raises them (StreamAlerts), one line per alert
  (on a terminal a later revision rewrites its alert's line; elsewhere each revision is a line with the same
  alert id), a bell on a new alert; Ctrl-C stops it; a system that stops ends it with a one-line message.
- `lfr deployment stats ID`: faces seen, alerts, pending adjudications, disposals and their times (match), the
  deployment's sources and frames (ingest), and the pipeline's drops (the services' metrics, when reachable).

Connection and identity as for `lfr alerts` (lfr/cli/report.py): --state-dir, --target HOST:PORT, --as NAME.
`--json` prints machine output (one JSON object; `alerts watch` one JSON line per alert revision). A refusal
exits 1 with one line on stderr.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc

from lfr.cli.ops import UNAVAILABLE_HINT
from lfr.cli.report import Failure, _common, channel, iso, run
from lfr.pb import ingest_pb2, ingest_pb2_grpc, match_pb2, match_pb2_grpc
from lfr.runtime.paths import state_dir


def emit(args, data, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def state_name(state: int) -> str:
    return ingest_pb2.SourceState.Name(state).removeprefix("SOURCE_STATE_")


# Sources -----------------------------------------------------------------------------------------------
def source_json(s: ingest_pb2.Source) -> dict:
    return {"source_id": s.source_id, "deployment_id": s.deployment_id, "camera_id": s.camera_id, "url": s.url,
            "target_fps": s.target_fps, "state": state_name(s.state), "frames_published": s.frames_published,
            "error": s.error}


def source_line(s: ingest_pb2.Source) -> str:
    line = (f"source {s.source_id} {state_name(s.state)}: camera {s.camera_id} of deployment {s.deployment_id} "
            f"<- {s.url} at {s.target_fps:g} fps, {s.frames_published} frames")
    return line + (f" ({s.error})" if s.error else "")


def media_url(text: str) -> str:
    """An rtsp:// (or other) URL as given; a file here made absolute (ingest does not share our working folder);
    any other path as given (a file on the ingest service's own media volume: ingest decides)."""
    if "://" in text:
        return text
    p = Path(text).expanduser()
    return str(p.resolve()) if p.is_file() else text


def source_start(args) -> None:
    if args.fps is not None and not 0 < args.fps <= 60:
        raise Failure("--fps must be between 0 and 60 frames per second")
    stub = ingest_pb2_grpc.IngestServiceStub(channel(args, "ingest"))
    s = stub.StartSource(ingest_pb2.StartSourceRequest(
        deployment_id=args.deployment, camera_id=args.camera, url=media_url(args.media),
        target_fps=args.fps or 0.0, realtime=not args.no_realtime), timeout=30)
    emit(args, source_json(s), source_line(s))


def source_stop(args) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel(args, "ingest"))
    s = stub.StopSource(ingest_pb2.StopSourceRequest(source_id=args.source), timeout=30)
    emit(args, source_json(s), source_line(s))


def source_list(args) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel(args, "ingest"))
    sources = [s for s in stub.ListSources(ingest_pb2.ListSourcesRequest(), timeout=30).sources
               if not args.deployment or s.deployment_id == args.deployment]
    emit(args, [source_json(s) for s in sources],
         "\n".join(source_line(s) for s in sources) or "no sources" + (
             f" for deployment {args.deployment}" if args.deployment else ""))


# Alerts as they arrive ----------------------------------------------------------------------------------
def _clock(ts) -> str:
    if not ts.seconds and not ts.nanos:
        return "--:--:--"
    return datetime.fromtimestamp(ts.seconds, UTC).astimezone().strftime("%H:%M:%S")


def alert_json(a: match_pb2.Alert) -> dict:
    return {"alert_id": a.alert_id, "revision": a.revision, "deployment_id": a.envelope.deployment_id,
            "camera_id": a.envelope.camera_id, "entry_id": a.entry_id, "subject_ref": a.subject_ref,
            "score": round(a.score, 4), "threshold": round(a.threshold, 4), "captured_at": iso(a.envelope.capture_time),
            "raised_at": iso(a.raised_at), "last_seen": iso(a.last_seen), "sightings": a.sightings,
            "video_time_s": round(a.video_time_s, 2), "probe_deleted": a.probe_deleted}


def alert_line(a: match_pb2.Alert) -> str:
    rev = f"  rev {a.revision}" if a.revision else ""
    return (f"{_clock(a.raised_at)}  ALERT {a.alert_id}  camera {a.envelope.camera_id}  subject {a.subject_ref}"
            f"  score {a.score:.3f} / {a.threshold:.3f}  seen {a.sightings}x, last {_clock(a.last_seen)}{rev}")


class AlertBoard:
    """Folds alert revisions: one line per alert. On a terminal a revision rewrites its alert's line in place;
    elsewhere (a pipe, a file, --json) each revision is written as a line of its own with the alert's id."""

    def __init__(self, out, as_json: bool, bell: bool):
        self.out, self.as_json = out, as_json
        self.tty = out.isatty() and not as_json
        self.bell = bell and self.tty
        self.order: list[str] = []  # alert ids in the order their lines were printed
        self.revision: dict[str, int] = {}

    def show(self, a: match_pb2.Alert) -> str:
        """'new', 'revision' or 'stale' (an older revision than the one shown: nothing printed)."""
        seen = self.revision.get(a.alert_id)
        if seen is not None and a.revision <= seen:
            return "stale"
        self.revision[a.alert_id] = a.revision
        text = json.dumps(alert_json(a)) if self.as_json else alert_line(a)
        if seen is None:
            self.order.append(a.alert_id)
            self.out.write(("\a" if self.bell else "") + text + "\n")
        elif self.tty:
            up = len(self.order) - self.order.index(a.alert_id)
            self.out.write(f"\x1b[{up}A\r\x1b[2K{text}\x1b[{up}B\r")
        else:
            self.out.write(text + "\n")
        self.out.flush()
        return "new" if seen is None else "revision"


def alerts_watch(args) -> None:
    stub = match_pb2_grpc.MatchServiceStub(channel(args, "match"))
    call = stub.StreamAlerts(match_pb2.StreamAlertsRequest(deployment_id=args.deployment,
                                                           from_start=args.from_start),
                             timeout=args.seconds or None)  # --seconds: the stream's own deadline ends it
    board = AlertBoard(sys.stdout, args.json, bell=not args.no_bell)
    print(f"lfr: watching the alerts of deployment {args.deployment}"
          + (" (from its first)" if args.from_start else "")
          + (f" for {args.seconds:g} s" if args.seconds else "") + "; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        for alert in call:
            board.show(alert)
    except KeyboardInterrupt:
        call.cancel()
        print(f"lfr: stopped watching ({len(board.order)} alerts shown)", file=sys.stderr, flush=True)
        return
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and args.seconds:  # the time asked for is up
            print(f"lfr: watched for {args.seconds:g} s ({len(board.order)} alerts shown)", file=sys.stderr,
                  flush=True)
            return
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise Failure(f"the alert stream ended: the match service is unavailable; {UNAVAILABLE_HINT}") from None
        if exc.code() == grpc.StatusCode.CANCELLED:  # not by us (Ctrl-C is handled above): the server went away
            raise Failure(f"the alert stream ended: the match service closed it; {UNAVAILABLE_HINT}") from None
        raise
    raise Failure(f"the alert stream ended: the match service closed it; {UNAVAILABLE_HINT}")


# Counters ----------------------------------------------------------------------------------------------
def _pipeline_drops(args) -> dict | None:
    """Items each stage dropped (all deployments, since each service started), from the services' Prometheus
    metrics, when the state folder names them (an embedded system); None otherwise."""
    from lfr.bench.live import metric_sum, scrape

    state = state_dir(args.state_dir)
    try:
        urls = json.loads((state / "endpoints.json").read_text()).get("metrics", {})
        out = {s: int(metric_sum(scrape(urls[s]), "lfr_items_dropped_total", stage=stage))
               for s, stage in (("detection", "detect"), ("embedding", "embed"), ("match", "match"))}
    except (OSError, KeyError, ValueError):
        return None
    return out


def deployment_stats(args) -> None:
    match = match_pb2_grpc.MatchServiceStub(channel(args, "match"))
    s = match.GetStats(match_pb2.GetStatsRequest(deployment_id=args.id), timeout=30)
    sources = None
    if not args.target:  # --target names the match service only; the sources come from ingest
        ingest = ingest_pb2_grpc.IngestServiceStub(channel(args, "ingest"))
        sources = [x for x in ingest.ListSources(ingest_pb2.ListSourcesRequest(), timeout=30).sources
                   if x.deployment_id == args.id]
    drops = None if args.target else _pipeline_drops(args)
    out = {
        "deployment_id": args.id, "faces_seen": s.faces_seen, "alerts": s.alerts, "alert_updates": s.alert_updates,
        "pending_adjudications": s.pending_adjudications, "overdue": s.overdue,
        "nonmatches_disposed": s.nonmatches_disposed, "faces_dropped_stale": s.stale_dropped,
        "disposal_ms": {"p50": round(s.disposal_ms_p50, 1), "max": round(s.disposal_ms_max, 1)},
        "frames_published": sum(x.frames_published for x in sources) if sources is not None else None,
        "sources": [source_json(x) for x in sources] if sources is not None else None,
        "pipeline_drops_all_deployments": drops,
        "match_instance": s.instance_id, "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    lines = [f"deployment {args.id}",
             f"  faces seen             {s.faces_seen}",
             f"  alerts                 {s.alerts} ({s.alert_updates} updates)",
             f"  pending adjudications  {s.pending_adjudications}" + (f" ({s.overdue} overdue)" if s.overdue else ""),
             f"  non-matches disposed   {s.nonmatches_disposed}, disposal p50 {s.disposal_ms_p50:.0f} ms, "
             f"max {s.disposal_ms_max:.0f} ms",
             f"  faces dropped (stale)  {s.stale_dropped}"]
    if sources is not None:
        lines.append(f"  frames published       {out['frames_published']} from {len(sources)} source(s)")
        lines += [f"    {source_line(x)}" for x in sources]
    if drops is not None:
        lines.append("  dropped by the pipeline (all deployments, since start): "
                     + ", ".join(f"{k} {v}" for k, v in drops.items()))
    emit(args, out, "\n".join(lines))


# Parsers -----------------------------------------------------------------------------------------------
def _with_json(p):
    p.add_argument("--json", action="store_true", help="machine output (JSON)")
    return p


def add_watch_parser(alsub, common) -> None:
    """`lfr alerts watch`, under report.py's `lfr alerts`."""
    p = _with_json(alsub.add_parser("watch", parents=[common], help="a deployment's alerts as they arrive "
                                    "(revisions folded, a bell on a new one); Ctrl-C stops"))
    p.add_argument("deployment")
    p.add_argument("--from-start", action="store_true", help="first the alerts raised so far, then new ones")
    p.add_argument("--no-bell", action="store_true", help="no terminal bell on a new alert")
    p.add_argument("--seconds", type=float, default=0.0, metavar="S",
                   help="stop after S seconds, exit status 0 (default: until Ctrl-C); for scripts")
    p.set_defaults(run=alerts_watch, func=run)


def add_parsers(sub) -> None:
    """`lfr source ...`, and `lfr deployment stats` under ops.py's `lfr deployment`."""
    import argparse

    common = _common()
    src = sub.add_parser("source", help="a deployment's cameras: start (a file or rtsp:// stream), stop, list")
    ssub = src.add_subparsers(dest="source_action", required=True)
    p = _with_json(ssub.add_parser("start", parents=[common], help="pull a video file or an RTSP stream for one "
                                   "camera of an ACTIVE deployment"))
    p.add_argument("--deployment", required=True)
    p.add_argument("--camera", required=True, help="one of the deployment's cameras")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default: the ingest service's)")
    p.add_argument("--no-realtime", action="store_true", help="read a file as fast as possible instead of at "
                   "its own frame rate")
    p.add_argument("media", metavar="FILE|URL", help="video file (inside the system's media roots) or rtsp:// URL")
    p.set_defaults(run=source_start)
    p = _with_json(ssub.add_parser("stop", parents=[common], help="stop a source"))
    p.add_argument("source", metavar="SOURCE_ID")
    p.set_defaults(run=source_stop)
    p = _with_json(ssub.add_parser("list", parents=[common], help="sources and their state"))
    p.add_argument("--deployment", default="", help="only this deployment's")
    p.set_defaults(run=source_list)
    src.set_defaults(func=run)

    dep = sub.choices["deployment"]  # ops.py's `lfr deployment`
    dsub = next(a for a in dep._actions if isinstance(a, argparse._SubParsersAction))
    p = _with_json(dsub.add_parser("stats", parents=[common], help="live counters: faces seen, alerts, pending "
                                   "adjudications, disposal times, sources and drops"))
    p.add_argument("id")
    p.set_defaults(run=deployment_stats, func=run)
