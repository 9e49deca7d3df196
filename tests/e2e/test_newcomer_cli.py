"""The newcomer's defects of issue 18, one test each: README commands that parse and act as a development user
with the role they need; relative times as option values; report periods; the public HTML report; an unknown
deployment's alerts; the image formats; per-image refusal reasons; audit verify's wording; the charts' axes; a
system that stops under the command line."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfr.cli import ops, report
from lfr.cli.client import IMAGE_SUFFIXES, subject_images
from lfr.cli.main import build_parser
from lfr.runtime.devidp import DEFAULT_USERS
from lfr.runtime.security import POLICY

ROOT = Path(__file__).resolve().parents[2]
LFR = [sys.executable, "-m", "lfr.cli.main"]
_W, _M, _A, _I = ("/lfr.watchlist.v1.WatchlistService/", "/lfr.match.v1.MatchService/",
                  "/lfr.audit.v1.AuditService/", "/lfr.ingest.v1.IngestService/")
_ID = "/lfr.identification.v1.IdentificationService/"
# The gRPC method each command of the README calls first (its role decides who may run it).
METHODS = {
    ("deployment", "create"): _W + "CreateDeployment", ("deployment", "authorise"): _W + "AuthoriseDeployment",
    ("deployment", "start"): _W + "StartDeployment", ("deployment", "end"): _W + "EndDeployment",
    ("deployment", "cancel"): _W + "CancelDeployment", ("deployment", "reembed"): _W + "ReembedWatchlist",
    ("deployment", "list"): _W + "ListDeployments", ("deployment", "show"): _W + "GetDeployment",
    ("deployment", "stats"): _M + "GetStats",
    ("watchlist", "add"): _W + "EnrollEntry", ("watchlist", "import"): _W + "EnrollEntry",
    ("watchlist", "select"): _W + "AddFromReference", ("watchlist", "remove"): _W + "RemoveEntry",
    ("watchlist", "show"): _W + "ListEntries",
    ("reference", "add"): _W + "AddReference", ("reference", "import"): _W + "AddReference",
    ("reference", "list"): _W + "ListReferences", ("policy", "show"): _W + "GetPolicy",
    ("alerts", "list"): _M + "ListAlerts", ("alerts", "show"): _M + "GetAlert",
    ("alerts", "adjudicate"): _M + "Adjudicate", ("alerts", "watch"): _M + "StreamAlerts",
    ("report", "deployments"): _A + "PublicRecords", ("report", "totals"): _A + "Totals",
    ("report", "deployment"): _A + "DeploymentReport", ("audit", "verify"): _A + "Verify",
    ("audit", "query"): _A + "Query",
    ("identify",): _ID + "Identify", ("gallery", "import"): _ID + "AddGalleryImages",
    ("gallery", "show"): _ID + "GetGallery", ("job", "submit"): _ID + "SubmitJob", ("job", "status"): _ID + "GetJob",
    ("job", "results"): _ID + "StreamResults", ("job", "cancel"): _ID + "CancelJob", ("job", "list"): _ID + "ListJobs",
    ("source", "start"): _I + "StartSource", ("source", "stop"): _I + "StopSource",
    ("source", "list"): _I + "ListSources",
}
NO_CALLER = {"up", "demo", "bench", "certs", "serve", "status"}  # commands that act as nobody


def readme_commands() -> list[tuple[str, list[str]]]:
    """(the line, the lfr arguments) of every `lfr ...` (or `tox -e lfr -- ...`) command in the shell blocks of the
    README and the docs pages, and in docs/walkthrough.sh, continuation lines joined, comments dropped, $VARS kept
    as words."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S)]
    blocks.append((ROOT / "docs" / "walkthrough.sh").read_text())
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            lex.commenters = "#"
            tokens = list(lex)
            for i, tok in enumerate(tokens):
                start = i + 1 if tok == "lfr" else i + 4 if tokens[i:i + 4] == ["tox", "-e", "lfr", "--"] else None
                if start is None or (i and tokens[i - 1] not in ("(", "$", "|", ";", "&&", "&", "||", "then")
                                     and not tokens[i - 1].endswith(("=", "$("))):
                    continue
                args = []
                for t in tokens[start:]:
                    if t in ("|", ">", ">>", "&", "&&", "||", ";", ")", "2>&1"):
                        break
                    args.append(t.strip("[]"))  # usage synopses: [--fps 10]
                if args and args[0] != "--help":
                    out.append((line.strip(), args))
    return out


