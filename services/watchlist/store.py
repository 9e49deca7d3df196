"""Storage owned by the watchlist service: deployment/entry metadata in SQLite, vectors in Qdrant.

Only this service talks to Qdrant. One collection per embedding model version; every point carries the
deployment id so a search never crosses deployments. No image is stored here.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from pathlib import Path

from qdrant_client import QdrantClient, models

from lfr.watchlist.core import DeploymentRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
  entry_id TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, subject_ref TEXT NOT NULL, category INTEGER NOT NULL,
  source_system TEXT, legal_basis TEXT, vectors INTEGER NOT NULL, added_by TEXT, added_at_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_deployment ON entries(deployment_id);
"""


class MetadataStore:
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def put_deployment(self, d: DeploymentRecord) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO deployments VALUES (?, ?)", (d.id, json.dumps(d.__dict__)))

    def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        row = self.db.execute("SELECT record FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["cameras"] = tuple(data["cameras"])
        return DeploymentRecord(**data)

    def list_deployments(self) -> list[DeploymentRecord]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM deployments ORDER BY rowid")]
        return [self.get_deployment(i) for i in ids]

    def add_entry(self, entry: dict) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO entries VALUES (:entry_id, :deployment_id, :subject_ref, :category, :source_system,"
                " :legal_basis, :vectors, :added_by, :added_at_ns)", entry)

    def entries(self, deployment_id: str) -> list[dict]:
        cur = self.db.execute("SELECT * FROM entries WHERE deployment_id = ? ORDER BY rowid", (deployment_id,))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur]

    def entry_count(self, deployment_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries WHERE deployment_id = ?", (deployment_id,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()


def collection_name(model_id: str, version: str) -> str:
    return "lfr_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{model_id}_{version}")


class VectorIndex:
    """Qdrant: local mode under the state dir by default, a server by URL in production."""

    def __init__(self, path: str | Path | None = None, url: str = "", api_key: str = ""):
        if url:
            self.client = QdrantClient(url=url, api_key=api_key or None)
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))
        self._known: set[str] = set()

    def ensure_collection(self, name: str, dim: int, metric: str) -> None:
        if name in self._known:
            return
        if not self.client.collection_exists(name):
            distance = models.Distance.COSINE if metric == "cosine" else models.Distance.EUCLID
            self.client.create_collection(name, vectors_config=models.VectorParams(size=dim, distance=distance))
            self.client.create_payload_index(name, "deployment_id", models.PayloadSchemaType.KEYWORD)
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

    def count(self, name: str, deployment_id: str) -> int:
        if not self.client.collection_exists(name):
            return 0
        flt = models.Filter(must=[models.FieldCondition(key="deployment_id",
                                                        match=models.MatchValue(value=deployment_id))])
        return self.client.count(name, count_filter=flt, exact=True).count

    def close(self) -> None:
        self.client.close()
