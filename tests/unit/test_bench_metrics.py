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


def test_balanced_threshold_weighs_classes_equally():
    # 2 genuine, 8 impostors; plain accuracy prefers rejecting the low genuine pair, balanced accuracy does not
    s = np.array([0.5, 0.9, 0.1, 0.2, 0.3, 0.4, 0.45, 0.55, 0.6, 0.65])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    t_plain, acc = metrics.best_threshold(s, y)
    t_bal, bal = metrics.best_threshold(s, y, balanced=True)
    assert 0.65 < t_plain < 0.9 and acc == 0.9
    assert 0.45 < t_bal < 0.5 and bal == pytest.approx(0.5 * (1.0 + 5 / 8))
    assert metrics.balanced_accuracy_at(s, y, t_bal) == pytest.approx(bal)


def test_equal_error_rate():
    y = np.array([1] * 10 + [0] * 10, bool)
    separable = np.concatenate([np.linspace(0.6, 1.0, 10), np.linspace(0.0, 0.4, 10)])
    assert metrics.equal_error_rate(separable, y) == 0.0
    # one genuine below one impostor: at the crossing 1 of 10 rejected and 1 of 10 accepted
    s = separable.copy()
    s[0], s[10] = 0.3, 0.7
    assert metrics.equal_error_rate(s, y) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        metrics.equal_error_rate(s[:10], y[:10])


def _all_pairs_balanced_accuracy(person, wrong_pairs, weights):
    """Brute force: expand people by their draw counts and count pairs one by one."""
    images = [(p, k, copy) for k, p in enumerate(person) for copy in range(int(weights[p]))]
    g = gi = fr = fa = 0
    for x in range(len(images)):
        for z in range(x + 1, len(images)):
            (p, i, cp), (q, j, cq) = images[x], images[z]
            if i == j:
                continue  # the same image twice (a redrawn person): not a pair
            if p == q and cp != cq:
                continue  # two copies of one person are neither genuine nor impostor pairs
            key = (min(i, j), max(i, j))
            if p == q:
                g += 1
                fr += key in wrong_pairs
            else:
                gi += 1
                fa += key in wrong_pairs
    return 0.5 * ((1 - fr / g) + (1 - fa / gi))


def test_person_bootstrap_matches_brute_force():
    rng = np.random.default_rng(3)
    person = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # image -> person
    n = len(person)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    wrong = {pairs[k] for k in rng.choice(len(pairs), 7, replace=False)}
    pa = np.array([person[i] for i, j in pairs if (i, j) in wrong])
    pb = np.array([person[j] for i, j in pairs if (i, j) in wrong])
    boot = metrics.person_bootstrap(np.bincount(person), {"x": (pa, pb)}, n_boot=20, seed=5)["x"]
    assert boot[0] == pytest.approx(_all_pairs_balanced_accuracy(person, wrong, np.ones(4)))
    draws = np.random.default_rng(5)
    for b in range(1, 21):
        m = np.bincount(draws.integers(0, 4, 4), minlength=4)
        if (m * np.bincount(person) * (np.bincount(person) - 1)).sum() == 0 or (m > 0).sum() < 2:
            continue  # no genuine or no impostor pair in this draw
        assert boot[b] == pytest.approx(_all_pairs_balanced_accuracy(person, wrong, m)), b
