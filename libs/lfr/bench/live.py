"""Live pipeline benchmark: the embedded system end to end on a real video (`lfr bench pipeline`)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lfr.bench.soak import Soak
from lfr.cli.client import Clients, subject_images
from lfr.cli.demo import closed_on_failure, temporary_state
from lfr.cli.live import AlertCollector, create_deployment, enroll, stream_video
from lfr.pb import ingest_pb2, match_pb2, watchlist_pb2
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.paths import data_dir

CAMERA = "bench-camera"


def add_arguments(p) -> None:
    p.add_argument("--video", default="", help="video file (default: the shared 1080p pedestrians video)")
    p.add_argument("--enroll", default="", help="folder of <subject>/<image> files, one entry per subject "
                   "(default: the shared faces/knn_examples/train)")
    p.add_argument("--fps", type=float, default=10.0, help="sampling rate (default 10)")
    p.add_argument("--cameras", type=int, default=1, help="stream the video on this many cameras of the deployment "
                   "at once (default 1; measures LFR_DETECTION_BATCH and LFR_EMBEDDING_BATCH across cameras)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds of video (0 = all)")
    p.add_argument("--loops", type=int, default=1, help="play the video this many times (a longer run)")
    p.add_argument("--minutes", type=float, default=0.0, help="soak: play the video again and again for this long, "
                   "sampling every process's memory and open files, latency and drops per window; fails on "
                   "unbounded growth or latency creep (see lfr.bench.soak)")
    p.add_argument("--sample-s", type=float, default=15.0, help="soak: sampling interval (default 15 s)")
    p.add_argument("--window-min", type=float, default=5.0, help="soak: window of the percentiles (default 5 min)")
    p.add_argument("--state-dir", default="", help="state folder (default: a temporary folder)")
    p.add_argument("--truth", default="", help="a walk-by's truth.json (`lfr bench walkby`): its video and watchlist, "
                   "and the run scored per pass (alerted, missed by name, false alerts per pass and per 10,000 faces, "
                   "first appearance to alert)")
    p.add_argument("--min-frames", type=int, default=0, help="match's pass rule: LFR_ALERT_MIN_FRAMES for this run "
                   "(1 = the per-frame rule; 0 = the default)")
    p.add_argument("--drain-s", type=float, default=1.5, help="after the video, wait up to this long for every "
                   "frame to be processed or dropped (default 1.5 s; a slow or loaded machine with a long "
                   "LFR_FRESHNESS_MS needs more)")
    p.add_argument("--strong-margin", type=float, default=-1.0, help="LFR_ALERT_STRONG_MARGIN for this run "
                   "(-1 = the default)")
    p.add_argument("--threshold", type=float, default=0.0, help="the deployment's threshold (0 = the policy's default)")
    p.add_argument("--suite", default="", help="a walk-by suite folder (`lfr bench walkby --suite DIR`): run and score "
                   "every video built there (or --only), one JSON with a line per video and the totals")
    p.add_argument("--only", default="", help="with --suite: these videos only (comma separated names)")
    p.add_argument("--rules", default="", help="with --suite or --truth: compare pass rules, each MIN_FRAMES[:STRONG_MARGIN] "
                   "(comma separated, e.g. 1,2,3:0.08), each a whole run; the result per rule")
    p.add_argument("--json", action="store_true", help="one-line JSON")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == val for k, val in labels.items()))


def cpu_seconds(system) -> dict[str, float]:
    """user + system CPU seconds of each service process and nats-server so far (Linux /proc)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    pids = {name: p.pid for name, p in system.procs.items()}
    pids["bench_client"] = os.getpid()
    if system.nats.proc is not None:
        pids["nats"] = system.nats.proc.pid
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else 0.0


SUMMARY_KEYS = ("frames_in", "frames_dropped", "faces", "alerts", "alert_latency_ms", "nonmatch_disposal_ms", "cpu_s",
                "threshold")


def _summary(out: dict) -> dict:
    t = out.get("truth") or {}
    return {k: out[k] for k in SUMMARY_KEYS} | {k: t[k] for k in (
        "watchlisted_passes", "watchlisted_alerted", "missed", "false_alerts", "false_alerts_per_10k_faces",
        "duplicate_alerts", "appearance_to_alert_s") if k in t}


def _total(lines: dict[str, dict]) -> dict:
    tot = {k: sum(v.get(k, 0) for v in lines.values()) for k in (
        "frames_in", "frames_dropped", "faces", "watchlisted_passes", "watchlisted_alerted", "false_alerts")}
    tot["missed"] = sum(len(v.get("missed", [])) for v in lines.values())
    tot["false_alerts_per_10k_faces"] = round(1e4 * tot["false_alerts"] / max(1, tot["faces"]), 2)
    tot["dropped_share"] = round(tot["frames_dropped"] / max(1, tot["frames_in"]), 4)
    tot["alert_latency_p95_max_ms"] = max((v["alert_latency_ms"]["p95"] for v in lines.values()), default=0.0)
    tot["disposal_max_ms"] = max((v["nonmatch_disposal_ms"]["max"] for v in lines.values()), default=0.0)
    return tot


