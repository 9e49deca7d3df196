"""lfr.models.scoring against brute-force references: each model's similarity, the vector store's distance and
hit → similarity (a real Qdrant, local mode), fusion with its floors, the valid thresholds, and the recipe's
round trip through the ModelDescription the embedding service publishes."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest

from lfr.models import scoring
from lfr.models.scoring import DLIB, FUSION, SFACE
from lfr.pb import embedding_pb2

RNG = np.random.default_rng(20)


def sface_vectors(n: int) -> np.ndarray:
    v = RNG.normal(size=(n, 128))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def dlib_vectors(n: int) -> np.ndarray:
    """Raw, like dlib's descriptors (norm about 0.6, not normalised)."""
    return (RNG.normal(size=(n, 128)) * 0.055).astype(np.float32)


VECTORS = {SFACE: sface_vectors, DLIB: dlib_vectors}


def brute_similarity(model_id: str, a, b) -> float:
    """The published definitions, one pair at a time in plain Python."""
    if model_id == SFACE:
        return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    return 1.0 - math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True)))


def brute_fusion(s: dict[str, float]) -> float:
    p = scoring.fusion_params()
    z = p["bias"] + sum(p["weights"][c] * s[c] for c in p["components"])
    if any(s[c] < p["floors"][c] for c in p["components"]):
        z = min(z, 0.0)
    return z


def test_no_torch_and_no_weights():
    import subprocess

    code = "import sys, lfr.models.scoring as s; s.recipe('fusion'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("model_id", [SFACE, DLIB])
def test_single_model_scores_equal_brute_force(model_id):
    r = scoring.recipe(model_id)
    a, b = VECTORS[model_id](4), VECTORS[model_id](7)
    got = r.score({model_id: a}, {model_id: b})
    assert got.shape == (4, 7)
    for i, j in itertools.product(range(4), range(7)):
        assert got[i, j] == pytest.approx(brute_similarity(model_id, a[i], b[j]), abs=1e-9)
    # one probe gives a row; row-wise similarities agree with the matrix
    np.testing.assert_allclose(r.score({model_id: a[0]}, {model_id: b}), got[0], atol=1e-12)
    np.testing.assert_allclose(scoring.similarity_rows(r.part(model_id).metric, a, b[:4]),
                               np.diag(got[:, :4]), atol=1e-9)
    # a single model's score is its component's similarity; the engine's own threshold is in range
    assert r.components == (model_id,) and not r.fused
    assert r.threshold_error(r.threshold) == "" and r.threshold_error(1.5) and r.threshold_error(float("nan"))


def test_fusion_equals_brute_force_with_floors():
    r = scoring.recipe(FUSION)
    assert r.fused and set(r.components) == {SFACE, DLIB}
    # component similarities on a grid that crosses both floors, and random vectors
    grid = np.linspace(-0.2, 1.0, 25)
    s_sface, s_dlib = np.meshgrid(grid, grid, indexing="ij")
    got = r.combine({SFACE: s_sface, DLIB: s_dlib})
    for i, j in itertools.product(range(25), range(25)):
        assert got[i, j] == pytest.approx(brute_fusion({SFACE: s_sface[i, j], DLIB: s_dlib[i, j]}), abs=1e-9)
    probe = {SFACE: sface_vectors(3), DLIB: dlib_vectors(3)}
    refs = {SFACE: sface_vectors(5), DLIB: dlib_vectors(5)}
    m = r.score(probe, refs)
    for i, j in itertools.product(range(3), range(5)):
        s = {c: brute_similarity(c, probe[c][i], refs[c][j]) for c in (SFACE, DLIB)}
        assert m[i, j] == pytest.approx(brute_fusion(s), abs=1e-9)


def test_fusion_thresholds_and_veto():
    r = scoring.recipe(FUSION)
    lo, hi = r.threshold_range
    assert lo == 0.0 and hi == pytest.approx(brute_fusion({SFACE: 1.0, DLIB: 1.0}))
    assert r.threshold == pytest.approx(5.438, abs=1e-3) and r.threshold_error(r.threshold) == ""
    assert "above 0" in r.threshold_error(0.0) and r.threshold_error(-1.0) and r.threshold_error(hi + 0.1)
    assert r.threshold_error(0.5) == ""  # thresholds are log-odds, not similarities in [-1, 1]
    # An engine under its floor vetoes at every valid threshold, however sure the other engine is.
    smallest_valid = np.nextafter(0.0, 1.0)
    for c, other in ((SFACE, DLIB), (DLIB, SFACE)):
        under = r.floors[c] - 1e-6
        z = float(r.combine({c: np.array(under), other: np.array(1.0)}))
        assert z <= 0.0 < smallest_valid  # below every valid threshold: never a match (score >= threshold)
    # both engines confident: a match at the default threshold
    assert float(r.combine({SFACE: np.array(0.8), DLIB: np.array(0.7)})) >= r.threshold


