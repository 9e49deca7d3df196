"""The gallery index (embedded HNSW and the Qdrant back end behind one interface), the gallery metadata, and the
pure cores of operator-initiated identification and of retrospective jobs (ranking, face choice, tracking)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfr.galleryindex import EmbeddedIndex, IndexParams, QdrantIndex
from lfr.identification import jobs as J
from lfr.identification.gallery import Component, GalleryRecord, GalleryStore, ImageRow, check_gallery_name
from lfr.identification.identify import NO_FACE, SEARCHED, SEVERAL, choose_face, rank, validate_identify
from lfr.pb import identification_pb2 as pb

SMALL = IndexParams(connectivity=16, expansion_add=64, expansion_search=128, threads=1)


def unit(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# The embedded index -----------------------------------------------------------------------------------------
def test_embedded_index_finds_what_exact_search_finds_and_scores_like_the_engine(tmp_path):
    x = unit(2000)
    idx = EmbeddedIndex(tmp_path / "g", 32, "cosine", SMALL)
    idx.add(np.arange(0, 1500), x[:1500])
    idx.add(np.arange(1500, 2000), x[1500:])
    q = x[:50] + 0.05 * unit(50, seed=1)
    ids, sims = idx.search(q, 10)
    exact_ids, exact_sims = idx.exact_search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids, strict=True)])
    assert recall >= 0.98
    assert (ids[:, 0] == np.arange(50)).all()
    # exact re-scoring: the similarity is the cosine of the stored float32 vectors
    np.testing.assert_allclose(sims[:, 0], (x[:50] * q).sum(1) / 1.0, rtol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-12).all()  # best first
    with pytest.raises(ValueError, match="continue"):
        idx.add(np.array([5]), x[:1])


def test_euclidean_similarity_is_one_minus_distance(tmp_path):
    x = np.random.default_rng(2).standard_normal((300, 16)).astype(np.float32) * 0.1
    idx = EmbeddedIndex(tmp_path / "d", 16, "euclidean", SMALL)
    idx.add(np.arange(300), x)
    ids, sims = idx.search(x[7:8] + 0.01, 3)
    assert ids[0, 0] == 7
    assert sims[0, 0] == pytest.approx(1 - np.linalg.norm(x[7] - (x[7] + 0.01)), rel=1e-5)


def test_restart_loads_the_saved_graph_catches_up_and_drops_a_torn_row(tmp_path):
    x = unit(600)
    idx = EmbeddedIndex(tmp_path / "g", 32, "cosine", SMALL)
    idx.add(np.arange(400), x[:400])
    assert idx.save()
    idx.add(np.arange(400, 600), x[400:])  # not saved: the next start adds these from the vector file
    idx.remove(np.array([3]))
    idx._mm = None
    with open(idx._vec_path, "ab") as f:  # a crash in the middle of an append
        f.write(b"\x00" * 10)
    again = EmbeddedIndex(tmp_path / "g", 32, "cosine", SMALL)
    assert again.rows == 600 and len(again) == 599
    ids, _ = again.search(x[[3, 450]], 1)
    assert ids[0, 0] != 3 and ids[1, 0] == 450


@pytest.mark.filterwarnings("ignore:Local mode performs exact")
def test_qdrant_back_end_answers_like_the_embedded_one(tmp_path):
    from qdrant_client import QdrantClient

    x = unit(300)
    client = QdrantClient(path=str(tmp_path / "q"))  # local mode stands in for a server: same calls
    try:
        q_idx = QdrantIndex(client, "lfrg_test", 32, "cosine", SMALL)
        e_idx = EmbeddedIndex(tmp_path / "e", 32, "cosine", SMALL)
        for idx in (q_idx, e_idx):
            idx.add(np.arange(300), x)
        probes = x[:5] + 0.1 * unit(5, seed=3)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)  # engine vectors are unit (Qdrant normalises)
        (qi, qs), (ei, es) = q_idx.search(probes, 5), e_idx.search(probes, 5)
        assert (qi == ei).all()
        np.testing.assert_allclose(qs, es, rtol=1e-4)
        np.testing.assert_allclose(q_idx.vectors(np.array([4, 2])), x[[4, 2]], rtol=1e-6)
        q_idx.remove(np.array([0]))
        assert len(q_idx) == 299 and q_idx.search(x[:1], 1)[0][0, 0] != 0
    finally:
        client.close()


def test_gallery_store_metadata_and_crash_between_vectors_and_metadata(tmp_path):
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "g", SMALL)
    g = GalleryRecord("custody", "sface-2021dec", "v", (Component("sface-2021dec", "v", 32, "cosine"),), "records",
                      1, 0.467)
    store.create(g)
    idx = store.index(g, g.components[0])
    x = unit(3)
    idx.add(np.arange(3), x)
    store.put_images("custody", [ImageRow(i, f"S{i % 2}", f"sha{i}", f"{i}.img", 0, "custody", "PACE", "r", 1, 1)
                                 for i in range(2)])  # the third image's metadata never committed
    assert store.counts("custody") == (2, 2)
    assert store.known_sha256("custody", ["sha0", "sha9"]) == {"sha0"}
    assert set(store.images("custody", [0, 1, 2])) == {0, 1}
    store.close()
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "g", SMALL)
    g = store.get("custody")
    store.truncate_vectors(g)
    assert store.index(g, g.components[0]).rows == 2 and store.next_image_id("custody") == 2
    store.close()


def test_gallery_names():
    assert check_gallery_name("custody-2025_a") == "custody-2025_a"
    for bad in ("", "a b", "x" * 65, "../etc"):
        with pytest.raises(ValueError):
            check_gallery_name(bad)


# Operator-initiated identification ---------------------------------------------------------------------------
def test_face_choice():
    assert choose_face(0, 0)[0] == NO_FACE
    assert choose_face(1, 0)[:2] == (SEARCHED, 0)
    outcome, index, message = choose_face(3, 0)
    assert outcome == SEVERAL and index == -1 and "3 faces" in message
    assert choose_face(3, 2)[:2] == (SEARCHED, 1)
    assert choose_face(2, 5)[0] == -1


def test_ranking_one_candidate_per_subject_threshold_and_investigation_mode():
    hits = [("A", 0.9, {"image_id": 1}), ("A", 0.95, {"image_id": 2}), ("B", 0.3, {"image_id": 3}),
            ("C", 0.5, {"image_id": 4})]
    ranked = rank(hits, 10, 0.45, investigation=True)
    assert [(r.key, r.info["image_id"], r.above) for r in ranked] == [("A", 2, True), ("C", 4, True), ("B", 3, False)]
    assert [r.key for r in rank(hits, 10, 0.6, investigation=False)] == ["A"]
    assert [r.key for r in rank(hits, 2, 0.0, investigation=True)] == ["A", "C"]


def test_identify_request_checks():
    ok = pb.IdentifyRequest(image=b"x", gallery="g", case_reference="C", justification="why", actor="PC")
    assert validate_identify(ok) == ""
    for change, needle in (({"case_reference": ""}, "case_reference"), ({"justification": " "}, "justification"),
                           ({"actor": ""}, "actor"), ({"k": 101}, "k"), ({"image": b""}, "image")):
        r = pb.IdentifyRequest()
        r.CopyFrom(ok)
        for k, v in change.items():
            setattr(r, k, v)
        assert needle in validate_identify(r)
    assert "target" in validate_identify(pb.IdentifyRequest(image=b"x", case_reference="C", justification="w",
                                                             actor="a"))


def test_central_face_rule_is_the_library_rule():
    from lfr.models.face_choice import central_index

    boxes = [(0, 0, 30, 30), (40, 40, 80, 80), (45, 45, 60, 60)]
    assert central_index(120, 120, boxes) == 1  # the largest box holding the centre
    assert central_index(400, 100, [(0, 0, 10, 10), (300, 0, 320, 20)]) == 1  # else the nearest to the centre


# Retrospective jobs ------------------------------------------------------------------------------------------
def cos(a, b):
    return float(np.dot(a, b))


def sighting(t, box, vec, hits=()):
    return J.Sighting(t, int(t * 10), box, np.asarray(vec, dtype=np.float32), [J.Hit(*h) for h in hits])


def test_tracker_groups_a_person_across_frames_and_splits_on_a_gap():
    a, b = unit(2, 8, seed=5)
    tr = J.AppearanceTracker(cos, link_threshold=0.5, gap_s=1.0)
    assert tr.observe(0, 0.0, [sighting(0.0, (0, 0, 10, 10), a, [("X", 0.7, {})]),
                              sighting(0.0, (50, 0, 60, 10), b)]) == []
    # a moves (box overlap, same face), b stays; a's best score improves
    assert tr.observe(0, 0.5, [sighting(0.5, (2, 0, 12, 10), a, [("X", 0.8, {"image_id": 9})]),
                              sighting(0.5, (50, 0, 60, 10), b)]) == []
    closed = tr.observe(0, 2.0, [sighting(2.0, (0, 0, 10, 10), a)])  # both gone for > 1 s: closed
    assert len(closed) == 2 and len(tr.open) == 1
    first = next(x for x in closed if x.best)
    assert (first.start_t, first.last_t, first.sightings) == (0.0, 0.5, 2)
    (key, best), = first.ranked(5, 0.75, investigation=False)
    assert key == "X" and best.score == 0.8 and best.t == 0.5 and best.info == {"image_id": 9}
    assert first.ranked(5, 0.9, investigation=False) == []
    assert len(first.ranked(5, 0.9, investigation=True)) == 1


def test_tracker_keeps_two_faces_of_one_frame_apart_and_checkpoints():
    a = unit(1, 8, seed=6)[0]
    tr = J.AppearanceTracker(cos, link_threshold=0.5, gap_s=1.0)
    tr.observe(0, 0.0, [sighting(0.0, (0, 0, 10, 10), a, [("X", 0.6, {})]), sighting(0.0, (0, 0, 10, 10), a)])
    assert len(tr.open) == 2  # one face per appearance per frame
    state = json.loads(json.dumps(tr.state()))
    again = J.AppearanceTracker(cos, link_threshold=0.5, gap_s=1.0)
    again.restore(state)
    assert [x.appearance_id for x in again.open] == [1, 2] and again.next_id == 3
    assert again.open[0].best["X"].score == pytest.approx(0.6)
    assert len(again.close_all()) == 2 and not again.open


def test_job_record_round_trip_validation_and_eta():
    job = J.JobRecord("j1", [{"path": "/v.mp4"}], "custody", "", "C1", "why", "DC", 5, 0.4, False, 2.0, "m", "v", 1)
    job.items = [J.Item("/v.mp4", True, 20, 10.0)]
    job.cursor = J.Cursor(0, 3.5, 35, 2)
    again = J.JobRecord.from_json(json.loads(json.dumps(job.to_json())))
    assert again == job
    assert J.eta_s(100, 50, 10.0) == pytest.approx(20.0) and J.eta_s(100, 0, 10.0) == 0.0
    ok = pb.SubmitJobRequest(media=[pb.MediaSource(path="/v.mp4")], gallery="g", case_reference="C",
                             justification="w", actor="a")
    assert J.validate_job(ok) == ""
    bad = pb.SubmitJobRequest()
    bad.CopyFrom(ok)
    bad.ClearField("media")
    assert "media" in J.validate_job(bad)
    bad.CopyFrom(ok)
    bad.media[0].url = "not-a-url"
    assert "URL" in J.validate_job(bad)
    assert J.clock(12.4) == "00:12" and J.clock(3723) == "1:02:03"
