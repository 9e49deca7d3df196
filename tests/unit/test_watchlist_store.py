"""Qdrant local mode: a purged watchlist leaves no vector or payload bytes in the collection's SQLite file."""

from __future__ import annotations

import sqlite3
import struct

import pytest

from lfr.vectorindex import VectorIndex


def _file_bytes(root) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def sqlite_without_secure_delete(monkeypatch):
    """Many SQLite builds (not Debian's) leave deleted rows' bytes in free pages by default: make this one do so."""
    import qdrant_client.local.persistence as persistence

    real = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(persistence.sqlite3, "connect", connect)


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect")
def test_purged_points_are_not_left_in_the_local_files(tmp_path, sqlite_without_secure_delete):
    index = VectorIndex(tmp_path / "qdrant")
    index.ensure_collection("lfr_test_v1", 4, "cosine")
    marker = 0.7071067811865476  # a value whose 8 bytes we can look for
    index.upsert("lfr_test_v1", [[marker, 0.1, 0.2, 0.3]], {"deployment_id": "dep-1", "entry_id": "ENTRY-SECRET-7"})
    index.upsert("lfr_test_v1", [[0.3, 0.2, 0.1, 0.9]], {"deployment_id": "dep-2", "entry_id": "ENTRY-KEPT-9"})
    index.close()
    index = VectorIndex(tmp_path / "qdrant")  # reopened, as after a restart: the setting is applied again
    before = _file_bytes(tmp_path / "qdrant")
    assert b"ENTRY-SECRET-7" in before and (struct.pack("<d", marker) in before or struct.pack(">d", marker) in before)
    assert index.delete_points("dep-1") == 1
    index.close()
    after = _file_bytes(tmp_path / "qdrant")
    assert b"ENTRY-SECRET-7" not in after
    assert struct.pack("<d", marker) not in after and struct.pack(">d", marker) not in after
    assert b"ENTRY-KEPT-9" in after  # the other deployment's point is still there
