"""The gallery vector index: one gallery's vectors of one model component, searchable by similarity. A library,
so that the identification service (which owns the galleries) and `lfr bench gallery` use the same code.

One interface, two back ends (chosen by configuration):

- ``EmbeddedIndex`` (the embedded default): every vector is appended to a float32 file (the durable copy; a
  row number is the image id) and indexed by an HNSW graph from ``usearch`` kept in memory, saved now and
  then and caught up from the file at start. The graph stores 8-bit (cosine) or 16-bit (Euclidean) copies to
  navigate; the best candidates are re-scored exactly from the float32 file, so scores equal the library's.
  Vectors are added to the graph in batches on several threads (``IndexParams.threads``, default: every core);
  adds and searches release the GIL, so a long import never stalls a service's event loop.
- ``QdrantIndex`` (``LFR_QDRANT_URL`` set): one Qdrant collection per gallery and model component
  (Qdrant builds its HNSW on the server); the same calls, the same similarities.

Why not qdrant-client's local mode: it searches by brute force (far too slow at a million vectors). Why not
qdrant-edge: its in-process HNSW build holds the GIL for the whole build, which would freeze a service. Recall
and build speed are measured, not assumed: ``lfr bench gallery`` (numbers in docs/identification.md).

Similarities are the models' (``lfr.models.scoring``): cosine for SFace, 1 - Euclidean distance for dlib.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lfr.models import scoring


@dataclass(frozen=True)
class IndexParams:
    """HNSW parameters: graph degree, candidates while building, candidates while searching."""

    connectivity: int = 48
    expansion_add: int = 128
    expansion_search: int = 1536
    threads: int = 0  # threads adding a batch to the graph (0 = one per core)

    def add_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


class VectorIndex(Protocol):
    """One gallery's vectors of one model component. Ids are image ids (int64). Similarities, not distances."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, similarities), each (Q, k), best first; missing slots are id -1 and similarity -inf."""
        ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def __len__(self) -> int: ...

    def save(self) -> None: ...

    def close(self) -> None: ...