def _rules(text: str) -> list[tuple[int, float]]:
    out = []
    for item in (x for x in text.split(",") if x.strip()):
        frames, _, margin = item.partition(":")
        out.append((int(frames), float(margin) if margin else -1.0))
    return out


def run(args) -> dict:
    """One run; with --suite every suite video; with --rules every rule (a whole run or suite each)."""
    rules = _rules(getattr(args, "rules", ""))
    if rules:
        per_rule = {}
        for frames, margin in rules:
            args.min_frames, args.strong_margin = frames, margin
            key = f"min_frames={frames}" + (f",strong_margin={margin}" if margin >= 0 else "")
            r = run_suite(args) if getattr(args, "suite", "") else run_one(args)
            per_rule[key] = r["total"] if "total" in r else _summary(r)
        return {"rules": per_rule, "suite": getattr(args, "suite", ""), "truth": getattr(args, "truth", "")}
    return run_suite(args) if getattr(args, "suite", "") else run_one(args)


def run_suite(args) -> dict:
    from argparse import Namespace

    from lfr.bench.walkby import suite_truths

    truths = suite_truths(Path(args.suite))
    only = [n for n in getattr(args, "only", "").split(",") if n]
    truths = {k: v for k, v in truths.items() if not only or k in only}
    if not truths:
        raise SystemExit(f"no walk-by suite videos in {args.suite} (build them with lfr bench walkby --suite DIR)")
    lines = {}
    for name, truth in truths.items():
        one = Namespace(**vars(args))
        one.truth, one.video, one.enroll, one.suite = str(truth), "", "", ""
        lines[name] = _summary(run_one(one))
    return {"suite": args.suite, "fps": args.fps, "videos": lines, "total": _total(lines)}


def run_one(args) -> dict:
    truth = json.loads(Path(args.truth).read_text()) if args.truth else None
    if truth:
        args.video, args.enroll = args.video or truth["video"], args.enroll or truth["enroll"]
    data = data_dir(required=not (args.video and args.enroll))
    video = args.video or str(data / "video/pedestrians-1080p25.mp4")
    subjects = subject_images(args.enroll or data / "faces/knn_examples/train")
    with temporary_state("lfr-bench-", keep=args.state_dir) as state:  # removed at the end unless --state-dir
        out = _measure(state, video, subjects, args)
    if truth:
        from lfr.bench.walkby import score_passes

        out["truth"] = score_passes(truth, out["alert_list"], out["faces"], until_s=args.seconds)
    return out | {"state_dir": args.state_dir or "(a temporary folder, removed)"}


