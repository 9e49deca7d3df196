"""Storage owned by the watchlist service: deployment, entry and reference metadata in SQLite, watchlist and
reference images in a file store, vectors in Qdrant.

Only this service talks to Qdrant (through lfr.vectorindex). One collection per embedding model version; every
point carries the deployment id so a search never crosses deployments, and a purge deletes a deployment's points
by that id.
Images are kept because a watchlist must be re-embedded from its reference images when the model changes;
a deployment's copies are deleted by its purge (the reference collection keeps its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path

from lfr.watchlist.core import Approval, DeploymentRecord, EntryRecord, ImageRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS watchlist_entries (
  entry_id TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS watchlist_entries_by_deployment ON watchlist_entries(deployment_id);
CREATE TABLE IF NOT EXISTS reference_subjects (subject_ref TEXT PRIMARY KEY, record TEXT NOT NULL);
"""


def _deployment_from_json(text: str) -> DeploymentRecord:
    data = json.loads(text)
    fields = {f.name for f in dataclasses.fields(DeploymentRecord)}
    data = {k: v for k, v in data.items() if k in fields}
    for key in ("cameras", "builders", "second_reasons", "equitability_attributes"):
        if key in data:
            data[key] = tuple(data[key])
    data["approvals"] = tuple(Approval(**a) for a in data.get("approvals", ()))
    return DeploymentRecord(**data)


def _entry_from_json(text: str) -> EntryRecord:
    data = json.loads(text)
    data["images"] = tuple(ImageRecord(**i) for i in data["images"])
    return EntryRecord(**data)


class MetadataStore:
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA secure_delete=ON")  # purged metadata is overwritten, not left in free pages
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()  # re-entrant: a transaction (lfr.runtime.outbox) spans several writes

    # Deployments -----------------------------------------------------------------------------------
    def put_deployment(self, d: DeploymentRecord) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO deployments VALUES (?, ?)",
                            (d.id, json.dumps(dataclasses.asdict(d))))

    def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        row = self.db.execute("SELECT record FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        return None if row is None else _deployment_from_json(row[0])

    def list_deployments(self) -> list[DeploymentRecord]:
        return [_deployment_from_json(r[0]) for r in self.db.execute("SELECT record FROM deployments ORDER BY rowid")]

    # Watchlist entries -----------------------------------------------------------------------------
    def put_entry(self, e: EntryRecord) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO watchlist_entries VALUES (?, ?, ?)",
                            (e.entry_id, e.deployment_id, json.dumps(dataclasses.asdict(e))))

    def delete_entry(self, entry_id: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM watchlist_entries WHERE entry_id = ?", (entry_id,))

    def entries(self, deployment_id: str) -> list[EntryRecord]:
        cur = self.db.execute("SELECT record FROM watchlist_entries WHERE deployment_id = ? ORDER BY rowid",
                              (deployment_id,))
        return [_entry_from_json(r[0]) for r in cur]

    def entry_count(self, deployment_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM watchlist_entries WHERE deployment_id = ?",
                               (deployment_id,)).fetchone()[0]

    # Reference collection --------------------------------------------------------------------------
    def put_reference(self, subject_ref: str, record: dict) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO reference_subjects VALUES (?, ?)",
                            (subject_ref, json.dumps(record)))

    def get_reference(self, subject_ref: str) -> dict | None:
        row = self.db.execute("SELECT record FROM reference_subjects WHERE subject_ref = ?",
                              (subject_ref,)).fetchone()
        return None if row is None else json.loads(row[0])

    def references(self) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT record FROM reference_subjects ORDER BY rowid")]

    def close(self) -> None:
        self.db.close()


class ImageStore:
    """Image files under one folder: `watchlists/<deployment>/<name>` (a deployment's copies, purged with it)
    and `reference/<name>` (the reference collection)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "watchlists").mkdir(parents=True, exist_ok=True)
        (self.root / "reference").mkdir(parents=True, exist_ok=True)

    def _folder(self, deployment_id: str | None) -> Path:
        return self.root / "reference" if deployment_id is None else self.root / "watchlists" / deployment_id

    def put(self, deployment_id: str | None, data: bytes) -> str:
        folder = self._folder(deployment_id)
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex + ".img"
        tmp = folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / name)
        return name

    def read(self, deployment_id: str | None, name: str) -> bytes:
        return (self._folder(deployment_id) / name).read_bytes()

    def delete(self, deployment_id: str | None, name: str) -> None:
        (self._folder(deployment_id) / name).unlink(missing_ok=True)

    def count(self, deployment_id: str) -> int:
        folder = self._folder(deployment_id)
        return sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0

    def delete_deployment(self, deployment_id: str) -> int:
        """Delete every image of a deployment's watchlist; returns how many files there were."""
        n = self.count(deployment_id)
        shutil.rmtree(self._folder(deployment_id), ignore_errors=True)
        return n
