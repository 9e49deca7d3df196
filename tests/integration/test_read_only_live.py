"""Read-only disks under a running system (#19 item 4), the way a disk really turns read-only: the kernel meets an
error on an ext4 file system mounted errors=remount-ro and makes it read-only at once, under every file held
open (a plain `mount -o remount,ro` is refused with EBUSY while a process holds a file open for writing). Each
file system here is a small ext4 image on a loop device of our own; the kernel's own error path is triggered
through ext4's sysfs knob (`trigger_fs_error`), so the test runs as root, as the project's CI container does.

- The watchlist's own stores (LFR_WATCHLIST_DIR: its database, images, Qdrant local folder) turn read-only
  under the running watchlist: it turns NOT_SERVING naming the folder, refuses a write with UNAVAILABLE (not
  INTERNAL), still answers reads, loses nothing acknowledged, and is SERVING again once the disk is repaired
  (an errored ext4 stays read-only until it is unmounted and checked, so the watchlist is restarted onto it).
- The state folder itself (logs, endpoints.json) turns read-only under every service and the supervisor: no
  service crashes or stops serving, the supervisor still restarts a killed service, and stops everything."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from test_disks import chain_verifies, health, records_of, remount, tmpfs, wait_for

from lfr.cli.client import Clients
from lfr.cli.live import create_deployment
from lfr.pb import watchlist_pb2
from lfr.runtime.embedded import SERVICES, EmbeddedSystem

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/ext4").is_dir(),
                                reason="loop-mounting an ext4 image needs root and ext4")

MOUNT = ["mount", "-o", "loop,errors=remount-ro"]


@contextlib.contextmanager
def ext4(path: Path, image: Path, size_mb: int = 64):
    """A small ext4 file system of our own (the file `image`) on a loop device, mounted at `path` with
    errors=remount-ro."""
    path.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run([*MOUNT, str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)  # the loop device is released with it


def turn_read_only(path: Path) -> None:
    """The kernel's own ext4 error path: the journal is aborted and the file system is read-only from now on,
    under every open file (EROFS to writes; SQLite reports its writes as "disk I/O error")."""
    source = next(line.split()[0] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[1] == str(path))
    Path(f"/sys/fs/ext4/{Path(os.path.realpath(source)).name}/trigger_fs_error").write_text("lfr read-only drill")
    with pytest.raises(OSError):
        (path / "probe").write_bytes(b"x")


def repair(path: Path, image: Path) -> None:
    """What an operator does with an errored ext4: unmount it (nothing may hold a file there), check it, mount it."""
    subprocess.run(["umount", str(path)], check=True)
    fsck = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected
    subprocess.run([*MOUNT, str(image), str(path)], check=True)


def log_writes_dropped(system: EmbeddedSystem, service: str) -> float:
    url = f"http://{system.host}:{system.metrics_ports[service]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("lfr_log_writes_dropped_total"))


def test_watchlist_stores_turned_read_only_under_the_running_watchlist(tmp_path):
    state = tmp_path / "state"
    # the mount point lies on a read-only tmpfs: while the ext4 is unmounted for its repair, the folder the
    # watchlist would see is read-only too (not an empty writable folder it would start afresh in)
    with tmpfs(tmp_path / "base", "1m") as base:
        (base / "watchlist").mkdir()
        remount(base, "ro")
        with ext4(base / "watchlist", tmp_path / "watchlist.ext4") as disk:
            system = EmbeddedSystem(state, env={"LFR_WATCHLIST_DIR": str(disk)}, console=False, supervise=True)
            with system:
                c = Clients.connect(system.endpoints(), access=system.access(user="builder", follow_actor=True))
                auditor = Clients.connect(system.endpoints(), access=system.access(user="auditor"))
                d0 = create_deployment(c, "read-only live 0", ["cam"])
                acknowledged = [d0.id]
                assert (disk / "watchlist.sqlite").is_file() and (disk / "qdrant").is_dir()
                assert (disk / "watchlist-images").is_dir() and not (state / "watchlist.sqlite").exists()

                turn_read_only(disk)
                with pytest.raises(grpc.RpcError) as refused:
                    create_deployment(c, "read-only live 1", ["cam"])
                code, details = refused.value.code(), refused.value.details()
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                assert "storage read-only" in details and f"{disk} (read-only)" in details, details
                assert health(system, "watchlist") == "NOT_SERVING"
                log = (state / "logs" / "watchlist.log").read_text()
                assert '"storage.failed"' in log and str(disk) in log
                got = c.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=d0.id), timeout=10)
                assert got.id == d0.id  # reads still answer
                assert health(system, "audit") == "SERVING" and health(system, "match") == "SERVING"

                # the repair needs the disk unmounted: the watchlist holds its files open, so it is stopped
                # (SIGTERM, as an operator or Kubernetes would); it shuts down on its read-only store, the
                # supervisor starts it again into its start gate (NOT_SERVING, holding nothing on the disk)
                old = system.pids()["watchlist"]
                t0 = time.monotonic()
                os.kill(old, signal.SIGTERM)
                wait_for(lambda: system.pids().get("watchlist", old) != old, 30, "the watchlist stopped and restarted")
                stop_s = time.monotonic() - t0
                wait_for(lambda: '"during": "start"' in (state / "logs" / "watchlist.log").read_text(), 60,
                         "the restarted watchlist held at its start gate")
                assert health(system, "watchlist") == "NOT_SERVING"
                with pytest.raises(grpc.RpcError) as refused:
                    create_deployment(c, "read-only live 1", ["cam"])
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "cannot start: storage read-only" in refused.value.details() and str(disk) in refused.value.details()
                log = (state / "logs" / "watchlist.log").read_text()
                assert "Traceback" not in log, log[-3000:]  # it stopped cleanly on its read-only store
                repair(disk, tmp_path / "watchlist.ext4")
                t1 = time.monotonic()
                wait_for(lambda: health(system, "watchlist") == "SERVING", 90, "the watchlist SERVING again")
                serving_s = time.monotonic() - t1
                got = c.watchlist.GetDeployment(watchlist_pb2.GetDeploymentRequest(deployment_id=d0.id), timeout=10)
                assert got.id == d0.id and got.name == "read-only live 0"  # nothing acknowledged lost
                acknowledged.append(create_deployment(c, "read-only live 2", ["cam"]).id)
                wait_for(lambda: all("deployment.created" in records_of(auditor, x) for x in acknowledged), 60,
                         "every acknowledged deployment in the audit record")
                names = [d.name for d in c.watchlist.ListDeployments(watchlist_pb2.ListDeploymentsRequest(),
                                                                     timeout=10).deployments]
                assert sorted(names) == ["read-only live 0", "read-only live 2"]  # the refused one changed nothing
                assert wait_for(lambda: chain_verifies(auditor), 60, "the chain verifies against its stream")
                print(f"read-only watchlist: stopped and restarted in {stop_s:.1f} s, SERVING {serving_s:.1f} s "
                      f"after the repaired disk was mounted")
                c.close()
                auditor.close()


def test_state_folder_turned_read_only_under_every_service_and_the_supervisor(tmp_path):
    """Logs and endpoints.json on a read-only state folder: nothing crashes, the supervisor goes on."""
    state = tmp_path / "state"
    events: list[dict] = []
    with ext4(state, tmp_path / "state.ext4") as state, tmpfs(state / "nats", "64m"), tmpfs(state / "outbox", "16m"), \
            tmpfs(tmp_path / "stores", "64m") as stores:
        system = EmbeddedSystem(state, env={"LFR_WATCHLIST_DIR": str(stores / "watchlist"),
                                            "LFR_AUDIT_DB": str(stores / "audit.sqlite"),
                                            "LFR_ALERT_DB": str(stores / "alerts.sqlite")},
                                console=False, supervise=True, log=events.append)
        with system:
            c = Clients.connect(system.endpoints(), access=system.access(user="builder", follow_actor=True))
            auditor = Clients.connect(system.endpoints(), access=system.access(user="auditor"))
            acknowledged = [create_deployment(c, "state read-only 0", ["cam"]).id]
            endpoints_before = (state / "endpoints.json").read_text()

            turn_read_only(state)
            # every service writes log lines to a read-only file from now on: each goes on serving
            acknowledged.append(create_deployment(c, "state read-only 1", ["cam"]).id)
            wait_for(lambda: all("deployment.created" in records_of(auditor, x) for x in acknowledged), 60,
                     "the deployments recorded")
            assert {s: health(system, s) for s in SERVICES} == {s: "SERVING" for s in SERVICES}
            assert log_writes_dropped(system, "watchlist") > 0  # its lines about the deployment: dropped, counted

            # the supervisor restarts a killed service although it cannot open the service's log there
            old = system.pids()["match"]
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: system.pids().get("match", old) != old, 30, "match restarted")
            wait_for(lambda: health(system, "match") == "SERVING", 60, "match SERVING again")
            print(f"read-only state folder: match SERVING {time.monotonic() - t0:.1f} s after its SIGKILL")
            assert system.status()["processes"]["match"]["restarts"] == 1
            assert any(e["event"] == "process.log_unwritable" and e["process"] == "match" for e in events), events
            assert (state / "endpoints.json").read_text() == endpoints_before  # not rewritten, and no crash
            acknowledged.append(create_deployment(c, "state read-only 2", ["cam"]).id)
            wait_for(lambda: all("deployment.created" in records_of(auditor, x) for x in acknowledged), 60,
                     "every acknowledged deployment recorded")
            assert {s: health(system, s) for s in SERVICES} == {s: "SERVING" for s in SERVICES}
            assert wait_for(lambda: chain_verifies(auditor), 60, "the chain verifies against its stream")
            pids = list(system.pids().values())
            c.close()
            auditor.close()
        time.sleep(0.5)
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in
                 Path(f"/proc/{p}/status").read_text().lower()]
        assert not alive, f"still running after stop: {alive}"


def test_a_collection_created_just_before_the_disk_fails_opens_again(tmp_path):
    """Qdrant local mode's meta.json (its collections' settings) was replaced without fsync: an ext4 error (or a
    power loss) right after a collection's creation left it empty, and the watchlist could not start again."""
    from lfr.vectorindex import VectorIndex

    with ext4(tmp_path / "disk", tmp_path / "disk.ext4", size_mb=32) as disk:
        VectorIndex(disk / "fresh").close()  # a new store: its first meta.json
        index = VectorIndex(disk / "qdrant")
        index.ensure_collection("lfr_drill", 4, "cosine")
        turn_read_only(disk)  # at once: nothing else flushed them
        index.close()
        repair(disk, tmp_path / "disk.ext4")
        assert (disk / "qdrant" / "meta.json").stat().st_size > 0 and (disk / "fresh" / "meta.json").stat().st_size
        reopened = VectorIndex(disk / "qdrant")
        assert reopened.client.collection_exists("lfr_drill")
        reopened.close()
        VectorIndex(disk / "fresh").close()
