"""The one durable outbox: how every durable fact leaves a service.

A fact is a row in the ``lfr_outbox`` table of the service's own SQLite database, written **in the same
transaction** as the state change it reports (:meth:`Outbox.transaction`), so the two are committed together
or not at all. A publisher task (started by :class:`lfr.runtime.bus.Bus`) sends the rows in order to JetStream
with their ``Nats-Msg-Id`` and deletes each only once the server acknowledged it; after a crash or a NATS
outage the next run sends what is left. A row sent twice (acknowledged, then a crash before its delete) is
dropped by the stream's duplicate window, so a fact is published exactly once.

:func:`publish` is the one JetStream publish with acknowledgement and dedup id; the audit's chain append (which
must also expect the stream's last sequence, ``Nats-Expected-Last-Sequence``) calls it directly.

Fault hook for crash tests: with ``LFR_FAULT_OUTBOX_KILL=<subject prefix>``, the process ends at once
(``os._exit(137)``, like SIGKILL: no cleanup, nothing flushed) right after it committed a fact on a subject with
that prefix and before publishing it (``LFR_FAULT_OUTBOX_AT=committed``, the default), or right after JetStream
acknowledged it and before its row is deleted (``published``). With ``LFR_FAULT_OUTBOX_MARK=<file>`` it does so
once: the file is created first, and its presence disarms the hook for the restarted process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from lfr.runtime import metrics
from lfr.runtime.logs import get_logger

SCHEMA = """
CREATE TABLE IF NOT EXISTS lfr_outbox (
  n INTEGER PRIMARY KEY AUTOINCREMENT,
  msg_id TEXT NOT NULL UNIQUE,      -- the fact's id: JetStream's Nats-Msg-Id
  subject TEXT NOT NULL,
  data BLOB NOT NULL,
  created_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Row:
    n: int
    msg_id: str
    subject: str
    data: bytes


async def publish(js, subject: str, data: bytes, msg_id: str, timeout_s: float = 2.0,
                  expected_last_seq: int | None = None):
    """Publish to JetStream and wait for its acknowledgement (returned: stream and sequence). ``msg_id`` lets the
    stream drop a repeat; ``expected_last_seq`` makes the stream refuse the message unless its last sequence is
    that one (the audit chain's append)."""
    headers = {"Nats-Msg-Id": msg_id}
    if expected_last_seq is not None:
        headers["Nats-Expected-Last-Sequence"] = str(expected_last_seq)
    return await js.publish(subject, data, timeout=timeout_s, headers=headers)


def _fault(point: str, subjects: list[str]) -> None:
    """The crash-test hook (see the module doc): a no-op unless LFR_FAULT_OUTBOX_KILL is set."""
    prefix = os.environ.get("LFR_FAULT_OUTBOX_KILL", "")
    if not prefix or os.environ.get("LFR_FAULT_OUTBOX_AT", "committed") != point:
        return
    if any(s.startswith(prefix) for s in subjects):
        mark = os.environ.get("LFR_FAULT_OUTBOX_MARK", "")
        if mark and os.path.exists(mark):
            return
        if mark:
            Path(mark).write_text(str(os.getpid()))
        os._exit(137)


class Outbox:
    """Facts waiting for JetStream, in a table of a service's own database (see the module doc)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock | None = None, service: str = "",
                 name: str = "outbox"):
        """`db`: the service's connection (autocommit mode: ``isolation_level=None``); `lock`: the re-entrant lock
        its store holds around writes, shared so a transaction spans the store's writes and the facts."""
        self.db = db
        self.lock = lock or threading.RLock()
        self.service = service
        self.name = name
        self.log = get_logger(component="outbox")
        with self.lock:
            self.db.executescript(SCHEMA)
        self._subjects: list[str] = []  # of the facts written in the open transaction
        self._wake: asyncio.Event | None = None
        self._sending: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._depth()

    @classmethod
    def open(cls, path: str | Path, service: str = "") -> Outbox:
        """An outbox in its own SQLite file, for a service that has no database of its own (':memory:' keeps
        the facts only as long as the process: for services with no state folder)."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        if str(path) != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a fact written is on disk when add() returns
        ob = cls(db, service=service)
        ob._own_db = True
        return ob

    # Writing ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction for a state change and the facts it produces (re-entrant: an inner block joins the
        outer one). Never ``await`` inside: another task's writes on the same connection would join it."""
        with self.lock:
            if self.db.in_transaction:
                yield
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back itself (a full disk): a ROLLBACK then
                    self.db.execute("ROLLBACK")  # fails and would hide the error that matters
                self._subjects = []
                raise
            self._committed()

    def add(self, subject: str, msg: Message | bytes, msg_id: str) -> None:
        """Write a fact (in the caller's open transaction, else in one of its own). A msg_id already waiting is
        not written twice."""
        data = msg if isinstance(msg, bytes) else msg.SerializeToString()
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO lfr_outbox (msg_id, subject, data, created_ns) VALUES (?, ?, ?, ?)",
                            (msg_id, subject, data, time.time_ns()))
            self._subjects.append(subject)
            if not self.db.in_transaction:
                self._committed()

    def _committed(self) -> None:
        subjects, self._subjects = self._subjects, []
        _fault("committed", subjects)
        self._depth()
        self.wake()

    def wake(self) -> None:
        if self._wake is None or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:  # written from a worker thread
            self._loop.call_soon_threadsafe(self._wake.set)

    # Reading and publishing --------------------------------------------------------------------------------
    def pending(self, limit: int = 100) -> list[Row]:
        with self.lock:
            rows = self.db.execute("SELECT n, msg_id, subject, data FROM lfr_outbox ORDER BY n LIMIT ?",
                                   (limit,)).fetchall()
        return [Row(*r) for r in rows]

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM lfr_outbox").fetchone()[0]

    def _depth(self) -> None:
        if self.service:
            metrics.QUEUE_DEPTH.labels(self.service, self.name).set(len(self))

    def published(self, n: int) -> None:
        with self.lock:
            self.db.execute("DELETE FROM lfr_outbox WHERE n = ?", (n,))

    async def send_pending(self, js) -> bool:
        """Publish what is waiting, in order; True when nothing is left, False at the first failure. One sender
        at a time (a flush beside the publisher task must not send a row twice: core subscribers would see it)."""
        if self._sending is None:
            self._sending = asyncio.Lock()
        async with self._sending:
            return await self._send(js)

    async def _send(self, js) -> bool:
        while True:
            rows = self.pending()
            if not rows:
                self._depth()
                return True
            for r in rows:
                try:
                    await publish(js, r.subject, r.data, r.msg_id)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.log.warning("nats.durable_publish_retry", subject=r.subject, error=type(exc).__name__,
                                     pending=len(self))
                    return False
                _fault("published", [r.subject])
                self.published(r.n)
            self._depth()

    async def run(self, js_getter) -> None:
        """Publish forever: at once when woken (a commit, a reconnect), else every second; back off on failure."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        delay = 0.1
        while True:
            self._wake.clear()
            js = js_getter()
            try:
                ok = js is not None and await self.send_pending(js)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - its file failed (a read-only or full disk): retried, the
                # facts stay on disk; a row published but not yet deleted is sent again, deduplicated by its id
                self.log.warning("outbox.store_failed", error=str(exc)[:200])
                ok = False
            if ok:
                delay = 0.1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    _own_db = False

    def close(self) -> None:
        self._loop = None
        if self._own_db:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
