"""#15: the galleries and jobs the watchlist service kept in the state folder move into identification's own folder
at its first start, and keep working there: the moved gallery is searchable and the moved job readable."""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from lfr.galleryindex import IndexParams
from lfr.identification.gallery import Component, GalleryRecord, GalleryStore
from lfr.identification.service import migrate_from_watchlist

SMALL = IndexParams(connectivity=16, expansion_add=64, expansion_search=128, threads=1)


def _old_state(state):
    """What a system of before the split left: <state>/galleries.sqlite, galleries/, jobs.sqlite, jobs/<job>/."""
    store = GalleryStore(state / "galleries.sqlite", state / "galleries", SMALL)
    g = GalleryRecord("custody", "sface-2021dec", "v", (Component("sface-2021dec", "v", 8, "cosine"),), "records",
                      1, 0.4)
    store.create(g)
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store.index(g, g.components[0]).add(np.arange(50), x)
    store.close()
    db = sqlite3.connect(state / "jobs.sqlite")
    db.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
    db.execute("INSERT INTO jobs VALUES ('j1', ?)", (json.dumps({"job_id": "j1"}),))
    db.commit()
    db.close()
    (state / "jobs" / "j1").mkdir(parents=True)
    (state / "jobs" / "j1" / "tracks-1.json").write_text("[]")
    return g, x


def test_the_old_stores_move_once_and_keep_working(tmp_path):
    state, folder = tmp_path, tmp_path / "identification"
    g, x = _old_state(state)
    (state / "watchlist.sqlite").write_text("the watchlist's own: stays")
    moved = migrate_from_watchlist(state, folder)
    assert {"galleries", "galleries.sqlite", "jobs", "jobs.sqlite"} <= set(moved)
    assert not (state / "galleries.sqlite").exists() and not (state / "jobs").exists()
    assert (state / "watchlist.sqlite").exists()
    store = GalleryStore(folder / "galleries.sqlite", folder / "galleries", SMALL)
    assert store.names() == ["custody"]
    ids, _ = store.index(store.get("custody"), g.components[0]).search(x[7:8], 1)
    assert ids[0, 0] == 7
    store.close()
    db = sqlite3.connect(folder / "jobs.sqlite")
    assert db.execute("SELECT job_id FROM jobs").fetchall() == [("j1",)]
    db.close()
    assert (folder / "jobs" / "j1" / "tracks-1.json").is_file()
    assert migrate_from_watchlist(state, folder) == []  # the next start: nothing to move


def test_a_new_system_moves_nothing_and_a_moved_store_is_not_overwritten(tmp_path):
    folder = tmp_path / "identification"
    assert migrate_from_watchlist(tmp_path, folder) == []
    folder.mkdir()
    (folder / "jobs.sqlite").write_text("current")
    (tmp_path / "jobs.sqlite").write_text("stale copy")
    assert migrate_from_watchlist(tmp_path, folder) == []
    assert (folder / "jobs.sqlite").read_text() == "current"


def test_an_interrupted_migration_is_finished_by_the_next_start(tmp_path):
    """The database goes last: a start that stopped after moving the folder moves the database next time."""
    state, folder = tmp_path, tmp_path / "identification"
    _old_state(state)
    folder.mkdir()
    (state / "galleries").rename(folder / "galleries")  # as if stopped before the database moved
    moved = migrate_from_watchlist(state, folder)
    assert "galleries.sqlite" in moved and (folder / "galleries.sqlite").is_file()
    store = GalleryStore(folder / "galleries.sqlite", folder / "galleries", SMALL)
    assert store.names() == ["custody"]
    store.close()