def similarity(metric: str, stored: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The model's similarity of one query (D,) against stored vectors (N, D)."""
    return scoring.similarity_matrix(metric, query, stored)[0]


class EmbeddedIndex:
    """HNSW (usearch) over an append-only float32 file; see the module doc."""

    def __init__(self, folder: str | Path, dim: int, metric: str, params: IndexParams = IndexParams()):
        from usearch.index import Index

        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"unknown metric {metric!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim, self.metric, self.params = dim, metric, params
        self.row_bytes = dim * 4
        self._vec_path = self.folder / "vectors.f32"
        self._removed_path = self.folder / "removed.i64"
        self._graph_path = self.folder / "hnsw.usearch"
        self._meta_path = self.folder / "hnsw.json"
        self._lock = threading.Lock()  # writers (add, remove, save) one at a time; searches run beside them
        self._vec_path.touch()
        size = self._vec_path.stat().st_size
        if size % self.row_bytes:  # a torn last row (a crash while appending): it was never acknowledged
            with open(self._vec_path, "r+b") as f:
                f.truncate(size - size % self.row_bytes)
        self.rows = self._vec_path.stat().st_size // self.row_bytes
        self._mm: np.ndarray | None = None
        self._index = Index(ndim=dim, metric="cos" if metric == "cosine" else "l2sq",
                            dtype="i8" if metric == "cosine" else "f16", connectivity=params.connectivity,
                            expansion_add=params.expansion_add, expansion_search=params.expansion_search)
        indexed = 0
        if self._graph_path.is_file() and self._meta_path.is_file():
            meta = json.loads(self._meta_path.read_text())
            if meta.get("dim") == dim and meta.get("metric") == metric and meta.get("rows", 0) <= self.rows:
                self._index.load(str(self._graph_path))
                indexed = int(meta["rows"])
        self._index.expansion_search = params.expansion_search
        for start in range(indexed, self.rows, 50_000):  # catch up what was added after the last save
            ids = np.arange(start, min(self.rows, start + 50_000), dtype=np.int64)
            self._index.add(ids, self._read(ids), threads=params.add_threads())
        self.removed: set[int] = set()
        if self._removed_path.is_file():
            self.removed = set(np.fromfile(self._removed_path, dtype=np.int64).tolist())
            for key in self.removed:
                if self._index.contains(key):
                    self._index.remove(key)
        self._saved_rows = indexed

    def __len__(self) -> int:
        return self.rows - len(self.removed)

    def _map(self) -> np.ndarray:
        mm = self._mm
        if mm is None or len(mm) != self.rows:
            mm = np.memmap(self._vec_path, dtype=np.float32, mode="r", shape=(self.rows, self.dim)) \
                if self.rows else np.zeros((0, self.dim), np.float32)
            self._mm = mm
        return mm

    def _read(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._map()[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append vectors whose ids continue the file (ids = rows, rows + 1, ...), durably, then index them."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        with self._lock:
            if len(ids) and not np.array_equal(ids, np.arange(self.rows, self.rows + len(ids))):
                raise ValueError(f"ids must continue the gallery: next id is {self.rows}")
            with open(self._vec_path, "ab") as f:
                f.write(vectors.tobytes())
                f.flush()
                os.fsync(f.fileno())
            self.rows += len(ids)
            self._index.add(ids, vectors, threads=self.params.add_threads())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_sim = np.full((len(queries), k), -np.inf, dtype=np.float64)
        if not len(self._index) or not len(queries):
            return out_ids, out_sim
        # The graph finds candidates on its compressed copies; the float32 vectors re-score them exactly.
        count = min(len(self._index), max(4 * k, 40))
        found = self._index.search(queries, count, threads=1)
        if hasattr(found, "counts"):  # several queries: BatchMatches
            keys, counts = np.atleast_2d(found.keys), np.atleast_1d(found.counts)
        else:  # one query: Matches
            keys, counts = np.atleast_2d(found.keys), np.array([len(found.keys)])
        mm = self._map()
        for i, q in enumerate(queries):
            cand = keys[i, : counts[i]].astype(np.int64)
            cand = cand[cand < len(mm)]
            if self.removed:
                cand = np.array([c for c in cand if int(c) not in self.removed], dtype=np.int64)
            if not len(cand):
                continue
            sims = similarity(self.metric, np.asarray(mm[cand], dtype=np.float64), q.astype(np.float64))
            order = np.argsort(-sims, kind="stable")[:k]
            out_ids[i, : len(order)] = cand[order]
            out_sim[i, : len(order)] = sims[order]
        return out_ids, out_sim

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the float32 file (the ground truth recall is measured against)."""
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        best_ids = np.full((len(queries), 0), -1, dtype=np.int64)
        best_sim = np.full((len(queries), 0), -np.inf)
        mm = self._map()
        for start in range(0, self.rows, 50_000):
            block = np.asarray(mm[start: start + 50_000], dtype=np.float32)
            sims = scoring.similarity_matrix(self.metric, queries, block)  # (Q, B)
            if self.removed:
                gone = [i - start for i in self.removed if start <= i < start + len(block)]
                sims[:, gone] = -np.inf
            take = min(k, sims.shape[1])
            top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            ids = np.concatenate([best_ids, top + start], axis=1)
            val = np.concatenate([best_sim, np.take_along_axis(sims, top, axis=1)], axis=1)
            order = np.argsort(-val, axis=1, kind="stable")[:, :k]
            best_ids, best_sim = np.take_along_axis(ids, order, axis=1), np.take_along_axis(val, order, axis=1)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_sim = np.full((len(queries), k), -np.inf)
        out_ids[:, : best_ids.shape[1]] = np.where(np.isfinite(best_sim), best_ids, -1)
        out_sim[:, : best_sim.shape[1]] = best_sim
        return out_ids, out_sim

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._read(ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64) if 0 <= int(i) < self.rows]
        with self._lock:
            with open(self._removed_path, "ab") as f:
                f.write(np.asarray(ids, dtype=np.int64).tobytes())
                f.flush()
                os.fsync(f.fileno())
            for key in ids:
                self.removed.add(key)
                if self._index.contains(key):
                    self._index.remove(key)

    def save(self, min_new_rows: int = 0) -> bool:
        """Save the graph (so a restart loads it instead of rebuilding) when enough rows are new."""
        with self._lock:
            if self.rows - self._saved_rows < max(1, min_new_rows):
                return False
            tmp = self._graph_path.with_suffix(".tmp")
            self._index.save(str(tmp))
            os.replace(tmp, self._graph_path)
            meta_tmp = self._meta_path.with_suffix(".json.tmp")
            meta_tmp.write_text(json.dumps({"rows": self.rows, "dim": self.dim, "metric": self.metric}))
            os.replace(meta_tmp, self._meta_path)
            self._saved_rows = self.rows
            return True

    def truncate(self, rows: int) -> None:
        """Forget the rows from `rows` on: vectors appended after the last committed metadata (a crash between
        the two), never acknowledged to anyone."""
        with self._lock:
            if rows >= self.rows:
                return
            for key in range(rows, self.rows):
                if self._index.contains(key):
                    self._index.remove(key)
            self._mm = None
            with open(self._vec_path, "r+b") as f:
                f.truncate(rows * self.row_bytes)
            self.rows = rows
            self._saved_rows = min(self._saved_rows, rows)
            self._saved_rows = 0
        self.save()  # the saved graph may hold them

    def set_expansion_search(self, ef: int) -> None:
        """Candidates examined per search (recall against speed); also LFR_GALLERY_EF."""
        self._index.expansion_search = int(ef)

    def memory_bytes(self) -> int:
        return int(self._index.memory_usage)

    def close(self) -> None:
        self.save(min_new_rows=1)
        self._mm = None


class QdrantIndex:
    """The same interface over a Qdrant collection (a server in production; local mode in tests)."""

    def __init__(self, client, collection: str, dim: int, metric: str, params: IndexParams = IndexParams()):
        from qdrant_client import models

        self.client, self.collection, self.dim, self.metric, self.params = client, collection, dim, metric, params
        self._models = models
        if not client.collection_exists(collection):
            distance = models.Distance(scoring.store_distance(metric))
            client.create_collection(collection, vectors_config=models.VectorParams(size=dim, distance=distance),
                                     hnsw_config=models.HnswConfigDiff(m=params.connectivity,
                                                                       ef_construct=params.expansion_add))

    def __len__(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        m = self._models
        vectors = np.asarray(vectors, dtype=np.float32)
        self.client.upsert(self.collection, points=[m.PointStruct(id=int(i), vector=v.tolist())
                                                    for i, v in zip(ids, vectors, strict=True)], wait=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = self._models
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_sim = np.full((len(queries), k), -np.inf)
        if not len(queries):
            return out_ids, out_sim
        reqs = [m.QueryRequest(query=q.tolist(), limit=k, params=m.SearchParams(hnsw_ef=self.params.expansion_search))
                for q in queries]
        for i, r in enumerate(self.client.query_batch_points(self.collection, requests=reqs)):
            for j, p in enumerate(r.points):
                out_ids[i, j] = int(p.id)
                out_sim[i, j] = scoring.similarity_from_hit(self.metric, p.score)
        return out_ids, out_sim

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        recs = {int(r.id): r.vector for r in self.client.retrieve(self.collection, [int(i) for i in ids],
                                                                 with_vectors=True)}
        return np.array([recs[int(i)] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    def remove(self, ids: np.ndarray) -> None:
        self.client.delete(self.collection, points_selector=self._models.PointIdsList(points=[int(i) for i in ids]),
                           wait=True)

    def save(self, min_new_rows: int = 0) -> bool:
        return False  # the server persists

    def close(self) -> None:
        pass
