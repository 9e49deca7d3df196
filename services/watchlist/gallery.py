"""Galleries: large, searchable sets of reference images (e.g. a force's custody images) for operator-initiated
and retrospective identification. Storage only; the watchlist service decides who may search and records it.

One storage interface, two back ends (chosen by configuration, like the watchlists' Qdrant):

- ``EmbeddedIndex`` (the embedded default): every vector is appended to a float32 file (the durable copy; a
  row number is the image id) and indexed by an HNSW graph from ``usearch`` kept in memory, saved now and
  then and caught up from the file at start. The graph stores 8-bit (cosine) or 16-bit (Euclidean) copies to
  navigate; the best candidates are re-scored exactly from the float32 file, so scores equal the library's.
  Adds and searches release the GIL, so a long import never stalls the service's event loop.
- ``QdrantIndex`` (``LFR_QDRANT_URL`` set): one Qdrant collection per gallery and model component
  (Qdrant builds its HNSW on the server); the same calls, the same similarities.

Why not qdrant-client's local mode: it searches by brute force (about 65 ms at 100 k vectors, far worse at
1 M). Why not qdrant-edge: its in-process HNSW build (``optimize``) holds the GIL for the whole build
(minutes at 1 M), which would freeze a service. Recall is measured, not assumed: ``lfr bench gallery``.

Similarities are the models' (``lfr.models.scoring``): cosine for SFace, 1 - Euclidean distance for dlib. Metadata (galleries, images, provenance) lives in SQLite beside the vectors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lfr.models import scoring

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_gallery_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ValueError("a gallery name is 1-64 letters, digits, '-' or '_'")
    return name


@dataclass(frozen=True)
class IndexParams:
    """HNSW parameters: graph degree, candidates while building, candidates while searching."""

    connectivity: int = 48
    expansion_add: int = 128
    expansion_search: int = 1536
    threads: int = 2  # threads used while adding a batch


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
            self._index.add(ids, self._read(ids), threads=params.threads)
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
            self._index.add(ids, vectors, threads=self.params.threads)

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


# Metadata --------------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS galleries (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gallery_images (
  gallery TEXT NOT NULL, image_id INTEGER NOT NULL, subject_ref TEXT NOT NULL, sha256 TEXT NOT NULL,
  record TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (gallery, image_id)
);
CREATE INDEX IF NOT EXISTS gallery_images_by_sha ON gallery_images(gallery, sha256);
CREATE INDEX IF NOT EXISTS gallery_images_by_subject ON gallery_images(gallery, subject_ref);
"""


@dataclass(frozen=True)
class Component:
    model_id: str
    version: str
    dim: int
    metric: str


@dataclass(frozen=True)
class GalleryRecord:
    name: str
    model_id: str
    model_version: str
    components: tuple[Component, ...]
    created_by: str
    created_at_ns: int
    default_threshold: float
    # Bumped by each re-embedding (#17): the new model's index is built beside the old one (its own folder or
    # collection), so a gallery swaps to it only when it is complete.
    generation: int = 0


@dataclass(frozen=True)
class ImageRow:
    image_id: int
    subject_ref: str
    sha256: str
    file: str
    captured_ns: int
    source_system: str
    legal_basis: str
    added_by: str
    added_at_ns: int
    faces_found: int


