"""Where the shared test/benchmark data lives: $LFR_DATA_DIR, else ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir(required: bool = True) -> Path | None:
    candidates = []
    if os.environ.get("LFR_DATA_DIR"):
        candidates.append(Path(os.environ["LFR_DATA_DIR"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    if required:
        raise FileNotFoundError(
            "shared data folder not found (looked in: " + ", ".join(map(str, candidates))
            + "); set LFR_DATA_DIR or pass the paths explicitly")
    return None
