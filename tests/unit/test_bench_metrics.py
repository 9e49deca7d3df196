"""LFW pair-file parsing and the verification / open-set identification metrics."""

from __future__ import annotations

import numpy as np
import pytest

from lfr.bench import metrics
from lfr.bench.lfw import LfwFormatError, limit_pairs, parse_pairs


def test_parse_view1():
    pf = parse_pairs("2\nA\t1\t2\nB\t1\t3\nA\t1\tC\t2\nB\t2\tD\t1\n")
    assert not pf.is_tenfold and len(pf.pairs) == 4
    assert pf.pairs[0].a == "A/A_0001.jpg" and pf.pairs[0].b == "A/A_0002.jpg" and pf.pairs[0].same
    assert pf.pairs[3].a == "B/B_0002.jpg" and pf.pairs[3].b == "D/D_0001.jpg" and not pf.pairs[3].same
    lim = limit_pairs(pf, 2)
    assert [p.same for p in lim.pairs] == [True, False]


def test_parse_view2_folds():
    lines = ["2 1", "A 1 2", "A 1 B 1", "C 1 2", "C 1 D 1"]
    pf = parse_pairs("\n".join(lines))
    assert pf.is_tenfold and [p.fold for p in pf.pairs] == [0, 0, 1, 1]
    assert [p.same for p in pf.pairs] == [True, False, True, False]


@pytest.mark.parametrize("text", ["", "x\n", "1\nA 1 2\n", "1\nA 1 B 2\nA 1 2\n"])
def test_parse_errors(text):
    with pytest.raises(LfwFormatError):
        parse_pairs(text)


def test_best_threshold_separable():
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    t, acc = metrics.best_threshold(s, y)
    assert acc == 1.0 and 0.3 < t < 0.7


def test_kfold_and_tar():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    s = np.where(y, rng.normal(1, 0.3, 600), rng.normal(0, 0.3, 600))
    k = metrics.kfold_accuracy(s, y, metrics.balanced_folds(y, 10))
    assert 0.9 < k["accuracy"] < 1.0 and len(k["fold_accuracies"]) == 10
    tar = metrics.tar_at_far(s, y, (0.001, 0.01))
    assert 0 <= tar["0.001"] <= tar["0.01"] <= 1
    # FAR 0.001 on 300 impostors: nothing may be accepted -> threshold above the top impostor
    t = metrics.threshold_at_fpr(s[~y], 0.001)
    assert t > s[~y].max()
    assert np.mean(s[~y] >= metrics.threshold_at_fpr(s[~y], 0.01)) <= 0.01


def test_open_set_split_and_metrics():
    ids = {"A": ["A1", "A2", "A3"], "B": ["B1"], "C": ["C1", "C2"], "D": ["D1"]}
    sp = metrics.open_set_split(ids)
    assert sp.gallery == ["A1", "C1"] and sp.mated == ["A2", "A3", "C2"] and sp.nonmated == ["B1", "D1"]
    sim_m = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.8]])  # A2 right, A3 wrong (C top), C2 right
    sim_n = np.array([[0.5, 0.2], [0.1, 0.85]])
    idx, s1, s2 = metrics.top2(sim_m)
    correct = np.array(sp.gallery_ids)[idx] == np.array(sp.mated_ids)
    assert correct.tolist() == [True, False, True] and s2.tolist() == [0.1, 0.2, 0.1]
    r = metrics.open_set_metrics(s1, correct, metrics.top2(sim_n)[1], fpirs=(0.5,), threshold=0.6)
    assert r["rank1"] == pytest.approx(2 / 3)
    # FPIR 0.5 of 2 non-mated: one may pass -> T just above 0.5; A2 (0.9) passes, C2 (0.8) passes
    assert r["tpir_at_fpir"]["0.5"] == pytest.approx(2 / 3)
    assert r["at_threshold"] == {"threshold": 0.6, "tpir": pytest.approx(2 / 3), "fpir": 0.5}
    assert metrics.fpir_points(5999) == [0.01, 0.001] and metrics.fpir_points(6000)[-1] == 0.000167