def test_every_readme_command_parses_and_acts_as_a_development_user_with_the_role_it_needs():
    commands = readme_commands()
    assert len(commands) > 40
    parser = build_parser("")  # benchmarks' own options are their modules' business: not parsed here
    problems = []
    for line, args in commands:
        if args[0] == "bench":
            continue
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            problems.append(f"does not parse: {line}")
            continue
        if args[0] in NO_CALLER:
            continue
        key = tuple(a for a in args[:2] if not a.startswith("-") and a in {
            *(k for ks in METHODS for k in ks)})[:2]
        method = METHODS.get(key) or METHODS.get(key[:1])
        actor = getattr(ns, "actor", None)
        if method is None:
            problems.append(f"no method known for: {line}")
        elif not actor:
            problems.append(f"names nobody (--as): {line}")
        elif actor not in DEFAULT_USERS:
            problems.append(f"{actor!r} is not a development user: {line}")
        elif not set(DEFAULT_USERS[actor]) & POLICY[method]:
            problems.append(f"{actor} ({DEFAULT_USERS[actor]}) may not call {method.rsplit('/', 1)[1]}: {line}")
    assert not problems, "\n".join(problems)


def test_relative_times_are_values_not_flags():
    p = build_parser("")
    ns = p.parse_args(["deployment", "create", "--name", "n", "--site", "s", "--start", "-2h", "--end", "-1h",
                       "--camera", "c", "--purpose", "p", "--as", "builder"])
    now = time.time_ns()
    assert abs(ns.start - (now - 2 * 3600 * 10**9)) < 60 * 10**9 and abs(ns.end - (now - 3600 * 10**9)) < 60 * 10**9
    assert abs(ops.parse_time("+4h") - (now + 4 * 3600 * 10**9)) < 60 * 10**9
    ns = p.parse_args(["watchlist", "add", "--deployment", "d", "--subject", "s", "--category", "wanted-by-police",
                       "--source", "x", "--legal-basis", "y", "--captured", "-30d", "face.jpg"])
    assert abs(ns.captured - (now - 30 * 86400 * 10**9)) < 60 * 10**9
    ns = p.parse_args(["report", "totals", "--from", "-30d"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", ns.from_date) and ns.to_date == ""
    with pytest.raises(SystemExit):  # a real flag still is one: -1x is no time
        p.parse_args(["deployment", "create", "--end", "-1x"])


def test_report_periods_are_optional_and_today_is_a_date():
    p = build_parser("")
    ns = p.parse_args(["report", "totals"])  # the default "" once failed the date check ("not a date: ''")
    assert ns.from_date == "" and ns.to_date == ""
    ns = p.parse_args(["report", "deployments", "--to", "today"])
    assert ns.to_date == time.strftime("%Y-%m-%d", time.gmtime())


def test_the_cli_takes_the_six_image_formats_the_services_decode(tmp_path):
    for suffix in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
        assert suffix in IMAGE_SUFFIXES, suffix
        (tmp_path / "subject").mkdir(exist_ok=True)
        (tmp_path / "subject" / f"face{suffix}").write_bytes(b"x")
    assert len(subject_images(tmp_path)["subject"]) == 8
    assert ops.image_paths([str(tmp_path / "subject" / "face.webp")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ops.Failure, match="JPEG, PNG, WebP, BMP, GIF or TIFF"):
        ops.image_paths([str(tmp_path / "notes.txt")])


def test_audit_verify_says_what_facts_not_yet_recorded_are():
    text = report.unrecorded_text(1)
    assert text.startswith("1 fact waits") and "within seconds" in text and "not an error" in text.lower()


def test_enrollment_refusals_name_the_policy_setting_that_governs_them():
    from lfr.watchlist.service import load_policy

    policy = load_policy("")  # the example policy
    day, now = 86400 * 10**9, time.time_ns()
    cases = {"min_inter_eye_px": dict(inter_eye_px=5.0), "min_sharpness": dict(sharpness=1.0),
             "max_abs_yaw_deg": dict(yaw_deg=80.0), "max_abs_pitch_deg": dict(pitch_deg=80.0),
             "max_image_age_days": dict(captured_ns=now - 5000 * day)}
    for key, change in cases.items():
        args = dict(n_faces=1, inter_eye_px=80.0, sharpness=300.0, yaw_deg=0.0, pitch_deg=0.0,
                    captured_ns=now - day, now_ns=now) | change
        reason = policy.image_refusal(**args)
        assert f"enrollment.{key}" in reason and "LFR_POLICY_FILE" in reason, (key, reason)
    allowed = next(iter(policy.categories))
    assert "max_watchlist_size in LFR_POLICY_FILE" in policy.entry_refusal(allowed, policy.max_watchlist_size)


def _rows(n: int, date: str = "2026-12-03") -> list[dict]:
    return [{"deployment_id": f"d{i}", "date": date, "start_time": f"{date}T1{i}:0{i}:00Z", "site": "s",
             "alerts": 1 if i == 0 else 0, "confirmed_alerts": 1 if i == 0 else 0, "false_alerts": 0,
             "not_engaged": 0, "unadjudicated": 0, "faces_seen": 10, "false_alert_rate": 0.0,
             "false_alert_rate_1_in": "none"} for i in range(n)]


def test_chart_axes_have_distinct_ticks_and_same_day_deployments_distinct_labels():
    for peak in (1, 2, 3, 7, 13, 250):
        ticks = report.axis_ticks(peak, integer=True)
        labels = [report.tick_text(v) for v in ticks]
        assert len(set(labels)) == len(labels) and ticks[-1] >= peak and len(ticks) <= 6, (peak, labels)
    for peak in (1.0, 0.3, 37.2, 1234.5):
        labels = [report.tick_text(v) for v in report.axis_ticks(peak, integer=False)]
        assert len(set(labels)) == len(labels), (peak, labels)
    svg = report._bars(_rows(2), 760, 300)  # one alert at most: the axis once read 0, 0, 0, 1, 1
    assert re.findall(r'class="y-tick"[^>]*>([^<]*)<', svg) == ["0", "1"]
    labels = re.findall(r'<text class="x-label".*?</text>', svg)
    assert len(labels) == 2 and labels[0] != labels[1] and "10:00 UTC" in labels[0] and "11:01 UTC" in labels[1]
    rate = report._rate_chart(_rows(2), 760, 260)
    assert len(set(re.findall(r'<text class="x-label".*?</text>', rate))) == 2
    single = report._bars(_rows(1), 760, 300)  # one deployment a day: its date alone
    assert "UTC" not in "".join(re.findall(r'<text class="x-label".*?</text>', single))


def test_same_minute_deployments_are_labelled_by_the_second():
    rows = _rows(2)
    rows[1]["start_time"] = rows[0]["start_time"][:17] + "30Z"  # the same minute
    labels = report.x_labels(rows)
    assert labels[0] != labels[1] and labels[1][1].endswith(":30 UTC"), labels


def test_status_gives_up_at_once_when_the_supervisor_is_gone(tmp_path):
    import json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "endpoints.json").write_text(json.dumps({"watchlist": "127.0.0.1:9", "supervisor": {
        "pid": dead.pid, "processes": {}}}))
    t0 = time.monotonic()
    r = subprocess.run([*LFR, "status", "--wait", "120", "--state-dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and time.monotonic() - t0 < 30, r.stderr
    assert f"`lfr up` (pid {dead.pid}), is not running" in r.stderr


# On a running system ---------------------------------------------------------------------------------------
def lfr(system, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*LFR, *args, "--state-dir", str(system.state_dir)], capture_output=True, text=True,
                          timeout=timeout)


def test_alerts_of_an_unknown_deployment_are_not_found(system):
    r = lfr(system, "alerts", "list", "no-such-deployment", "--as", "operator")
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.startswith("lfr: NOT_FOUND") and "no-such-deployment" in r.stderr and "Traceback" not in r.stderr


def test_status_waits_for_the_system_and_needs_nobody(system, tmp_path):
    r = subprocess.run([*LFR, "status", "--wait", "5", "--state-dir", str(system.state_dir)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "ready, every service SERVING" in r.stdout, r.stderr
    r = subprocess.run([*LFR, "status", "--wait", "2", "--state-dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "not ready after 2 s" in r.stderr and "lfr up" in r.stderr


def test_watchlist_import_reports_each_refused_image_and_takes_webp(system, data, tmp_path):
    from PIL import Image

    folder = tmp_path / "list"
    (folder / "old-photo").mkdir(parents=True)
    shutil.copy(data / "faces/knn_examples/train/biden/biden.jpg", folder / "old-photo")  # EXIF date: 2010
    (folder / "lin").mkdir()
    Image.open(data / "faces/misc/lin-manuel-miranda.png").convert("RGB").save(folder / "lin" / "face.webp")
    d = lfr(system, "deployment", "create", "--name", "n", "--site", "Queen Street, Cardiff", "--start", "-10m",
            "--end", "+1h", "--camera", "c", "--purpose", "p", "--as", "builder", "--id-only")
    assert d.returncode == 0, d.stderr
    dep = d.stdout.strip()
    r = lfr(system, "watchlist", "import", "--deployment", dep, "--category", "wanted-by-police", "--source", "x",
            "--legal-basis", "y", "--as", "builder", str(folder))
    assert r.returncode == 1, r.stdout + r.stderr  # a subject refused
    assert "1 of 2 subjects added" in r.stdout
    assert re.search(r"old-photo/biden\.jpg: refused: image too old", r.stdout), r.stdout
    assert "biden.jpg: image too old" in r.stderr.splitlines()[-1], r.stderr  # the one-line reason says why
    assert "lin: 1/1 images accepted" in r.stderr  # the WebP image enrolled


def test_the_public_may_make_the_html_report(system, tmp_path):
    page = tmp_path / "public.html"
    r = lfr(system, "report", "deployments", "--from", "today", "--format", "html", "--out", str(page), "--as",
            "public")
    assert r.returncode == 0, r.stderr
    assert "the chain was not verified when this page was made" in page.read_text()
    assert "needs the auditor role" in r.stderr
    r = lfr(system, "report", "deployments", "--format", "html", "--out", str(page), "--as", "auditor")
    assert r.returncode == 0 and "chain verified:" in page.read_text() and "intact" in page.read_text()
    r = lfr(system, "report", "totals", "--from", "today", "--as", "public")
    assert r.returncode == 0 and '"from"' in r.stdout, r.stderr


def test_audit_verify_explains_facts_not_yet_recorded(system):
    r = lfr(system, "audit", "verify", "--as", "auditor")
    assert r.returncode == 0 and r.stdout.startswith("audit chain intact"), r.stdout + r.stderr
    assert "facts not yet recorded" not in r.stdout
    if "wait" in r.stdout:  # a fact still on its way: the line says what that means
        assert "in the durable event streams to be recorded" in r.stdout


def test_a_request_over_the_message_limit_names_the_settings(system, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(9 * 1024 * 1024))  # over the default LFR_MAX_MESSAGE_BYTES (8 MiB)
    r = lfr(system, "reference", "add", "--subject", "s", "--source", "x", "--legal-basis", "y", "--as", "builder",
            str(big))
    assert r.returncode == 1 and r.stderr.startswith("lfr: RESOURCE_EXHAUSTED"), r.stderr
    assert "LFR_MAX_MESSAGE_BYTES" in r.stderr and "LFR_MAX_IMAGE_BYTES" in r.stderr


def test_a_stopped_system_is_one_line_that_says_so(system):
    """Last in this module: it stops the system (the fixture's own stop afterwards finds nothing to do)."""
    system.stop()
    for args in (("deployment", "list", "--as", "operator"), ("alerts", "list", "x", "--as", "operator")):
        r = lfr(system, *args, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("lfr: UNAVAILABLE") and "not running, or it stopped" in r.stderr, r.stderr
