"""Which face a photo is about (#14): one rule (lfr.models.face_choice) for galleries and enrollment, the
policy deciding whether a dominant face is taken."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lfr.models.engines import central_face
from lfr.models.face_choice import Candidate, central_index, dominant_index
from lfr.models.types import Face
from lfr.policy import PolicyError, parse_policy
from lfr.watchlist.service import load_policy

BIG = Candidate((400, 150, 600, 400), 80.0, 0.95)      # centred portrait
SMALL = Candidate((820, 60, 880, 130), 22.0, 0.81)     # a face in the background
TWIN = Candidate((650, 150, 850, 400), 78.0, 0.93)     # a second person as large as the first


def test_the_gallery_rule_and_the_engine_rule_are_one():
    faces = [SMALL, BIG]
    assert central_index(1000, 500, [f.box for f in faces]) == 1
    engine_faces = [Face(box=f.box, landmarks=np.zeros((5, 2), np.float32), score=f.score) for f in faces]
    assert central_face(np.zeros((500, 1000, 3), np.uint8), engine_faces) is engine_faces[1]


def test_a_dominant_face_needs_both_margins():
    c = dominant_index(1000, 500, [SMALL, BIG], 1.5, 0.5)
    assert c.index == 1 and "face 2 of 2 dominates" in c.why
    assert dominant_index(1000, 500, [BIG, TWIN], 1.5, 0.5).index == -1  # two people as large: none dominates
    off = Candidate((20, 20, 220, 270), 80.0, 0.9)  # the largest face at the edge
    corner = Candidate((950, 450, 990, 490), 15.0, 0.7)
    c = dominant_index(1000, 500, [off, corner], 1.5, 0.5)
    assert c.index == -1 and "off centre" in c.why


def test_the_policy_refuses_several_faces_listing_them_unless_told():
    p = load_policy("")
    idx, reason, how = p.enrollment_face(1000, 500, [SMALL, BIG])
    assert idx == -1 and "2 faces found" in reason and "--face N" in reason
    assert "face 1: box (820,60)-(880,130), 22 px between the eyes, detector score 0.81" in reason
    assert "face 2: box (400,150)-(600,400), 80 px between the eyes" in reason
    assert p.enrollment_face(1000, 500, [SMALL, BIG], requested=1) == (0, "", "face 1 of 2, chosen by the enroller")
    assert "does not exist" in p.enrollment_face(1000, 500, [SMALL, BIG], requested=3)[1]
    assert p.enrollment_face(1000, 500, [BIG]) == (0, "", "")
    dominant = dataclasses.replace(p, several_faces="dominant")
    idx, reason, how = dominant.enrollment_face(1000, 500, [SMALL, BIG])
    assert idx == 1 and reason == "" and "several_faces=dominant" in how and p.version in how
    idx, reason, _ = dominant.enrollment_face(1000, 500, [BIG, TWIN])
    assert idx == -1 and "none dominates" in reason and "face 2:" in reason


def test_the_policy_file_sets_the_rule_and_checks_it():
    text = load_policy("").canonical_json
    p = parse_policy(text.replace('"min_sharpness"', '"several_faces":"dominant","dominant_min_size_ratio":2,'
                                                   '"min_sharpness"'))
    assert p.several_faces == "dominant" and p.dominant_min_size_ratio == 2.0
    with pytest.raises(PolicyError, match="enrollment.several_faces"):
        parse_policy(text.replace('"min_sharpness"', '"several_faces":"all","min_sharpness"'))
    with pytest.raises(PolicyError, match="dominant_min_size_ratio"):
        parse_policy(text.replace('"min_sharpness"', '"dominant_min_size_ratio":0.5,"min_sharpness"'))