def _measure(state: str, video: str, subjects: dict, args) -> dict:
    env = {}
    if getattr(args, "min_frames", 0):
        env["LFR_ALERT_MIN_FRAMES"] = str(args.min_frames)
    if getattr(args, "strong_margin", -1.0) >= 0:
        env["LFR_ALERT_STRONG_MARGIN"] = str(args.strong_margin)
    with EmbeddedSystem(state, media_roots=[Path(video).resolve().parent], env=env or None) as system:
        c = Clients.connect(system.endpoints(), access=system.access(user="operator", follow_actor=True))
        n_cams = max(1, getattr(args, "cameras", 1))
        cameras = [CAMERA] if n_cams == 1 else [f"{CAMERA}-{k + 1}" for k in range(n_cams)]
        d = create_deployment(c, "bench", cameras, threshold=getattr(args, "threshold", 0.0),
                              threshold_reason="benchmark: pass rules compared at a lower threshold"
                              if getattr(args, "threshold", 0.0) else "")
        with closed_on_failure(c, d.id):  # an error or Ctrl-C ends (and purges) the deployment
            enrolled = enroll(c, d.id, subjects)
            c.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"))
            collector = AlertCollector(c, d.id)
            cpu0 = cpu_seconds(system)
            t0 = time.monotonic()
            frames_in = 0
            soak = Soak(system, args.sample_s, args.window_min * 60).start() if args.minutes else None
            loops = 0
            while loops < max(1, args.loops) or (soak and time.monotonic() - t0 < args.minutes * 60):
                loops += 1
                if args.seconds:
                    timer = threading.Timer(args.seconds, lambda: [
                        c.ingest.StopSource(ingest_pb2.StopSourceRequest(source_id=s.source_id))
                        for s in c.ingest.ListSources(ingest_pb2.ListSourcesRequest()).sources
                        if s.state == ingest_pb2.SOURCE_STATE_RUNNING])
                    timer.start()
                with ThreadPoolExecutor(len(cameras)) as pool:  # every camera streams at once
                    srcs = list(pool.map(lambda cam: stream_video(c, d.id, cam, video, args.fps, realtime=True),
                                         cameras))
                if args.seconds:
                    timer.cancel()
                frames_in += sum(src.frames_published for src in srcs)
            wall = time.monotonic() - t0
            if soak:
                soak.stop()
            cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_seconds(system).items()}
            drain_until = time.monotonic() + getattr(args, "drain_s", 1.5)
            while time.monotonic() < drain_until:  # let the last frames through
                time.sleep(0.5)
                det = scrape(system.endpoints()["metrics"]["detection"])
                if metric_sum(det, "lfr_items_processed_total", stage="detect") + \
                        metric_sum(det, "lfr_items_dropped_total", stage="detect") >= frames_in:
                    time.sleep(1.5)  # and through embedding and match (their queues empty, when frames are kept long)
                    while time.monotonic() < drain_until and any(
                            metric_sum(scrape(system.endpoints()["metrics"][name]), "lfr_queue_depth", stage=stage)
                            for name, stage in (("embedding", "embed"), ("match", "match"))):
                        time.sleep(0.5)
                    time.sleep(1.0)  # the batch in progress
                    break
            stats = c.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id))
            deadline = time.monotonic() + 10
            while len({a.alert_id for a, _ in collector.alerts}) < stats.alerts and time.monotonic() < deadline:
                time.sleep(0.1)
            collector.close()
            det = scrape(system.endpoints()["metrics"]["detection"])
            emb = scrape(system.endpoints()["metrics"]["embedding"])
            match = scrape(system.endpoints()["metrics"]["match"])
            ended = c.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(
                deployment_id=d.id, actor="operator", reason="benchmark finished"), timeout=60)
        c.close()
    # An alert is raised once per pass (revision 0); later revisions update it with a better probe.
    raised = [(a, recv) for a, recv in collector.alerts if a.revision == 0]
    latencies = [(recv - a.envelope.capture_time.ToNanoseconds()) / 1e6 for a, recv in raised]
    # The pass rule raises at the frame that completes the evidence (its capture is the raise's last_seen): the
    # difference is the time the alert waited for evidence, the rest is the pipeline's
    decisions = [(recv - (a.last_seen.ToNanoseconds() or a.envelope.capture_time.ToNanoseconds())) / 1e6
                 for a, recv in raised]
    disposal_p50 = stats.disposal_ms_p50
    processed = metric_sum(det, "lfr_items_processed_total", stage="detect")
    dropped = {
        "detection": metric_sum(det, "lfr_items_dropped_total", stage="detect"),
        "embedding": metric_sum(emb, "lfr_items_dropped_total", stage="embed"),
        "match": metric_sum(match, "lfr_items_dropped_total", stage="match"),
    }
    return {
        "video": video,
        "enrolled": {k: sum(r.accepted for r in v.results) for k, v in enrolled.items()},
        "threshold": round(d.threshold, 4),
        "model": f"{d.model_id} {d.model_version}",
        "frames_in": frames_in,
        "frames_processed": int(processed),
        "frames_dropped": int(dropped["detection"]),
        "drops_by_stage": {k: int(v) for k, v in dropped.items()},
        "drop_reasons": {name: {dict(lab)["reason"]: int(v) for (n, lab), v in m.items()
                                if n == "lfr_items_dropped_total" and dict(lab).get("stage") == stage and v}
                         for name, m, stage in (("detection", det, "detect"), ("embedding", emb, "embed"),
                                                ("match", match, "match"))},
        "stage_batch_ms": {  # mean time of one batch in each stage's worker
            name: round(1000 * metric_sum(m, "lfr_stage_seconds_sum", stage=stage)
                        / max(1.0, metric_sum(m, "lfr_stage_seconds_count", stage=stage)), 1)
            for name, m, stage in (("detection", det, "detect"), ("embedding", emb, "embed"), ("match", match, "match"))},
        "faces": stats.faces_seen,
        "faces_skipped_tracked": int(metric_sum(det, "lfr_faces_skipped_total", reason="tracked")),
        "alerts": stats.alerts,
        "alert_latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95),
                             "max": round(max(latencies), 1) if latencies else 0.0},
        "decision_latency_ms": {"p50": pct(decisions, 50), "p95": pct(decisions, 95),
                                "max": round(max(decisions), 1) if decisions else 0.0},
        "nonmatch_disposal_ms": {"p50": round(disposal_p50, 1), "max": round(stats.disposal_ms_max, 1)},
        "fps": round(processed / wall, 2) if wall else 0.0,
        "seconds": round(wall, 2),
        "cpu_s": cpu,  # CPU seconds each process used while the video streamed (2 cores = 2 s per second)
        "alert_updates": len(collector.alerts) - len(raised),
        "alert_list": [{"subject": a.subject_ref, "video_time_s": round(a.video_time_s, 2),
                        "score": round(a.score, 4), "latency_ms": round(lat, 1), "decision_ms": round(dec, 1)}
                       for (a, _), lat, dec in zip(raised, latencies, decisions, strict=True)],
        "deployment": {"id": d.id, "status": watchlist_pb2.DeploymentStatus.Name(ended.status).removeprefix(
            "DEPLOYMENT_STATUS_"), "purged": bool(ended.purged_at.seconds)},
        "loops": loops,
        "cameras": len(cameras),
    } | ({"soak": (report := soak.report()), "ok": report["ok"]} if soak else {})
