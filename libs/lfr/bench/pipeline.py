"""Image → vector pipelines for the benchmarks: ours (lfr.models.engines) and the reference implementations.

Both kinds embed a list of LFW-relative image paths and cache the vectors per image for the run. Each image
gives one face: the detection the photo is about (:func:`lfr.models.engines.central_face`); when the
detector finds nothing, a box in the middle of the image stands in (:func:`lfr.models.engines.centre_face`)
and the image is counted in ``no_face``.

References (test oracles, imported lazily, never used by the platform):

- dlib: ``dlib.get_frontal_face_detector`` (1× upsampling) → ``dlib.shape_predictor`` (5 points) →
  ``dlib.get_face_chip`` (150, 0.25) → ``dlib.face_recognition_model_v1``; similarity 1 − distance.
- SFace: ``cv2.FaceDetectorYN`` → ``cv2.FaceRecognizerSF.alignCrop`` / ``feature`` on the same weight
  files; cosine similarity.
- fusion: both references, fused with the same coefficients as ours (``fusion_v1.json``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lfr.models import scoring
from lfr.models.engines import (
    DLIB,
    FUSION,
    SFACE,
    FaceEngine,
    central_face,
    centre_face,
    resolve_model_id,
)
from lfr.models.images import decode_image
from lfr.models.types import Face


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def default_data_dir() -> Path:
    """$LFR_DATA_DIR, else ``<repo>/../shared/data``."""
    env = os.environ.get("LFR_DATA_DIR")
    return Path(env) if env else (repo_root().parent / "shared" / "data")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SystemExit(
            f"{what} not found at {path}. Pass --data DIR or set LFR_DATA_DIR to the shared data folder "
            f"(expected beside the checkout as ../shared/data)."
        )
    return path


def add_common_arguments(parser, *, default_sub: str = "lfw-dev") -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"LFW-layout folder (default: $LFR_DATA_DIR/{default_sub} or <repo>/../shared/data/{default_sub})",
    )
    parser.add_argument("--model", default="sface", help="dlib | sface | fusion (or a full model id)")
    parser.add_argument("--reference", action="store_true", help="also run the reference implementation")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch / OpenCV (default 2)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--flip", choices=("on", "off", "default"), default="default", help="flip averaging")
    parser.add_argument(
        "--dlib-align", choices=("landmarks", "predictor"), default=None, help="dlib alignment path"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def data_dir(args, sub: str = "lfw-dev") -> Path:
    if args.data is not None:
        return require_dir(Path(args.data), "data folder")
    return require_dir(default_data_dir() / sub, f"shared data folder {sub!r}")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))
    try:
        import cv2  # noqa: PLC0415 - only where installed (reference runs); harmless otherwise

        cv2.setNumThreads(max(1, int(n)))
    except ImportError:
        pass


def load_rgb(root: Path, rel: str) -> np.ndarray:
    return decode_image((Path(root) / rel).read_bytes())


# Vectors computed in this process, shared by every pipeline with the same implementation and settings
# (so `verify` then `identify`, or dlib then fusion, embed each image once per run):
# (implementation key, component) -> {image path: (vector, no_face)}
_SHARED: dict[tuple, dict[str, tuple[np.ndarray, bool]]] = {}


@dataclass
class Embeddings:
    """Vectors per component for a set of images, looked up by image path."""

    components: list[str]
    store: dict[str, dict[str, tuple[np.ndarray, bool]]] = field(
        default_factory=dict
    )  # component -> path -> ...
    seconds: float = 0.0

    def __post_init__(self) -> None:
        for c in self.components:
            self.store.setdefault(c, {})

    def has(self, rel: str) -> bool:
        return all(rel in self.store[c] for c in self.components)

    def add(self, rel: str, vecs: dict[str, np.ndarray], no_face: bool) -> None:
        for c in self.components:
            self.store[c][rel] = (np.asarray(vecs[c], dtype=np.float32), bool(no_face))

    def get(self, rels: list[str]) -> dict[str, np.ndarray]:
        return {
            c: np.stack([self.store[c][r][0] for r in rels]) if rels else np.zeros((0, 128), np.float32)
            for c in self.components
        }

    def is_no_face(self, rel: str) -> bool:
        return any(self.store[c][rel][1] for c in self.components if rel in self.store[c])

    @property
    def no_face(self) -> set[str]:
        return {r for c in self.components for r, (_, nf) in self.store[c].items() if nf}


class _Progress:
    def __init__(self, label: str, total: int, quiet: bool):
        self.label, self.total, self.quiet = label, total, quiet
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if self.quiet or (now - self.last < 5 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        print(f"[{self.label}] {done}/{self.total} images, {rate:.1f}/s", file=sys.stderr, flush=True)


class Pipeline:
    """Common part: caching and batching; subclasses embed a batch of images."""

    name = "pipeline"
    batch = 32

    def __init__(self, model: str, quiet: bool = False):
        self.model_id = resolve_model_id(model)
        self.scorer = scoring.recipe(self.model_id) if self.model_id != FUSION or _fusion_available() else None
        self.components = [DLIB, SFACE] if self.model_id == FUSION else [self.model_id]
        if self.scorer is not None:
            self.components = list(self.scorer.components)
        self.quiet = quiet

    def cache_key(self, component: str) -> tuple:
        """Identifies the settings that produce a component's vectors (for sharing across pipelines)."""
        return (self.name, component)

    @property
    def cache(self) -> Embeddings:
        e = Embeddings(self.components)
        for c in self.components:
            e.store[c] = _SHARED.setdefault(self.cache_key(c), {})
        return e

    def embed_batch(self, images: list[np.ndarray]) -> tuple[dict[str, np.ndarray], list[bool]]:
        raise NotImplementedError

    def embed(self, root: Path, rels: list[str]) -> Embeddings:
        cache = self.cache
        todo = [r for r in dict.fromkeys(rels) if not cache.has(r)]
        prog = _Progress(f"{self.name} {self.model_id}", len(todo), self.quiet)
        t0 = time.perf_counter()
        for i in range(0, len(todo), self.batch):
            chunk = todo[i : i + self.batch]
            imgs = [load_rgb(root, r) for r in chunk]
            vecs, nf = self.embed_batch(imgs)
            for j, r in enumerate(chunk):
                cache.add(r, {c: vecs[c][j] for c in self.components}, nf[j])
            prog(i + len(chunk))
        cache.seconds += time.perf_counter() - t0
        return cache

    def scores(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
        return self.scorer.score_matrix(a, b)

    def component_scores(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.scorer.component_scores(a, b)

    def describe(self) -> dict:
        return {"implementation": self.name}


def _fusion_available() -> bool:
    from importlib import resources

    return resources.files("lfr.models").joinpath("fusion_v1.json").is_file()


def _flip_arg(flip: str | None) -> bool | None:
    return {"on": True, "off": False}.get(flip or "default")


class OursPipeline(Pipeline):
    name = "ours"

    def __init__(self, model: str, device=None, flip: str | None = None, dlib_align=None, quiet=False):
        super().__init__(model, quiet)
        self.engine = FaceEngine(self.model_id, device=device, flip=_flip_arg(flip), dlib_align=dlib_align)
        self.scorer = self.engine.scorer
        self.components = list(self.engine.components)

    def cache_key(self, component: str) -> tuple:
        part = self.engine.component(component)
        return (self.name, component, part.flip, getattr(part, "align", None), self.engine.detector_score)

    def select(self, images: list[np.ndarray]) -> tuple[list[Face], list[bool]]:
        found = self.engine.detector.detect(images)
        faces, nf = [], []
        for img, fs in zip(images, found):
            f = central_face(img, fs)
            nf.append(f is None)
            faces.append(f if f is not None else centre_face(img))
        return faces, nf

    def embed_batch(self, images):
        faces, nf = self.select(images)
        per = [self.engine.chips(img, f) for img, f in zip(images, faces)]
        chips = {c: np.stack([p[c] for p in per]) for c in self.components}
        return self.engine.embed(chips), nf

    def describe(self) -> dict:
        d = {"implementation": "ours", "flip": self.engine.flips}
        if DLIB in self.components:
            d["dlib_align"] = self.engine.component(DLIB).align
        return d


# ---------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------
class DlibReference:
    """dlib-bin's own pipeline. Boxes are (x1, y1, x2, y2) end-exclusive floats."""

    def __init__(self, upsample: int = 1):
        import dlib

        from lfr.models.weights import weight_path

        self.dlib = dlib
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.sp = dlib.shape_predictor(str(weight_path("dlib_shape5")))
        self.rec = dlib.face_recognition_model_v1(str(weight_path("dlib_resnet")))

    def detect(self, img: np.ndarray) -> list[Face]:
        rects, scores, _ = self.detector.run(img, self.upsample, 0.0)
        out = []
        for r, s in zip(rects, scores):
            box = (float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1))
            out.append(Face(box=box, landmarks=np.zeros((5, 2), np.float32), score=float(s)))
        return out

    def rect(self, box) -> object:
        x1, y1, x2, y2 = box
        return self.dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)) - 1, int(round(y2)) - 1)

    def shape(self, img: np.ndarray, box) -> object:
        return self.sp(img, self.rect(box))

    def points(self, img: np.ndarray, box) -> np.ndarray:
        s = self.shape(img, box)
        return np.array([[s.part(i).x, s.part(i).y] for i in range(s.num_parts)], dtype=np.float64)

    def chip(self, img: np.ndarray, box) -> np.ndarray:
        return np.asarray(self.dlib.get_face_chip(img, self.shape(img, box), size=150, padding=0.25))

    def descriptors(self, chips: list[np.ndarray]) -> np.ndarray:
        if not chips:
            return np.zeros((0, 128), np.float32)
        out = self.rec.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return np.array([np.array(v) for v in out], dtype=np.float32)

    def fallback_box(self, img: np.ndarray):
        """Where dlib would put the centre stand-in face: our centre box, mapped like a YuNet box."""
        from lfr.models.engines import dlib_box_from_yunet

        return dlib_box_from_yunet(centre_face(img).box)

    def embed_images(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[bool]]:
        chips, nf = [], []
        for img in images:
            f = central_face(img, self.detect(img))
            nf.append(f is None)
            chips.append(self.chip(img, f.box if f is not None else self.fallback_box(img)))
        return self.descriptors(chips), nf


