"""An engine plugged in by manifest, live (#17): the built-in SFace exported to ONNX stands in for a force's
licensed engine. Installed with `lfr model add` into the state folder's engines, selected by LFR_MODEL for the
embedded system: a deployment records it; authorisation is refused (FAILED_PRECONDITION naming the engine)
until `lfr model check` has completed for it, then the same deployment is authorised."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lfr.bench.export_engines import export
from lfr.runtime.embedded import EmbeddedSystem

LFR = [sys.executable, "-m", "lfr.cli.main"]
ENGINE = "sface-2021dec-onnx"
FACE = "lfw-dev/Aaron_Sorkin/Aaron_Sorkin_0001.jpg"


@pytest.fixture(scope="module")
def state(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("state")
    manifest = export(tmp_path_factory.mktemp("vendor"), (ENGINE,))[ENGINE]
    r = subprocess.run([*LFR, "model", "add", str(manifest), "--engines-dir", str(folder / "engines")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "not checked yet" in r.stdout, r.stdout + r.stderr
    return folder


@pytest.fixture(scope="module")
def system(state):
    with EmbeddedSystem(state, env={"LFR_MODEL": ENGINE}) as s:  # engines: <state>/engines, the default
        yield s


def lfr(system, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*LFR, *args, "--state-dir", str(system.state_dir)], capture_output=True, text=True,
                          timeout=timeout)


def test_only_a_checked_engine_is_authorised_for_a_deployment(system, data):
    r = lfr(system, "deployment", "create", "--name", "byoe", "--site", "Queen Street, Cardiff", "--start", "-10m",
            "--end", "+1h", "--camera", "c", "--purpose", "p", "--as", "builder", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    version = d["model"]["version"]
    assert d["model"]["id"] == ENGINE and version.endswith("-onnx1"), d
    r = lfr(system, "watchlist", "add", "--deployment", d["id"], "--subject", "S1", "--category", "wanted-by-police",
            "--source", "press", "--legal-basis", "warrant", "--as", "builder", "--json", str(data / FACE))
    assert r.returncode == 0, r.stdout + r.stderr
    r = lfr(system, "deployment", "authorise", d["id"], "--as", "inspector")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr, r.stdout + r.stderr
    assert f"engine {ENGINE} {version} has no completed check" in r.stderr
    assert f"lfr model check {ENGINE}" in r.stderr
    # the check (small here: --limit; beside itself, so its vectors are computed once) records its completion
    # (its false-accept target is the running system's policy's, read with GetPolicy as a signed-in user)
    r = lfr(system, "model", "check", ENGINE, "--limit", "10", "--beside", ENGINE, "--quiet", timeout=600)
    assert r.returncode == 2 and "--as NAME" in r.stderr, r.stdout + r.stderr
    r = lfr(system, "model", "check", ENGINE, "--limit", "10", "--beside", ENGINE, "--quiet", "--as", "auditor",
            timeout=600)
    assert r.returncode == 0 and "TPIR@FPIR" in r.stdout and "recorded:" in r.stdout, r.stdout + r.stderr
    assert "false-accept target from: policy default-" in r.stdout and "of the running system" in r.stdout
    r = lfr(system, "model", "list", "--json")
    row = next(m for m in json.loads(r.stdout)["models"] if m["id"] == ENGINE)
    assert "NOT CHECKED" not in row["checked"] and "--limit 10" in row["checked"]
    r = lfr(system, "deployment", "authorise", d["id"], "--as", "inspector")
    assert r.returncode == 0 and "AUTHORISED" in r.stdout, r.stdout + r.stderr
