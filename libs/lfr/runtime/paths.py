"""Where things live when nobody says: the shared test/benchmark data ($LFR_DATA_DIR, else ../shared/data
beside the checkout) and a command's state folder (--state-dir, else $LFR_STATE_DIR, else ./state)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(given: str | Path | None = "") -> Path:
    """The state folder a command uses: the one given (--state-dir), else $LFR_STATE_DIR, else ./state. The
    one place this default is computed (the CLI, the benchmarks, the engines folder)."""
    return Path(given or os.environ.get("LFR_STATE_DIR") or Path.cwd() / "state")


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
