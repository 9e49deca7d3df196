"""The one place where vectors become a decision (numpy only: no torch, no weights, no I/O).

Every model id has a **recipe** (:class:`Recipe`): its components (one per embedder), each with its metric;
for a fused model the weights, bias and agreement floors; its default threshold; and the range a deployment's
threshold may take. The live watchlist search, galleries, operator-initiated and retrospective
identification, enrollment checks and the benchmarks all score through it, so the rules cannot drift apart.

Metrics (a component's similarity, higher = more alike):

``cosine``
    ``s = a·b`` of L2-normalised vectors (SFace). Stored in a vector DB with distance ``Cosine``; a hit's score
    *is* ``s``. Valid thresholds: [-1, 1].
``euclidean``
    ``s = 1 − ‖a − b‖₂`` of raw vectors (dlib: its rule "same iff d < 0.6" is ``s > 0.4``). Stored with
    distance ``Euclid``; a hit's score is the distance ``d`` and ``s = 1 − d``. Valid thresholds: [-1, 1].

Fusion (``fusion-v1``): ``z = bias + Σ wᵢ·sᵢ``, the log-odds of a logistic model (``fusion_v1.json``). **A
match needs agreement**: when any component is below its floor (its own 1:1 threshold), ``z`` is capped at 0
(even odds). So the valid thresholds of a fused model are *above* 0 (up to ``bias + Σ wᵢ·maxᵢ``): with any of
them, an engine under its floor vetoes the match.

A recipe travels between services in ``lfr.embedding.v1.ModelDescription`` (:meth:`Recipe.from_description`,
:meth:`Recipe.describe`): the service that produced the vectors says how they are scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

DLIB = "dlib-resnet-v1"
SFACE = "sface-2021dec"
FUSION = "fusion-v1"
ALIASES = {"dlib": DLIB, "sface": SFACE, "fusion": FUSION}
BUILT_IN = frozenset({DLIB, SFACE, FUSION})  # the models the project ships; others are registered (`register`)

COSINE = "cosine"
EUCLIDEAN = "euclidean"
# metric -> (vector-store distance, valid similarity thresholds)
METRICS: dict[str, tuple[str, tuple[float, float]]] = {
    COSINE: ("Cosine", (-1.0, 1.0)),
    EUCLIDEAN: ("Euclid", (-1.0, 1.0)),
}


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: {sorted(METRICS)}")


def similarity_matrix(metric: str, a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None,
                      dtype=np.float64) -> np.ndarray:
    """(P, M) similarities of vectors a (P, D) (or one (D,)) against b (M, D), computed in ``dtype`` (float64 by
    default; float32 is what a vector store computes in). ``b_sq``: the squared norms of b's rows, when the
    caller keeps them (euclidean)."""
    _check_metric(metric)
    a = np.asarray(a, dtype=dtype)
    b = np.asarray(b, dtype=dtype)
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    if metric == COSINE:
        return a @ b.T
    b_sq = (b * b).sum(1) if b_sq is None else b_sq
    d2 = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return 1.0 - np.sqrt(np.maximum(d2, 0.0))


def similarity_rows(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise similarities s(a[i], b[i]) of two (N, D) arrays: (N,)."""
    _check_metric(metric)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == COSINE:
        return (a * b).sum(-1)
    return 1.0 - np.sqrt(((a - b) ** 2).sum(-1))


def store_distance(metric: str) -> str:
    """The vector-store (Qdrant) distance that ranks as the metric does: 'Cosine' or 'Euclid'."""
    _check_metric(metric)
    return METRICS[metric][0]


def similarity_from_hit(metric: str, hit_score):
    """A vector-store hit's score (stored with :func:`store_distance`) as the metric's similarity."""
    _check_metric(metric)
    return hit_score if metric == COSINE else 1.0 - hit_score


