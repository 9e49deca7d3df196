"""Storage owned by the watchlist service: deployment, entry and reference metadata in SQLite, watchlist and
reference images in a file store, vectors in Qdrant.

Only this service talks to Qdrant. One collection per embedding model version; every point carries the
deployment id so a search never crosses deployments, and a purge deletes a deployment's points by that id.
Images are kept because a watchlist must be re-embedded from its reference images when the model changes;
a deployment's copies are deleted by its purge (the reference collection keeps its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path

from qdrant_client import QdrantClient, models

from lfr.models import scoring
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


def collection_name(model_id: str, version: str) -> str:
    return "lfr_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{model_id}_{version}")


class VectorIndex:
    """Qdrant: local mode under the state dir by default, a server by URL in production."""

    def __init__(self, path: str | Path | None = None, url: str = "", api_key: str = ""):
        self.local = not url
        if url:
            self.client = QdrantClient(url=url, api_key=api_key or None)
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))
        self._known: set[str] = set()
        self._secure_local()

    def _local_db(self, name: str):
        """Local mode keeps each collection's points (pickled vectors and payloads) in a SQLite file; its
        connection, reached through qdrant-client's local internals (checked by tests/unit/test_watchlist_store.py)."""
        collections = getattr(getattr(self.client, "_client", None), "collections", {})
        return getattr(getattr(collections.get(name), "storage", None), "storage", None)

    def _secure_local(self) -> None:
        """SQLite leaves a deleted row's bytes in free pages: with secure_delete they are overwritten with zeros,
        so a purged vector is not left in the file. Applied to every local collection's connection."""
        if not self.local:
            return
        for name in self._collections():
            db = self._local_db(name)
            if db is None:
                raise RuntimeError(f"Qdrant local mode: cannot reach the storage of {name} to secure deletes")
            db.execute("PRAGMA secure_delete = ON")

    def ensure_collection(self, name: str, dim: int, metric: str) -> None:
        if name in self._known:
            return
        if not self.client.collection_exists(name):
            distance = models.Distance(scoring.store_distance(metric))
            self.client.create_collection(name, vectors_config=models.VectorParams(size=dim, distance=distance))
            self.client.create_payload_index(name, "deployment_id", models.PayloadSchemaType.KEYWORD)
            self.client.create_payload_index(name, "entry_id", models.PayloadSchemaType.KEYWORD)
            self._secure_local()
        self._known.add(name)

    def upsert(self, name: str, vectors: list[list[float]], payload: dict) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in vectors]
        self.client.upsert(name, points=[
            models.PointStruct(id=i, vector=v, payload=payload) for i, v in zip(ids, vectors, strict=True)
        ], wait=True)
        return ids

    def search(self, name: str, queries: list[list[float]], deployment_id: str, k: int) -> list[list[tuple[dict, float]]]:
        """Per query: (payload, raw Qdrant score) best first."""
        if not self.client.collection_exists(name):
            return [[] for _ in queries]
        flt = models.Filter(must=[models.FieldCondition(key="deployment_id",
                                                        match=models.MatchValue(value=deployment_id))])
        requests = [models.QueryRequest(query=q, filter=flt, limit=k, with_payload=True) for q in queries]
        responses = self.client.query_batch_points(name, requests=requests)
        return [[(p.payload, p.score) for p in r.points] for r in responses]

    def search_entries(self, name: str, query: list[float], deployment_id: str, entry_ids: list[str]
                       ) -> list[tuple[dict, float]]:
        """(payload, raw Qdrant score) of every vector of the given entries, best first (a fused model scores a
        candidate one engine found with the other engines too)."""
        if not self.client.collection_exists(name) or not entry_ids:
            return []
        flt = models.Filter(must=[
            models.FieldCondition(key="deployment_id", match=models.MatchValue(value=deployment_id)),
            models.FieldCondition(key="entry_id", match=models.MatchAny(any=list(entry_ids)))])
        limit = self.client.count(name, count_filter=flt, exact=True).count
        if not limit:
            return []
        r = self.client.query_points(name, query=query, query_filter=flt, limit=limit, with_payload=True)
        return [(p.payload, p.score) for p in r.points]

    def vectors_of(self, name: str, deployment_id: str) -> list[tuple[dict, list[float]]]:
        """(payload, vector) of every point of a deployment in a collection."""
        if not self.client.collection_exists(name):
            return []
        flt = models.Filter(must=[models.FieldCondition(key="deployment_id",
                                                        match=models.MatchValue(value=deployment_id))])
        out, offset = [], None
        while True:
            points, offset = self.client.scroll(name, scroll_filter=flt, limit=1000, offset=offset,
                                                with_payload=True, with_vectors=True)
            out += [(p.payload, p.vector) for p in points]
            if offset is None:
                return out

    def count(self, name: str, deployment_id: str) -> int:
        if not self.client.collection_exists(name):
            return 0
        flt = models.Filter(must=[models.FieldCondition(key="deployment_id",
                                                        match=models.MatchValue(value=deployment_id))])
        return self.client.count(name, count_filter=flt, exact=True).count

    def _collections(self) -> list[str]:
        return [c.name for c in self.client.get_collections().collections if c.name.startswith("lfr_")]

    def count_deployment(self, deployment_id: str) -> int:
        """How many points of a deployment are in Qdrant, in every collection."""
        return sum(self.count(name, deployment_id) for name in self._collections())

    def delete_points(self, deployment_id: str, entry_id: str = "") -> int:
        """Delete a deployment's points (or one entry's) from every collection; returns how many there were."""
        conds = [models.FieldCondition(key="deployment_id", match=models.MatchValue(value=deployment_id))]
        if entry_id:
            conds.append(models.FieldCondition(key="entry_id", match=models.MatchValue(value=entry_id)))
        flt = models.Filter(must=conds)
        deleted = 0
        for name in self._collections():
            n = self.client.count(name, count_filter=flt, exact=True).count
            if n:
                self.client.delete(name, points_selector=models.FilterSelector(filter=flt), wait=True)
                deleted += n
                if self.local:  # zeroed already (secure_delete); VACUUM also gives the pages back
                    self._local_db(name).execute("VACUUM")
        return deleted

    def close(self) -> None:
        self.client.close()
