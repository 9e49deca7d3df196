"""Engines a force plugs in by configuration: an ONNX file run by onnxruntime, described by a manifest.

A **manifest** (JSON) says everything the platform needs to use the file without code::

    {
      "id": "acme-face-v3",                 # model id: the vectors' tag, the Qdrant collection's name
      "version": "3.1.0",                   # with the id, what every vector carries
      "file": "acme_v3.onnx",               # beside the manifest (or an absolute path)
      "sha256": "<64 hex digits>",          # of the file: a mismatch refuses to load
      "input": {"size": 112,                # square chip side in pixels
                "layout": "NCHW",           # or NHWC
                "colour": "RGB",            # or BGR: the order the network expects
                "mean": [127.5, 127.5, 127.5], "std": [128, 128, 128]},   # x = (pixel - mean) / std
      "alignment": {"kind": "template",     # 5-point similarity transform of YuNet's landmarks to the model's
                    "landmarks": [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]},
                   # (chip pixels, YuNet's order: right eye, left eye, nose tip, right / left mouth corner)
                   # or {"kind": "dlib-chip"}: dlib's 150 x 150 chip (shape predictor geometry, padding 0.25)
      "output": {"dim": 512, "normalise": true},   # L2-normalise the vectors (cosine models)
      "metric": "cosine",                   # or "euclidean" (similarity 1 - distance): lfr.models.scoring
      "threshold": 0.35,                    # the vendor's default; `lfr model check` derives the platform's
      "flip": false                         # average with the mirrored chip (test-time flip)
    }

Installed engines live in ``engines_dir()``: ``$LFR_ENGINES_DIR``, else ``<state dir>/engines`` (the state dir is
``$LFR_STATE_DIR``, else ``./state``, as for ``lfr up``), one folder per engine id holding the manifest, the file
and, once ``lfr model check`` has run, ``check.json``. An installed engine joins the model registry
(:mod:`lfr.models.scoring`, :mod:`lfr.models.engines`) under its id, so the benchmarks, the embedding service
(``LFR_MODEL=<id>``) and scoring use it like a built-in model; its vectors carry its own id and version and live
in their own collection, so they never meet another model's.

An engine without a completed check (for its id, version and sha256) cannot be authorised for a deployment
(:func:`authorisation_refusal`). This module reads manifests with the standard library only; ``onnx`` and
``onnxruntime`` are imported when a file is verified or run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
CHECK = "check.json"
LAYOUTS = ("NCHW", "NHWC")
COLOURS = ("RGB", "BGR")
ALIGNMENTS = ("template", "dlib-chip")
DLIB_CHIP_SIZE = 150
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")


class ManifestError(ValueError):
    """A manifest (or the file it describes) is refused; ``field`` names the manifest field at fault."""

    def __init__(self, source: str, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{source}: {field_name}: {message}")


@dataclass(frozen=True)
class Manifest:
    model_id: str
    version: str
    file: Path
    sha256: str
    size: int
    layout: str
    colour: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    alignment: str
    landmarks: tuple[tuple[float, float], ...]  # template alignment only
    dim: int
    normalise: bool
    metric: str
    threshold: float
    threshold_1to1: float
    flip: bool
    source: str = ""  # where it was read from
    raw: dict = field(default_factory=dict, compare=False)


# -----------------------------------------------------------------------------------------------------
# where engines live
# -----------------------------------------------------------------------------------------------------
def engines_dir() -> Path:
    """``$LFR_ENGINES_DIR``, else ``<$LFR_STATE_DIR or ./state>/engines``."""
    env = os.environ.get("LFR_ENGINES_DIR")
    if env:
        return Path(env)
    from lfr.runtime.paths import state_dir

    return state_dir() / "engines"


def _folder(model_id: str, root: Path | None = None) -> Path:
    return (root or engines_dir()) / model_id


# -----------------------------------------------------------------------------------------------------
# parsing and verifying a manifest
# -----------------------------------------------------------------------------------------------------
def _get(raw: dict, path: str, src: str, kind, default=None, required: bool = True):
    cur: Any = raw
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if required:
                raise ManifestError(src, path, "required")
            return default
        cur = cur[part]
    if kind is float and isinstance(cur, int) and not isinstance(cur, bool):
        cur = float(cur)
    if not isinstance(cur, kind) or (kind is int and isinstance(cur, bool)):
        raise ManifestError(src, path, f"must be {getattr(kind, '__name__', kind)}, got {cur!r}")
    return cur


def _triple(raw: dict, path: str, src: str, default: float) -> tuple[float, float, float]:
    v = _get(raw, path, src, list, [default] * 3, required=False)
    if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ManifestError(src, path, f"must be three numbers (one per colour channel), got {v!r}")
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def parse_manifest(raw: dict, base: Path, source: str = "manifest") -> Manifest:
    """The manifest's fields, checked for form (not against the file: see :func:`verify`)."""
    from . import scoring

    src = source
    if not isinstance(raw, dict):
        raise ManifestError(src, "(top level)", "must be a JSON object")
    known = {"id", "version", "file", "sha256", "input", "alignment", "output", "metric", "threshold",
             "threshold_1to1", "flip", "licence", "vendor", "notes"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(src, unknown[0], f"unknown field (known: {sorted(known)})")
    mid = _get(raw, "id", src, str)
    if not _ID.match(mid):
        raise ManifestError(src, "id", f"{mid!r}: lower-case letters, digits, '.', '_' or '-', 2 to 64 characters")
    if mid in scoring.BUILT_IN or mid in scoring.ALIASES:
        raise ManifestError(src, "id", f"{mid!r} is a built-in model id; give the engine its own")
    version = _get(raw, "version", src, str)
    if not version.strip():
        raise ManifestError(src, "version", "must not be empty")
    file = Path(_get(raw, "file", src, str))
    file = file if file.is_absolute() else base / file
    sha = _get(raw, "sha256", src, str).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ManifestError(src, "sha256", "must be 64 hexadecimal digits")
    size = _get(raw, "input.size", src, int)
    if not 16 <= size <= 1024:
        raise ManifestError(src, "input.size", f"{size} is not a chip side between 16 and 1024 pixels")
    layout = _get(raw, "input.layout", src, str, "NCHW", required=False)
    if layout not in LAYOUTS:
        raise ManifestError(src, "input.layout", f"{layout!r}: one of {LAYOUTS}")
    colour = _get(raw, "input.colour", src, str, "RGB", required=False)
    if colour not in COLOURS:
        raise ManifestError(src, "input.colour", f"{colour!r}: one of {COLOURS}")
    mean = _triple(raw, "input.mean", src, 0.0)
    std = _triple(raw, "input.std", src, 1.0)
    if any(s == 0 for s in std):
        raise ManifestError(src, "input.std", "must not be 0")
    kind = _get(raw, "alignment.kind", src, str)
    if kind not in ALIGNMENTS:
        raise ManifestError(src, "alignment.kind", f"{kind!r}: one of {ALIGNMENTS}")
    landmarks: tuple = ()
    if kind == "template":
        pts = _get(raw, "alignment.landmarks", src, list)
        arr = np.asarray(pts, dtype=np.float64) if all(isinstance(p, list) for p in pts) else None
        if arr is None or arr.shape != (5, 2) or not np.isfinite(arr).all():
            raise ManifestError(src, "alignment.landmarks", "five [x, y] points in chip pixels (YuNet's order)")
        landmarks = tuple((float(x), float(y)) for x, y in arr)
    elif size != DLIB_CHIP_SIZE:
        raise ManifestError(src, "input.size", f"dlib-chip alignment cuts {DLIB_CHIP_SIZE}-pixel chips, not {size}")
    dim = _get(raw, "output.dim", src, int)
    if not 2 <= dim <= 4096:
        raise ManifestError(src, "output.dim", f"{dim} is not a vector length between 2 and 4096")
    metric = _get(raw, "metric", src, str)
    if metric not in scoring.METRICS:
        raise ManifestError(src, "metric", f"{metric!r}: one of {sorted(scoring.METRICS)}")
    normalise = _get(raw, "output.normalise", src, bool, metric == scoring.COSINE, required=False)
    if metric == scoring.COSINE and not normalise:
        raise ManifestError(src, "output.normalise", "a cosine engine's vectors are L2-normalised: set it true")
    threshold = _get(raw, "threshold", src, float)
    lo, hi = scoring.METRICS[metric][1]
    if not lo <= threshold <= hi:
        raise ManifestError(src, "threshold", f"{threshold} is not a similarity between {lo:g} and {hi:g}")
    t11 = _get(raw, "threshold_1to1", src, float, threshold, required=False)
    flip = _get(raw, "flip", src, bool, False, required=False)
    return Manifest(mid, version, file, sha, size, layout, colour, mean, std, kind, landmarks, dim, normalise,
                    metric, threshold, t11, flip, source=src, raw=raw)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a manifest file (form only)."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(str(p), "(manifest)", "no such file")
    try:
        raw = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(str(p), "(manifest)", f"not valid JSON: {exc}") from None
    return parse_manifest(raw, p.parent, str(p))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def providers() -> list[str]:
    """onnxruntime's CUDA provider where it is installed (onnxruntime-gpu) and a GPU is present, then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def verify(m: Manifest, device: str | None = None):
    """Check the file against the manifest and return a ready onnxruntime session.

    Refused (ManifestError naming the field): a missing file (``file``), a different sha256 (``sha256``), a model
    the runtime cannot run, e.g. an opset it does not know (``opset``), an input that is not the manifest's chip
    (``input.size`` / ``input.layout``), vectors of another length (``output.dim``).
    """
    import onnx
    import onnxruntime as ort

    src = m.source
    if not m.file.is_file():
        raise ManifestError(src, "file", f"{m.file} does not exist")
    actual = file_sha256(m.file)
    if actual != m.sha256:
        raise ManifestError(src, "sha256", f"{m.file.name} has sha256 {actual}, the manifest says {m.sha256}: "
                            "not the file the manifest describes; refusing to load it")
    try:
        proto = onnx.load(str(m.file), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not an ONNX model"
        raise ManifestError(src, "file", f"{m.file.name} is not an ONNX model: {exc}") from None
    opsets = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = os.environ.get("LFR_ONNX_THREADS")
    if threads:
        opts.intra_op_num_threads = int(threads)
    want = providers() if device in (None, "auto") or str(device).startswith("cuda") else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(m.file), sess_options=opts, providers=want)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(src, "opset", f"onnxruntime {ort.__version__} cannot run {m.file.name} (opsets "
                            f"{opsets}): {first}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ManifestError(src, "file", f"the model has {len(inputs)} inputs; an engine takes one batch of chips")
    shape = list(inputs[0].shape)
    if len(shape) != 4:
        raise ManifestError(src, "input.layout", f"the model's input has shape {shape}, not a 4-D batch of chips")
    c, h, w = (shape[1], shape[2], shape[3]) if m.layout == "NCHW" else (shape[3], shape[1], shape[2])
    if isinstance(c, int) and c != 3:
        raise ManifestError(src, "input.layout", f"the model's input {shape} has {c} channels where {m.layout} "
                            "puts the colour channels (3)")
    for name, got in (("height", h), ("width", w)):
        if isinstance(got, int) and got != m.size:
            raise ManifestError(src, "input.size", f"the model takes {shape} ({m.layout}): chip {name} {got}, "
                                f"the manifest says {m.size}")
    probe = np.zeros((1, m.size, m.size, 3) if m.layout == "NHWC" else (1, 3, m.size, m.size), np.float32)
    try:
        out = session.run(None, {inputs[0].name: probe})[0]
    except Exception as exc:  # noqa: BLE001
        raise ManifestError(src, "input.size", f"the model does not run on a {m.size}x{m.size} chip: "
                            f"{str(exc).splitlines()[0]}") from None
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] != m.dim:
        raise ManifestError(src, "output.dim", f"the model gives vectors of shape {list(out.shape[1:])} per chip, "
                            f"the manifest says {m.dim}")
    return session


# -----------------------------------------------------------------------------------------------------
# installing, listing, check records
# -----------------------------------------------------------------------------------------------------
def add(manifest_path: str | os.PathLike, root: Path | None = None) -> Manifest:
    """Verify a manifest and its file, then install both under ``<engines dir>/<id>/`` (replacing a previous
    version of the same id drops its check: the new file needs its own)."""
    m = read_manifest(manifest_path)
    verify(m, device="cpu")
    dest = _folder(m.model_id, root)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / m.file.name
    if m.file.resolve() != target.resolve():
        shutil.copyfile(m.file, target)
    raw = dict(m.raw, file=target.name)
    old = installed_manifest(m.model_id, root)
    if old is not None and (old.version, old.sha256) != (m.version, m.sha256):
        (dest / CHECK).unlink(missing_ok=True)
    (dest / MANIFEST).write_text(json.dumps(raw, indent=2) + "\n")
    return read_manifest(dest / MANIFEST)


def installed_manifest(model_id: str, root: Path | None = None) -> Manifest | None:
    p = _folder(model_id, root) / MANIFEST
    return read_manifest(p) if p.is_file() else None


def installed(root: Path | None = None) -> list[Manifest]:
    base = root or engines_dir()
    if not base.is_dir():
        return []
    return [read_manifest(p / MANIFEST) for p in sorted(base.iterdir()) if (p / MANIFEST).is_file()]


def check_record(model_id: str, root: Path | None = None) -> dict | None:
    """The completed check of the installed engine (same version and sha256), or None."""
    m = installed_manifest(model_id, root)
    p = _folder(model_id, root) / CHECK
    if m is None or not p.is_file():
        return None
    rec = json.loads(p.read_text())
    if (rec.get("model_version"), rec.get("sha256")) != (m.version, m.sha256) or not rec.get("completed"):
        return None
    return rec


def write_check(model_id: str, record: dict, root: Path | None = None) -> Path:
    p = _folder(model_id, root) / CHECK
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(p)
    return p


def authorisation_refusal(model_id: str, model_version: str, root: Path | None = None) -> str:
    """'' when a deployment on this model may be authorised; else why not (FAILED_PRECONDITION). Built-in
    models are checked by the project's own benchmarks; a plugged-in engine needs its completed check."""
    from . import scoring

    if model_id in scoring.BUILT_IN:
        return ""
    where = root or engines_dir()
    m = installed_manifest(model_id, root)
    if m is None:
        return f"engine {model_id} is not installed in {where}: `lfr model add MANIFEST`, then `lfr model check`"
    if m.version != model_version:
        return (f"engine {model_id}: the deployment's vectors are version {model_version} but {m.version} is "
                f"installed; re-embed the watchlist")
    if check_record(model_id, root) is None:
        return (f"engine {model_id} {m.version} has no completed check: run `lfr model check {model_id}` "
                "before it can be authorised for a deployment")
    return ""


# -----------------------------------------------------------------------------------------------------
# the registry: an installed engine as a model id like the built-in ones
# -----------------------------------------------------------------------------------------------------
_LOCK = threading.Lock()


def register_installed(model_id: str, root: Path | None = None) -> bool:
    """Add an installed engine to the model registry (scoring recipe, chip maker, embedder). False when no
    engine of that id is installed. Its default threshold is the one its completed check derived (when its
    data resolved the false-accept target), else the manifest's."""
    from . import engines, scoring

    m = installed_manifest(model_id, root)
    if m is None:
        return False
    rec = check_record(model_id, root)
    threshold = float(rec["threshold"]["value"]) if rec and rec["threshold"].get("resolved") else m.threshold
    comp = scoring.Component(m.model_id, m.version, m.dim, m.metric, m.size, m.threshold_1to1)
    with _LOCK:
        scoring.register(comp, threshold)
        engines.register(comp, threshold, m.flip, lambda align=None: OnnxChips(m),
                         lambda device, flip: OnnxEmbedder(m, device, flip),
                         similarity=f"{m.metric} of the engine's vectors (plugged in by manifest {m.source})")
    return True


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection) src → dst."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    a = d0.T @ s0 / len(src)
    u, s, vt = np.linalg.svd(a)
    d = np.ones(2)
    if np.linalg.det(a) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / ((s0**2).sum() / len(src))
    m = np.empty((2, 3))
    m[:, :2] = rot * scale
    m[:, 2] = md - scale * rot @ ms
    return m


