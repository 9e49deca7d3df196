"""The durable outbox (lfr.runtime.outbox) against a real nats-server, and a killed process.

A fact is committed with its state change or not at all; a process killed (os._exit, as SIGKILL: nothing
flushed) between the commit and the publish, or between JetStream's acknowledgement and the row's delete, gets
the fact published exactly once by its next run. The last test does it to the watchlist service of a running
system: killed right after it committed a new deployment, restarted, the deployment's fact is in the durable
stream once and in the audit once."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

import grpc
import pytest

from lfr.pb import watchlist_pb2
from lfr.runtime import subjects
from lfr.runtime.bus import Bus
from lfr.runtime.natsserver import NatsServer
from lfr.runtime.outbox import Outbox

CHILD = r"""
import asyncio, sqlite3, sys
from lfr.pb import common_pb2, watchlist_pb2
from lfr.runtime import subjects
from lfr.runtime.bus import Bus
from lfr.runtime.outbox import Outbox

url, db_path, fact_id = sys.argv[1:4]

async def main():
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS things (id TEXT PRIMARY KEY)")
    bus = Bus(url, "outbox-child", service="outbox-test")
    await bus.connect()
    await bus.ensure_streams()
    ob = bus.use_outbox(Outbox(db, service="outbox-test"))
    if fact_id:
        with ob.transaction():  # the state change and its fact
            db.execute("INSERT INTO things VALUES (?)", (fact_id,))
            bus.publish_durable(subjects.lifecycle("dep1"), watchlist_pb2.DeploymentEvent(
                envelope=common_pb2.Envelope(event_id=fact_id), action="created"), fact_id)
    assert await bus.flush_outbox(10)
    await bus.drain()

