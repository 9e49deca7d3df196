"""Generated code in libs/lfr/pb matches protos/ exactly, and the protos follow the conventions."""

from __future__ import annotations

from pathlib import Path

from lfr.protogen import PB, PROTOS, generate


def test_generated_code_matches_protos(tmp_path: Path):
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    fresh["__init__.py"] = (tmp_path / "__init__.py").read_text()
    committed = {p.name: p.read_text() for p in PB.glob("*.py")}
    assert sorted(committed) == sorted(fresh), "run `tox -e protos` and commit libs/lfr/pb"
    for name, text in fresh.items():
        assert committed[name] == text, f"libs/lfr/pb/{name} is stale: run `tox -e protos`"


def test_proto_conventions():
    import re

    for path in PROTOS.rglob("*.proto"):
        text = path.read_text()
        domain = path.parent.parent.name
        assert f"package lfr.{domain}.v1;" in text, path
        for enum_name, body in re.findall(r"enum (\w+) \{(.*?)\}", text, re.S):
            first = re.search(r"(\w+) = 0;", body).group(1)
            assert first.endswith("_UNSPECIFIED"), (path, enum_name)