class OnnxChips:
    """The engine's alignment: YuNet's 5 landmarks onto its template (bilinear warp, zeros outside), or
    dlib's chip (the built-in dlib alignment)."""

    def __init__(self, m: Manifest):
        self.m = m
        self.align = m.alignment
        self._dlib = None
        if m.alignment == "dlib-chip":
            from .engines import DlibChips

            self._dlib = DlibChips()
        self._template = np.asarray(m.landmarks, np.float64)

    def chip(self, image: np.ndarray, face) -> np.ndarray:
        if self._dlib is not None:
            return self._dlib.chip(image, face)
        from .sface import warp_affine_bilinear

        t = _umeyama(np.asarray(face.landmarks, np.float64), self._template)
        return warp_affine_bilinear(image, t, (self.m.size, self.m.size))


class OnnxEmbedder:
    """Runs the engine's file with onnxruntime (its CUDA provider where installed and a GPU is present)."""

    def __init__(self, m: Manifest, device: str | None = None, flip: bool | None = None):
        from .engines import MODELS

        self.m = m
        self.info = MODELS[m.model_id]
        self.device = device
        self.flip = m.flip if flip is None else bool(flip)
        self.session = verify(m, device)  # sha256, opset, sizes: checked every time the file is loaded
        self.input = self.session.get_inputs()[0].name
        self._mean = np.asarray(m.mean, np.float32)
        self._std = np.asarray(m.std, np.float32)

    def _prepare(self, chips: np.ndarray) -> np.ndarray:
        x = chips.astype(np.float32)
        if self.m.colour == "BGR":
            x = x[..., ::-1]
        x = (x - self._mean) / self._std
        if self.m.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _run(self, chips: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: self._prepare(chips)})[0], np.float32)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        chips = np.asarray(chips)
        if chips.ndim == 3:
            chips = chips[None]
        if chips.ndim != 4 or chips.shape[1:] != (self.m.size, self.m.size, 3) or chips.dtype != np.uint8:
            raise ValueError(f"{self.m.model_id}: expected (N, {self.m.size}, {self.m.size}, 3) uint8 chips, "
                             f"got {chips.dtype} {chips.shape}")
        if len(chips) == 0:
            return np.zeros((0, self.m.dim), np.float32)
        if self.flip:
            v = self._run(np.concatenate([chips, chips[:, :, ::-1]]))
            v = (v[: len(chips)] + v[len(chips):]) / 2
        else:
            v = self._run(chips)
        if self.m.normalise:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v.astype(np.float32, copy=False)