class SFaceReference:
    """OpenCV's FaceDetectorYN + FaceRecognizerSF on the same weight files."""

    def __init__(self, score_threshold: float = 0.6):
        import cv2

        from lfr.models.weights import weight_path

        self.cv2 = cv2
        self.det = cv2.FaceDetectorYN.create(
            str(weight_path("yunet")), "", (320, 320), score_threshold, 0.3, 5000
        )
        self.rec = cv2.FaceRecognizerSF.create(str(weight_path("sface")), "")

    def detect(self, img: np.ndarray) -> np.ndarray:
        """(N, 15) rows [x, y, w, h, 10 landmark coords, score] for an RGB image."""
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        self.det.setInputSize((img.shape[1], img.shape[0]))
        _, faces = self.det.detect(bgr)
        return np.zeros((0, 15), np.float32) if faces is None else faces

    @staticmethod
    def to_faces(rows: np.ndarray) -> list[Face]:
        return [
            Face(
                box=(float(r[0]), float(r[1]), float(r[0] + r[2]), float(r[1] + r[3])),
                landmarks=r[4:14].reshape(5, 2).astype(np.float32),
                score=float(r[14]),
            )
            for r in rows
        ]

    @staticmethod
    def to_row(face: Face) -> np.ndarray:
        x1, y1, x2, y2 = face.box
        return np.array(
            [x1, y1, x2 - x1, y2 - y1, *np.asarray(face.landmarks).reshape(-1), face.score], np.float32
        )

    def chip(self, img: np.ndarray, face: Face) -> np.ndarray:
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        return self.rec.alignCrop(bgr, self.to_row(face)[None])  # BGR 112×112

    def feature(self, chip_bgr: np.ndarray) -> np.ndarray:
        v = np.asarray(self.rec.feature(chip_bgr), dtype=np.float32).reshape(-1)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def embed_images(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[bool]]:
        vecs, nf = [], []
        for img in images:
            f = central_face(img, self.to_faces(self.detect(img)))
            nf.append(f is None)
            vecs.append(self.feature(self.chip(img, f if f is not None else centre_face(img))))
        return np.stack(vecs), nf


