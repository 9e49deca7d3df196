"""The platform's one NATS client wrapper.

- connect with retry, reconnect forever, `drain()` on stop;
- typed publish/subscribe of protobuf messages, queue groups, a bounded hand-off per subscription;
- JetStream streams declared idempotently from `subjects.STREAMS`;
- durable facts go through the durable outbox (`lfr.runtime.outbox`): a table in the service's own database,
  written in the same transaction as the state change (`use_outbox`), or else a SQLite file in its state folder
  (`outbox_path`), written before `publish_durable` returns; published with JetStream acknowledgement and a
  dedup id, retried across reconnects and restarts, so neither a NATS restart nor a killed process loses an
  alert or an audit fact, and none is published twice;
- durable consumers are pull consumers that survive reconnects and server restarts;
- with a user, a password and TLS material when given: the server then lets the user do only what
  `natsauth.PERMISSIONS` allows, and replies come on the user's own inbox prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api

from lfr.runtime import metrics, natsauth, subjects
from lfr.runtime.logs import get_logger
from lfr.runtime.outbox import Outbox

M = TypeVar("M", bound=Message)


async def fetch_ready(psub, batch: int, wait_s: float = 1.0) -> list:
    """Up to `batch` messages of a pull consumer, handed over as soon as there is one: it waits at most `wait_s` for
    the first, then takes what else is already there. (nats-py's `fetch(batch)` that gets its first message from a
    waiting pull request can keep it until `batch` arrived or the request expired: now and then the second of two
    alerts raised a tenth of a second apart reached StreamAlerts half a second late.) Raises a timeout when nothing
    came."""
    msgs = await psub.fetch(1, timeout=wait_s)
    if batch > 1:
        with contextlib.suppress(TimeoutError, NatsTimeout):
            msgs += await psub.fetch(batch - 1, timeout=0.002)  # what is there now; nothing: a 2 ms look
    return msgs


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
        # publish_durable writes to the last outbox (the service's own database once it called use_outbox); every
        # one is published, so what an earlier one holds from a previous run still leaves.
        self.outboxes: list[Outbox] = [Outbox.open(outbox_path or ":memory:", self.service)]
        if len(self.outboxes[0]):
            self.log.info("nats.outbox_recovered", pending=len(self.outboxes[0]))
        self._outbox_tasks: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

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
        for ob in self.outboxes:
            self._start_outbox(ob)
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
        for ob in self.outboxes:
            ob.wake()

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

    def use_outbox(self, outbox: Outbox) -> Outbox:
        """From now on durable facts are written to `outbox` (a table in the service's own database, so a state
        change and its facts commit together: `outbox.transaction()`)."""
        self.outboxes.append(outbox)
        if self.js is not None:
            self._start_outbox(outbox)
        return outbox

    @property
    def outbox(self) -> Outbox:
        return self.outboxes[-1]

    def _start_outbox(self, outbox: Outbox) -> None:
        self._outbox_tasks.append(asyncio.create_task(outbox.run(lambda: self.js), name=f"outbox-{outbox.name}"))

    def publish_durable(self, subject: str, msg: Message, msg_id: str) -> None:
        """Write a durable fact to the outbox (inside the caller's open transaction of it, if any: then it is
        committed with the state change). It is published once JetStream acknowledges it, deduplicated by
        `msg_id`. On disk when this returns, unless the bus has no outbox file (a client, not a service)."""
        self.outbox.add(subject, msg, msg_id)

    @property
    def outbox_size(self) -> int:
        return sum(len(ob) for ob in self.outboxes)

    async def flush_outbox(self, timeout_s: float = 10.0) -> bool:
        """Publish what waits now (for at most `timeout_s`); True when every outbox is empty."""
        try:
            async with asyncio.timeout(timeout_s):
                for ob in self.outboxes:
                    while self.js is not None and not await ob.send_pending(self.js):
                        await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        except (OSError, sqlite3.Error) as exc:  # an outbox's disk failed: its facts wait on it for the next run
            self.log.warning("nats.outbox_store_failed", error=str(exc)[:200])
            return False
        return self.outbox_size == 0

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
                    msgs = await fetch_ready(psub, batch)
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
                        msgs = await fetch_ready(psub, 32)
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
        with contextlib.suppress(OSError, sqlite3.Error):  # counting reads the outbox's file
            if self.outbox_size:  # kept on disk (when the outbox has a file): published by the next run
                self.log.warning("nats.outbox_not_flushed", pending=self.outbox_size)
        self._closing = True  # consumer loops finish their current fetch (<= 1 s) and return
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.5)
        for task in list(self._tasks) + self._outbox_tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            if self.nc.is_connected:
                await asyncio.wait_for(self.nc.drain(), 5)
        with contextlib.suppress(Exception):
            await self.nc.close()
        for ob in self.outboxes:
            ob.close()
