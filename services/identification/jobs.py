"""Pure core of retrospective identification jobs: the job record and its states, progress and ETA, and the
appearance tracker that groups one person's faces in consecutive frames. No I/O: the runner
(`identification.py`) decodes media, calls detection and embedding, searches and persists.

    QUEUED --> RUNNING --> SUCCEEDED | FAILED
       |          |
       +----------+--> CANCELLED          (a restart leaves RUNNING: the job resumes from its checkpoint)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lfr.media import Item
from lfr.models.boxes import Box, iou
from lfr.pb import identification_pb2 as pb

J = pb.JobState
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (J.JOB_STATE_QUEUED, J.JOB_STATE_RUNNING, J.JOB_STATE_SUCCEEDED,
                                                 J.JOB_STATE_FAILED, J.JOB_STATE_CANCELLED)
FINISHED = {SUCCEEDED, FAILED, CANCELLED}
SEARCH, REEMBED = "search", "gallery-reembed"  # job kinds (#17: a gallery re-embedded after a model change)


def state_name(state: int) -> str:
    return J.Name(state).removeprefix("JOB_STATE_")


@dataclass
class Progress:
    items_total: int = 0
    items_done: int = 0
    frames_total: int = 0
    frames_done: int = 0
    faces_found: int = 0
    appearances: int = 0
    results: int = 0
    media_seconds_done: float = 0.0
    run_seconds: float = 0.0  # wall-clock seconds spent working on the job (all runs)


@dataclass
class Cursor:
    """Where the job stands: the item being worked on and, in a video, the time of the last frame examined."""

    item_index: int = 0
    item_time_s: float = -1.0  # -1: nothing of this item examined yet
    frame_index: int = -1
    checkpoint: int = 0  # number of the open-appearances file in the job's folder (0 = none)


@dataclass
class JobRecord:
    job_id: str
    media: list[dict]  # [{"path": ...} | {"url": ...}]
    gallery: str
    deployment_id: str
    case_reference: str
    justification: str
    actor: str
    k: int
    threshold: float
    investigation: bool
    fps: float
    model_id: str
    model_version: str
    submitted_at_ns: int
    state: int = QUEUED
    items: list[Item] | None = None  # resolved when the job first runs
    progress: Progress = field(default_factory=Progress)
    cursor: Cursor = field(default_factory=Cursor)
    started_at_ns: int = 0
    finished_at_ns: int = 0
    error: str = ""
    resumes: int = 0
    cancelled_by: str = ""
    kind: str = "search"  # SEARCH, or REEMBED: a gallery's stored images re-embedded with model_id/model_version

    @property
    def reembed(self) -> bool:
        return self.kind == REEMBED

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> JobRecord:
        data = dict(data)
        items = data.get("items")
        data["items"] = None if items is None else [Item(**i) for i in items]
        data["progress"] = Progress(**data.get("progress", {}))
        data["cursor"] = Cursor(**data.get("cursor", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def target(self) -> str:
        return f"gallery {self.gallery}" if self.gallery else f"the watchlist of deployment {self.deployment_id}"


def reembed_progress(images_done: int, images_total: int) -> str:
    """How a running re-embedding is named in a refusal: 'N of M images'."""
    return f"{images_done} of {images_total} images"


def eta_s(frames_left: int, frames_done_now: int, elapsed_s: float) -> float:
    """Seconds left at the rate of this run (0 = unknown)."""
    if frames_left <= 0 or frames_done_now <= 0 or elapsed_s <= 0:
        return 0.0
    return frames_left * elapsed_s / frames_done_now


def validate_job(req: pb.SubmitJobRequest) -> str:
    """'' when the request's fields are acceptable, else the reason."""
    if not req.media:
        return "at least one media source (a path or a URL) is required"
    for m in req.media:
        which = m.WhichOneof("source")
        if which is None or not getattr(m, which).strip():
            return "each media source needs a path or a URL"
        if which == "url" and "://" not in m.url:
            return f"not a URL: {m.url!r} (give files and folders as path)"
    if req.WhichOneof("target") is None:
        return "a target is required: a gallery or a deployment's watchlist"
    for name in ("case_reference", "justification", "actor"):
        if not getattr(req, name).strip():
            return f"{name} is required"
    if not 0 <= req.k <= 20:
        return "k must be between 1 and 20"
    if req.fps < 0 or req.fps > 30:
        return "fps must be between 0 (the default) and 30"
    # the threshold's range depends on the target's model: checked once the target is known (lfr.models.scoring)
    return ""


# Appearance tracking -----------------------------------------------------------------------------------------
@dataclass
class Hit:
    """One candidate for one face: `key` identifies the candidate (subject or watchlist entry)."""

    key: str
    score: float
    info: dict  # what a result shows: subject_ref, image_id or entry_id, category, provenance


