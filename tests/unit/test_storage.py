"""Which failures are a disk's (full or read-only), and the write probe that decides recovery."""

from __future__ import annotations

import errno
import sqlite3

from lfr.runtime.storage import FULL, READ_ONLY, STATUS, probe, storage_error


def test_disk_failures_are_told_apart_from_other_errors():
    assert storage_error(OSError(errno.ENOSPC, "No space left on device")) == FULL
    assert storage_error(OSError(errno.EROFS, "Read-only file system")) == READ_ONLY
    assert storage_error(sqlite3.OperationalError("database or disk is full")) == FULL
    assert storage_error(sqlite3.OperationalError("attempt to write a readonly database")) == READ_ONLY
    assert storage_error(Exception("nats: code=503 err_code=10023 description='insufficient resources'")) == FULL
    assert storage_error(sqlite3.OperationalError("no such table: x")) is None
    assert storage_error(ValueError("bad input")) is None
    assert STATUS == {FULL: "RESOURCE_EXHAUSTED", READ_ONLY: "UNAVAILABLE"}


def test_a_full_disk_hidden_behind_a_failed_rollback_is_still_seen():
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.Error:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None
    except sqlite3.Error as exc:
        assert exc.__cause__ is None and exc.__context__ is not None
        assert storage_error(exc) == FULL


def test_the_probe_writes_and_removes_its_file(tmp_path):
    assert probe(tmp_path) is None
    assert not any(tmp_path.iterdir())
    assert probe(tmp_path / "missing") is not None


def test_an_outbox_transaction_that_sqlite_rolled_back_itself_raises_the_real_error():
    from lfr.runtime.outbox import Outbox

    ob = Outbox.open(":memory:")
    ob.db.execute("CREATE TABLE t (x)")
    try:
        with ob.transaction():  # SQLite rolls back itself on some errors (a full disk); no second ROLLBACK then
            ob.db.execute("INSERT INTO t VALUES (1)")
            ob.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
    except sqlite3.OperationalError as exc:
        assert str(exc) == "database or disk is full" and exc.__context__ is None
    assert not ob.db.in_transaction and ob.db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


def test_a_real_full_database_is_refused_as_full_and_nothing_is_written(tmp_path):
    from lfr.runtime.outbox import Outbox

    ob = Outbox.open(tmp_path / "o.sqlite")
    ob.db.execute("CREATE TABLE t (x BLOB)")
    pages = ob.db.execute("PRAGMA page_count").fetchone()[0]
    ob.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a database that can grow by two pages only
    try:
        with ob.transaction():
            ob.add("lfr.test.fact", b"fact", "id-1")
            ob.db.execute("INSERT INTO t VALUES (?)", (b"\0" * 100_000,))
        raise AssertionError("the write should not fit")
    except sqlite3.Error as exc:
        assert storage_error(exc) == FULL and "no transaction is active" not in str(exc)
    assert len(ob) == 0 and not ob.db.in_transaction
    ob.close()


def test_an_io_error_is_a_disks_only_when_a_store_refuses_the_probe(tmp_path, monkeypatch):
    """SQLite reports a write refused by a file system turned read-only under it as "disk I/O error": the
    guard then asks its stores' probe, and refuses precisely only when one fails."""
    from lfr.runtime import storage
    from lfr.runtime.storage import StorageGuard, io_error

    ioerr = sqlite3.OperationalError("disk I/O error")
    assert io_error(ioerr) and io_error(OSError(errno.EIO, "Input/output error"))
    assert not io_error(sqlite3.OperationalError("no such table: x")) and storage_error(ioerr) is None
    guard = StorageGuard("watchlist", [tmp_path])
    assert guard.failed(ioerr, "CreateDeployment") is None and not guard.reason  # the disk is fine: not its error
    monkeypatch.setattr(storage, "probe", lambda d: READ_ONLY)  # the store's folder now refuses writes
    status, message = guard.failed(ioerr, "CreateDeployment")
    assert status == "UNAVAILABLE" and f"storage read-only: {tmp_path} (read-only)" in message


def test_each_service_guards_the_folders_it_writes_not_the_state_folders_logs():
    from pathlib import Path

    from lfr.runtime.config import Config
    from lfr.runtime.service import store_folders

    def folders(service, **kw):
        return store_folders(Config(service=service, state_dir="/s", **kw))

    assert folders("detection") == [Path("/s/outbox")]  # its outbox only: logs and endpoints.json stop nothing
    assert folders("watchlist") == [Path("/s/outbox"), Path("/s")]
    assert folders("watchlist", watchlist_dir="/w") == [Path("/s/outbox"), Path("/w")]
    assert folders("audit", audit_db="/a/audit.sqlite") == [Path("/s/outbox"), Path("/a")]
    assert folders("match", alert_db="/m/alerts.sqlite") == [Path("/s/outbox"), Path("/m")]
    assert store_folders(Config(service="watchlist", watchlist_dir="/w")) == [Path("/w")]
