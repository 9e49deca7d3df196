"""A service's disks: a write that fails because a store is full or read-only turns the service NOT_SERVING,
refuses the request with a precise status naming the store, and a probe brings the service back to SERVING
once every store it writes takes writes again.

- full (ENOSPC, EDQUOT, SQLite "database or disk is full", JetStream "insufficient resources"):
  RESOURCE_EXHAUSTED;
- read-only (EROFS, EACCES, EPERM, SQLite "readonly database"): UNAVAILABLE.

Nothing acknowledged is lost meanwhile: a refused request changed nothing (SQLite rolls the transaction back),
facts already queued stay in the outbox file or the stream until they can be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from pathlib import Path

from grpc_health.v1 import health_pb2

from lfr.runtime import metrics
from lfr.runtime.logs import get_logger

FULL = "full"
READ_ONLY = "read-only"
STATUS = {FULL: "RESOURCE_EXHAUSTED", READ_ONLY: "UNAVAILABLE"}
PROBE_NAME = ".lfr-write-probe"
PROBE_BYTES = 64 * 1024

STORAGE_OK = metrics.Gauge("lfr_storage_ok", "1 while every store of the service takes writes, 0 while one is "
                           "full or read-only", ["service"], registry=metrics.REGISTRY)


def storage_error(exc: BaseException | None) -> str | None:
    """FULL, READ_ONLY, or None when `exc` is not a failed write to a disk. The exceptions it was raised while
    handling count too: SQLite rolls a transaction back itself on SQLITE_FULL, so the caller's ROLLBACK then
    fails with "no transaction is active", hiding the full disk behind it."""
    seen = 0
    while exc is not None and seen < 8:
        kind = _storage_error(exc)
        if kind is not None:
            return kind
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _storage_error(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return FULL
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return READ_ONLY
    text = str(exc).lower()
    if isinstance(exc, sqlite3.Error):
        if "disk is full" in text:
            return FULL
        if "readonly" in text or "read-only" in text:
            return READ_ONLY
    if "insufficient resources" in text or "no space left" in text:  # JetStream's store is full
        return FULL
    return None


def io_error(exc: BaseException | None) -> bool:
    """`exc` (or one it was raised while handling) is an I/O error without a cause of its own: EIO, or SQLite's
    SQLITE_IOERR ("disk I/O error")."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            return True
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorname", "").startswith("SQLITE_IOERR")
                                                or "disk i/o error" in str(exc).lower()):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def probe(directory: Path) -> str | None:
    """Write, fsync and delete a small file in `directory`: None when that works, else why not."""
    path = Path(directory) / PROBE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        return None
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        return storage_error(exc) or exc.strerror or type(exc).__name__


class StorageGuard:
    """One per service process. `stores`: the folders the service writes (the state folder, a store's own
    volume). `failed(exc)` is called where a write failed; it returns the refusal (status, message) when the
    failure is a disk's, else None."""

    def __init__(self, service: str, stores: list[Path], interval_s: float = 1.0):
        self.service = service
        self.stores = list(dict.fromkeys(Path(s) for s in stores if s))
        self.interval_s = interval_s
        self.reason = ""  # why the service is NOT_SERVING ('' while healthy)
        self.kind = ""
        self.since = 0.0
        self.health = None
        self.service_names: list[str] = []
        self.log = get_logger(component="storage")
        self._task: asyncio.Task | None = None
        self.remote: set[str] = set()  # stores only a successful write can show healthy again (JetStream's)
        STORAGE_OK.labels(service).set(1)

    def bind(self, health, service_names: list[str]) -> None:
        self.health, self.service_names = health, service_names

    def failing(self) -> dict[str, str]:
        """store -> why it refuses writes, for every store that does now."""
        out = {}
        for s in self.stores:
            why = probe(s) if s.is_dir() else None
            if why:
                out[str(s)] = why
        return out

    def failed(self, exc: BaseException, what: str = "", remote: str = "") -> tuple[str, str] | None:
        kind = storage_error(exc)
        if kind is None and io_error(exc):
            # SQLite reports a write refused by a file system turned read-only under it (ext4 after an error,
            # errors=remount-ro) as a plain "disk I/O error": the stores' probe tells whether a disk is why
            why = set(self.failing().values())
            kind = FULL if FULL in why else READ_ONLY if READ_ONLY in why else None
        if kind is None:
            return None
        if remote:
            self.remote.add(remote)
        stores = {**self.failing(), **{r: kind for r in self.remote}} or {"(a store of this service)": kind}
        names = ", ".join(f"{s} ({why})" for s, why in stores.items())
        message = (f"{self.service} cannot write: storage {kind}: {names}; nothing was changed, retry when the "
                   f"disk has space and is writable again")
        if not self.reason:
            self.since = time.monotonic()
            self.log.error("storage.failed", kind=kind, stores=names, during=what, error=str(exc)[:200])
            STORAGE_OK.labels(self.service).set(0)
        self.reason, self.kind = message, kind
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        with contextlib.suppress(RuntimeError):  # no loop: the next failure in one starts the probe
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._recover(), name="storage-probe")
        return STATUS[kind], message

    def blocked(self, failing: dict[str, str]) -> tuple[str, str] | None:
        """At start, before anything is opened: `failing` (from failing()) sets the reason and logs it once;
        empty, it clears a reason set so (logging the recovery). Returns the refusal (status, message) or None."""
        if not failing:
            if self.reason:
                self.log.info("storage.recovered", after_s=round(time.monotonic() - self.since, 1), during="start")
                self.reason = self.kind = ""
                STORAGE_OK.labels(self.service).set(1)
            return None
        kind = FULL if FULL in failing.values() else READ_ONLY
        names = ", ".join(f"{s} ({why})" for s, why in failing.items())
        message = (f"{self.service} cannot start: storage {kind}: {names}; it serves nothing until the disk has "
                   f"space and is writable again")
        if not self.reason:
            self.since = time.monotonic()
            self.log.error("storage.failed", kind=kind, stores=names, during="start")
            STORAGE_OK.labels(self.service).set(0)
        self.reason, self.kind = message, kind
        return STATUS[kind], message

    def succeeded(self, remote: str) -> None:
        """A write to a remote store worked again."""
        self.remote.discard(remote)

    def _set_health(self, status) -> None:
        if self.health is None:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for name in ["", *self.service_names]:
                loop.create_task(self.health.set(name, status))

    async def _recover(self) -> None:
        while self.reason:
            await asyncio.sleep(self.interval_s)
            if not self.remote and not self.failing():
                self.log.info("storage.recovered", after_s=round(time.monotonic() - self.since, 1))
                self.reason = self.kind = ""
                STORAGE_OK.labels(self.service).set(1)
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
