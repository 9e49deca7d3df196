"""``lfr bench identify``: open-set (watchlist) identification on an LFW-layout folder.

Protocol (NPL / NIST FRVT 1:N definitions, see :mod:`lfr.bench.metrics`): the gallery holds the
lowest-numbered image of every person with 2+ images; the other images of those people are mated probes;
every image of a person with exactly one image is a non-mated probe. Reported: rank-1 rate of the mated
probes, TPIR at FPIR 0.01 and 0.001 (and 1/6000 = 0.000167 with at least 6000 non-mated probes), and TPIR /
FPIR at the model's default threshold.

``--experiments`` also evaluates score post-processing on the same embeddings:

- T-norm (per probe) / Z-norm (per gallery entry) / S-norm (mean of the two) against an impostor cohort of
  faces known not to be on the list. The cohort is half of the non-mated identities; the probes evaluated
  with it are the other half's non-mated probes and half of the mated probes; then the halves swap. So no
  probe is ever normalised with a cohort containing itself, and the cohort never touches the gallery.
- rank-1/rank-2 margin rules: the decision statistic s1 − λ·s2 (λ = 0 is the plain top score).

What these experiments found on LFW View 1, and why none is in the default decision (the mislabelled pairs
that set TPIR at FPIR 0.001 on that folder; flip averaging kept; T/Z/S-norm and margin rules not kept, with the
margin rule recommended if dlib is ever deployed): docs/models-and-accuracy.md, with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lfr.bench import metrics
from lfr.bench.lfw import list_identities
from lfr.bench.pipeline import Pipeline, add_common_arguments, data_dir, make_pipelines, set_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="use at most N identities (smoke tests)")
    parser.add_argument("--experiments", action="store_true", help="also try T/Z/S-norm and margin rules")


def _select(identities: dict[str, list[str]], limit: int | None) -> dict[str, list[str]]:
    if not limit or limit >= len(identities):
        return identities
    names = sorted(identities)
    # keep the mix of single- and multi-image people: every k-th identity
    step = len(names) / limit
    return {names[int(i * step)]: identities[names[int(i * step)]] for i in range(limit)}


def _decide(sim: np.ndarray, gallery_ids: np.ndarray, probe_ids: np.ndarray | None, lam: float = 0.0):
    idx, s1, s2 = metrics.top2(sim)
    stat = s1 - lam * np.where(np.isfinite(s2), s2, 0.0) if lam else s1
    correct = gallery_ids[idx] == probe_ids if probe_ids is not None else None
    return stat, correct


def _norm(sim: np.ndarray, probe_cohort: np.ndarray | None, gallery_cohort: np.ndarray | None, kind: str):
    """sim (P, G); probe_cohort (P, K) probe-vs-cohort; gallery_cohort (G, K) gallery-vs-cohort."""
    if kind == "none":
        return sim
    out = []
    if kind in ("t", "s"):
        mu, sd = probe_cohort.mean(1, keepdims=True), probe_cohort.std(1, keepdims=True) + 1e-9
        out.append((sim - mu) / sd)
    if kind in ("z", "s"):
        mu, sd = gallery_cohort.mean(1)[None, :], gallery_cohort.std(1)[None, :] + 1e-9
        out.append((sim - mu) / sd)
    return sum(out) / len(out)


def evaluate(pipe: Pipeline, root, identities: dict[str, list[str]], fpirs, experiments: bool) -> dict:
    t0 = time.perf_counter()
    split = metrics.open_set_split(identities)
    everything = split.gallery + split.mated + split.nonmated
    emb = pipe.embed(root, everything)
    g = emb.get(split.gallery)
    m = emb.get(split.mated)
    n = emb.get(split.nonmated)
    gid = np.array(split.gallery_ids)
    mid = np.array(split.mated_ids)
    sim_m = pipe.scores(m, g)
    sim_n = pipe.scores(n, g)
    threshold = pipe.scorer.threshold
    ms, mc = _decide(sim_m, gid, mid)
    ns, _ = _decide(sim_n, gid, None)
    res = metrics.open_set_metrics(ms, mc, ns, fpirs, threshold=threshold)
    # The highest non-mated searches set the thresholds at low FPIR: list them, so label noise (the same
    # person filed under two names) is visible.
    top_idx = np.argmax(sim_n, axis=1)
    worst = np.argsort(-ns)[:5]
    res["nonmated_top"] = [
        {"probe": split.nonmated[i], "candidate": split.gallery[top_idx[i]], "score": float(ns[i])}
        for i in worst
    ]
    out = {
        "protocol": "open-set: gallery = first image of each person with 2+ images",
        "gallery": len(split.gallery),
        "mated_probes": len(split.mated),
        "nonmated_probes": len(split.nonmated),
        **res,
        "no_face": sum(1 for r in everything if emb.is_no_face(r)),
    }
    if experiments:
        out["experiments"] = run_experiments(pipe, emb, split, sim_m, sim_n, fpirs)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["impl"] = pipe.describe()
    return out


def run_experiments(pipe: Pipeline, emb, split, sim_m, sim_n, fpirs) -> dict:
    gid = np.array(split.gallery_ids)
    mid = np.array(split.mated_ids)
    g = emb.get(split.gallery)
    # two halves of the non-mated identities (alternating in name order) and of the mated probes (by person)
    n_half = np.arange(len(split.nonmated)) % 2
    persons = sorted(set(split.mated_ids))
    parity = {p: i % 2 for i, p in enumerate(persons)}
    m_half = np.array([parity[p] for p in split.mated_ids])
    res: dict = {}
    variants = {"none": None, "t": None, "z": None, "s": None}
    for kind in variants:
        ms_all = np.zeros(len(split.mated))
        ns_all = np.zeros(len(split.nonmated))
        lam_stats = {}
        for half in (0, 1):
            cohort_rel = [r for r, h in zip(split.nonmated, n_half) if h == 1 - half]
            c = emb.get(cohort_rel)
            pm, pn = m_half == half, n_half == half
            gc = pipe.scores(g, c) if kind in ("z", "s") else None
            pc_m = (
                pipe.scores(emb.get([r for r, k in zip(split.mated, pm) if k]), c)
                if kind in ("t", "s")
                else None
            )
            pc_n = (
                pipe.scores(emb.get([r for r, k in zip(split.nonmated, pn) if k]), c)
                if kind in ("t", "s")
                else None
            )
            sm = _norm(sim_m[pm], pc_m, gc, kind)
            sn = _norm(sim_n[pn], pc_n, gc, kind)
            for lam in (0.0, 0.25, 0.5, 1.0):
                a, ok = _decide(sm, gid, mid[pm], lam)
                b, _ = _decide(sn, gid, None, lam)
                st = lam_stats.setdefault(
                    lam, [np.zeros(len(ms_all)), np.zeros(len(ms_all), bool), np.zeros(len(ns_all))]
                )
                st[0][pm], st[1][pm], st[2][pn] = a, ok, b
        for lam, (a, ok, b) in lam_stats.items():
            r = metrics.open_set_metrics(a, ok, b, fpirs)
            res[f"{kind}norm_margin{lam:g}"] = {"rank1": r["rank1"], "tpir_at_fpir": r["tpir_at_fpir"]}
    return res


def run(args) -> dict:
    set_threads(args.threads)
    root = data_dir(args)
    identities = _select(list_identities(root), args.limit)
    n_nonmated = sum(1 for v in identities.values() if len(v) == 1)
    fpirs = metrics.fpir_points(n_nonmated)
    ours, ref = make_pipelines(args)
    result = {
        "model": ours.model_id,
        "data": str(root),
        **evaluate(ours, root, identities, fpirs, args.experiments),
    }
    if ref is not None:
        result["reference"] = {
            "model": ref.model_id,
            **evaluate(ref, root, identities, fpirs, args.experiments),
        }
    return result


def format_text(r: dict) -> str:
    def line(tag, d):
        tp = ", ".join(f"TPIR@FPIR{k}={v:.4f}" for k, v in d["tpir_at_fpir"].items())
        at = d["at_threshold"]
        return (
            f"{tag:<10} rank-1 {d['rank1']:.4f}  {tp}  at threshold {at['threshold']:.3f}: "
            f"TPIR {at['tpir']:.4f} FPIR {at['fpir']:.4f}  no_face {d['no_face']}  {d['seconds']:.1f}s"
        )

    lines = [
        f"{r['model']} on {r['data']}: gallery {r['gallery']}, mated probes {r['mated_probes']}, "
        f"non-mated probes {r['nonmated_probes']}",
        line("ours", r),
    ]
    if "reference" in r:
        lines.append(line("reference", r["reference"]))
    for k, v in r.get("experiments", {}).items():
        lines.append(
            f"  {k:<22} rank-1 {v['rank1']:.4f}  "
            + ", ".join(f"{a}={b:.4f}" for a, b in v["tpir_at_fpir"].items())
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="lfr bench identify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(ap)
    args = ap.parse_args(argv)
    r = run(args)
    print(json.dumps(r, indent=2) if args.json else format_text(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