class ReferencePipeline(Pipeline):
    name = "reference"

    def __init__(self, model: str, quiet: bool = False):
        super().__init__(model, quiet)
        self.refs = {}
        if DLIB in self.components:
            self.refs[DLIB] = DlibReference()
        if SFACE in self.components:
            self.refs[SFACE] = SFaceReference()

    def embed_batch(self, images):
        out, nf_any = {}, [False] * len(images)
        for c, ref in self.refs.items():
            v, nf = ref.embed_images(images)
            out[c] = v
            nf_any = [a or b for a, b in zip(nf_any, nf)]
        return out, nf_any

    def describe(self) -> dict:
        d = {"implementation": "reference"}
        if DLIB in self.refs:
            d[DLIB] = (
                "dlib-bin: get_frontal_face_detector(upsample 1) + shape_predictor_5 + get_face_chip + face_recognition_model_v1"
            )
        if SFACE in self.refs:
            d[SFACE] = "OpenCV: FaceDetectorYN + FaceRecognizerSF.alignCrop/feature"
        return d


def make_pipelines(args) -> tuple[Pipeline, Pipeline | None]:
    ours = OursPipeline(
        args.model, device=args.device, flip=args.flip, dlib_align=args.dlib_align, quiet=args.quiet
    )
    ref = ReferencePipeline(args.model, quiet=args.quiet) if args.reference else None
    return ours, ref