def fuse(scores: np.ndarray, weights: np.ndarray, bias: float, floors: np.ndarray) -> np.ndarray:
    """Fusion with agreement: scores (..., K) per component → log-odds (...), capped at 0 where any component
    is below its floor. Also used by the benchmarks that refit weights (same rule, other weights)."""
    x = np.asarray(scores, dtype=np.float64)
    z = bias + x @ np.asarray(weights, dtype=np.float64)
    agree = (x >= np.asarray(floors, dtype=np.float64)).all(-1)
    return np.where(agree, z, np.minimum(z, 0.0))


@dataclass(frozen=True)
class Component:
    """One embedder's vectors: identity and metric."""

    model_id: str
    version: str
    dim: int
    metric: str
    chip_size: int = 0
    threshold_1to1: float = 0.0  # the engine's published one-to-one threshold (e.g. linking faces)

    @property
    def distance(self) -> str:
        return store_distance(self.metric)


@dataclass(frozen=True)
class Recipe:
    """How a model's vectors become a score and a decision."""

    model_id: str
    version: str
    parts: tuple[Component, ...]
    threshold: float  # the default decision threshold (on the model's score)
    weights: dict[str, float] = field(default_factory=dict)  # fused models only
    bias: float = 0.0
    floors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [p.model_id for p in self.parts]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"{self.model_id}: components must be distinct and at least one")
        for p in self.parts:
            _check_metric(p.metric)
        if self.weights or len(ids) > 1:
            if set(self.weights) != set(ids) or set(self.floors) != set(ids):
                raise ValueError(f"{self.model_id}: a fused model needs a weight and a floor per component")
        err = self.threshold_error(self.threshold)
        if err:
            raise ValueError(f"{self.model_id}: default threshold: {err}")

    # identity -------------------------------------------------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        return tuple(p.model_id for p in self.parts)

    @property
    def fused(self) -> bool:
        return bool(self.weights)

    def part(self, model_id: str) -> Component:
        for p in self.parts:
            if p.model_id == model_id:
                return p
        raise KeyError(f"{model_id!r} is not a component of {self.model_id}")

    # thresholds -----------------------------------------------------------------------------------
    @property
    def threshold_range(self) -> tuple[float, float]:
        """(low, high): single models accept low <= t <= high; fused ones low < t <= high (low = 0, even odds:
        at or below it an engine under its floor could no longer veto)."""
        if not self.fused:
            return METRICS[self.parts[0].metric][1]
        hi = self.bias + sum(self.weights[p.model_id] * METRICS[p.metric][1][1] for p in self.parts)
        return 0.0, float(hi)

    def threshold_error(self, t: float) -> str:
        """'' when t is a valid decision threshold of this model, else why not (for INVALID_ARGUMENT)."""
        lo, hi = self.threshold_range
        if not np.isfinite(t):
            return "threshold must be a finite number"
        if self.fused:
            if not lo < t <= hi:
                return (f"threshold must be above {lo:g} and at most {hi:.4g} for {self.model_id} (log-odds; "
                        f"default {self.threshold:.4g}): at or below even odds one engine could not veto")
        elif not lo <= t <= hi:
            return f"threshold must be a similarity between {lo:g} and {hi:g} for {self.model_id}"
        return ""

    # scoring --------------------------------------------------------------------------------------
    def similarity(self, model_id: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """A component's (P, M) similarity matrix."""
        return similarity_matrix(self.part(model_id).metric, a, b)

    def from_hit(self, model_id: str, hit_score):
        """A vector-store hit's score in a component's collection as that component's similarity."""
        return similarity_from_hit(self.part(model_id).metric, hit_score)

    def component_scores(self, probe: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per component similarity matrices (P, M)."""
        return {c: self.similarity(c, probe[c], refs[c]) for c in self.components}

    def combine(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The model's score from per-component similarities of the same shape (identity for a single model)."""
        if not self.fused:
            return np.asarray(scores[self.components[0]], dtype=np.float64)
        x = np.stack([np.asarray(scores[c], dtype=np.float64) for c in self.components], axis=-1)
        return fuse(x, np.array([self.weights[c] for c in self.components]), self.bias,
                    np.array([self.floors[c] for c in self.components]))

    def score_matrix(self, probe: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> np.ndarray:
        return self.combine(self.component_scores(probe, refs))

    def score(self, probe: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> np.ndarray:
        """Score of one probe ((D,) per component) against M references: (M,); of P probes: (P, M)."""
        s = self.score_matrix(probe, refs)
        single = all(np.asarray(probe[c]).ndim == 1 for c in self.components)
        return s[0] if single or s.shape[0] == 1 else s

    # the wire form --------------------------------------------------------------------------------
    def describe(self, out) -> Any:
        """Fill a ``lfr.embedding.v1.ModelDescription`` (passed in: this module imports no protobuf)."""
        out.model_id, out.model_version, out.default_threshold = self.model_id, self.version, self.threshold
        for p in self.parts:
            c = out.components.add()
            c.model_id, c.model_version, c.dim, c.chip_size, c.metric = (p.model_id, p.version, p.dim,
                                                                         p.chip_size, p.metric)
            c.threshold_1to1 = p.threshold_1to1
        if self.fused:
            out.fusion_weights.extend(self.weights[c] for c in self.components)
            out.fusion_floors.extend(self.floors[c] for c in self.components)
            out.fusion_bias = self.bias
        out.threshold_min, out.threshold_max = self.threshold_range
        return out

    @classmethod
    def from_description(cls, d) -> Recipe:
        """The recipe a ``ModelDescription`` carries (raises ValueError when it is not a coherent one)."""
        parts = tuple(Component(c.model_id, c.model_version, c.dim, c.metric, c.chip_size, c.threshold_1to1)
                      for c in d.components)
        ids = [p.model_id for p in parts]
        weights, floors = list(d.fusion_weights), list(d.fusion_floors)
        if weights and (len(weights) != len(ids) or len(floors) != len(ids)):
            raise ValueError(f"{d.model_id}: the description has {len(weights)} weights and {len(floors)} floors "
                             f"for {len(ids)} components")
        return cls(d.model_id, d.model_version, parts, float(d.default_threshold),
                   dict(zip(ids, map(float, weights), strict=True)) if weights else {},
                   float(d.fusion_bias), dict(zip(ids, map(float, floors), strict=True)) if weights else {})


class ExactIndex:
    """A watchlist's vectors in memory, searched exactly with a recipe, by the same rule as the watchlist's
    search: an entry's score per component is its best vector's; a fused model combines those with its floors.
    Similarities are computed in float32, as the vector store computes them (scores agree within ~1e-6).
    What a process holds to decide per face without asking the vector store (see ``lfr bench match``)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.entries: list[str] = []
        self._rows: dict[str, list[np.ndarray]] = {c: [] for c in recipe.components}
        self._owner: dict[str, list[int]] = {c: [] for c in recipe.components}
        self._packed: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry_id: str, vectors: dict[str, np.ndarray]) -> None:
        """One entry's vectors: component -> (n, D), at least one per component."""
        if any(len(np.atleast_2d(vectors.get(c, np.zeros((0, 1))))) == 0 for c in self.recipe.components):
            raise ValueError(f"entry {entry_id}: a vector of every component ({self.recipe.components}) is needed")
        n = len(self.entries)
        self.entries.append(entry_id)
        for c in self.recipe.components:
            v = np.atleast_2d(np.asarray(vectors[c], dtype=np.float64))
            self._rows[c].append(v)
            self._owner[c].extend([n] * len(v))
        self._packed = None

    def _pack(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per component: the rows (entries contiguous, in order), their squared norms, each entry's first row."""
        if self._packed is None:
            packed = {}
            for c in self.recipe.components:
                rows = np.concatenate(self._rows[c]).astype(np.float32)  # as the vector store computes
                owner = np.asarray(self._owner[c], dtype=np.int64)
                starts = np.searchsorted(owner, np.arange(len(self.entries)))
                packed[c] = (rows, (rows * rows).sum(1), None if len(rows) == len(self.entries) else starts)
            self._packed = packed
        return self._packed

    def search(self, probes: dict[str, np.ndarray], k: int = 1) -> list[list[tuple[str, float]]]:
        """Per probe ((P, D) per component, or one (D,)): the k best (entry id, score), best first."""
        if not self.entries:
            n = len(np.atleast_2d(next(iter(probes.values()))))
            return [[] for _ in range(n)]
        best = {}
        for c, (rows, sq, starts) in self._pack().items():
            sims = similarity_matrix(self.recipe.part(c).metric, probes[c], rows, sq, dtype=np.float32)
            # (P, entries): each entry's best vector (one vector per entry: the row is the entry)
            best[c] = sims if starts is None else np.maximum.reduceat(sims, starts, axis=1)
        scores = self.recipe.combine(best)
        k = min(k, scores.shape[1])
        # k = 1 (the live decision): an argmax costs far less than a partition over every entry
        top = scores.argmax(1)[:, None] if k == 1 else np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for i in range(scores.shape[0]):
            order = top[i][np.argsort(-scores[i, top[i]], kind="stable")]
            out.append([(self.entries[j], float(scores[i, j])) for j in order])
        return out


# The registry ---------------------------------------------------------------------------------------------
# Default thresholds: the similarity at a 1:1 false-accept rate of 1e-5 over the impostor pairs of the LFW View 1
# training images (flip on), printed by `python -m lfr.bench.fit_fusion` (see lfr.models.engines).
SFACE_THRESHOLD = 0.467
DLIB_THRESHOLD = 0.589

COMPONENTS: dict[str, Component] = {
    DLIB: Component(DLIB, "dlib_face_recognition_resnet_model_v1", 128, EUCLIDEAN, 150, 0.4),
    SFACE: Component(SFACE, "face_recognition_sface_2021dec_int8bq", 128, COSINE, 112, 0.363),
}
_SINGLE_THRESHOLDS = {DLIB: DLIB_THRESHOLD, SFACE: SFACE_THRESHOLD}


def register(component: Component, threshold: float) -> None:
    """Add (or replace) a single-engine model by id, e.g. an engine a force installed by manifest
    (:mod:`lfr.models.onnx_engine`). Its recipe is checked here; built-in ids cannot be replaced."""
    if component.model_id in BUILT_IN or component.model_id in ALIASES:
        raise ValueError(f"{component.model_id!r} is a built-in model id")
    Recipe(component.model_id, component.version, (component,), float(threshold))  # raises when incoherent
    COMPONENTS[component.model_id] = component
    _SINGLE_THRESHOLDS[component.model_id] = float(threshold)
    _RECIPES.pop(component.model_id, None)


def fusion_params() -> dict[str, Any]:
    try:
        return json.loads(resources.files("lfr.models").joinpath("fusion_v1.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            "lfr/models/fusion_v1.json is missing: produce it with `python -m lfr.bench.fit_fusion`") from None


def resolve_model_id(model_id: str) -> str:
    mid = ALIASES.get(model_id, model_id)
    if mid not in COMPONENTS and mid != FUSION:
        raise KeyError(f"unknown model {model_id!r}; known: {sorted([*COMPONENTS, FUSION])} or {sorted(ALIASES)}")
    return mid


_RECIPES: dict[str, Recipe] = {}


def recipe(model_id: str) -> Recipe:
    """The recipe of a model id (or alias)."""
    mid = resolve_model_id(model_id)
    r = _RECIPES.get(mid)
    if r is None:
        if mid == FUSION:
            p = fusion_params()
            comps = list(p["components"])
            r = Recipe(FUSION, str(p.get("version", "1")), tuple(COMPONENTS[c] for c in comps), float(p["threshold"]),
                       {c: float(p["weights"][c]) for c in comps}, float(p["bias"]),
                       {c: float(p["floors"][c]) for c in comps})
        else:
            r = Recipe(mid, COMPONENTS[mid].version, (COMPONENTS[mid],), _SINGLE_THRESHOLDS[mid])
        _RECIPES[mid] = r
    return r