asyncio.run(main())
"""


@pytest.fixture
def nats(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield server


def run_child(nats, db, fact_id: str, fault_at: str = "") -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LFR_FAULT")}
    if fault_at:
        env.update(LFR_FAULT_OUTBOX_KILL="lfr.v1.lifecycle.", LFR_FAULT_OUTBOX_AT=fault_at)
    return subprocess.run([sys.executable, "-c", CHILD, nats.url, str(db), fact_id], env=env, timeout=60,
                          capture_output=True).returncode


async def stream_facts(url: str, subject: str) -> list[str]:
    """The Nats-Msg-Id of every message on `subject` in LFR_EVENTS."""
    from nats.js import api

    bus = Bus(url, "reader")
    await bus.connect()
    out = []
    try:
        last = (await bus.js.stream_info(subjects.EVENTS.name)).state.last_seq
        if last:
            psub = await bus.js.pull_subscribe(subject, stream=subjects.EVENTS.name, config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL))
            try:
                while True:
                    msgs = await psub.fetch(100, timeout=1)
                    out += [m.headers.get("Nats-Msg-Id", "") for m in msgs]
            except Exception:  # timeout: nothing more
                pass
    finally:
        await bus.drain()
    return out


def test_a_fact_committed_then_killed_is_published_once_by_the_next_run(nats, tmp_path):
    db = tmp_path / "service.sqlite"
    subject = subjects.lifecycle("dep1")
    # killed right after the commit: the state change and the fact are both on disk, nothing published
    assert run_child(nats, db, "fact-1", fault_at="committed") == 137
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT id FROM things").fetchall() == [("fact-1",)]
    assert conn.execute("SELECT msg_id FROM lfr_outbox").fetchall() == [("fact-1",)]
    assert asyncio.run(stream_facts(nats.url, subject)) == []
    # the next run publishes it; the outbox is then empty
    assert run_child(nats, db, "") == 0
    assert asyncio.run(stream_facts(nats.url, subject)) == ["fact-1"]
    assert conn.execute("SELECT COUNT(*) FROM lfr_outbox").fetchone()[0] == 0
    # killed after JetStream acknowledged, before the row was deleted: sent again, dropped as a duplicate
    assert run_child(nats, db, "fact-2", fault_at="published") == 137
    assert conn.execute("SELECT msg_id FROM lfr_outbox").fetchall() == [("fact-2",)]
    assert run_child(nats, db, "") == 0
    assert asyncio.run(stream_facts(nats.url, subject)) == ["fact-1", "fact-2"]
    assert conn.execute("SELECT COUNT(*) FROM lfr_outbox").fetchone()[0] == 0
    conn.close()


def test_a_failed_change_leaves_no_fact(tmp_path):
    db = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None, check_same_thread=False)
    db.execute("CREATE TABLE things (id TEXT PRIMARY KEY)")
    ob = Outbox(db)
    with pytest.raises(sqlite3.IntegrityError):
        with ob.transaction():
            db.execute("INSERT INTO things VALUES ('a')")
            ob.add("lfr.v1.lifecycle.x", b"fact", "m1")
            db.execute("INSERT INTO things VALUES ('a')")  # the change fails: the fact goes with it
    assert len(ob) == 0 and db.execute("SELECT COUNT(*) FROM things").fetchone()[0] == 0
    with ob.transaction():
        db.execute("INSERT INTO things VALUES ('b')")
        ob.add("lfr.v1.lifecycle.x", b"fact", "m2")
        ob.add("lfr.v1.lifecycle.x", b"fact", "m2")  # the same fact twice waits once
    assert [r.msg_id for r in ob.pending()] == ["m2"]


def test_watchlist_killed_between_commit_and_publish_publishes_and_audits_once(tmp_path):
    from lfr.cli.client import Clients
    from lfr.cli.live import create_deployment
    from lfr.pb import audit_pb2
    from lfr.runtime.embedded import EmbeddedSystem
    from lfr.runtime.security import ROLES

    mark = tmp_path / "killed-once"
    env = {"LFR_FAULT_OUTBOX_KILL": "lfr.v1.lifecycle.", "LFR_FAULT_OUTBOX_MARK": str(mark)}
    with EmbeddedSystem(tmp_path / "state", env=env, console=False) as system:
        clients = Clients.connect(system.endpoints(), access=system.access(user="t", follow_actor=True,
                                                                            roles=sorted(ROLES)))
        try:
            with pytest.raises(grpc.RpcError):  # the watchlist commits the deployment and its fact, then dies
                create_deployment(clients, "crash", ["cam-1"])
            assert mark.is_file()
            deadline = time.monotonic() + 20
            while system.procs["watchlist"].poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert system.procs["watchlist"].returncode == 137
            system.start_service("watchlist")
            system.wait_healthy(["watchlist"], 120)
            deps = clients.watchlist.ListDeployments(watchlist_pb2.ListDeploymentsRequest()).deployments
            assert [d.name for d in deps] == ["crash"]  # the change was committed
            dep = deps[0].id

            def audited():
                return clients.audit.Query(audit_pb2.QueryRequest(deployment_id=dep,
                                                                  type_prefix="deployment.created")).records
            deadline = time.monotonic() + 30
            while not audited() and time.monotonic() < deadline:
                time.sleep(0.3)
            time.sleep(2)  # anything published twice would be recorded by now
            assert len(audited()) == 1
            ids = asyncio.run(_admin_facts(system, subjects.lifecycle(dep)))
            assert len(ids) == 1, ids  # in the durable stream once
        finally:
            clients.close()


async def _admin_facts(system, subject: str) -> list[str]:
    from nats.js import api

    bus = system.nats_admin_bus("outbox-test")
    await bus.connect()
    out: list[str] = []
    try:
        psub = await bus.js.pull_subscribe(subject, stream=subjects.EVENTS.name, config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL))
        try:
            while True:
                out += [m.headers.get("Nats-Msg-Id", "") for m in await psub.fetch(100, timeout=1)]
        except Exception:  # timeout: nothing more
            pass
    finally:
        await bus.drain()
    return out
