"""Full disks: the state folder (watchlist metadata, match's alert book, the outbox files, Qdrant local), the
audit index and NATS's JetStream store, each on a small tmpfs of its own, filled in turn while the embedded
system runs. The service that writes there reports NOT_SERVING, a write is refused with RESOURCE_EXHAUSTED
naming the full store, nothing acknowledged is lost, the service is SERVING again once space returns, and
the audit chain verifies against its stream.

Filling a real file system needs a mount of our own: a small tmpfs, so the test runs as root (as the project's
CI container does). A file system that turns read-only under open files cannot be forced from here (a
read-only remount is refused while files are open for writing), so read-only is covered by the same path
in lfr.runtime.storage (EROFS -> UNAVAILABLE) but not by this test."""

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
from lfr.pb import audit_pb2, watchlist_pb2
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
