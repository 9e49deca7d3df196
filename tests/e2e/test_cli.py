"""`lfr up` starts everything and SIGTERM stops everything (no orphan); `lfr serve` runs one service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from lfr.runtime.access import Access
from lfr.runtime.embedded import SERVICES, check_health
from lfr.runtime.natsserver import NatsServer, free_port

LFR = [sys.executable, "-m", "lfr.cli.main"]


def children_of(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            out |= {child} | children_of(child)
    return out


def test_lfr_up_starts_all_services_and_sigterm_leaves_no_orphan(tmp_path):
    proc = subprocess.Popen([*LFR, "up", "--state-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        endpoints = tmp_path / "endpoints.json"
        deadline = time.monotonic() + 180
        while not endpoints.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert endpoints.exists(), proc.stdout.read() if proc.poll() is not None else "timed out"
        eps = json.loads(endpoints.read_text())
        access = Access.dev(tmp_path)  # lfr up made a development CA and identity provider
        for s in SERVICES:
            assert check_health(eps[s], access=access) == "SERVING", s
            assert check_health(eps[s]) != "SERVING", s  # plaintext is refused
        kids = children_of(proc.pid)
        assert len(kids) >= len(SERVICES) + 1  # six services and nats-server
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "stopped" in out
    alive = [k for k in kids if Path(f"/proc/{k}").exists()
             and Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"orphans left running: {alive}"


def test_lfr_serve_runs_one_service_against_an_existing_nats(tmp_path):
    with NatsServer(tmp_path / "nats") as nats:
        port, probe_port = free_port(), free_port()
        env = dict(os.environ, LFR_NATS_URL=nats.url, LFR_GRPC_PORT=str(port), LFR_STATE_DIR=str(tmp_path),
                   LFR_METRICS_PORT="-1", LFR_INSECURE="1", LFR_HEALTH_PORT=str(probe_port))
        proc = subprocess.Popen([*LFR, "serve", "audit"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while check_health(f"127.0.0.1:{port}") != "SERVING" and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
            assert check_health(f"127.0.0.1:{port}", "lfr.audit.v1.AuditService") == "SERVING"
            # the probe port answers health and nothing else
            assert check_health(f"127.0.0.1:{probe_port}", "lfr.audit.v1.AuditService") == "SERVING"
            with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as ch:
                with pytest.raises(grpc.RpcError) as err:
                    ch.unary_unary("/lfr.audit.v1.AuditService/Query", lambda b: b, lambda b: b)(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [x["event"] for x in lines if x["event"].startswith("service.")][-1] == "service.stopped"
        assert any(x["event"] == "security.insecure" and x["level"] == "warning" for x in lines)
        # without TLS material or the explicit insecure flag the service refuses to start, naming the key
        env.pop("LFR_INSECURE")
        r = subprocess.run([*LFR, "serve", "audit"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "LFR_TLS_DIR" in r.stdout + r.stderr


def test_a_bad_config_value_stops_the_service_naming_the_key(tmp_path):
    env = dict(os.environ, LFR_GRPC_PORT="not-a-port", LFR_STATE_DIR=str(tmp_path))
    r = subprocess.run([*LFR, "serve", "match"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "LFR_GRPC_PORT" in r.stderr


def test_lfr_demo_runs_end_to_end_with_its_own_identities(data, tmp_path):
    """`tox -e demo`'s command: the embedded system with TLS, tokens for the development users, a real video;
    the person enrolled who appears in it raises an alert, and the deployment ends purged; its temporary state
    folder (the alert's probe crop, the development CA's keys) is gone afterwards."""
    env = dict(os.environ, TMPDIR=str(tmp_path))  # where the demo's temporary state folder is made
    r = subprocess.run([*LFR, "demo"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    raised = [line for line in r.stdout.splitlines() if line.startswith("[alert]")]
    assert len(raised) == 1 and "lin-manuel-miranda" in raised[0], r.stdout
    assert "authorised by inspector" in r.stdout and "deployment PURGED" in r.stdout
    assert "-" not in raised[0].split(",")[-1]  # latency after capture is not negative
    assert "temporary state folder" in r.stdout and "removed" in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lfr-demo-")]
