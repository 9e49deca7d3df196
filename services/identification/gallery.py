"""Gallery metadata owned by the identification service: galleries (name, model, generation), their images'
provenance (SQLite), and one vector index per gallery and model component (`lfr.galleryindex`: the embedded HNSW
or a Qdrant server)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from lfr.galleryindex import EmbeddedIndex, IndexParams, QdrantIndex, VectorIndex

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_gallery_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ValueError("a gallery name is 1-64 letters, digits, '-' or '_'")
    return name



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
