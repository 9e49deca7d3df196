"""Operator console benchmark (`lfr bench console`): alert capture → visible on an open control-room page in a
real Chromium while a walk-by video runs through the embedded pipeline, and the server time of each page.

A walk-by video is built from LFW people (one photo of each enrolled person shown in turn, and strangers
between them, as in the end-to-end tests). The enrolled photos are other photos of the same people. The
operator's control room is open in Chromium (Debian's `chromium`, driven by Playwright) before the camera
starts; each alert row records when it became visible (the console's script sets `data-shown-ms`) and the
capture time of the frame it was raised on. Meanwhile another signed-in officer loads every page again and
again, and the `Server-Timing` header gives the console's server time per page (and again once the video has
ended, idle). The browser and the page loads run on this same machine, sharing its cores with the pipeline."""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import numpy as np

from lfr.bench.synthvideo import make_video
from lfr.cli.client import Clients
from lfr.cli.demo import temporary_state
from lfr.cli.live import AlertCollector, create_deployment, enroll, stream_video
from lfr.pb import match_pb2, watchlist_pb2
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.paths import data_dir

CAMERA = "camera-1"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PAGE_BUDGET_MS = 200.0
ALERT_BUDGET_MS = 1000.0


def add_arguments(p) -> None:
    p.add_argument("--people", type=int, default=12, help="enrolled people who walk by (default 12)")
    p.add_argument("--strangers", type=int, default=8, help="people not enrolled who walk by (default 8)")
    p.add_argument("--fps", type=float, default=10.0, help="sampling rate of the camera (default 10)")
    p.add_argument("--page-rounds", type=int, default=15, help="loads of each page when idle (default 15)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (default /usr/bin/chromium)")
    p.add_argument("--state-dir", default="", help="state folder (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=13)


def pct(values, q) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else 0.0


def summary(values) -> dict:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95),
            "max": round(float(max(values)), 1) if len(values) else 0.0}


def walk_by(lfw: Path, people: int, strangers: int, seed: int):
    """(enrolled: name -> [photo], shown: [(name, photo)]): people with two photos or more (the first enrolled,
    the second shown) and people with one photo (strangers), in a shuffled order."""
    rng = random.Random(seed)
    folders = sorted(p for p in lfw.iterdir() if p.is_dir())
    rng.shuffle(folders)
    enrolled, shown, others = {}, [], []
    for f in folders:
        imgs = sorted(f.glob("*.jpg"))
        if len(imgs) >= 2 and len(enrolled) < people:
            enrolled[f.name] = [imgs[0]]
            shown.append((f.name, imgs[1]))
        elif len(imgs) == 1 and len(others) < strangers:
            others.append((f.name, imgs[0]))
    order = shown + others
    rng.shuffle(order)
    return enrolled, order


class PageLoads:
    """Another officer (every human role) loading the console's pages in a loop; Server-Timing per page."""

    def __init__(self, base: str, user: str):
        import httpx

        self.http = httpx.Client(base_url=base, follow_redirects=True, timeout=30)
        page = self.http.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        self.http.post("/login", data={"csrf": csrf, "user": user})
        self.times: dict[str, list[float]] = {}
        self.errors: list[str] = []

    def load(self, name: str, path: str) -> None:
        r = self.http.get(path)
        m = re.search(r"app;dur=([\d.]+)", r.headers.get("server-timing", ""))
        if r.status_code != 200 or not m:
            self.errors.append(f"{name}: HTTP {r.status_code}")
            return
        self.times.setdefault(name, []).append(float(m.group(1)))

    def round(self, pages: dict[str, str]) -> None:
        for name, path in pages.items():
            self.load(name, path)


def run(args) -> dict:
    data = data_dir()
    with temporary_state("lfr-bench-console-", keep=args.state_dir) as state:
        return _measure(state, data, args) | {"state_dir": args.state_dir or "(a temporary folder, removed)"}