@dataclass
class Sighting:
    t: float
    frame_index: int
    box: Box
    vector: np.ndarray  # of the linking component (for tracking only)
    hits: list[Hit]


@dataclass
class Best:
    score: float
    t: float
    frame_index: int
    box: Box
    info: dict


@dataclass
class Appearance:
    appearance_id: int
    item_index: int
    start_t: float
    last_t: float
    last_box: Box
    vector: np.ndarray
    sightings: int = 1
    best: dict[str, Best] = field(default_factory=dict)

    def add_hits(self, s: Sighting) -> None:
        for h in s.hits:
            b = self.best.get(h.key)
            if b is None or h.score > b.score:
                self.best[h.key] = Best(h.score, s.t, s.frame_index, s.box, h.info)

    def ranked(self, k: int, threshold: float, investigation: bool) -> list[tuple[str, Best]]:
        """The candidates to report: the top k (investigation mode) or the top k at or above the threshold."""
        ranked = sorted(self.best.items(), key=lambda kv: (-kv[1].score, kv[0]))
        if not investigation:
            ranked = [kv for kv in ranked if kv[1].score >= threshold]
        return ranked[:k]


class AppearanceTracker:
    """Groups faces of consecutive frames of one video into appearances: a face joins an open appearance whose
    faces it resembles (similarity to their mean >= `link_threshold`, the model's one-to-one threshold); among
    several, the most alike, box overlap breaking near-ties; each appearance takes at most one face per frame.
    Position alone never links (two people filmed at one spot one after the other stay apart). An appearance
    closes when it has not been seen for `gap_s` of video time, or at the end of the item."""

    def __init__(self, similarity: Callable[[np.ndarray, np.ndarray], float], link_threshold: float,
                 gap_s: float = 2.0, normalise: bool = True):
        self.similarity = similarity
        self.link_threshold = link_threshold
        self.gap_s = gap_s
        self.normalise = normalise
        self.open: list[Appearance] = []
        self.next_id = 1

    def observe(self, item_index: int, t: float, sightings: list[Sighting]) -> list[Appearance]:
        """Add one frame's faces; returns the appearances that closed (gone for longer than gap_s)."""
        closed = [a for a in self.open if t - a.last_t > self.gap_s]
        self.open = [a for a in self.open if t - a.last_t <= self.gap_s]
        pairs = []
        for si, s in enumerate(sightings):
            for ai, a in enumerate(self.open):
                sim = float(self.similarity(a.vector, s.vector))
                overlap = iou(a.last_box, s.box)
                if sim >= self.link_threshold:
                    pairs.append((sim + 0.1 * overlap, si, ai))
        pairs.sort(key=lambda p: -p[0])
        used_s, used_a = set(), set()
        for _, si, ai in pairs:
            if si in used_s or ai in used_a:
                continue
            used_s.add(si)
            used_a.add(ai)
            a, s = self.open[ai], sightings[si]
            n = a.sightings
            v = (a.vector * n + s.vector) / (n + 1)
            if self.normalise:
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            a.vector = v.astype(np.float32)
            a.last_t, a.last_box, a.sightings = t, s.box, n + 1
            a.add_hits(s)
        for si, s in enumerate(sightings):
            if si in used_s:
                continue
            a = Appearance(self.next_id, item_index, t, t, s.box, np.asarray(s.vector, dtype=np.float32))
            self.next_id += 1
            a.add_hits(s)
            self.open.append(a)
        return closed

    def close_all(self) -> list[Appearance]:
        closed, self.open = self.open, []
        return closed

    # Checkpoint (the runner keeps it in the job's temporary folder, deleted when the job ends) --------------
    def state(self) -> dict:
        return {"next_id": self.next_id, "open": [
            {"appearance_id": a.appearance_id, "item_index": a.item_index, "start_t": a.start_t,
             "last_t": a.last_t, "last_box": list(a.last_box), "vector": [float(x) for x in a.vector],
             "sightings": a.sightings,
             "best": {k: dataclasses.asdict(b) | {"box": list(b.box)} for k, b in a.best.items()}}
            for a in self.open]}

    def restore(self, state: dict) -> None:
        self.next_id = int(state.get("next_id", 1))
        self.open = []
        for o in state.get("open", []):
            a = Appearance(o["appearance_id"], o["item_index"], o["start_t"], o["last_t"], tuple(o["last_box"]),
                           np.asarray(o["vector"], dtype=np.float32), o["sightings"])
            a.best = {k: Best(b["score"], b["t"], b["frame_index"], tuple(b["box"]), b["info"])
                      for k, b in o["best"].items()}
            self.open.append(a)


def clock(seconds: float) -> str:
    """00:12 or 1:02:03: how a result names a time in a video."""
    s = max(0, int(math.floor(seconds + 1e-6)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
