"""`lfr demo` and `lfr bench pipeline` leave nothing behind: their temporary state folder (alert crops, enrollment
images, the development CA's keys) is removed when they finish and when they are interrupted (SIGINT), their
processes end, and the benchmark ends and purges the deployment it created."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_cli import LFR, children_of  # the process tree under a launcher


def alive(pids: set[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def test_an_interrupted_demo_stops_everything_and_removes_its_state_folder(data, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # where the demo's temporary state folder is made
    proc = subprocess.Popen([*LFR, "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # the system is up, the list enrolled and the video streaming: interrupt it there
            lines.append(line)
            if line.startswith("[demo] streaming"):
                break
        assert lines and lines[-1].startswith("[demo] streaming"), "".join(lines)
        state = [p for p in tmp_path.iterdir() if p.name.startswith("lfr-demo-")]
        assert len(state) == 1 and (state[0] / "security" / "tls" / "ca.key").is_file()
        kids = children_of(proc.pid)
        assert kids  # six services and nats-server
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + out
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted (SIGINT)" in out and "Traceback" not in out, out[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lfr-demo-")], out[-2000:]
    assert not alive(kids), f"processes left running: {alive(kids)}"


def test_bench_pipeline_ends_and_purges_its_deployment_and_removes_its_state_folder(data, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([*LFR, "bench", "pipeline", "--seconds", "2", "--json"], env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["deployment"]["status"] == "PURGED" and result["deployment"]["purged"], result["deployment"]
    assert result["frames_in"] > 0
    assert result["state_dir"] == "(a temporary folder, removed)"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lfr-bench-")]


def test_a_demo_whose_system_stops_under_it_says_so_in_one_line_and_cleans_up(data, tmp_path):
    """The demo follows StreamAlerts and polls its source; when a service goes away mid-stream it reports the
    UNAVAILABLE status in one line (no traceback), exits 1, and still removes its state folder."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([*LFR, "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[demo] streaming"):
                break
        kids = children_of(proc.pid)
        ingest = [k for k in kids if b"lfr.ingest" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(ingest) == 1, "".join(lines)
        os.kill(ingest[0], signal.SIGKILL)  # the service the demo polls is gone
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "[demo] stopped: UNAVAILABLE" in err and "lfr up" in err, err[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lfr-demo-")]
    assert not alive(kids), f"processes left running: {alive(kids)}"


def test_temporary_state_is_removed_on_sigint_sigterm_and_sighup(tmp_path):
    """The helper every run-once command uses (demo, the pipeline, console and chaos benchmarks): a signal
    unwinds the run (so its embedded system stops) and the folder goes; a folder the user named stays."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom lfr.cli.demo import temporary_state\n"
            "with temporary_state('lfr-bench-', keep=sys.argv[1]) as s:\n"
            "    (Path(s) / 'crop.jpg').write_bytes(b'x')\n    print(s, flush=True)\n    time.sleep(60)\n")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        env = dict(os.environ, TMPDIR=str(tmp_path))
        proc = subprocess.Popen([sys.executable, "-c", code, ""], env=env, stdout=subprocess.PIPE, text=True)
        folder = Path(proc.stdout.readline().strip())
        assert (folder / "crop.jpg").is_file()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert not folder.exists(), sig
    kept = tmp_path / "mine"
    kept.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", code, str(kept)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == str(kept)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert (kept / "crop.jpg").is_file()
