"""Shared fixtures. Tests that need ../shared/data skip (saying so) when it is absent; nothing else skips."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from lfr.runtime.paths import data_dir

# Tests stop the processes they start with Ctrl-C (SIGINT) as a person at a terminal would. A shell starts a
# background job (`pytest ... &`, nohup) with SIGINT ignored, and every child inherits that, so such a run saw
# `lfr alerts watch` and a demo's cleanup ignore the signal: the suite's own process takes Ctrl-C as usual.
signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data() -> Path:
    d = data_dir(required=False)
    if d is None:
        pytest.skip("../shared/data is absent: tests on real images and video need it")
    return d


@pytest.fixture(scope="session")
def model_registry_kept():
    """A context manager: inside it engines may be registered (lfr model add, plug-ins); afterwards the model
    registry is as it was, so no other test sees them (they are process-wide tables)."""
    from lfr.models import engines, scoring

    @contextmanager
    def kept():
        tables = (scoring.COMPONENTS, scoring._SINGLE_THRESHOLDS, scoring._RECIPES, engines.MODELS,
                  engines.CHIP_MAKERS, engines.EMBEDDERS)
        saved = [dict(t) for t in tables]
        try:
            yield
        finally:
            for table, before in zip(tables, saved, strict=True):
                table.clear()
                table.update(before)

    return kept