def _measure(state: str, data: Path, args) -> dict:
    from playwright.sync_api import sync_playwright

    enrolled, order = walk_by(data / "lfw-dev", args.people, args.strangers, args.seed)
    media = Path(state) / "media"
    media.mkdir(parents=True, exist_ok=True)
    video = media / "walk-by.mp4"
    segments = make_video(video, order, seconds_each=1.5, fps=int(args.fps))
    with EmbeddedSystem(state) as system:
        system.add_dev_user("bench-officer")  # every human role: loads every page
        c = Clients.connect(system.endpoints(), access=system.access(user="operator", follow_actor=True))
        d = create_deployment(c, "console bench", [CAMERA])
        results = enroll(c, d.id, enrolled)
        accepted = sum(bool(r.entry_id) for r in results.values())
        c.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"))
        base = system.console_url().rstrip("/")
        collector = AlertCollector(c, d.id)
        loads = PageLoads(base, "bench-officer")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_context().new_page()
            page.goto(base + "/login")
            page.click("#login-operator")
            page.goto(f"{base}/deployments/{d.id}/control")
            page.wait_for_selector("#queue[data-live='1']")
            pages = {"deployments": "/deployments", "deployment": f"/deployments/{d.id}",
                     "authorise": f"/deployments/{d.id}/authorise", "control_room": f"/deployments/{d.id}/control",
                     "records": "/records", "audit": f"/audit?deployment={d.id}", "investigations": "/investigations"}
            stop = threading.Event()

            def busy() -> None:
                while not stop.is_set():
                    loads.round(pages)
                    stop.wait(0.5)

            worker = threading.Thread(target=busy, daemon=True)
            worker.start()
            t0 = time.monotonic()
            src = stream_video(c, d.id, CAMERA, str(video), args.fps, realtime=True)
            wall = time.monotonic() - t0
            time.sleep(2.0)  # the last alerts through
            stop.set()
            worker.join(30)
            busy_times, loads.times = loads.times, {}
            rows = page.evaluate("""Array.from(document.querySelectorAll('#queue-body tr[data-shown-ms]')).map(
                r => ({id: r.dataset.alert, shown: +r.dataset.shownMs, capture: +r.dataset.firstCaptureMs,
                       raised: +r.dataset.raisedMs}))""")
            stats = c.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id))
            alerts = {a.alert_id: a for a, _ in collector.alerts if a.revision == 0}
            collector.close()
            # page server times once the video has ended; the review page of one alert too
            if alerts:
                pages["alert_review"] = f"/alerts/{next(iter(alerts))}"
            for _ in range(args.page_rounds):
                loads.round(pages)
            browser.close()
        c.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="operator"))
        c.close()
    visible = [r["shown"] - r["capture"] for r in rows]
    raised = [r["raised"] - r["capture"] for r in rows]
    console_part = [r["shown"] - r["raised"] for r in rows]
    busy = {k: summary(v) for k, v in busy_times.items()}
    idle = {k: summary(v) for k, v in loads.times.items()}
    ok = bool(visible) and pct(visible, 95) <= ALERT_BUDGET_MS and all(
        s["p95"] < PAGE_BUDGET_MS for s in idle.values())
    return {
        "bench": "console", "video_s": round(segments[-1].end_s + 0.5, 1), "wall_s": round(wall, 1),
        "frames": src.frames_published, "fps": args.fps, "enrolled": accepted,
        "people_shown": len(order), "alerts_raised": stats.alerts, "alerts_on_page": len(rows),
        "faces_seen": stats.faces_seen,
        "capture_to_visible_ms": summary(visible),
        "capture_to_raised_ms": summary(raised),
        "raised_to_visible_ms": summary(console_part),
        "within_1s": round(sum(v <= ALERT_BUDGET_MS for v in visible) / len(visible), 3) if visible else 0.0,
        "page_server_ms_while_streaming": busy, "page_server_ms_idle": idle,
        "page_errors": loads.errors[:10],
        "budgets": {"page_server_ms_p95": PAGE_BUDGET_MS, "capture_to_visible_ms_p95": ALERT_BUDGET_MS},
        "ok": ok,
    }
