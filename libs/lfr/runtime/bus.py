"""The platform's one NATS client wrapper.

- connect with retry, reconnect forever, `drain()` on stop;
- typed publish/subscribe of protobuf messages, queue groups, a bounded hand-off per subscription;
- JetStream streams declared idempotently from `subjects.STREAMS`;
- durable publishes go through an outbox that retries until the server acknowledges them, de-duplicated by
  message id, so a NATS restart loses no alert or audit fact; with `outbox_path` the outbox is a SQLite file
  written before `publish_durable` returns and read again at the next start, so a killed process loses none
  either (the services keep it in their state folder);
- durable consumers are pull consumers that survive reconnects and server restarts;
- with a user, a password and TLS material when given: the server then lets the user do only what
  `natsauth.PERMISSIONS` allows, and replies come on the user's own inbox prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api

from lfr.runtime import metrics, natsauth, subjects
from lfr.runtime.logs import get_logger

M = TypeVar("M", bound=Message)


class Bus:
    def __init__(self, url: str, name: str, service: str = "", *, user: str = "", password: str = "",
                 tls_dir: str | Path = "", tls_cert: str = "", outbox_path: str | Path = ""):
        """`user`/`password`: NATS credentials (none = anonymous). `tls_dir`: ca.pem to check the server with, and
        <tls_cert>.pem/.key (default: the service's) as the client certificate if present; TLS is used whenever
        the server asks for it, and required with tls:// URLs."""
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.name = name
        self.service = service or name
        self.user = user
        self._password = password
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.tls_cert = tls_cert or self.service
        self._last_error = ""
        self._auth_error = ""  # the server refused the credentials: kept, a later reset must not hide it
        self.nc: nats.NATS | None = None
        self.js = None
        self.log = get_logger(component="bus")
        self._outbox: deque[tuple[str, bytes, str, int]] = deque()  # subject, data, msg id, row in the file
        self._outbox_db = self._open_outbox(outbox_path) if outbox_path else None
        self._outbox_event = asyncio.Event()
        self._outbox_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    def _open_outbox(self, path: str | Path) -> sqlite3.Connection:
        """The outbox file, and the facts a previous run of this process left unacknowledged in it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a fact the caller was told is queued survives a power loss too
        db.execute("CREATE TABLE IF NOT EXISTS outbox (n INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL,"
                   " data BLOB NOT NULL, msg_id TEXT NOT NULL)")
        for n, subject, data, msg_id in db.execute("SELECT n, subject, data, msg_id FROM outbox ORDER BY n"):
            self._outbox.append((subject, data, msg_id, n))
        if self._outbox:
            self.log.info("nats.outbox_recovered", pending=len(self._outbox))
        return db

    # Connection -------------------------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext | None:
        if self.tls_dir is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        cert, key = self.tls_dir / f"{self.tls_cert}.pem", self.tls_dir / f"{self.tls_cert}.key"
        if cert.is_file() and key.is_file():
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def _tls_in_use(self) -> bool:
        writer = getattr(getattr(self.nc, "_transport", None), "_io_writer", None)
        if writer is not None:
            return writer.get_extra_info("ssl_object") is not None
        return bool(getattr(self.nc, "_server_info", {}).get("tls_required"))

    async def connect(self, timeout_s: float = 30.0) -> None:
        """Connect, retrying until `timeout_s`; afterwards the client reconnects by itself, forever."""
        extra: dict = {}
        if self.user:
            extra.update(user=self.user, password=self._password, inbox_prefix=natsauth.inbox_prefix(self.user))
        tls = self._tls_context()
        if tls is not None:
            extra["tls"] = tls
        try:
            self.nc = await asyncio.wait_for(nats.connect(
                servers=self.servers,
                name=self.name,
                connect_timeout=2,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,  # also retries the first connection, bounded by wait_for
                allow_reconnect=True,
                ping_interval=5,
                max_outstanding_pings=2,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect,
                **extra,
            ), timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            last = self._auth_error or self._last_error
            why = f"; last error: {last}" if last else ""
            raise ConnectionError(f"cannot connect to NATS at {self.servers} within {timeout_s:.0f} s"
                                  f" ({type(exc).__name__}{why})") from None
        if any(s.startswith("tls://") for s in self.servers) and not self._tls_in_use():
            self._closing = True
            await self.nc.close()
            raise ConnectionError(f"NATS at {self.servers}: a tls:// URL, but the connection is not encrypted")
        self.js = self.nc.jetstream(timeout=5)
        self._outbox_task = asyncio.create_task(self._run_outbox(), name="bus-outbox")
        self.log.info("nats.connected", servers=self.servers)

    @property
    def connected(self) -> bool:
        return bool(self.nc and self.nc.is_connected)

    @property
    def last_error(self) -> str:
        """The last error the client reported (a refused connection, a permissions violation, ...), or ''."""
        return self._last_error

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = str(exc) or type(exc).__name__  # e.g. "Permissions Violation for Publish to ..."
        if "authorization violation" in self._last_error.lower():
            self._auth_error = self._last_error
        self.log.warning("nats.error", error=self._last_error)

    async def _on_disconnect(self) -> None:
        if not self._closing:
            self.log.warning("nats.disconnected")

    async def _on_reconnect(self) -> None:
        self.log.info("nats.reconnected")
        self._outbox_event.set()

    async def ensure_streams(self, streams=subjects.STREAMS, replicas: int = 1) -> None:
        """Declare the platform's JetStream streams; safe to call from every service at every start.

        A service user declares only the streams its permissions name (the audit service's, all of them)."""
        for s in natsauth.declarable(self.user, streams):
            cfg = api.StreamConfig(
                name=s.name,
                subjects=list(s.subjects),
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                max_age=s.max_age_s or None,
                deny_delete=s.deny_delete,
                deny_purge=s.deny_delete,
                duplicate_window=120.0,
                num_replicas=replicas,
            )
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(cfg)

    # Publishing -------------------------------------------------------------------------------------
    async def publish(self, subject: str, msg: Message) -> bool:
        """Core NATS (memory only). A failure is counted as a drop, never retried: live beats complete."""
        try:
            await self.nc.publish(subject, msg.SerializeToString())
            return True
        except Exception as exc:
            metrics.DROPPED.labels(self.service, "publish", "nats_unavailable").inc()
            self.log.debug("nats.publish_failed", subject=subject, error=type(exc).__name__)
            return False

    def publish_durable(self, subject: str, msg: Message, msg_id: str) -> None:
        """Queue a durable fact; the outbox retries until JetStream acknowledges it (deduplicated by id). With an
        outbox file the fact is on disk when this returns (an OSError, e.g. a full disk, reaches the caller)."""
        data = msg.SerializeToString()
        n = 0
        if self._outbox_db is not None:
            n = self._outbox_db.execute("INSERT INTO outbox (subject, data, msg_id) VALUES (?, ?, ?)",
                                        (subject, data, msg_id)).lastrowid
        self._outbox.append((subject, data, msg_id, n))
        metrics.QUEUE_DEPTH.labels(self.service, "outbox").set(len(self._outbox))
        self._outbox_event.set()

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    async def flush_outbox(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._outbox and time.monotonic() < deadline:
            self._outbox_event.set()
            await asyncio.sleep(0.05)
        return not self._outbox

    async def _run_outbox(self) -> None:
        delay = 0.1
        while True:
            if not self._outbox:
                self._outbox_event.clear()
                await self._outbox_event.wait()
                continue
            subject, data, msg_id, n = self._outbox[0]
            try:
                await self.js.publish(subject, data, timeout=2, headers={"Nats-Msg-Id": msg_id})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("nats.durable_publish_retry", subject=subject, error=type(exc).__name__,
                                 pending=len(self._outbox))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.1
            if n and self._outbox_db is not None:
                try:
                    self._outbox_db.execute("DELETE FROM outbox WHERE n = ?", (n,))
                except sqlite3.Error as exc:  # sent twice at the next start at worst: JetStream drops the copy
                    self.log.warning("nats.outbox_delete_failed", error=str(exc))
            self._outbox.popleft()
            metrics.QUEUE_DEPTH.labels(self.service, "outbox").set(len(self._outbox))

    # Subscribing ------------------------------------------------------------------------------------
    async def subscribe(
        self,
        subject: str,
        msg_type: type[M],
        handler: Callable[[M, str], Awaitable[None] | None],
        queue: str = "",
        stage: str = "subscribe",
    ):
        """Typed core subscription. Malformed payloads are counted and dropped, never crash the service."""

        async def on_msg(raw) -> None:
            try:
                msg = msg_type.FromString(raw.data)
            except DecodeError:
                metrics.DROPPED.labels(self.service, stage, "malformed").inc()
                return
            result = handler(msg, raw.subject)
            if asyncio.iscoroutine(result):
                await result

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg, pending_msgs_limit=1024)

    async def consume_durable(
        self,
        stream: str,
        subject: str,
        durable: str,
        handler: Callable[[bytes, str, int], Awaitable[None]],
        batch: int = 64,
    ) -> asyncio.Task:
        """Run a durable pull consumer: each message is acked only after `handler` returned."""

        async def loop() -> None:
            psub = None
            while not self._closing:
                try:
                    if psub is None:
                        psub = await self.js.pull_subscribe(
                            subject, durable=durable, stream=stream,
                            config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=1000),
                        )
                    msgs = await psub.fetch(batch, timeout=1)
                except (TimeoutError, NatsTimeout):
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.log.warning("nats.consumer_retry", durable=durable, error=type(exc).__name__)
                    psub = None
                    await asyncio.sleep(0.5)
                    continue
                for m in msgs:
                    await handler(m.data, m.subject, m.metadata.sequence.stream)
                    with contextlib.suppress(Exception):
                        await m.ack()
            if psub is not None:  # unacked messages are redelivered to the next run of this consumer
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()

        return self.spawn(loop(), f"consume-{durable}")

    async def replay(self, stream: str, subject: str, from_start: bool) -> AsyncIterator[tuple[int, bytes]]:
        """Follow a stream (ephemeral pull consumer), recreated from the last seen sequence after any error."""
        next_seq = 0
        if not from_start:
            info = await self.js.stream_info(stream)
            next_seq = info.state.last_seq + 1
        while not self._closing:
            try:
                cfg = api.ConsumerConfig(
                    ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0,
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if next_seq else api.DeliverPolicy.ALL,
                    opt_start_seq=next_seq or None,
                )
                psub = await self.js.pull_subscribe(subject, stream=stream, config=cfg)
                while not self._closing:
                    try:
                        msgs = await psub.fetch(32, timeout=1)
                    except (TimeoutError, NatsTimeout):
                        continue
                    for m in msgs:
                        next_seq = m.metadata.sequence.stream + 1
                        yield next_seq - 1, m.data
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("nats.replay_retry", stream=stream, error=type(exc).__name__)
                await asyncio.sleep(0.5)

    # Lifecycle --------------------------------------------------------------------------------------
    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, outbox_timeout_s: float = 10.0) -> None:
        if self.nc is None:
            return
        if self.connected:
            await self.flush_outbox(outbox_timeout_s)
        if self._outbox:
            self.log.error("nats.outbox_not_flushed", pending=len(self._outbox))
        self._closing = True  # consumer loops finish their current fetch (<= 1 s) and return
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.5)
        for task in list(self._tasks) + ([self._outbox_task] if self._outbox_task else []):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            if self.nc.is_connected:
                await asyncio.wait_for(self.nc.drain(), 5)
        with contextlib.suppress(Exception):
            await self.nc.close()
        if self._outbox_db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._outbox_db.close()
