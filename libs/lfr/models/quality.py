"""Per-face quality figures from the image and the detector's box and 5 landmarks (numpy + Pillow only).

- ``inter_eye_px``: distance between the two eye landmarks in source pixels (resolution on the face).
- ``sharpness``: variance of the 4-neighbour Laplacian of the grey face crop resized to
  ``SHARPNESS_SIDE`` × ``SHARPNESS_SIDE``. The fixed size makes the figure comparable across face sizes: it
  measures blur/defocus/motion relative to the face, not the face's pixel count. Typical LFW faces score
  a few hundred; a badly blurred face scores under ~50.
- ``roll_deg``: angle of the eye line from horizontal; positive = turned clockwise as displayed (the
  image-right eye lower than the image-left eye).
- ``yaw_deg``/``pitch_deg``: from where the nose tip falls relative to the eyes and mouth, after removing
  roll, with a simple rigid model of the face (nose tip protruding ``NOSE_DEPTH`` inter-eye half-widths in
  front of the eye/mouth plane). Positive yaw = nose toward the image's right; positive pitch = nose
  toward the mouth (head down). These are coarse (±10°) estimates for gating, not pose measurements.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .types import Face, Quality

SHARPNESS_SIDE = 64
# Rigid-face model constants. Where YuNet puts the nose tip between the eye line and the mouth line on a
# frontal face: the median over 600 LFW faces (mostly frontal press photos) is 0.563. (The ArcFace/SFace
# 112-px template, built from other landmarks, has 0.495: the constant is specific to the detector.)
FRONTAL_NOSE_FRACTION = 0.563
NOSE_DEPTH = 1.0  # nose-tip protrusion / half inter-eye distance (yaw model)
NOSE_DEPTH_VS_EYE_MOUTH = 0.45  # nose-tip protrusion / eye-to-mouth distance (pitch model)


def _laplacian_variance(grey: np.ndarray) -> float:
    g = grey.astype(np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def sharpness(image: np.ndarray, box: tuple[float, float, float, float], side: int = SHARPNESS_SIDE) -> float:
    """Variance of the Laplacian of the grey crop of ``box`` (clipped to the image), resized to side²."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    x1, y1 = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
    x2, y2 = min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
    if x2 - x1 < 3 or y2 - y1 < 3:
        return 0.0
    crop = np.ascontiguousarray(image[y1:y2, x1:x2])
    grey = Image.fromarray(crop).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    return _laplacian_variance(np.asarray(grey))


def pose_from_landmarks(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 5 landmarks in YuNet order (r-eye, l-eye, nose, r-mouth, l-mouth)."""
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_r, eye_l, nose, mouth_r, mouth_l = p
    d = eye_l - eye_r  # image-left eye -> image-right eye
    roll = math.degrees(math.atan2(d[1], d[0]))
    # remove roll: rotate everything about the eye midpoint so the eye line is horizontal
    c, s = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    rot = np.array([[c, -s], [s, c]])
    eye_mid = (eye_r + eye_l) / 2.0
    q = (p - eye_mid) @ rot.T
    half_eye = float(np.hypot(*d)) / 2.0
    if half_eye < 1e-6:
        return 0.0, 0.0, roll
    nose_q = q[2]
    mouth_mid = (q[3] + q[4]) / 2.0
    # yaw: x offset of the nose from the eye midline, in units of half the (foreshortened) eye distance
    yaw = math.degrees(math.atan2(nose_q[0], NOSE_DEPTH * half_eye))
    eye_mouth = float(mouth_mid[1])
    if eye_mouth <= 1e-6:
        pitch = 0.0
    else:
        frac = nose_q[1] / eye_mouth
        pitch = math.degrees(math.atan((frac - FRONTAL_NOSE_FRACTION) / NOSE_DEPTH_VS_EYE_MOUTH))
    return yaw, pitch, roll


def face_quality(image: np.ndarray, face: Face) -> Quality:
    """Quality figures for one detected face in ``image`` (RGB uint8, H×W×3)."""
    lm = np.asarray(face.landmarks, dtype=np.float64).reshape(5, 2)
    inter_eye = float(np.hypot(*(lm[1] - lm[0])))
    yaw, pitch, roll = pose_from_landmarks(lm)
    return Quality(
        inter_eye_px=inter_eye,
        sharpness=sharpness(image, face.box),
        yaw_deg=float(yaw),
        pitch_deg=float(pitch),
        roll_deg=float(roll),
        detector_score=float(face.score),
    )
