"""NATS per-service users (lfr.runtime.natsauth) on a real nats-server: every service does its whole job with
its own user, and anything outside its table is refused by the server itself: publishing another stage's
output, subscribing to another's input or replies, writing or reconfiguring a stream, a wrong password, and
(with TLS) a client without a certificate of the CA."""

from __future__ import annotations

import asyncio
import stat
import subprocess

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import ServerError

from lfr.pb import common_pb2
from lfr.runtime import natsauth, subjects
from lfr.runtime.bus import Bus
from lfr.runtime.embedded import SERVICES
from lfr.runtime.natsserver import NatsServer, nats_server_binary

ENV = common_pb2.Envelope


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("creds") / "nats"
    return natsauth.read_passwords(natsauth.write_credentials(folder, natsauth.PERMISSIONS))


@pytest.fixture(scope="module")
def server(tmp_path_factory, creds):
    with NatsServer(tmp_path_factory.mktemp("nats"), auth=natsauth.server_auth_config(creds)) as s:
        yield s


def bus(server, creds, user: str, **kw) -> Bus:
    return Bus(server.url, f"t-{user}", service=user, user=user, password=creds[user], **kw)


@pytest.fixture(scope="module")
async def streams(server, creds):
    """The streams, declared as the audit service declares them at start."""
    audit = bus(server, creds, "audit")
    await audit.connect(10)
    await audit.ensure_streams()
    await audit.ensure_streams((subjects.AUDIT,))
    yield audit
    await audit.drain()


