"""Full disks: the state folder (watchlist metadata, match's alert book, the outbox files, Qdrant local), the
audit index and NATS's JetStream store, each on a small tmpfs of its own, filled in turn while the embedded
system runs. The service that writes there reports NOT_SERVING, a write is refused with RESOURCE_EXHAUSTED
naming the full store, nothing acknowledged is lost, the service is SERVING again once space returns, and
the audit chain verifies against its stream.

Filling a real file system needs a mount of our own: a small tmpfs, so the test runs as root (as the project's
CI container does).

Read-only: a remount read-only is refused (EBUSY) while a process holds a file there open for writing, so the
second test stops the one process that writes the store, remounts it read-only, and starts it again under the
supervisor, as a disk that turned read-only would be met at a restart: the audit index, match's alert book (its
own database, LFR_ALERT_DB) and NATS's JetStream store, each on a tmpfs of its own. A disk turning read-only
under running processes (the kernel's ext4 error path) is `test_read_only_live.py`: the watchlist's own stores
(LFR_WATCHLIST_DIR) and the state folder's logs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from lfr.cli.client import Clients
from lfr.cli.live import create_deployment
from lfr.pb import audit_pb2, match_pb2, watchlist_pb2
from lfr.runtime.embedded import EmbeddedSystem, check_health

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write a filler file until the file system is full."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError):  # the last partial megabyte, too
        with open(path / "filler2", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    return filler


def free(path: Path) -> None:
    for name in ("filler", "filler2"):
        (path / name).unlink(missing_ok=True)


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s: {what}")


def health(system: EmbeddedSystem, service: str) -> str:
    return check_health(system.endpoint(service), access=system.access())


def records_of(auditor: Clients, deployment_id: str) -> set[str]:
    return {r.type for r in auditor.audit.Query(audit_pb2.QueryRequest(deployment_id=deployment_id),
                                                timeout=30).records}


def chain_verifies(auditor: Clients):
    v = auditor.audit.Verify(audit_pb2.VerifyRequest(), timeout=60)
    return v if v.ok and v.unrecorded == 0 and v.records == v.stream_records else None


def test_each_store_full_in_turn_refuses_precisely_loses_nothing_and_recovers(tmp_path):
    with tmpfs(tmp_path / "state", "192m") as state, tmpfs(tmp_path / "audit", "16m") as audit_disk, \
            tmpfs(state / "nats", "48m") as nats_disk:
        system = EmbeddedSystem(state, env={"LFR_AUDIT_DB": str(audit_disk / "audit.sqlite")}, console=False,
                                supervise=True)
        with system:
            c = Clients.connect(system.endpoints(), access=system.access(user="builder", follow_actor=True))
            auditor = Clients.connect(system.endpoints(), access=system.access(user="auditor"))
            acknowledged: list[str] = []

            # 1. the audit index full: the audit says so, facts wait in the stream, none is lost
            fill(audit_disk)
            d = create_deployment(c, "disk test 1", ["cam"])  # acknowledged: its fact must reach the record
            acknowledged.append(d.id)
            wait_for(lambda: health(system, "audit") == "NOT_SERVING", 30, "audit NOT_SERVING with its index full")
            log = (state / "logs" / "audit.log").read_text()
            assert '"storage.failed"' in log and str(audit_disk) in log
            free(audit_disk)
            wait_for(lambda: health(system, "audit") == "SERVING", 30, "audit SERVING again")
            wait_for(lambda: "deployment.created" in records_of(auditor, d.id), 30, "the fact recorded after all")

            # 2. the state folder full: the watchlist refuses a write, naming the store, and comes back
            filler = fill(state)
            with pytest.raises(grpc.RpcError) as refused:
                create_deployment(c, "disk test 2", ["cam"])
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "storage full" in refused.value.details() and str(state) in refused.value.details()
            assert health(system, "watchlist") == "NOT_SERVING"
            got = c.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=d.id), timeout=10)
            assert got.id == d.id  # reads still answer
            free(state)
            assert not filler.exists()
            wait_for(lambda: health(system, "watchlist") == "SERVING", 30, "watchlist SERVING again")
            d2 = create_deployment(c, "disk test 2", ["cam"])
            acknowledged.append(d2.id)

            # 3. NATS's store full: acknowledged writes wait in the services' outboxes (on the state disk)
            fill(nats_disk)
            d3 = create_deployment(c, "disk test 3", ["cam"])
            acknowledged.append(d3.id)
            time.sleep(3)
            free(nats_disk)
            # nats-server's file store does not take writes again by itself after ENOSPC: it is restarted (the
            # supervisor starts it again on the same store), and the outboxes deliver what waited
            os.kill(system.pids()["nats"], 9)
            wait_for(lambda: all("deployment.created" in records_of(auditor, x) for x in acknowledged), 90,
                     "every acknowledged deployment in the audit record")
            assert wait_for(lambda: chain_verifies(auditor), 60, "the chain verifies against its stream")
            c.close()
            auditor.close()


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def read_only_restart(system: EmbeddedSystem, service: str, disk: Path) -> None:
    """Stop the one service that writes `disk`, make the disk read-only, start it again (supervised from then)."""
    system.stop_service(service)
    remount(disk, "ro")
    system.start_service(service)


def refused_read_only(call, disk: Path) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (refused.value.code(), refused.value.details())
    assert "storage read-only" in refused.value.details() and str(disk) in refused.value.details()


def test_each_store_read_only_in_turn_refuses_precisely_loses_nothing_and_recovers(tmp_path):
    state = tmp_path / "state"
    with tmpfs(tmp_path / "audit", "16m") as audit_disk, tmpfs(tmp_path / "alerts", "16m") as alert_disk, \
            tmpfs(state / "nats" / "jetstream", "64m") as js_disk:
        system = EmbeddedSystem(state, env={"LFR_AUDIT_DB": str(audit_disk / "audit.sqlite"),
                                            "LFR_ALERT_DB": str(alert_disk / "alerts.sqlite")},
                                console=False, supervise=True)
        with system:
            c = Clients.connect(system.endpoints(), access=system.access(user="builder", follow_actor=True))
            auditor = Clients.connect(system.endpoints(), access=system.access(user="auditor"))
            acknowledged = [create_deployment(c, "read-only 0", ["cam"]).id]
            wait_for(lambda: "deployment.created" in records_of(auditor, acknowledged[0]), 30, "first fact recorded")

            # 1. the audit index read-only: the audit starts NOT_SERVING naming it, refuses with UNAVAILABLE, the
            # other services serve, facts wait in their streams and are recorded once it is writable again
            read_only_restart(system, "audit", audit_disk)
            wait_for(lambda: health(system, "audit") == "NOT_SERVING", 60, "audit NOT_SERVING, its index read-only")
            log = (state / "logs" / "audit.log").read_text()
            assert '"storage.failed"' in log and f"{audit_disk} (read-only)" in log
            refused_read_only(lambda: auditor.audit.Verify(audit_pb2.VerifyRequest(), timeout=10), audit_disk)
            acknowledged.append(create_deployment(c, "read-only 1", ["cam"]).id)
            assert health(system, "watchlist") == "SERVING" and health(system, "match") == "SERVING"
            remount(audit_disk, "rw")
            wait_for(lambda: health(system, "audit") == "SERVING", 60, "audit SERVING again by itself")
            wait_for(lambda: all("deployment.created" in records_of(auditor, x) for x in acknowledged), 30,
                     "the facts acknowledged meanwhile recorded")

            # 2. match's alert book read-only
            read_only_restart(system, "match", alert_disk)
            wait_for(lambda: health(system, "match") == "NOT_SERVING", 60, "match NOT_SERVING, its book read-only")
            assert f"{alert_disk} (read-only)" in (state / "logs" / "match.log").read_text()
            refused_read_only(lambda: auditor.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=acknowledged[0]), timeout=10), alert_disk)
            acknowledged.append(create_deployment(c, "read-only 2", ["cam"]).id)
            remount(alert_disk, "rw")
            wait_for(lambda: health(system, "match") == "SERVING", 60, "match SERVING again by itself")
            auditor.match.ListAlerts(match_pb2.ListAlertsRequest(deployment_id=acknowledged[0]), timeout=10)  # reads and writes again

            # 3. NATS's JetStream store read-only: nats-server refuses to start ("storage directory is not
            # writable"), the supervisor keeps trying; services keep answering, acknowledged facts wait in their
            # outboxes, and all arrive once the store is writable and nats-server is up again
            with system.lock:  # the supervisor restarts nothing meanwhile
                os.kill(system.pids()["nats"], 9)
                system.nats.proc.wait()
                remount(js_disk, "ro")
            sup_log = state / "logs" / "supervisor.log"
            wait_for(lambda: sup_log.exists() and "process.restart_failed" in sup_log.read_text(), 30,
                     "the supervisor's failed restart of nats-server logged")
            assert "storage directory is not writable" in (state / "nats" / "nats-server.log").read_text()
            acknowledged.append(create_deployment(c, "read-only 3", ["cam"]).id)  # into the watchlist's outbox
            assert health(system, "watchlist") == "SERVING"
            remount(js_disk, "rw")
            wait_for(lambda: "nats" in system.pids(), 60, "nats-server started again by the supervisor")
            wait_for(lambda: all("deployment.created" in records_of(auditor, x) for x in acknowledged), 90,
                     "every acknowledged deployment in the audit record")
            assert wait_for(lambda: chain_verifies(auditor), 60, "the chain verifies against its stream")
            assert health(system, "audit") == "SERVING" and health(system, "match") == "SERVING"
            c.close()
            auditor.close()
