"""Verification and open-set identification metrics (numpy only). Scores are similarities: higher = more alike.

Verification decision: "same person" iff score >= threshold.

Open-set identification, as in NIST FRVT 1:N / NPL's LFR evaluations:

- gallery: for every person with 2+ images, their lowest-numbered image;
- mated probes: every other image of those people;
- non-mated probes: every image of people with exactly one image (never in the gallery).
- A mated search is a true positive at threshold T when its mate is at rank 1 with score >= T:
  TPIR(T) = 1 - FNIR(T). A non-mated search is a false positive when its top score is >= T:
  FPIR(T). TPIR at FPIR x uses the smallest T with FPIR(T) <= x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------------
def best_threshold(scores: np.ndarray, labels: np.ndarray, balanced: bool = False) -> tuple[float, float]:
    """Threshold maximising accuracy of ``score >= t`` on (scores, labels); returns (t, accuracy).

    Candidates are the midpoints between consecutive distinct scores (and just beyond both ends);
    among equally accurate thresholds the middle one of the best run is taken. ``balanced``: maximise the mean
    of the true accept and true reject rates instead (for sets with many more impostor than genuine pairs).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n = len(s)
    if n == 0:
        raise ValueError("no scores")
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1e-6]])
    pos_sorted = np.sort(s[y])
    neg_sorted = np.sort(s[~y])
    # accepted positives = #pos >= t ; rejected negatives = #neg < t
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, cands, side="left")
    tn = np.searchsorted(neg_sorted, cands, side="left")
    if balanced:
        acc = 0.5 * (tp / max(1, len(pos_sorted)) + tn / max(1, len(neg_sorted)))
    else:
        acc = (tp + tn) / n
    best = acc.max()
    idx = np.flatnonzero(acc == best)
    return float(cands[idx[len(idx) // 2]]), float(best)


def accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    return float(np.mean((s >= threshold) == y))


def balanced_accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Mean of the true accept rate and the true reject rate of ``score >= threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    return float(0.5 * (np.mean(s[y] >= threshold) + np.mean(s[~y] < threshold)))


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> float:
    """The error rate where false rejects and false accepts are equal (mean of the two at the closest threshold)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("equal error rate needs genuine and impostor scores")
    cands = np.unique(s)
    frr = np.searchsorted(pos, cands, side="left") / len(pos)  # genuine below t
    far = (len(neg) - np.searchsorted(neg, cands, side="left")) / len(neg)  # impostors at or above t
    k = int(np.argmin(np.abs(frr - far)))
    return float((frr[k] + far[k]) / 2.0)


def person_bootstrap(
    images_per_person: np.ndarray, wrong: dict[str, tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Balanced accuracy over *every* pair of a set of images, recomputed on people resampled with replacement.

    Pairs that share a person are not independent, so a confidence interval must resample people, not pairs.
    ``images_per_person[p]`` = n_p; ``wrong[name]`` = (person of a, person of b) for each pair the system decided
    wrongly (same person: a false reject; different: a false accept). A person drawn m times contributes their
    genuine pairs m times and their impostor pairs with q m_p·m_q times. Row 0 of each result uses every person
    once (the point estimate); the rest are the ``n_boot`` resamples, the same ones for every system (paired).
    """
    n = np.asarray(images_per_person, dtype=np.float64)
    people = len(n)
    rng = np.random.default_rng(seed)
    draws = [np.ones(people)] + [np.bincount(rng.integers(0, people, people), minlength=people).astype(np.float64)
                                 for _ in range(n_boot)]
    m = np.stack(draws)  # (B+1, people)
    genuine = m @ (n * (n - 1) / 2.0)
    mn = m * n
    impostor = (mn.sum(1) ** 2 - (mn**2).sum(1)) / 2.0
    out = {}
    for name, (pa, pb) in wrong.items():
        pa, pb = np.asarray(pa, dtype=int), np.asarray(pb, dtype=int)
        same = pa == pb
        fr = m[:, pa[same]].sum(1)
        fa = (m[:, pa[~same]] * m[:, pb[~same]]).sum(1)
        out[name] = 0.5 * ((1.0 - fr / np.maximum(genuine, 1)) + (1.0 - fa / np.maximum(impostor, 1)))
    return out


def kfold_accuracy(scores, labels, folds) -> dict:
    """Standard LFW protocol: for each fold, threshold chosen on the other folds, accuracy on this fold."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    f = np.asarray(folds)
    accs, thrs = [], []
    for k in np.unique(f):
        tr, te = f != k, f == k
        t, _ = best_threshold(s[tr], y[tr])
        thrs.append(t)
        accs.append(accuracy_at(s[te], y[te], t))
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(thrs)),
        "fold_accuracies": [float(a) for a in accs],
    }


def balanced_folds(labels, n_folds: int = 10) -> np.ndarray:
    """Fold ids for a single pair set: matched and mismatched pairs each cut into n consecutive chunks."""
    y = np.asarray(labels, dtype=bool)
    folds = np.zeros(len(y), dtype=int)
    for val in (True, False):
        idx = np.flatnonzero(y == val)
        folds[idx] = np.arange(len(idx)) * n_folds // max(1, len(idx))
    return folds


def threshold_at_fpr(negative_scores, rate: float) -> float:
    """Smallest threshold t with fraction(negative >= t) <= rate."""
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    if len(neg) == 0:
        return -np.inf
    k = int(np.floor(rate * len(neg) + 1e-9))  # how many negatives may be accepted
    if k >= len(neg):
        return float(neg[-1])
    return float(np.nextafter(neg[k], np.inf))


def tar_at_far(scores, labels, fars=(0.001, 0.01)) -> dict[str, float]:
    """True accept rate at each false accept rate (threshold set on the impostor scores themselves)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    out = {}
    for far in fars:
        t = threshold_at_fpr(s[~y], far)
        out[_key(far)] = float(np.mean(s[y] >= t))
    return out


def _key(x: float) -> str:
    return f"{x:g}" if x >= 1e-4 else f"{x:.6f}".rstrip("0")


# ---------------------------------------------------------------------------------------------------------
# open-set identification
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenSetSplit:
    gallery: list[str]  # image ids, one per enrolled identity
    gallery_ids: list[str]  # identity of each gallery entry
    mated: list[str]  # mated probe image ids
    mated_ids: list[str]
    nonmated: list[str]
    nonmated_ids: list[str]


def open_set_split(identities: dict[str, list[str]]) -> OpenSetSplit:
    """identities: {person: [image ids in image-number order]} (see lfw.list_identities)."""
    g, gi, m, mi, n, ni = [], [], [], [], [], []
    for person, imgs in sorted(identities.items()):
        if len(imgs) >= 2:
            g.append(imgs[0])
            gi.append(person)
            m.extend(imgs[1:])
            mi.extend([person] * (len(imgs) - 1))
        elif len(imgs) == 1:
            n.append(imgs[0])
            ni.append(person)
    return OpenSetSplit(g, gi, m, mi, n, ni)


def fpir_points(n_nonmated: int) -> list[float]:
    """FPIR operating points worth reporting: 0.01, 0.001, and 1/6000 (0.000167) with >= 6000 non-mated."""
    pts = [0.01, 0.001]
    if n_nonmated >= 6000:
        pts.append(0.000167)
    return pts


def open_set_metrics(
    mated_stat: np.ndarray,
    mated_correct: np.ndarray,
    nonmated_stat: np.ndarray,
    fpirs=(0.01, 0.001),
    threshold: float | None = None,
) -> dict:
    """TPIR at FPIR from per-search decision statistics.

    mated_stat: decision statistic of each mated search (normally its top score); mated_correct: whether
    the rank-1 candidate is the mate; nonmated_stat: decision statistic of each non-mated search.
    """
    ms = np.asarray(mated_stat, dtype=np.float64)
    mc = np.asarray(mated_correct, dtype=bool)
    ns = np.asarray(nonmated_stat, dtype=np.float64)
    out: dict = {"rank1": float(mc.mean()) if len(mc) else 0.0, "tpir_at_fpir": {}, "threshold_at_fpir": {}}
    for x in fpirs:
        t = threshold_at_fpr(ns, x)
        out["tpir_at_fpir"][_key(x)] = float(np.mean(mc & (ms >= t))) if len(ms) else 0.0
        out["threshold_at_fpir"][_key(x)] = t
    if threshold is not None:
        out["at_threshold"] = {
            "threshold": float(threshold),
            "tpir": float(np.mean(mc & (ms >= threshold))) if len(ms) else 0.0,
            "fpir": float(np.mean(ns >= threshold)) if len(ns) else 0.0,
        }
    return out


def top2(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (P, G) similarity matrix: (index of best, best score, second-best score)."""
    sim = np.asarray(sim)
    if sim.shape[1] == 1:
        idx = np.zeros(sim.shape[0], dtype=int)
        return idx, sim[:, 0], np.full(sim.shape[0], -np.inf)
    part = np.argpartition(-sim, 1, axis=1)[:, :2]
    a = np.take_along_axis(sim, part, axis=1)
    first = np.argmax(a, axis=1)
    idx = part[np.arange(len(part)), first]
    s1 = a[np.arange(len(a)), first]
    s2 = a[np.arange(len(a)), 1 - first]
    return idx, s1, s2