class Client:
    """A raw nats-py connection as one user, keeping what the server reported through the error callback."""

    def __init__(self, user: str):
        self.user = user
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def connect(self, server, password: str, **kw) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(server.url, user=self.user, password=password, error_cb=on_error,
                                     inbox_prefix=natsauth.inbox_prefix(self.user), allow_reconnect=False,
                                     connect_timeout=2, **kw)
        return self

    async def refused(self, what: str, subject: str, timeout_s: float = 3.0) -> bool:
        """The server reported a permissions violation for `what` ('publish' or 'subscription') on subject."""
        want = f'permissions violation for {what} to "{subject}"'.lower()  # nats-py lowercases it
        for _ in range(int(timeout_s / 0.05)):
            if any(want in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


async def connect(server, creds, user: str) -> Client:
    return await Client(user).connect(server, creds[user])


async def wait_for(cond, timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return True
        await asyncio.sleep(0.05)
    return bool(cond())


# -------------------------------------------------------------------------------------------- the table
def test_one_user_per_service_and_the_table_follows_the_subjects():
    assert set(natsauth.SERVICES) == set(SERVICES) and natsauth.ADMIN not in SERVICES
    perms = natsauth.PERMISSIONS
    biometric = {subjects.frames(), subjects.faces(), subjects.embeddings(), subjects.embeddings_partition()}
    # each stage publishes its output only, and each biometric subject has one publisher and one reader
    assert {u: biometric & set(p.publish) for u, p in perms.items() if biometric & set(p.publish)} == {
        "ingest": {subjects.frames()}, "detection": {subjects.faces()},
        "embedding": {subjects.embeddings(), subjects.embeddings_partition()}}
    assert {u: biometric & set(p.subscribe) for u, p in perms.items() if biometric & set(p.subscribe)} == {
        "detection": {subjects.frames()}, "embedding": {subjects.faces()},
        "match": {subjects.embeddings_partition()}}  # its partitions of the embeddings (the server maps them)
    assert [u for u, p in perms.items() if subjects.alerts() in p.publish] == ["match"]
    assert [u for u, p in perms.items() if subjects.audit() in p.publish] == ["audit"]
    for user in SERVICES:  # access events as itself only, replies on its own inbox only
        p = perms[user]
        assert [s for s in p.publish if s.startswith("lfr.v1.access.")] == [subjects.access(user)]
        assert [s for s in p.subscribe if s.startswith("_INBOX")] == [f"_INBOX_{user}.>"]
        assert not any(s.startswith(("_INBOX", ">", "*")) or s.endswith("v1.>") for s in p.publish)
    # only the audit declares streams; the stages of the biometric flow have no JetStream API at all
    assert {u for u, p in perms.items() if p.declares} == {"audit"}
    for user in ("ingest", "detection", "embedding", "watchlist"):
        assert not any(s.startswith("$JS") for s in perms[user].publish), user
    assert {u for u, p in perms.items() if any("CONSUMER" in s for s in p.publish)} == {"match", "audit",
                                                                                         natsauth.ADMIN}
    assert not any("LFR_EVENTS" in s or "LFR_AUDIT" in s for s in perms["match"].publish)  # match reads alerts only
    # nobody may delete a stream or create one outside the platform's; the admin never sees the biometric flow
    for p in perms.values():
        assert not any("STREAM.DELETE" in s or s in ("$JS.API.>", "$JS.>", ">") for s in p.publish)
        assert not any(".CREATE." in s and "STREAM" in s and "*" in s for s in p.publish)
    assert not set(perms[natsauth.ADMIN].subscribe) & biometric and not any(
        s.startswith("lfr.") for s in perms[natsauth.ADMIN].publish)
    assert natsauth.declarable("detection", subjects.STREAMS) == []
    assert natsauth.declarable("audit", (*subjects.STREAMS, subjects.AUDIT)) == [*subjects.STREAMS, subjects.AUDIT]
    assert natsauth.declarable("", subjects.STREAMS) == list(subjects.STREAMS)  # no auth: as before


def test_credentials_are_private_random_and_kept(tmp_path):
    folder = tmp_path / "nats"
    files = natsauth.write_credentials(folder, ["match", "audit"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in files.values()} == {0o600}
    first = natsauth.read_passwords(files)
    assert first["match"] != first["audit"] and min(len(p) for p in first.values()) >= 32
    assert natsauth.read_passwords(natsauth.write_credentials(folder, ["match", "audit"])) == first
    with pytest.raises(ValueError):
        natsauth.write_credentials(folder, ["intruder"])
    with pytest.raises(ValueError):
        natsauth.server_auth_config({"match": 'x" } ] } authorization { users = [ { user: "evil'})
    assert "password: $NATS_MATCH_PASSWORD\n" in natsauth.server_auth_config({"match": "$NATS_MATCH_PASSWORD"})


def test_nats_server_accepts_the_generated_configuration(tmp_path, creds):
    conf = tmp_path / "nats.conf"
    conf.write_text(NatsServer(tmp_path, port=4222, auth=natsauth.server_auth_config(creds)).config())
    out = subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------ it works
async def test_every_service_does_its_job_with_its_own_user(server, creds, streams):
    """The whole platform's use of NATS, each part as its own user, with no violation reported."""
    audit = streams
    b = {u: bus(server, creds, u) for u in SERVICES if u != "audit"}
    for x in b.values():
        await x.connect(10)
        await x.ensure_streams()  # as every service does at start: a no-op for those that declare nothing
    b["audit"] = audit
    try:
        got: dict[str, list[str]] = {"detection": [], "embedding": [], "match": [], "match-lc": [], "ingest-lc": []}
        await b["detection"].subscribe(subjects.frames(), ENV, lambda m, s: got["detection"].append(s),
                                       queue=subjects.QUEUE["detection"])
        await b["embedding"].subscribe(subjects.faces(), ENV, lambda m, s: got["embedding"].append(s),
                                       queue=subjects.QUEUE["embedding"])
        await b["match"].subscribe(subjects.embeddings_partition(), ENV, lambda m, s: got["match"].append(s),
                                   queue=subjects.QUEUE["match"])
        await b["match"].subscribe(subjects.lifecycle(), ENV, lambda m, s: got["match-lc"].append(s))
        await b["ingest"].subscribe(subjects.lifecycle(), ENV, lambda m, s: got["ingest-lc"].append(s))
        for x in b.values():
            await x.nc.flush()

        assert await b["ingest"].publish(subjects.frames("dep1", "cam1"), ENV(event_id="f"))
        assert await b["detection"].publish(subjects.faces("dep1", "cam1"), ENV(event_id="fa"))
        assert await b["embedding"].publish(subjects.embeddings("dep1", "cam1"), ENV(event_id="e"))
        b["watchlist"].publish_durable(subjects.lifecycle("dep1"), ENV(event_id="l1"), "l1")
        b["watchlist"].publish_durable(subjects.watchlist("dep1"), ENV(event_id="w1"), "w1")
        for i, subject in enumerate((subjects.alerts("dep1", "cam1"), subjects.matchstats("dep1"),
                                     subjects.adjudications("dep1"), subjects.alertflags("dep1"),
                                     subjects.retention("dep1"))):
            b["match"].publish_durable(subject, ENV(event_id=f"m{i}"), f"m{i}")
        for user, x in b.items():  # every service records the calls to its API as itself
            x.publish_durable(subjects.access(user), ENV(event_id=f"a-{user}"), f"a-{user}")
        for x in b.values():
            assert await x.flush_outbox(10)

        recorded: list[str] = []

        async def record(data: bytes, subject: str, seq: int) -> None:
            recorded.append(subject)

        for stream in subjects.STREAMS:  # the audit's durable consumers, acked
            for subject in stream.subjects:
                durable = "audit-" + stream.name.lower() + "-" + subject.split(".")[2]
                await audit.consume_durable(stream.name, subject, durable, record)
        # the audit appends to and reads back its chain
        ack = await audit.js.publish(subjects.audit("dep1"), b"record", timeout=2,
                                     headers={"Nats-Expected-Last-Sequence": "0"})
        psub = await audit.js.pull_subscribe(subjects.audit(), stream=subjects.AUDIT.name, config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=ack.seq,
            inactive_threshold=30.0))
        assert [m.data for m in await psub.fetch(8, timeout=5)] == [b"record"]
        await psub.unsubscribe()
        # match replays its alerts (ReplayAlerts)
        async for seq, _data in b["match"].replay(subjects.ALERTS.name, subjects.alerts("dep1", "*"), True):
            assert seq == 1
            break

        assert await wait_for(lambda: len(recorded) == 2 + 5 + len(SERVICES))
        assert subjects.alerts("dep1", "cam1") in recorded and subjects.access("detection") in recorded
        # published as embeddings.dep1.cam1, read as its partition (the server checks the publish after mapping)
        [partitioned] = got["match"]
        assert partitioned.rsplit(".", 1)[0] == subjects.embeddings("dep1", "cam1")
        assert 0 <= int(partitioned.rsplit(".", 1)[1]) < subjects.MATCH_PARTITIONS
        assert got == {"detection": [subjects.frames("dep1", "cam1")], "embedding": [subjects.faces("dep1", "cam1")],
                       "match": [partitioned], "match-lc": [subjects.lifecycle("dep1")],
                       "ingest-lc": [subjects.lifecycle("dep1")]}
        assert {u: x.last_error for u, x in b.items()} == {u: "" for u in b}  # no violation anywhere
    finally:
        for user, x in b.items():
            if user != "audit":
                await x.drain()


# -------------------------------------------------------------------------------------- it is refused
@pytest.mark.parametrize(("user", "subject", "why"), [
    ("detection", subjects.alerts("dep1", "cam1"), "a stage cannot raise an alert"),
    ("ingest", subjects.faces("dep1", "cam1"), "nor publish another stage's output"),
    ("embedding", subjects.frames("dep1", "cam1"), "nor feed frames in"),
    ("watchlist", subjects.audit("dep1"), "only the audit writes the audit chain"),
    ("match", subjects.access("watchlist"), "access events only as itself"),
    ("match", subjects.lifecycle("dep1"), "only the watchlist starts and ends deployments"),
    ("identification", subjects.lifecycle("dep1"), "identification searches deployments, never changes one"),
    ("identification", subjects.alerts("dep1", "cam1"), "nor raises an alert"),
    (natsauth.ADMIN, subjects.alerts("dep1", "cam1"), "the admin publishes no fact"),
])
async def test_publishing_outside_the_table_is_refused_by_the_server(server, creds, streams, user, subject, why):
    # someone allowed to read the subject watches it: nothing forged arrives
    reader = {"frames": "detection", "faces": "embedding"}.get(subject.split(".")[2], natsauth.ADMIN)
    watcher = await connect(server, creds, reader)
    seen: list[str] = []

    async def on_msg(msg) -> None:
        seen.append(msg.subject)

    await watcher.nc.subscribe(subject, cb=on_msg)
    await watcher.nc.flush()
    c = await connect(server, creds, user)
    try:
        await c.nc.publish(subject, b"forged")
        await c.nc.flush()
        assert await c.refused("publish", subject), (why, c.errors)
        await asyncio.sleep(0.2)
        assert seen == [] and watcher.errors == [], why
        assert c.nc.is_connected  # refused, not disconnected
    finally:
        await c.nc.close()
        await watcher.nc.close()


@pytest.mark.parametrize(("user", "subject", "why"), [
    ("detection", subjects.alerts(), "a stage cannot read alerts"),
    ("ingest", subjects.embeddings(), "ingest cannot read embeddings"),
    ("embedding", subjects.frames(), "embedding sees faces only, not whole frames"),
    ("watchlist", subjects.faces(), "the watchlist is no part of the biometric flow"),
    ("identification", subjects.embeddings(), "nor is identification: its faces come over gRPC, in memory"),
    ("match", subjects.audit(), "match cannot read the audit chain live"),
    ("detection", "_INBOX_audit.>", "nor another service's replies"),
    ("detection", "_INBOX.>", "nor the default inbox"),
    ("detection", ">", "nor everything"),
    (natsauth.ADMIN, subjects.frames(), "the admin never sees the biometric flow"),
])
async def test_subscribing_outside_the_table_is_refused_by_the_server(server, creds, user, subject, why):
    c = await connect(server, creds, user)
    publisher = await connect(server, creds, "ingest")
    got: list[str] = []

    async def on_msg(msg) -> None:
        got.append(msg.subject)

    try:
        await c.nc.subscribe(subject, cb=on_msg)
        await c.nc.flush()
        assert await c.refused("subscription", subject), (why, c.errors)
        await publisher.nc.publish(subjects.frames("dep1", "cam1"), b"frame")  # something it would have matched
        await publisher.nc.flush()
        await asyncio.sleep(0.2)
        assert got == [], why
    finally:
        await c.nc.close()
        await publisher.nc.close()


async def test_jetstream_writes_and_stream_changes_outside_the_table_are_refused(server, creds, streams):
    audit = streams
    before = {s.name: (await audit.js.stream_info(s.name)).state.messages for s in (*subjects.STREAMS, subjects.AUDIT)}
    det = await connect(server, creds, "detection")
    wl = await connect(server, creds, "watchlist")
    match = await connect(server, creds, "match")
    admin = await connect(server, creds, natsauth.ADMIN)
    try:
        # a durable write to a stream the user may not write: refused, so JetStream never acks
        with pytest.raises(NatsTimeout):
            await det.nc.jetstream().publish(subjects.alerts("dep1", "cam1"), b"forged", timeout=1)
        assert await det.refused("publish", subjects.alerts("dep1", "cam1"))
        with pytest.raises(NatsTimeout):
            await wl.nc.jetstream().publish(subjects.audit("dep1"), b"forged", timeout=1)
        assert await wl.refused("publish", subjects.audit("dep1"))
        # reading a stream it has no business with: no consumer
        with pytest.raises(NatsTimeout):
            await det.nc.jetstream(timeout=1).pull_subscribe(subjects.alerts(), durable="spy",
                                                              stream=subjects.ALERTS.name)
        assert await det.refused("publish", "$JS.API.CONSUMER.INFO.LFR_ALERTS.spy")
        # declaring, reconfiguring, purging, deleting: only the audit declares, and nobody deletes
        for client, op, stream in ((match, "UPDATE", "LFR_ALERTS"), (match, "CREATE", "LFR_SPY"),
                                   (match, "PURGE", "LFR_ALERTS"), (match, "DELETE", "LFR_EVENTS"),
                                   (wl, "CREATE", "LFR_EVENTS"), (admin, "DELETE", "LFR_AUDIT"),
                                   (admin, "UPDATE", "LFR_AUDIT")):
            subject = f"$JS.API.STREAM.{op}.{stream}"
            with pytest.raises(NatsTimeout):  # the server drops the request: no reply comes
                await client.nc.request(subject, b"{}", timeout=0.5)
            assert await client.refused("publish", subject), (client.user, subject)
        # what the admin may ask, the streams refuse themselves
        js = admin.nc.jetstream(timeout=2)
        with pytest.raises(ServerError):
            await js.purge_stream(subjects.AUDIT.name)
        with pytest.raises(ServerError):
            await js.delete_msg(subjects.AUDIT.name, 1)
        after = {s.name: (await audit.js.stream_info(s.name)).state.messages for s in (*subjects.STREAMS, subjects.AUDIT)}
        assert after == before
        assert audit.last_error == ""
    finally:
        for c in (det, wl, match, admin):
            await c.nc.close()


async def test_a_wrong_password_or_none_cannot_connect(server, creds):
    for user, password in (("match", "not-the-password"), ("match", creds["audit"]), ("nobody", creds["match"])):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await Client(user).connect(server, password, max_reconnect_attempts=0)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2)
    b = Bus(server.url, "t-wrong", service="match", user="match", password="not-the-password")
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await b.connect(timeout_s=2)


# --------------------------------------------------------------------------------------------- TLS
async def test_mutual_tls_to_nats(tmp_path, creds):
    pki = pytest.importorskip("lfr.runtime.pki")
    tls = pki.create_dev_pki(tmp_path / "tls", ["nats", "match"])
    with NatsServer(tmp_path / "nats", auth=natsauth.server_auth_config(creds), tls_dir=tls) as server:
        assert server.url.startswith("tls://")
        ok = Bus(server.url, "t-tls", service="match", user="match", password=creds["match"], tls_dir=tls)
        await ok.connect(10)
        try:
            assert ok._tls_in_use()
            assert await ok.publish(subjects.alerts("dep1", "cam1"), ENV(event_id="x"))
            await ok.nc.flush()
            assert ok.last_error == ""
        finally:
            await ok.drain()
        # the right password but no client certificate; no TLS at all: both refused
        for kw in ({"tls_dir": tls, "tls_cert": "nobody"}, {}):
            b = Bus(server.url.replace("tls://", "nats://"), "t-tls", service="match", user="match",
                    password=creds["match"], **kw)
            with pytest.raises(ConnectionError):
                await b.connect(timeout_s=2)
    # a tls:// URL never falls back to plaintext
    with NatsServer(tmp_path / "plain") as plain:
        b = Bus(plain.url.replace("nats://", "tls://"), "t-tls", service="match", tls_dir=tls)
        with pytest.raises(ConnectionError, match="not encrypted"):
            await b.connect(timeout_s=5)
