"""Quick end-to-end runs of `lfr bench verify` / `identify` on a slice of LFW View 1 (SFace, ours only), and a
few seconds of `lfr bench abuse` against an embedded system."""

from __future__ import annotations

import argparse
import time

import pytest

from lfr.bench import abuse, identify, verify
from lfr.bench.lfw import limit_pairs, read_pairs
from lfr.bench.pipeline import default_data_dir

LFW = default_data_dir() / "lfw-dev"
pytestmark = pytest.mark.skipif(
    not (LFW / "pairsDevTest.txt").is_file(), reason=f"shared LFW data not found at {LFW} (set LFR_DATA_DIR)"
)


def _args(module, *argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    module.add_arguments(ap)
    return ap.parse_args(list(argv))


def test_verify_view1_fusion_reports_pooled_cross_validation():
    r = verify.run(_args(verify, "--data", str(LFW), "--limit", "30", "--model", "fusion", "--json", "--quiet"))
    assert r["train_pairs"] == 30 and r["pairs"] == 30  # --limit: pairs per file, balanced
    pooled = r["pooled_10fold"]
    assert pooled["pairs"] == 60 and pooled["refit_per_fold"] and len(pooled["fold_accuracies"]) == 10
    assert 0.5 <= pooled["accuracy"] <= 1.0
    assert set(pooled["component_accuracy"]) == {"sface-2021dec", "dlib-resnet-v1"}  # same folds, each engine

    # every pair of the (limited) test split's images, counted here independently of the bench
    ap = r["all_pairs"]
    test_pairs = read_pairs(LFW / "pairsDevTest.txt")
    rels = sorted({x for p in limit_pairs(test_pairs, 30).pairs for x in (p.a, p.b)})
    names = [x.split("/")[0] for x in rels]
    n = len(rels)
    assert ap["images"] == n and ap["pairs"] == n * (n - 1) // 2
    assert ap["genuine"] == sum(names[i] == names[j] for i in range(n) for j in range(i + 1, n))
    assert set(ap["systems"]) == {"fusion-v1", "sface-2021dec", "dlib-resnet-v1"}
    for d in ap["systems"].values():
        wrong = d["false_rejects"] / ap["genuine"] + d["false_accepts"] / (ap["pairs"] - ap["genuine"])
        assert d["balanced_accuracy"] == pytest.approx(1 - wrong / 2)
        assert 0 <= d["eer"] <= 0.5
    v = ap["vs_best_single"]
    assert v["engine"] in {"sface-2021dec", "dlib-resnet-v1"}
    assert v["ci95"][0] <= v["ci95"][1]
    assert v["balanced_accuracy_diff"] == pytest.approx(
        ap["systems"]["fusion-v1"]["balanced_accuracy"] - ap["systems"][v["engine"]]["balanced_accuracy"]
    )
    assert "every pair of the test images" in verify.format_text(r)


def test_verify_sface_100_pairs():
    t0 = time.perf_counter()
    r = verify.run(
        _args(
            verify,
            "--data",
            str(LFW),
            "--pairs",
            str(LFW / "pairsDevTest.txt"),
            "--limit",
            "100",
            "--model",
            "sface",
            "--json",
            "--quiet",
        )
    )
    for key in (
        "model",
        "pairs",
        "accuracy",
        "accuracy_std",
        "threshold",
        "tar_at_far",
        "no_face",
        "seconds",
    ):
        assert key in r, key
    assert r["model"] == "sface-2021dec"
    assert r["pairs"] == 100
    assert r["accuracy"] > 0.9
    assert 0.0 <= r["accuracy_std"] < 0.2
    assert set(r["tar_at_far"]) >= {"0.001"} and 0.0 <= r["tar_at_far"]["0.001"] <= 1.0
    assert -1.0 < r["threshold"] < 1.0
    assert 0 <= r["no_face"] <= 5
    assert "reference" not in r
    assert time.perf_counter() - t0 < 60


def test_identify_sface_small_gallery():
    r = identify.run(
        _args(identify, "--data", str(LFW), "--limit", "60", "--model", "sface", "--json", "--quiet")
    )
    for key in (
        "rank1",
        "tpir_at_fpir",
        "gallery",
        "mated_probes",
        "nonmated_probes",
        "at_threshold",
        "no_face",
    ):
        assert key in r, key
    assert set(r["tpir_at_fpir"]) == {"0.01", "0.001"}  # 0.000167 only with >= 6000 non-mated probes
    assert r["gallery"] > 5 and r["mated_probes"] > 5 and r["nonmated_probes"] > 5
    assert r["rank1"] > 0.8
    assert 0.0 <= r["at_threshold"]["fpir"] <= 1.0 and 0.0 <= r["at_threshold"]["tpir"] <= 1.0


def test_abuse_few_seconds(tmp_path):
    r = abuse.run(_args(abuse, "--seconds", "3", "--state-dir", str(tmp_path / "state"), "--json"))
    for key in (
        "requests",
        "status_counts",
        "categories",
        "unauthenticated_allowed",
        "wrong_role_allowed",
        "rate_limited",
        "healthy_after",
        "rss_mb_before",
        "rss_mb_after",
        "elapsed_s",
        "ok",
    ):
        assert key in r, key
    assert r["unauthenticated_allowed"] == 0, r["examples"]
    assert r["wrong_role_allowed"] == 0, r["examples"]
    assert r["healthy_after"] is True and r["ok"] is True
    assert r["requests"] > 100 and r["rate_limited"] > 0  # the one flooding caller was limited
    assert r["client_errors"] == 0 and r["bombs_accepted"] == 0, r["examples"]
    assert {"malformed", "bomb", "oversized", "wrong_role", "flood"} <= set(r["categories"])
    assert any(k.startswith("unauthenticated/") for k in r["categories"])
    assert r["rss_mb_before"] > 0 and r["rss_mb_after"] > 0
