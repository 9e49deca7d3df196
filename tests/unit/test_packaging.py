"""Every Python package in libs/ and services/ is declared in pyproject.toml (else a wheel would miss it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_is_declared():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    libs = REPO / "libs"
    found = {".".join(p.parent.relative_to(libs).parts) for p in libs.rglob("__init__.py")}
    found |= {f"lfr.{p.parent.name}" for p in (REPO / "services").glob("*/__init__.py")}
    assert found - declared == set()
    for pkg, folder in cfg["package-dir"].items():
        assert (REPO / folder / "__init__.py").is_file(), pkg
