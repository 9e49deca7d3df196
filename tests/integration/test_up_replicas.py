"""`lfr up --replicas match=2,detection=2,embedding=2` (#20 item 6): every replica is its own supervised process
with its own port, endpoints.json and `lfr status` list them, a killed replica is restarted alone, SIGTERM stops
them all; a service that cannot run replicas is refused before anything starts. (Alerts with two match replicas:
tests/e2e/test_match_replicas.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from lfr.runtime.access import Access
from lfr.runtime.embedded import SERVICES, check_health
from tests.integration.test_supervisor import LFR, still_running, system_processes, wait_for, wait_serving

REPLICAS = "match=2,detection=2,embedding=2"


def test_lfr_up_runs_supervised_replicas(tmp_path):
    refused = subprocess.run([*LFR, "up", "--replicas", "audit=2", "--state-dir", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "single writers" in refused.stderr and not (tmp_path / "no").exists()

    proc = subprocess.Popen([*LFR, "up", "--replicas", REPLICAS, "--state-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: dict = {}
    try:
        eps = wait_serving(tmp_path, 300)
        seen.update(system_processes(tmp_path))
        replicas = {"match-1", "detection-1", "embedding-1"}
        assert {"nats", *SERVICES, *replicas} <= set(seen)
        assert {s: len(t) for s, t in eps["replicas"].items()} == {"match": 2, "detection": 2, "embedding": 2}
        assert all(eps["replicas"][s][0] == eps[s] for s in eps["replicas"])  # replica 0 is the service's address
        assert len({t for ts in eps["replicas"].values() for t in ts}) == 6  # a port each
        status = subprocess.run([*LFR, "status", "--state-dir", str(tmp_path), "--json"], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        health = json.loads(status.stdout)["services"]
        assert {*SERVICES, *replicas} <= set(health) and set(health.values()) == {"SERVING"}

        # a killed replica comes back alone: the others keep their processes
        victim = seen["detection-1"][0]
        os.kill(victim, signal.SIGKILL)
        access = Access.dev(tmp_path)
        wait_for(lambda: (e := json.loads((tmp_path / "endpoints.json").read_text()))["supervisor"]["processes"]
                 ["detection-1"]["restarts"] == 1 and e, 60, "detection-1 restarted")
        wait_for(lambda: check_health(eps["replicas"]["detection"][1], access=access) == "SERVING", 120,
                 "detection-1 SERVING")
        now = system_processes(tmp_path)
        assert now["detection-1"][0] != victim
        assert all(now[n] == seen[n] for n in seen if n not in ("detection-1", "supervisor"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    time.sleep(0.5)
    assert still_running({**seen, **system_processes(tmp_path)}) == []
