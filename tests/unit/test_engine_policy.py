"""#17 item 2: the false-accept target of `lfr model check` is the policy's (engines.false_accept_target), read from
the policy file when no system runs; --far overrides it and the output says so. (The running system's GetPolicy
is exercised in tests/e2e/test_gallery_reembed.py.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lfr.bench import engine_check
from lfr.cli.model import policy_far
from lfr.policy import FALSE_ACCEPT_TARGET, PolicyError, parse_policy
from lfr.watchlist.service import load_policy

REPO = Path(__file__).resolve().parents[2]


def base(**overrides) -> dict:
    raw = json.loads((REPO / "services" / "watchlist" / "default_policy.json").read_text())
    raw.update(overrides)
    return raw


def test_shipped_policy_sets_the_target_and_absent_means_the_rule():
    assert load_policy("").false_accept_target == 1e-5
    raw = base()
    del raw["engines"]
    assert parse_policy(json.dumps(raw)).false_accept_target == FALSE_ACCEPT_TARGET
    assert parse_policy(json.dumps(base(engines={"false_accept_target": 1e-4}))).false_accept_target == 1e-4
    # the digest versions it: another target is another policy
    assert parse_policy(json.dumps(base(engines={"false_accept_target": 1e-4}))).digest != load_policy("").digest


@pytest.mark.parametrize("engines, message", [
    ([1e-5], "engines: must be an object"),
    ({"false_accept_target": "1e-5"}, "engines.false_accept_target: must be a number"),
    ({"false_accept_target": True}, "engines.false_accept_target: must be a number"),
    ({"false_accept_target": 0}, "engines.false_accept_target: must be above 0"),
    ({"false_accept_target": -1e-5}, "engines.false_accept_target: must be at least 0"),
    ({"false_accept_target": 0.5}, "engines.false_accept_target: must be above 0 and at most 0.01"),
    ({"false_accept_target": 1e-5, "far": 1}, "engines.far: unknown field"),
])
def test_bad_engines_section_is_refused_naming_the_field(engines, message):
    with pytest.raises(PolicyError, match=message.replace(".", r"\.")):
        parse_policy(json.dumps(base(engines=engines)))


def args(tmp_path: Path, far=None) -> argparse.Namespace:
    return argparse.Namespace(far=far, state_dir=tmp_path / "state", actor=None)


def test_no_running_system_reads_the_policy_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LFR_POLICY_FILE", raising=False)
    far, source = policy_far(args(tmp_path))
    assert far == 1e-5 and "shipped example policy" in source and "no running system" in source
    path = tmp_path / "force.json"
    path.write_text(json.dumps(base(version="force-7", engines={"false_accept_target": 2e-4})))
    monkeypatch.setenv("LFR_POLICY_FILE", str(path))
    far, source = policy_far(args(tmp_path))
    assert far == 2e-4 and source.startswith("policy force-7: policy file") and str(path) in source
    path.write_text(json.dumps(base(engines={"false_accept_target": 3})))
    with pytest.raises(SystemExit):
        policy_far(args(tmp_path))


def test_far_option_overrides_and_is_marked(tmp_path, monkeypatch):
    path = tmp_path / "force.json"
    path.write_text(json.dumps(base(engines={"false_accept_target": 2e-4})))
    monkeypatch.setenv("LFR_POLICY_FILE", str(path))
    far, source = policy_far(args(tmp_path, far=1e-3))
    assert far == 1e-3 and "explicit override" in source


def test_check_output_names_where_the_target_came_from():
    side = {"model": "m", "verification": {"accuracy": 0.99, "tar_at_far": {"0.01": 0.9, "0.001": 0.8}, "pairs": 10},
            "identification": {"rank1": 0.9, "tpir_at_fpir": {"0.01": 0.9, "0.001": 0.7}, "gallery": 5,
                               "mated_probes": 5, "nonmated_probes": 5},
            "speed": {"chips_per_s": 10.0}, "threshold_at_far": {"value": 0.4}}
    t = {"value": 0.41, "far_target": 1e-3, "impostor_pairs": 20_000, "note": "",
         "far_source": "--far (explicit override of the policy's target)"}
    text = engine_check.format_text({"model_id": "x", "model_version": "1", "data": "d", "limit": None,
                                     "engine": side, "beside": side, "speed_ratio": 1.0, "threshold": t,
                                     "not_measured": "n", "seconds": 1.0})
    assert "default threshold at FAR 0.001: 0.4100" in text
    assert "false-accept target from: --far (explicit override" in text
