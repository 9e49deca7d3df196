"""Shared fixtures. Tests that need ../shared/data skip (saying so) when it is absent; nothing else skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfr.runtime.paths import data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data() -> Path:
    d = data_dir(required=False)
    if d is None:
        pytest.skip("../shared/data is absent: tests on real images and video need it")
    return d
