"""Enrollment from real photos (#14) through the whole system and the CLI, under a policy that takes a dominant
face: a photo of two people is refused listing both faces (box, inter-eye pixels, detector score), then enrolled
with --face 2; a press photo with a partial second face at its edge is enrolled by the dominant-face rule; the
provenance of each says which face and why; `watchlist import` enrolls what it can, lists the subjects refused
in its JSON and exits with their number."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from lfr.runtime.embedded import EmbeddedSystem
from lfr.watchlist.service import load_policy

LFR = [sys.executable, "-m", "lfr.cli.main"]
TWO = "faces/misc/two_people.jpg"  # two people side by side, the same size: no face dominates
PRESS = "faces/deepface/tests/unit/dataset/img59.jpg"  # a portrait, a second face cut by the left edge


@pytest.fixture(scope="module")
def system(tmp_path_factory, data):
    policy = json.loads(load_policy("").canonical_json)
    policy["version"] = "force-14"
    policy["enrollment"].update(several_faces="dominant", max_image_age_days=0)
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps(policy))
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env={"LFR_POLICY_FILE": str(path)}) as s:
        yield s


def lfr(system, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LFR, *args, "--state-dir", str(system.state_dir)], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def deployment(system):
    r = lfr(system, "deployment", "create", "--name", "faces", "--site", "Queen Street, Cardiff", "--start", "-10m",
            "--end", "+1h", "--camera", "c", "--purpose", "p", "--as", "builder", "--id-only")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def add(system, deployment, subject, *args):
    return lfr(system, "watchlist", "add", "--deployment", deployment, "--subject", subject, "--category",
               "wanted-by-police", "--source", "press", "--legal-basis", "warrant", "--as", "builder", "--json", *args)


def provenance(system, deployment, subject) -> dict:
    r = lfr(system, "watchlist", "show", "--deployment", deployment, "--as", "builder", "--json")
    assert r.returncode == 0, r.stderr
    entry = next(e for e in json.loads(r.stdout)["entries"] if e["subject"] == subject)
    return entry["provenance"]["faces"][0]


def test_two_faces_are_refused_listed_then_enrolled_with_face(system, deployment, data):
    r = add(system, deployment, "pair", str(data / TWO))
    assert r.returncode == 1, r.stdout + r.stderr
    [item] = json.loads(r.stdout)
    assert not item["accepted"] and "2 faces found and none dominates" in item["reason"]
    assert [f["face"] for f in item["faces"]] == [1, 2]
    for f in item["faces"]:
        assert len(f["box"]) == 4 and f["inter_eye_px"] > 40 and f["detector_score"] > 0.6
        said = re.search(rf"face {f['face']}: box \([0-9,\-()]+\), (\d+) px between the eyes", item["reason"])
        assert said and abs(int(said.group(1)) - f["inter_eye_px"]) <= 1, item["reason"]
    r = add(system, deployment, "pair", "--face", "2", str(data / TWO))
    assert r.returncode == 0, r.stdout + r.stderr
    [item] = json.loads(r.stdout)
    assert item["accepted"] and item["face"] == 2 and item["face_choice"] == "face 2 of 2, chosen by the enroller"
    assert provenance(system, deployment, "pair") == {"face": 2, "choice": "face 2 of 2, chosen by the enroller"}
    r = add(system, deployment, "pair3", "--face", "3", str(data / TWO))
    assert r.returncode == 1 and "face 3 does not exist: the image holds 2 face(s)" in r.stdout


def test_the_dominant_face_policy_takes_the_subject_of_a_press_photo(system, deployment, data):
    r = add(system, deployment, "press", str(data / PRESS))
    assert r.returncode == 0, r.stdout + r.stderr
    [item] = json.loads(r.stdout)
    assert item["accepted"] and item["face"] == 1 and len(item["faces"]) == 2
    assert "face 1 of 2 dominates" in item["face_choice"] and "policy force-14" in item["face_choice"]
    assert provenance(system, deployment, "press")["choice"] == item["face_choice"]


def test_import_enrolls_what_it_can_and_exits_with_the_number_refused(system, deployment, data, tmp_path):
    for subject, image in (("press2", PRESS), ("pair2", TWO), ("group", "faces/knn_examples/test/obama_and_biden.jpg")):
        (tmp_path / subject).mkdir()
        shutil.copy(data / image, tmp_path / subject)
    r = lfr(system, "watchlist", "import", "--deployment", deployment, "--category", "wanted-by-police", "--source",
            "press", "--legal-basis", "warrant", "--as", "builder", "--json", str(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["entries_added"] == 1 and out["subjects_refused"] == 2
    refused = {s["subject"]: s for s in out["refused"]}
    assert set(refused) == {"pair2", "group"}
    assert len(refused["pair2"]["refused_images"][0]["faces"]) == 2
    assert len(refused["group"]["refused_images"][0]["faces"]) >= 3
    assert [s["subject"] for s in out["by_subject"] if s["added"]] == ["press2"]