@pytest.mark.parametrize("model_id", [SFACE, DLIB])
def test_vector_store_hits_become_the_models_similarity(model_id, tmp_path):
    """A real Qdrant collection made with the recipe's distance: hits, converted, rank and score as brute force."""
    from qdrant_client import QdrantClient, models

    part = scoring.recipe(model_id).part(model_id)
    stored, queries = VECTORS[model_id](200), VECTORS[model_id](5)
    client = QdrantClient(path=str(tmp_path / "q"))
    try:
        client.create_collection("c", vectors_config=models.VectorParams(
            size=128, distance=models.Distance(part.distance)))
        client.upsert("c", points=[models.PointStruct(id=i, vector=v.tolist()) for i, v in enumerate(stored)],
                      wait=True)
        for q in queries:
            hits = client.query_points("c", query=q.tolist(), limit=10).points
            brute = sorted(((brute_similarity(model_id, q, v), i) for i, v in enumerate(stored)), reverse=True)
            assert [h.id for h in hits] == [i for _, i in brute[:10]]
            for h, (s, _) in zip(hits, brute, strict=False):
                assert scoring.recipe(model_id).from_hit(model_id, h.score) == pytest.approx(s, abs=1e-5)
    finally:
        client.close()


@pytest.mark.parametrize("model_id", [SFACE, DLIB, FUSION])
def test_recipe_travels_in_the_model_description(model_id):
    r = scoring.recipe(model_id)
    wire = embedding_pb2.ModelDescription.FromString(r.describe(embedding_pb2.ModelDescription()).SerializeToString())
    back = scoring.Recipe.from_description(wire)
    assert (back.model_id, back.version, back.components, back.fused) == (r.model_id, r.version, r.components,
                                                                          r.fused)
    assert back.threshold == pytest.approx(r.threshold, rel=1e-6)
    assert wire.threshold_min == pytest.approx(r.threshold_range[0]) and \
        wire.threshold_max == pytest.approx(r.threshold_range[1], rel=1e-6)
    for c in r.components:
        assert back.part(c).metric == r.part(c).metric and back.part(c).dim == 128
        if r.fused:
            assert back.weights[c] == pytest.approx(r.weights[c], rel=1e-6)
            assert back.floors[c] == pytest.approx(r.floors[c], rel=1e-6)
    probe = {SFACE: sface_vectors(2), DLIB: dlib_vectors(2)}
    refs = {SFACE: sface_vectors(6), DLIB: dlib_vectors(6)}
    np.testing.assert_allclose(back.score(probe, refs), r.score(probe, refs), atol=1e-4)


def test_an_incoherent_description_is_refused():
    d = scoring.recipe(FUSION).describe(embedding_pb2.ModelDescription())
    del d.fusion_floors[:]
    with pytest.raises(ValueError, match="floors"):
        scoring.Recipe.from_description(d)
    d = scoring.recipe(SFACE).describe(embedding_pb2.ModelDescription())
    d.default_threshold = 3.0
    with pytest.raises(ValueError, match="threshold"):
        scoring.Recipe.from_description(d)


def test_gallery_index_scores_with_the_recipe(tmp_path):
    """The embedded gallery's exact re-scoring and brute force are the model's similarity."""
    from lfr.galleryindex import EmbeddedIndex

    for model_id, metric in ((SFACE, "cosine"), (DLIB, "euclidean")):
        idx = EmbeddedIndex(tmp_path / model_id, 128, metric)
        stored, q = VECTORS[model_id](300), VECTORS[model_id](2)
        idx.add(np.arange(300), stored)
        exact_ids, exact_sims = idx.exact_search(q, 5)
        ann_ids, ann_sims = idx.search(q, 5)
        for i in range(2):
            brute = sorted(((brute_similarity(model_id, q[i], v), n) for n, v in enumerate(stored)), reverse=True)[:5]
            assert exact_ids[i].tolist() == [n for _, n in brute]
            np.testing.assert_allclose(exact_sims[i], [s for s, _ in brute], atol=1e-6)
            np.testing.assert_allclose(ann_sims[i][ann_ids[i] >= 0],
                                       [brute_similarity(model_id, q[i], stored[n]) for n in ann_ids[i] if n >= 0],
                                       atol=1e-6)
        idx.close()


@pytest.mark.parametrize("model_id", [SFACE, DLIB, FUSION])
def test_exact_index_equals_brute_force(model_id):
    """The in-memory exact search: each entry's best vector per engine, combined by the recipe, ranked."""
    r = scoring.recipe(model_id)
    idx = scoring.ExactIndex(r)
    entries = {}
    for e in range(40):
        n = 1 + e % 3  # entries with one to three images
        entries[f"e{e}"] = {c: VECTORS[c](n) for c in r.components}
        idx.add(f"e{e}", entries[f"e{e}"])
    probes = {c: VECTORS[c](4) for c in r.components}
    probes = {c: np.concatenate([v, entries["e7"][c][:1] + 0.01]) for c, v in probes.items()}  # one near e7
    got = idx.search(probes, k=5)
    for i in range(5):
        scores = {}
        for e, vecs in entries.items():
            best = {c: max(brute_similarity(c, probes[c][i], v) for v in vecs[c]) for c in r.components}
            scores[e] = brute_fusion(best) if r.fused else best[model_id]
        expect = sorted(scores.items(), key=lambda kv: -kv[1])[:5]
        assert [e for e, _ in got[i]] == [e for e, _ in expect]
        np.testing.assert_allclose([s for _, s in got[i]], [s for _, s in expect], atol=2e-5)  # float32
    assert got[4][0][0] == "e7"
    with pytest.raises(ValueError):
        idx.add("partial", {r.components[0]: VECTORS[r.components[0]](1)} if r.fused else {})
