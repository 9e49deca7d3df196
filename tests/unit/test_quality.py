"""face_quality: inter-eye distance, Laplacian sharpness, pose from landmarks."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from lfr.models.quality import face_quality, pose_from_landmarks, sharpness
from lfr.models.types import Face

# A frontal face as YuNet marks it (median landmarks over 600 LFW images, shifted into a 112-px frame),
# YuNet order: right eye, left eye, nose tip, right mouth corner, left mouth corner
FRONTAL = np.array(
    [[104.08, 112.83], [147.69, 112.10], [126.26, 136.79], [107.94, 155.97], [145.47, 155.59]],
    dtype=np.float32,
) - np.array([70.0, 80.0], dtype=np.float32)


def _rotate(points: np.ndarray, deg: float, centre=(56.0, 56.0)) -> np.ndarray:
    a = math.radians(deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return ((points - centre) @ r.T + centre).astype(np.float32)


def _checker(side: int = 112, cell: int = 4) -> np.ndarray:
    y, x = np.mgrid[:side, :side]
    board = (((x // cell) + (y // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def test_frontal_pose_is_near_zero():
    yaw, pitch, roll = pose_from_landmarks(FRONTAL)
    assert abs(yaw) < 1 and abs(pitch) < 1 and abs(roll) < 1


def test_roll_follows_rotation_and_leaves_yaw_pitch():
    for deg in (-30, -10, 15, 40):
        yaw, pitch, roll = pose_from_landmarks(_rotate(FRONTAL, deg))
        assert abs(roll - deg) < 1.0
        assert abs(yaw) < 1.5 and abs(pitch) < 1.5


def test_yaw_sign_and_growth():
    shifted = FRONTAL.copy()
    shifted[2, 0] += 6
    more = FRONTAL.copy()
    more[2, 0] += 14
    y1 = pose_from_landmarks(shifted)[0]
    y2 = pose_from_landmarks(more)[0]
    assert 0 < y1 < y2 < 90
    assert pose_from_landmarks(FRONTAL - [[0, 0], [0, 0], [10, 0], [0, 0], [0, 0]])[0] < 0


def test_pitch_sign():
    down = FRONTAL.copy()
    down[2, 1] += 8  # nose closer to the mouth: head down
    up = FRONTAL.copy()
    up[2, 1] -= 8
    assert pose_from_landmarks(down)[1] > 5
    assert pose_from_landmarks(up)[1] < -5


def test_sharpness_drops_with_blur_and_is_size_independent():
    sharp = _checker()
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(3)))
    box = (0.0, 0.0, 112.0, 112.0)
    s_sharp, s_blur = sharpness(sharp, box), sharpness(blurred, box)
    assert s_sharp > 10 * s_blur
    # the same scene at twice the resolution scores about the same (crop is resized to a fixed side)
    big = np.asarray(Image.fromarray(sharp).resize((224, 224), Image.Resampling.NEAREST))
    s_big = sharpness(big, (0.0, 0.0, 224.0, 224.0))
    assert 0.5 < s_big / s_sharp < 2.0
    assert sharpness(np.full((50, 50, 3), 128, np.uint8), (0, 0, 50, 50)) == 0.0


def test_box_outside_image_is_clipped_or_zero():
    img = _checker()
    assert sharpness(img, (-20.0, -20.0, 60.0, 60.0)) > 0
    assert sharpness(img, (500.0, 500.0, 600.0, 600.0)) == 0.0


def test_face_quality_fields():
    img = _checker()
    lm = _rotate(FRONTAL, 10)
    q = face_quality(img, Face(box=(10.0, 10.0, 100.0, 110.0), landmarks=lm, score=0.93))
    assert abs(q.inter_eye_px - float(np.hypot(*(FRONTAL[1] - FRONTAL[0])))) < 1e-3
    assert abs(q.roll_deg - 10) < 1
    assert q.detector_score == np.float32(0.93) or abs(q.detector_score - 0.93) < 1e-6
    assert q.sharpness > 0