class GalleryStore:
    """Gallery and image metadata (SQLite), and one vector index per gallery and component."""

    def __init__(self, db_path: str | Path, folder: str | Path, params: IndexParams = IndexParams(),
                 qdrant_client=None):
        self.db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.folder = Path(folder)
        self.params = params
        self.qdrant = qdrant_client
        self.lock = threading.Lock()
        self._indexes: dict[tuple[str, str], VectorIndex] = {}

    # Galleries -------------------------------------------------------------------------------------------
    def get(self, name: str) -> GalleryRecord | None:
        row = self.db.execute("SELECT record FROM galleries WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["components"] = tuple(Component(**c) for c in data["components"])
        return GalleryRecord(**data)

    def create(self, g: GalleryRecord) -> None:
        with self.lock:
            self.db.execute("INSERT INTO galleries VALUES (?, ?)", (g.name, json.dumps(dataclasses.asdict(g))))

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM galleries ORDER BY rowid")]

    def _collection(self, g: GalleryRecord, c: Component) -> str:
        return "lfrg_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{g.name}_{c.model_id}_{c.version}") + (
            f"_g{g.generation}" if g.generation else "")

    def _index_folder(self, g: GalleryRecord, c: Component) -> Path:
        """<gallery>/<model> (generation 0), <gallery>/@<n>/<model> after the n-th re-embedding ('@' is never in a
        model's folder name)."""
        base = self.folder / g.name / (f"@{g.generation}" if g.generation else "")
        return base / re.sub(r"[^A-Za-z0-9_.-]", "_", c.model_id)

    def index(self, g: GalleryRecord, c: Component) -> VectorIndex:
        key = (g.name, g.generation, c.model_id)
        idx = self._indexes.get(key)
        if idx is None:
            with self.lock:
                idx = self._indexes.get(key)
                if idx is None:
                    if self.qdrant is not None:
                        idx = QdrantIndex(self.qdrant, self._collection(g, c), c.dim, c.metric, self.params)
                    else:
                        idx = EmbeddedIndex(self._index_folder(g, c), c.dim, c.metric, self.params)
                    self._indexes[key] = idx
        return idx

    def drop_indexes(self, g: GalleryRecord) -> None:
        """Delete a generation's vectors (a replaced index, or an unfinished re-embedding's)."""
        import shutil

        for c in g.components:
            with self.lock:
                idx = self._indexes.pop((g.name, g.generation, c.model_id), None)
            if self.qdrant is not None:
                coll = self._collection(g, c)
                if self.qdrant.collection_exists(coll):
                    self.qdrant.delete_collection(coll)
            else:
                if idx is not None:
                    idx._mm = None  # no save: the folder goes
                shutil.rmtree(self._index_folder(g, c), ignore_errors=True)
        if g.generation and self.qdrant is None:
            with contextlib.suppress(OSError):
                (self.folder / g.name / f"@{g.generation}").rmdir()

    def drop_generation(self, name: str, generation: int) -> None:
        """Delete an unfinished re-embedding's index (whatever its model: the folder or collections of that
        generation)."""
        import shutil

        with self.lock:
            dropped = [self._indexes.pop(k) for k in [k for k in self._indexes if k[:2] == (name, generation)]]
        for idx in dropped:
            if isinstance(idx, EmbeddedIndex):
                idx._mm = None
        if self.qdrant is not None:
            names = {idx.collection for idx in dropped if isinstance(idx, QdrantIndex)}
            if not names:  # not opened by this process: that generation's collections of this gallery only
                prefix = "lfrg_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{name}_")
                others = ["lfrg_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{n}_") for n in self.names() if n != name]
                gen = re.compile(r"_g[0-9]+$")
                names = {c.name for c in self.qdrant.get_collections().collections
                         if c.name.startswith(prefix) and not any(o.startswith(prefix) and c.name.startswith(o)
                                                                  for o in others)
                         and (c.name.endswith(f"_g{generation}") if generation else not gen.search(c.name))}
            for coll in names:
                if self.qdrant.collection_exists(coll):
                    self.qdrant.delete_collection(coll)
        elif generation:
            shutil.rmtree(self.folder / name / f"@{generation}", ignore_errors=True)
        elif (self.folder / name).is_dir():  # generation 0: <gallery>/<model> folders (not images/, not @n/)
            for sub in (self.folder / name).iterdir():
                if sub.is_dir() and sub.name != "images" and not sub.name.startswith("@"):
                    shutil.rmtree(sub, ignore_errors=True)

    def replace(self, g: GalleryRecord) -> None:
        """The gallery's record now names another model and generation (a completed re-embedding)."""
        with self.lock:
            self.db.execute("UPDATE galleries SET record = ? WHERE name = ?",
                            (json.dumps(dataclasses.asdict(g)), g.name))

    # Images ----------------------------------------------------------------------------------------------
    def next_image_id(self, name: str) -> int:
        row = self.db.execute("SELECT MAX(image_id) FROM gallery_images WHERE gallery = ?", (name,)).fetchone()
        return 0 if row[0] is None else row[0] + 1

    def put_images(self, name: str, rows: list[ImageRow]) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO gallery_images (gallery, image_id, subject_ref, sha256, record) "
                                "VALUES (?, ?, ?, ?, ?)",
                                [(name, r.image_id, r.subject_ref, r.sha256, json.dumps(dataclasses.asdict(r)))
                                 for r in rows])
            self.db.execute("COMMIT")

    def images(self, name: str, ids: list[int]) -> dict[int, ImageRow]:
        out = {}
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start: start + 500]]
            q = ",".join("?" * len(chunk))
            for rec, deleted in self.db.execute(
                    f"SELECT record, deleted FROM gallery_images WHERE gallery = ? AND image_id IN ({q})",
                    (name, *chunk)):
                if not deleted:
                    r = ImageRow(**json.loads(rec))
                    out[r.image_id] = r
        return out

    def known_sha256(self, name: str, digests: list[str]) -> set[str]:
        out = set()
        for start in range(0, len(digests), 500):
            chunk = digests[start: start + 500]
            q = ",".join("?" * len(chunk))
            out |= {r[0] for r in self.db.execute(
                f"SELECT sha256 FROM gallery_images WHERE gallery = ? AND deleted = 0 AND sha256 IN ({q})",
                (name, *chunk))}
        return out

    def counts(self, name: str) -> tuple[int, int]:
        """(images, subjects) of a gallery."""
        images, subjects = self.db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT subject_ref) FROM gallery_images WHERE gallery = ? AND deleted = 0",
            (name,)).fetchone()
        return images, subjects

    def truncate_vectors(self, g: GalleryRecord) -> None:
        """At start: vectors appended after the last committed image (a crash between the two) are dropped."""
        n = self.next_image_id(g.name)
        for c in g.components:
            idx = self.index(g, c)
            if isinstance(idx, EmbeddedIndex):
                idx.truncate(n)

    def save_all(self, min_new_rows: int = 0) -> None:
        for idx in list(self._indexes.values()):
            idx.save(min_new_rows)

    def close(self) -> None:
        for idx in self._indexes.values():
            idx.close()
        self._indexes.clear()
        self.db.close()
