"""The audit index (SQLite by default): the chained records, queryable. Only the audit service writes it, and
only after the record is in the durable LFR_AUDIT stream (the source of truth), so the index is never ahead of
the stream; when it is behind (a crash between the two, a lost disk) it is filled again from the stream.
A record's source (stream + sequence of the fact) is unique, so a redelivered fact is never recorded twice."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lfr.audit.chain import ChainRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  sequence INTEGER PRIMARY KEY,
  source TEXT NOT NULL UNIQUE,
  time_ns INTEGER NOT NULL, type TEXT NOT NULL, actor TEXT NOT NULL, deployment_id TEXT NOT NULL,
  subject TEXT NOT NULL, payload_digest TEXT NOT NULL, summary_json TEXT NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_deployment ON records(deployment_id, type, sequence);
CREATE INDEX IF NOT EXISTS records_by_type ON records(type, time_ns);
"""
COLUMNS = ("sequence", "time_ns", "type", "actor", "deployment_id", "subject", "payload_digest", "summary_json",
           "source", "prev_hash", "hash")


class AuditStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path).resolve()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(records)")}
        if cols and "hash" not in cols:  # an index from before the chain: kept aside, never mixed in
            self.db.execute(f"ALTER TABLE records RENAME TO records_unchained_{time.time_ns()}")
            self.db.execute("DROP INDEX IF EXISTS records_by_deployment")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()  # shared with the outbox in this database (lfr.runtime.outbox)

    def insert(self, r: ChainRecord) -> None:
        with self.lock:
            self.db.execute(f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            tuple(getattr(r, c) for c in COLUMNS))

    def has_source(self, source: str) -> bool:
        return self.db.execute("SELECT 1 FROM records WHERE source = ?", (source,)).fetchone() is not None

    def head(self) -> ChainRecord | None:
        row = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM records ORDER BY sequence DESC LIMIT 1").fetchone()
        return ChainRecord(*row) if row else None

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def chain(self, after: int = 0) -> Iterator[ChainRecord]:
        """Every record in sequence order, from a snapshot (its own connection and read transaction, so the
        walk may run in another thread while records are appended)."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            db.execute("BEGIN")
            cur = db.execute(f"SELECT {', '.join(COLUMNS)} FROM records WHERE sequence > ? ORDER BY sequence",
                             (after,))
            for row in cur:
                yield ChainRecord(*row)
        finally:
            db.close()

    def get(self, sequence: int) -> ChainRecord | None:
        row = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM records WHERE sequence = ?", (sequence,)).fetchone()
        return ChainRecord(*row) if row else None

    def recorded_from(self, stream: str, first_seq: int) -> int:
        """How many facts of `stream` with a stream sequence >= first_seq are recorded."""
        return self.db.execute("SELECT COUNT(*) FROM records WHERE source LIKE ? AND"
                               " CAST(substr(source, ?) AS INTEGER) >= ?",
                               (stream + ":%", len(stream) + 2, first_seq)).fetchone()[0]

    def query(self, deployment_id: str = "", type_prefix: str = "", after: int = 0, limit: int = 1000) -> list[dict]:
        sql = "SELECT * FROM records WHERE sequence > ?"
        args: list = [after]
        if deployment_id:
            sql += " AND deployment_id = ?"
            args.append(deployment_id)
        if type_prefix:
            sql += " AND type LIKE ?"
            args.append(type_prefix.replace("%", "").replace("_", r"\_") + "%")
            sql += r" ESCAPE '\'"
        sql += " ORDER BY sequence LIMIT ?"
        args.append(limit)
        cur = self.db.execute(sql, args)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur]

    def of_types(self, types: tuple[str, ...], deployment_id: str = "") -> list[ChainRecord]:
        """All records of the given types (of one deployment), in sequence order."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM records WHERE type IN ({', '.join('?' * len(types))})"
        args: list = list(types)
        if deployment_id:
            sql += " AND deployment_id = ?"
            args.append(deployment_id)
        return [ChainRecord(*row) for row in self.db.execute(sql + " ORDER BY sequence", args)]

    def close(self) -> None:
        self.db.close()
