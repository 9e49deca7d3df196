"""The audit index (SQLite by default). Only the audit service writes it. Records are unique per stream
message, so a redelivery after a restart never duplicates a record."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from lfr.audit.core import RecordData

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  sequence INTEGER PRIMARY KEY AUTOINCREMENT,
  source TEXT NOT NULL UNIQUE,
  time_ns INTEGER NOT NULL, type TEXT NOT NULL, actor TEXT, deployment_id TEXT, subject TEXT,
  payload_digest TEXT NOT NULL, summary_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_deployment ON records(deployment_id, sequence);
"""


class AuditStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def append(self, source: str, r: RecordData) -> bool:
        """Append once per source (stream name + sequence); False if already recorded."""
        with self.lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO records (source, time_ns, type, actor, deployment_id, subject, payload_digest,"
                " summary_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (source, r.time_ns, r.type, r.actor, r.deployment_id, r.subject, r.payload_digest, r.summary_json))
            return cur.rowcount == 1

    def query(self, deployment_id: str = "", type_prefix: str = "", after: int = 0, limit: int = 1000) -> list[dict]:
        sql = "SELECT * FROM records WHERE sequence > ?"
        args: list = [after]
        if deployment_id:
            sql += " AND deployment_id = ?"
            args.append(deployment_id)
        if type_prefix:
            sql += " AND type LIKE ?"
            args.append(type_prefix.replace("%", "") + "%")
        sql += " ORDER BY sequence LIMIT ?"
        args.append(limit)
        cur = self.db.execute(sql, args)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur]

    def close(self) -> None:
        self.db.close()
