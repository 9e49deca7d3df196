"""Fit the ``fusion-v1`` model and calibrate every model's default (watchlist) threshold.

On LFW View 1 training data (``pairsDevTrain.txt``; its people are disjoint from ``pairsDevTest.txt``),
both engines (default settings: flip averaging on) embed every image.

- Fusion: a logistic model ``z = bias + w_sface·s_sface + w_dlib·s_dlib`` (log-odds of "same person")
  fitted by Newton's method (IRLS, tiny ridge) on the 1,100 matched + 1,100 mismatched training pairs.
  Agreement floors = each component's published 1:1 threshold (``threshold_1to1``): the fused score is
  capped at 0 when a component is below its floor (see :func:`lfr.models.scoring.fuse`).
- Thresholds: for each model, the similarity at a 1:1 false-accept rate of ``--far`` (1e-5) over *all*
  impostor pairs among the training images (5.9 M pairs), i.e. a watchlist of N alerts on ≈ N × FAR of
  passers-by. The fusion's is stored in the JSON; the components' are printed for engines.py.

Writes ``lfr/models/fusion_v1.json``:

    python -m lfr.bench.fit_fusion [--data DIR] [--limit N] [--far 1e-5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np

from lfr.bench import metrics
from lfr.bench.lfw import pair_images, read_pairs
from lfr.bench.pipeline import OursPipeline, data_dir, set_threads
from lfr.bench.verify import pair_scores
from lfr.models import scoring
from lfr.models.scoring import DLIB, FUSION, SFACE

COMPONENTS = [SFACE, DLIB]
OUT_NAME = "fusion_v1.json"


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-4, iters: int = 100) -> np.ndarray:
    """Weights [bias, w1, ..., wk] maximising the (lightly ridge-penalised) log-likelihood."""
    xa = np.hstack([np.ones((len(x), 1)), np.asarray(x, np.float64)])
    yv = np.asarray(y, np.float64)
    w = np.zeros(xa.shape[1])
    reg = ridge * np.eye(xa.shape[1])
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xa @ w)))
        g = xa.T @ (p - yv) + reg @ w
        h = (xa * (p * (1 - p))[:, None]).T @ xa + reg
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def impostor_thresholds(pipes: dict, root: Path, rels: list[str], combine, far: float) -> dict:
    """Similarity at 1:1 FAR ``far`` over all cross-identity pairs of ``rels``, per component and fused."""
    who = np.array([r.split("/")[0] for r in rels])
    iu = np.triu_indices(len(rels), 1)
    impostor = (who[:, None] != who[None, :])[iu]
    comp = {}
    for c, pipe in pipes.items():
        v = pipe.embed(root, rels).get(rels)
        comp[c] = scoring.similarity_matrix(scoring.COMPONENTS[c].metric, v[c], v[c])[iu]
    scores = {**comp, FUSION: combine(comp)}
    out = {}
    for k, s in scores.items():
        imp = s[impostor]
        t = metrics.threshold_at_fpr(imp, far)
        out[k] = {
            "threshold": t,
            "tar": float(np.mean(s[~impostor] >= t)),
            "impostor_pairs": int(impostor.sum()),
        }
    return out


def fit(root: Path, limit: int | None, device=None, quiet: bool = False, far: float = 1e-5) -> dict:
    pf = read_pairs(root / "pairsDevTrain.txt")
    if limit:
        from lfr.bench.lfw import limit_pairs

        pf = limit_pairs(pf, limit)
    scores, flips, pipes = {}, {}, {}
    t0 = time.perf_counter()
    for c in COMPONENTS:
        pipe = OursPipeline(c, device=device, quiet=quiet)
        s, y, _ = pair_scores(pipe, root, pf)
        scores[c] = s
        flips[c] = pipe.engine.flips[c]
        pipes[c] = pipe
    x = np.stack([scores[c] for c in COMPONENTS], 1)
    w = fit_logistic(x, y)
    bias, weights = float(w[0]), {c: float(w[i + 1]) for i, c in enumerate(COMPONENTS)}
    floors = {c: scoring.COMPONENTS[c].threshold_1to1 for c in COMPONENTS}

    def combine(comp: dict) -> np.ndarray:
        return scoring.fuse(np.stack([comp[c] for c in COMPONENTS], -1), [weights[c] for c in COMPONENTS], bias,
                            [floors[c] for c in COMPONENTS])

    fused = combine(scores)
    t_acc, acc = metrics.best_threshold(fused, y)
    cal = impostor_thresholds(pipes, root, pair_images(pf.pairs), combine, far)
    thr = cal[FUSION]["threshold"]
    single = {c: metrics.best_threshold(scores[c], y)[1] for c in COMPONENTS}
    return {
        "model_id": FUSION,
        "version": "1",
        "components": COMPONENTS,
        "weights": weights,
        "bias": bias,
        "floors": floors,
        "threshold": thr,
        "flip": flips,
        "calibration": {
            "far": far,
            "thresholds": {k: v["threshold"] for k, v in cal.items()},
            "tar_at_threshold": {k: v["tar"] for k, v in cal.items()},
            "impostor_pairs": cal[FUSION]["impostor_pairs"],
        },
        "train": {
            "pairs": len(pf.pairs),
            "accuracy_threshold": t_acc,
            "accuracy": acc,
            "component_accuracy": single,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "fitted_on": f"{root.name}/pairsDevTrain.txt",
        "produced_by": "python -m lfr.bench.fit_fusion",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use at most N training pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: lfr/models/fusion_v1.json")
    ap.add_argument("--far", type=float, default=1e-5, help="1:1 false-accept rate for the thresholds")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    doc = fit(data_dir(args), args.limit, args.device, args.quiet, args.far)
    out = args.out or Path(str(resources.files("lfr.models").joinpath(OUT_NAME)))
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
