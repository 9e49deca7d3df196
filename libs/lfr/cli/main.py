"""The `lfr` command line: run services, the embedded system, the demo and the benchmarks, and operate
deployments (`lfr deployment|watchlist|reference|policy ...`, see lfr/cli/ops.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading

from lfr.runtime.paths import state_dir

SERVICES = ("ingest", "detection", "embedding", "watchlist", "identification", "match", "audit")
BENCHES = {
    "verify": "lfr.bench.verify",
    "identify": "lfr.bench.identify",
    "speed": "lfr.bench.speed",
    "pipeline": "lfr.bench.live",
    "capacity": "lfr.bench.capacity",
    "gallery": "lfr.bench.gallery",
    "identify-oifr": "lfr.bench.oifr",
    "abuse": "lfr.bench.abuse",
    "chaos": "lfr.bench.chaos",
    "console": "lfr.bench.console",
    "dominant": "lfr.bench.dominant",
    "walkby": "lfr.bench.walkby",
    "match": "lfr.bench.match",
}


def cmd_serve(args) -> None:
    """Become the service's process (`python -m lfr.<service>`, as `lfr up` and the images start it): the CLI is
    a library and imports no service."""
    os.environ.setdefault("LFR_STATE_DIR", str(state_dir()))
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", f"lfr.{args.service}"])


class Output:
    """Lines for a person on stdout that never raise: once a write fails (the reader is gone: a closed pipe,
    a launcher that exited), stdout is pointed at /dev/null and the work goes on."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.broken = False

    def say(self, text: str) -> None:
        if self.broken:
            return
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):
            self.broken = True
            try:  # the interpreter's final flush must not fail either
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self.stream.fileno())
                os.close(null)
            except (OSError, ValueError):
                pass


def cmd_up(args) -> None:
    """Start the embedded system supervised; stop it all on SIGTERM, SIGINT, SIGHUP or when the process that
    started this one is gone (a launcher such as tox exits on SIGTERM without passing it on)."""
    from prometheus_client import start_http_server

    from lfr.runtime.embedded import EmbeddedSystem, parse_replicas
    from lfr.runtime.natsserver import free_port

    out = Output()
    try:
        replicas = parse_replicas(args.replicas)
    except ValueError as exc:
        sys.exit(f"lfr up: {exc}")
    system = EmbeddedSystem(args.state_dir, supervise=True, log=lambda line: out.say(json.dumps(line)),
                            replicas=replicas)
    stop = threading.Event()
    why: list[str] = []

    def on_signal(signum, _frame) -> None:
        why.append(signal.Signals(signum).name)
        stop.set()
        system.stopping.set()  # a start in progress gives up

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    parent = os.getppid()
    port = free_port(system.host)
    start_http_server(port, addr=system.host)
    system.supervisor_metrics = f"http://{system.host}:{port}/metrics"
    out.say(f"starting nats-server and six services under {system.state_dir} (supervisor pid {os.getpid()}) ...")
    try:
        try:
            system.start()
        except RuntimeError:
            if not stop.is_set():
                raise
        if not stop.is_set():
            out.say(json.dumps(system.endpoints(), indent=2))
            out.say("all services SERVING, supervised (restarted if they end); Ctrl-C or SIGTERM stops everything")
            if system.console_url():
                out.say(f"operator console: {system.console_url()} (development sign-in)")
        while not stop.wait(0.5):
            if os.getppid() != parent:
                why.append(f"parent {parent} gone")
                system.log_event("supervisor.parent_gone", parent=parent)
                break
    finally:
        system.log_event("supervisor.stopping", reason=", ".join(why) or "error")
        out.say("stopping ...")
        system.stop()
        system.log_event("supervisor.stopped")
        out.say("stopped")


def cmd_demo(args) -> None:
    from lfr.cli.demo import run_demo

    sys.exit(run_demo(args.state_dir, video=args.video, watchlist=args.watchlist, fps=args.fps))


def cmd_bench(args) -> None:
    result = args.bench_run(args)
    print(json.dumps(result, indent=None if args.json else 2))
    if isinstance(result, dict) and result.get("ok") is False:  # a benchmark that checks something failed it
        sys.exit(1)


def build_parser(bench: str | None = None) -> argparse.ArgumentParser:
    """bench: the one benchmark whose module to import ('' = none, None = all)."""
    p = argparse.ArgumentParser(prog="lfr", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run one service in the foreground (configured by LFR_* variables)")
    s.add_argument("service", choices=SERVICES)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("up", help="embedded default: nats-server, Qdrant local mode and all seven services")
    s.add_argument("--state-dir", default=str(state_dir()), help="state folder (default ./state or $LFR_STATE_DIR)")
    s.add_argument("--replicas", default="", metavar="SERVICE=N,...",
                   help="run replicas of match, detection or embedding, e.g. match=2,detection=2,embedding=2 "
                        "(match replicas split the cameras by NATS subject partitioning; docs/scaling.md)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("demo", help="enroll a watchlist, stream a real video through the embedded system, print alerts")
    s.add_argument("--state-dir", default="", help="state folder, kept (default: a new temporary folder, removed at the end, also on Ctrl-C)")
    s.add_argument("--video", default="", help="video file or rtsp:// URL (default: the shared stage video)")
    s.add_argument("--watchlist", default="", help="folder of <subject>/<image> files or of images named by subject")
    s.add_argument("--fps", type=float, default=10.0, help="sampling rate")
    s.set_defaults(func=cmd_demo)

    from lfr.cli import certs, investigate, liveops, model, ops, report

    ops.add_parsers(sub)
    liveops.add_parsers(sub)  # lfr source; lfr deployment stats
    report.add_parsers(sub)  # lfr report | audit | alerts
    investigate.add_parsers(sub)  # lfr identify | gallery | job
    certs.add_parsers(sub)  # lfr certs dev
    model.add_parsers(sub)  # lfr model add | list | check (engines plugged in by manifest)

    b = sub.add_parser("bench", help="benchmarks (print JSON); never part of the test run: "
                       + ", ".join(BENCHES))
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, module_name in BENCHES.items():
        if bench is not None and name != bench:  # keep `lfr --help` fast
            bsub.add_parser(name, help=f"see `lfr bench {name} --help`")
            continue
        module = importlib.import_module(module_name)  # benchmarks import torch: only the one asked for
        bp = bsub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(bp)
        if not any(a.dest == "json" for a in bp._actions):
            bp.add_argument("--json", action="store_true", help="one-line JSON")
        bp.set_defaults(func=cmd_bench, bench_run=module.run)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    bench = argv[1] if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCHES else ""
    args = build_parser(bench).parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
