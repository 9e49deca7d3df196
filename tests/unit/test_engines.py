"""Engine registry and scoring semantics (no weights needed: scoring works on vectors alone)."""

from __future__ import annotations

import numpy as np
import pytest

from lfr.models import engines, scoring
from lfr.models.scoring import DLIB, FUSION, SFACE

Scorer = scoring.recipe  # the engines score with lfr.models.scoring (tested against brute force in test_scoring)


def test_registry_and_aliases():
    assert engines.resolve_model_id("dlib") == DLIB
    assert engines.resolve_model_id("sface") == SFACE
    assert engines.resolve_model_id("fusion") == FUSION
    assert engines.resolve_model_id(engines.DEFAULT_MODEL) in (DLIB, SFACE, FUSION)
    with pytest.raises(KeyError):
        engines.resolve_model_id("arcface")
    for mid in (DLIB, SFACE, FUSION):
        info = engines.model_info(mid)
        assert info.model_id == mid and info.dim in (128, 256)


def test_dlib_similarity_is_one_minus_distance():
    a = np.zeros((1, 128), np.float32)
    b = np.zeros((2, 128), np.float32)
    b[0, 0] = 0.59
    b[1, 0] = 0.61
    s = Scorer(DLIB).score({DLIB: a[0]}, {DLIB: b})
    assert s.shape == (2,)
    np.testing.assert_allclose(s, [0.41, 0.39], atol=1e-6)
    # dlib's rule d < 0.6 <=> s > 0.4 = its published 1:1 threshold; the watchlist default is stricter
    assert (s >= engines.MODELS[DLIB].extra["threshold_1to1"]).tolist() == [True, False]
    assert engines.MODELS[DLIB].threshold > 0.4
    assert scoring.recipe(DLIB).part(DLIB).distance == "Euclid" and not engines.MODELS[DLIB].extra["normalized"]
    assert scoring.recipe(DLIB).from_hit(DLIB, 0.59) == pytest.approx(0.41)


def test_sface_cosine_and_matrix_shape():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 128))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    s = Scorer(SFACE).score({SFACE: a}, {SFACE: a})
    assert s.shape == (3, 3)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-9)
    assert scoring.recipe(SFACE).part(SFACE).distance == "Cosine"
    assert scoring.recipe(SFACE).from_hit(SFACE, 0.5) == 0.5


def test_fusion_is_monotone_and_requires_agreement():
    sc = Scorer(FUSION)
    assert set(sc.components) == {DLIB, SFACE}

    def z(s_sface, s_dlib):
        return float(sc.combine({SFACE: np.array([[s_sface]]), DLIB: np.array([[s_dlib]])})[0, 0])

    assert z(0.5, 0.5) < z(0.6, 0.5) and z(0.5, 0.5) < z(0.5, 0.6)
    thr = sc.threshold
    assert thr > 0 and z(0.8, 0.7) >= thr  # both confident: a match
    # one component at its maximum, the other just below its own 1:1 threshold: never a match
    assert z(1.0, 0.39) <= 0 < thr
    assert z(0.36, 1.0) <= 0 < thr
    # matrix shapes pass through
    out = sc.score_matrix(
        {SFACE: np.eye(2, 128), DLIB: np.zeros((2, 128))}, {SFACE: np.eye(3, 128), DLIB: np.zeros((3, 128))}
    )
    assert out.shape == (2, 3)


def test_similarity_transform_recovers_known_transform():
    src = np.array([[0, 0], [10, 0], [5, 5], [0, 10], [10, 10]], float)
    ang, scale, t = np.deg2rad(20), 1.7, np.array([3.0, -4.0])
    r = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = src @ r.T + t
    m = engines.similarity_transform(src, dst)
    np.testing.assert_allclose(engines.apply_transform(m, src), dst, atol=1e-9)


def test_central_and_centre_face():
    img = np.zeros((250, 250, 3), np.uint8)
    f = engines.centre_face(img)
    x1, y1, x2, y2 = f.box
    assert x1 < 125 < x2 and y1 < 125 < y2 and f.landmarks.shape == (5, 2)
    side = engines.Face(box=(0, 0, 40, 40), landmarks=f.landmarks, score=0.99)
    mid = engines.Face(box=(100, 100, 150, 150), landmarks=f.landmarks, score=0.7)
    assert engines.central_face(img, [side, mid]) is mid
    assert engines.central_face(img, []) is None


def test_an_engine_builds_only_the_parts_it_serves():
    """The registry by model id: detection builds the detector and chip makers, embedding only embedders
    (weights are loaded only for what is built; the detector itself loads on first use)."""
    det = engines.FaceEngine(FUSION, parts=engines.DETECTION_PARTS)
    assert det.built() == {"model": FUSION, "detector": engines.DETECTOR, "chip_makers": sorted([DLIB, SFACE]),
                           "embedders": []}
    with pytest.raises(RuntimeError, match="without embedders"):
        det.embed({SFACE: np.zeros((1, 112, 112, 3), np.uint8)})
    only_detector = engines.FaceEngine(SFACE, parts=("detector",))
    with pytest.raises(RuntimeError, match="without chip makers"):
        only_detector.chips(np.zeros((64, 64, 3), np.uint8), engines.centre_face(np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(ValueError, match="unknown engine parts"):
        engines.FaceEngine(SFACE, parts=("tracker",))
    assert set(engines.CHIP_MAKERS) == set(engines.EMBEDDERS) == {DLIB, SFACE}
