"""The embedded default's supervisor (`lfr up`): a killed service or nats-server is started again and counted;
SIGTERM stops everything even when stdout is a closed pipe; a SIGTERM to the documented launcher
(`tox -e lfr -- up`) stops the system too. (A SIGKILL of the supervisor alone, after which its children die by
their parent-death signal, is a round of tests/integration/test_power_loss.py.) The PIDs checked are the ones
the system recorded (endpoints.json), never processes found by name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lfr.runtime.access import Access
from lfr.runtime.embedded import SERVICES, check_health

ROOT = Path(__file__).resolve().parents[2]
LFR = [sys.executable, "-m", "lfr.cli.main"]


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie: (pid, start) names
    one process even if the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def read_endpoints(state: Path) -> dict | None:
    try:
        return json.loads((state / "endpoints.json").read_text())
    except (OSError, ValueError):
        return None


def system_processes(state: Path) -> dict[str, tuple[int, int]]:
    """name -> (pid, start time) of the supervisor and every process it runs, as it recorded them."""
    sup = read_endpoints(state)["supervisor"]
    out = {"supervisor": sup["pid"], **{n: p["pid"] for n, p in sup["processes"].items()}}
    return {n: (pid, start_time(pid)) for n, pid in out.items() if pid}


def still_running(procs: dict[str, tuple[int, int]]) -> list[str]:
    return [f"{n} ({pid})" for n, (pid, t0) in procs.items() if t0 is not None and start_time(pid) == t0]


def wait_serving(state: Path, timeout_s: float = 120.0) -> dict:
    return wait_for(lambda: read_endpoints(state), timeout_s, "endpoints.json (every service SERVING)")


def test_killed_processes_return_counted_and_sigterm_with_a_closed_stdout_stops_all(tmp_path):
    proc = subprocess.Popen([*LFR, "up", "--state-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[str, tuple[int, int]] = {}
    try:
        eps = wait_serving(tmp_path)
        access = Access.dev(tmp_path)
        seen.update(system_processes(tmp_path))
        assert {"supervisor", "nats", *SERVICES} <= set(seen)  # and whatever else it runs (the console)
        assert eps["supervisor"]["pgid"] and all(os.getpgid(pid) == eps["supervisor"]["pgid"]
                                                 for n, (pid, _) in seen.items() if n != "supervisor")
        for victim in ("match", "nats"):
            old = seen[victim][0]
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)

            def restarted(victim=victim, old=old):
                p = (read_endpoints(tmp_path) or {}).get("supervisor", {}).get("processes", {}).get(victim, {})
                return p if p.get("restarts") == 1 and p.get("pid") not in (0, old) else None

            p = wait_for(restarted, 30, f"{victim} restarted")
            assert p["last_exit"]["signal"] == "SIGKILL"
            wait_for(lambda: all(check_health(eps[s], access=access) == "SERVING" for s in SERVICES), 90,
                     f"every service SERVING after {victim} was killed")
            print(f"{victim}: SIGKILL -> all SERVING in {time.monotonic() - t0:.1f} s")
            seen.update({f"{n} restarted": v for n, v in system_processes(tmp_path).items() if v not in seen.values()})
        log = (tmp_path / "logs" / "supervisor.log").read_text()
        assert '"process.restarted", "process": "match"' in log and '"process.restarted", "process": "nats"' in log
        metrics = eps["metrics"]["supervisor"]
        import urllib.request

        text = urllib.request.urlopen(metrics, timeout=5).read().decode()
        assert 'lfr_process_restarts_total{process="match"} 1.0' in text
        # the reader of stdout goes away; SIGTERM must still stop everything, in order, and say so in the log
        proc.stdout.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0
    assert '"supervisor.stopped"' in (tmp_path / "logs" / "supervisor.log").read_text()
    wait_for(lambda: not still_running(seen), 10, f"no process left after SIGTERM: {still_running(seen)}")


def test_sigterm_to_the_tox_launcher_stops_the_system(tmp_path):
    """tox 4 exits on SIGTERM without passing it on: `lfr up` notices that its parent is gone and stops."""
    tox = shutil.which("tox")
    assert tox, "tox is the documented launcher (`tox -e lfr -- up`) and must be on PATH (CI installs it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOX_", "VIRTUAL_ENV"))}
    launcher = subprocess.Popen([tox, "-c", str(ROOT / "tox.ini"), "-e", "lfr", "--", "up", "--state-dir",
                                 str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    seen: dict[str, tuple[int, int]] = {}
    try:
        wait_serving(tmp_path, 240)
        seen = system_processes(tmp_path)
        assert len(seen) >= len(SERVICES) + 2
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(30)
    wait_for(lambda: not still_running(seen), 90, f"no process left after SIGTERM to tox: {still_running(seen)}")
    assert '"supervisor.parent_gone"' in (tmp_path / "logs" / "supervisor.log").read_text()
