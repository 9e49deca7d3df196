"""Vectors in Qdrant: local mode under a folder by default, a server by URL in production. One collection per
embedding model version (collection_name); every point carries the deployment id, so a search never crosses
deployments and a purge deletes a deployment's points by that id. Local mode overwrites deleted points on disk
(SQLite secure_delete, then VACUUM).

The watchlist service owns the store that uses it (services/watchlist/store.py); a library so that benchmarks
can fill a stopped system's store without importing a service.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from qdrant_client import QdrantClient, models

from lfr.models import scoring


def collection_name(model_id: str, version: str) -> str:
    return "lfr_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{model_id}_{version}")


class VectorIndex:
    """Qdrant: local mode under the state dir by default, a server by URL in production."""

    def __init__(self, path: str | Path | None = None, url: str = "", api_key: str = ""):
        self.local = not url
        self.path = Path(path) if path is not None and not url else None
        if url:
            self.client = QdrantClient(url=url, api_key=api_key or None)
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))
            self._durable_meta()  # a new store's first meta.json too
        self._known: set[str] = set()
        self._secure_local()

    def _local_db(self, name: str):
        """Local mode keeps each collection's points (pickled vectors and payloads) in a SQLite file; its
        connection, reached through qdrant-client's local internals (checked by tests/unit/test_watchlist_store.py)."""
        collections = getattr(getattr(self.client, "_client", None), "collections", {})
        return getattr(getattr(collections.get(name), "storage", None), "storage", None)

    def _durable_meta(self) -> None:
        """Local mode writes meta.json (every collection's settings) without fsync: a power loss or a file-system
        error within a second of a new store or a collection's creation left it empty on disk (ext4, measured),
        and the store would not open again. Its data and its folder's entry are flushed after each such change."""
        if self.path is None:
            return
        for target, flags in ((self.path / "meta.json", os.O_RDONLY), (self.path, os.O_RDONLY | os.O_DIRECTORY)):
            fd = os.open(target, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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
            self._durable_meta()
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
