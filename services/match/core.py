"""Pure core of the match service: decide match / no match per face, keep the counters. No I/O."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Decision:
    face_index: int
    matched: bool
    entry_id: str = ""
    subject_ref: str = ""
    score: float = 0.0


def decide(candidate_lists, threshold: float) -> list[Decision]:
    """Top candidate per face against the deployment threshold (score: higher = more alike)."""
    out = []
    for i, cands in enumerate(candidate_lists):
        best = cands.candidates[0] if cands.candidates else None
        if best is not None and best.score >= threshold:
            out.append(Decision(i, True, best.entry_id, best.subject_ref, best.score))
        else:
            out.append(Decision(i, False, score=best.score if best else 0.0))
    return out


@dataclass
class Counters:
    """Per-deployment counts. Disposal times are kept as a bounded sample of numbers, nothing else."""

    faces_seen: int = 0
    alerts: int = 0
    nonmatches_disposed: int = 0
    stale_dropped: int = 0
    disposal_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))
    disposal_ms_max: float = 0.0
    changed_ns: int = 0

    def disposed(self, ms: float) -> None:
        self.nonmatches_disposed += 1
        self.disposal_ms.append(ms)
        self.disposal_ms_max = max(self.disposal_ms_max, ms)
        self.changed_ns = time.time_ns()

    @property
    def disposal_ms_p50(self) -> float:
        if not self.disposal_ms:
            return 0.0
        s = sorted(self.disposal_ms)
        return s[len(s) // 2]
