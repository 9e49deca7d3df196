"""Plain data types shared by every face model (no torch, no I/O).

Images are numpy arrays: RGB, uint8, shape (H, W, 3). Coordinates are pixels in that image, x right, y down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Quality:
    """Per-face figures used to gate enrollment and live matching."""

    inter_eye_px: float  # distance between the two eye centres, in pixels of the source image
    sharpness: float  # variance of the Laplacian of the grey face crop (higher is sharper)
    yaw_deg: float  # pose estimate from the 5 landmarks (0 = frontal)
    pitch_deg: float
    roll_deg: float
    detector_score: float


@dataclass(frozen=True)
class Face:
    """One detected face.

    box: (x1, y1, x2, y2) floats. landmarks: (5, 2) float32 in YuNet order
    (right eye, left eye, nose tip, right mouth corner, left mouth corner — as the detector emits them).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    quality: Quality | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Identity of an embedding model; travels with every vector it produces."""

    model_id: str
    version: str
    dim: int
    chip_size: int  # side of the square aligned chip the embedder takes
    metric: str  # "cosine" (higher = more similar) or "euclidean" (lower = more similar)
    threshold: float  # default decision threshold on *similarity* (see Embedder.similarity)
    extra: dict = field(default_factory=dict)
