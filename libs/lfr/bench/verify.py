"""``lfr bench verify``: LFW verification accuracy from raw images (detect → align → embed → score).

Protocols (see :func:`lfr.bench.lfw.find_protocol`):

- a 10-fold file (View 2 ``pairs.txt``, in DIR or via ``--pairs``): the standard 10-fold accuracy, the
  threshold chosen on 9 folds and applied to the 10th; ``accuracy_std`` = std over the 10 folds;
- ``pairsDevTrain.txt`` + ``pairsDevTest.txt`` in DIR (View 1): threshold fitted on train, accuracy on test;
  ``accuracy_std`` = std of the accuracy over 10 equal slices of the test pairs at that threshold;
- a single-set file via ``--pairs``: 10-fold cross-validation within it.

View 1 also reports ``pooled_10fold``: 10-fold cross-validation over train and test pairs together (3,200
pairs, balanced folds, threshold chosen on nine folds); for fusion the logistic weights are refitted on the nine
folds each time, so no fold is scored by weights that saw it. The 1,000-pair test split alone cannot tell apart
accuracies within about 0.5 % (one pair is 0.1 %); the pooled figure has three times the pairs.

View 1 also reports ``all_pairs``: every pair of the test split's images (1,549 images, 1.2 M pairs, 983 of them
genuine; its people are disjoint from the training split's), each system's threshold chosen for the best
balanced accuracy over every pair of the training split's images (5.9 M). It reports the balanced accuracy (mean
of true accept and true reject rates), the equal error rate and TAR down to FAR 1e-5. For fusion, each engine is
scored the same way, and ``vs_best_single`` compares fusion with the engine that was better *on the training
images*, with a 95 % interval from resampling people (pairs sharing a person are not independent).

``tar_at_far``: true accept rate at a false accept rate, threshold set on the evaluated impostor scores
(the test pairs for View 1; all pairs for 10-fold). With 500 impostor pairs, FAR 0.001 means "above
every impostor".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lfr.bench import metrics
from lfr.bench.lfw import PairFile, find_protocol, pair_images
from lfr.bench.pipeline import Pipeline, add_common_arguments, data_dir, make_pipelines, set_threads
from lfr.models import scoring

FARS = (0.001, 0.01)
ALL_PAIRS_FARS = (0.001, 0.0001, 0.00001)
ALL_PAIRS_MAX_IMAGES = 6000  # per split: every pair of 6,000 images is 18 M pairs
BOOTSTRAP = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--pairs", default=None, help="pair file (default: pairs.txt or pairsDev* in DIR)")
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most N pairs per pair file (balanced)"
    )
    parser.add_argument(
        "--int8", type=int, default=0, metavar="N",
        help="also evaluate SFace quantised to int8 (PyTorch FX, fbgemm: static, per-channel weights), calibrated "
        "on the chips of N images of the shared data's faces and crowd folders (never in an LFW pair file); float "
        "and int8 in one JSON (--model sface)",
    )


def pair_scores(pipe: Pipeline, root, pf: PairFile) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, labels, no_face images among this file's images)."""
    rels = pair_images(pf.pairs)
    emb = pipe.embed(root, rels)
    a = emb.get([p.a for p in pf.pairs])
    b = emb.get([p.b for p in pf.pairs])
    s = _paired(pipe, a, b)
    y = np.array([p.same for p in pf.pairs])
    return s, y, sum(1 for r in rels if emb.is_no_face(r))


def _paired(pipe: Pipeline, a: dict, b: dict) -> np.ndarray:
    """Row-wise scores score(a[i], b[i]) without forming the full matrix."""
    comp = _components(a, b)
    return np.asarray(pipe.scorer.combine({c: v[:, None] for c, v in comp.items()}))[:, 0]


def _components(a: dict, b: dict) -> dict[str, np.ndarray]:
    return {c: _rowwise(c, a[c].astype(np.float64), b[c].astype(np.float64)) for c in a}


def component_pair_scores(pipe: Pipeline, root, pf: PairFile) -> dict[str, np.ndarray]:
    """Each component engine's row-wise scores for a pair file (embeddings come from the pipeline's cache)."""
    emb = pipe.embed(root, pair_images(pf.pairs))
    return _components(emb.get([p.a for p in pf.pairs]), emb.get([p.b for p in pf.pairs]))


def pooled_kfold(pipe: Pipeline, root, files: list[PairFile]) -> dict:
    """10-fold accuracy over several pair files together; a fusion's weights are refitted per fold."""
    from lfr.bench.fit_fusion import fit_logistic

    comps = [component_pair_scores(pipe, root, pf) for pf in files]
    comp = {c: np.concatenate([d[c] for d in comps]) for c in comps[0]}
    y = np.concatenate([np.array([p.same for p in pf.pairs]) for pf in files])
    folds = metrics.balanced_folds(y, 10)
    scorer = pipe.scorer
    if len(comp) == 1:
        return metrics.kfold_accuracy(next(iter(comp.values())), y, folds) | {"pairs": len(y)}
    names = list(scorer.components)
    x = np.stack([comp[c] for c in names], 1)
    floors = np.array([scorer.floors[c] for c in names])
    accs = []
    for k in range(10):
        tr, te = folds != k, folds == k
        w = fit_logistic(x[tr], y[tr])
        z = scoring.fuse(x, w[1:], w[0], floors)  # the model's agreement rule, with the refitted weights
        t, _ = metrics.best_threshold(z[tr], y[tr])
        accs.append(metrics.accuracy_at(z[te], y[te], t))
    single = {c: metrics.kfold_accuracy(comp[c], y, folds)["accuracy"] for c in names}
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "fold_accuracies": [float(a) for a in accs], "pairs": len(y), "refit_per_fold": True,
            "component_accuracy": single}


def _split_images(pf: PairFile, seed: int) -> tuple[list[str], int]:
    """A split's images (a seeded sample of ``ALL_PAIRS_MAX_IMAGES`` when it has more) and how many it has."""
    rels = sorted(set(pair_images(pf.pairs)))
    if len(rels) <= ALL_PAIRS_MAX_IMAGES:
        return rels, len(rels)
    keep = np.random.default_rng(seed).choice(len(rels), ALL_PAIRS_MAX_IMAGES, replace=False)
    return [rels[i] for i in sorted(keep)], len(rels)


def _every_pair(pipe: Pipeline, root, rels: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Scores of every pair (i < j) of ``rels`` per system (the model, and for fusion each engine too), the
    person index of each image, and the pairs' image indices (2, pairs)."""
    v = pipe.embed(root, rels).get(rels)
    iu = np.triu_indices(len(rels), 1)
    comp = {c: m[iu] for c, m in pipe.scorer.component_scores(v, v).items()}
    systems = {pipe.model_id: np.asarray(pipe.scorer.combine(comp))}
    if len(comp) > 1:
        systems.update(comp)
    _, person = np.unique([r.split("/")[0] for r in rels], return_inverse=True)
    return systems, person, np.stack(iu)


def all_pairs(pipe: Pipeline, root, train: PairFile, test: PairFile) -> dict:
    """Every pair of the test split's images, thresholds from every pair of the training split's images."""
    (tr_rels, _), (te_rels, te_total) = _split_images(train, 1), _split_images(test, 2)
    s_tr, person_tr, ij_tr = _every_pair(pipe, root, tr_rels)
    s_te, person, ij = _every_pair(pipe, root, te_rels)
    y_tr = person_tr[ij_tr[0]] == person_tr[ij_tr[1]]
    pa, pb = person[ij[0]], person[ij[1]]
    y_te = pa == pb
    if not (y_tr.any() and y_te.any() and (~y_tr).any() and (~y_te).any()):
        return {"skipped": "each split needs genuine and impostor pairs"}
    systems, wrong, train_acc = {}, {}, {}
    fars = [f for f in ALL_PAIRS_FARS if f * (~y_te).sum() >= 10]  # at least 10 impostors above the threshold
    for name, scores in s_te.items():
        t, train_acc[name] = metrics.best_threshold(s_tr[name], y_tr, balanced=True)
        accepted = scores >= t
        wrong[name] = accepted != y_te
        systems[name] = {
            "balanced_accuracy": metrics.balanced_accuracy_at(scores, y_te, t),
            "threshold": t,
            "train_balanced_accuracy": train_acc[name],
            "false_rejects": int((y_te & ~accepted).sum()),
            "false_accepts": int((~y_te & accepted).sum()),
            "eer": metrics.equal_error_rate(scores, y_te),
            "tar_at_far": metrics.tar_at_far(scores, y_te, fars),
        }
    out = {
        "images": len(te_rels),
        "images_in_split": te_total,  # more than "images" when the split was sampled down
        "pairs": int(len(y_te)),
        "genuine": int(y_te.sum()),
        "people": int(person.max() + 1),
        "train_images": len(tr_rels),
        "train_pairs": int(len(y_tr)),
        "systems": systems,
    }
    if len(systems) > 1:
        # the engine that was better on the training images (chosen without looking at the test split)
        best = max((n for n in systems if n != pipe.model_id), key=lambda n: train_acc[n])
        model_wrong, best_wrong = wrong[pipe.model_id], wrong[best]
        boot = metrics.person_bootstrap(
            np.bincount(person), {k: (pa[wrong[k]], pb[wrong[k]]) for k in (pipe.model_id, best)}, BOOTSTRAP
        )
        diff = boot[pipe.model_id] - boot[best]
        out["vs_best_single"] = {
            "engine": best,
            "balanced_accuracy_diff": float(diff[0]),
            "ci95": [float(x) for x in np.quantile(diff[1:], [0.025, 0.975])],
            "p_not_better": float(np.mean(diff[1:] <= 0)),
            "bootstrap": f"{BOOTSTRAP} resamples of the test split's people",
            "genuine_fixed": int((y_te & best_wrong & ~model_wrong).sum()),
            "genuine_broken": int((y_te & model_wrong & ~best_wrong).sum()),
            "impostor_fixed": int((~y_te & best_wrong & ~model_wrong).sum()),
            "impostor_broken": int((~y_te & model_wrong & ~best_wrong).sum()),
        }
    return out


def _rowwise(component: str, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    return scoring.similarity_rows(scoring.COMPONENTS[component].metric, x, z)


def evaluate(pipe: Pipeline, root, protocol) -> dict:
    t0 = time.perf_counter()
    if protocol.kind == "train_test":
        tr, te = protocol.files["train"], protocol.files["test"]
        s_tr, y_tr, _ = pair_scores(pipe, root, tr)
        s_te, y_te, _ = pair_scores(pipe, root, te)
        thr, train_acc = metrics.best_threshold(s_tr, y_tr)
        slices = metrics.balanced_folds(y_te, 10)
        per = [metrics.accuracy_at(s_te[slices == k], y_te[slices == k], thr) for k in range(10)]
        out = {
            "protocol": "View 1: threshold fitted on train, accuracy on test",
            "pairs": len(te.pairs),
            "train_pairs": len(tr.pairs),
            "accuracy": metrics.accuracy_at(s_te, y_te, thr),
            "accuracy_std": float(np.std(per)),
            "threshold": thr,
            "train_accuracy": train_acc,
            "tar_at_far": metrics.tar_at_far(s_te, y_te, FARS),
        }
        used = pair_images(tr.pairs) + pair_images(te.pairs)
        default_thr = pipe.scorer.threshold
        out["accuracy_at_default_threshold"] = {
            "threshold": default_thr,
            "accuracy": metrics.accuracy_at(s_te, y_te, default_thr),
        }
        if pipe.scorer is not None:
            out["pooled_10fold"] = pooled_kfold(pipe, root, [tr, te])
            out["all_pairs"] = all_pairs(pipe, root, tr, te)
    else:
        pf = protocol.files["pairs"]
        s, y, _ = pair_scores(pipe, root, pf)
        folds = np.array([p.fold for p in pf.pairs]) if pf.is_tenfold else metrics.balanced_folds(y, 10)
        k = metrics.kfold_accuracy(s, y, folds)
        out = {
            "protocol": "10-fold" if pf.is_tenfold else "10-fold cross-validation within one pair set",
            "pairs": len(pf.pairs),
            "accuracy": k["accuracy"],
            "accuracy_std": k["accuracy_std"],
            "threshold": k["threshold"],
            "tar_at_far": metrics.tar_at_far(s, y, FARS),
        }
        used = pair_images(pf.pairs)
    cache = pipe.cache
    out["images"] = len(set(used))
    out["no_face"] = sum(1 for r in set(used) if cache.is_no_face(r))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["impl"] = pipe.describe()
    return out


def run(args) -> dict:
    set_threads(args.threads)
    root = data_dir(args)
    protocol = find_protocol(root, args.pairs, args.limit)
    ours, ref = make_pipelines(args)
    result = {"model": ours.model_id, "data": str(root), **evaluate(ours, root, protocol)}
    if args.int8:
        result["int8"] = evaluate_int8(ours, root, protocol, args.int8)
    if ref is not None:
        result["reference"] = {"model": ref.model_id, **evaluate(ref, root, protocol)}
    return result


def calibration_images(n: int) -> list[Path]:
    """`n` images, evenly spread, of the shared data's faces and crowd folders: never in an LFW pair file."""
    from lfr.runtime.paths import data_dir as shared_data

    base = shared_data(required=True)
    found = sorted(p for sub in ("faces", "crowd") for p in (base / sub).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(found) < n:
        raise SystemExit(f"--int8 {n}: only {len(found)} images in {base}/faces and {base}/crowd")
    return [found[i] for i in np.linspace(0, len(found) - 1, n).round().astype(int)]


def evaluate_int8(pipe, root, protocol, n: int) -> dict:
    """The same evaluation with SFace quantised to int8 after calibration on real chips, beside the float model's:
    accuracy, how far its vectors move (cosine to the float vectors of the same chips) and CPU per chip."""
    import copy

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from lfr.bench.pipeline import _SHARED, load_rgb
    from lfr.models.device import own_layers
    from lfr.models.engines import SFACE

    if pipe.components != [SFACE]:
        raise SystemExit("--int8 measures SFace alone: use --model sface")
    model = pipe.engine._embedders[SFACE].model  # the engine's network (its frozen copy runs as model.compiled)
    imgs = [load_rgb(p.parent, p.name) for p in calibration_images(n)]
    faces, _ = pipe.select(imgs)
    chips = np.stack([pipe.engine.chips(img, f)[SFACE] for img, f in zip(imgs, faces, strict=True)])
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).to(torch.float32).contiguous(memory_format=torch.channels_last)
    with own_layers(model):  # the network itself, traced by FX
        eager = copy.deepcopy(model).eval()
    torch.backends.quantized.engine = "fbgemm"
    with torch.no_grad():
        prepared = prepare_fx(eager, get_default_qconfig_mapping("fbgemm"), (x[:2],))
        for i in range(0, len(x), 32):
            prepared(x[i: i + 32])  # calibration: activation ranges from real chips
        quantised = convert_fx(prepared)

    def per_chip_ms(net) -> float:  # batches of 4, as the live embedder runs (LFR_EMBEDDING_BATCH)
        sample = x[:64]
        with torch.inference_mode():
            net(sample[:4])
            t = time.process_time()
            for i in range(0, len(sample), 4):
                net(sample[i: i + 4])
            return round((time.process_time() - t) / len(sample) * 1000, 2)

    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model(x), dim=1)
        got = torch.nn.functional.normalize(quantised(x), dim=1)
    cos = (ref * got).sum(1).numpy()
    speed = {"threads": torch.get_num_threads(), "float_ms_per_chip": per_chip_ms(model),
             "int8_ms_per_chip": per_chip_ms(quantised)}
    _SHARED.pop(pipe.cache_key(SFACE), None)  # the int8 vectors are new: embed every image again
    with own_layers(model):
        object.__setattr__(model, "compiled", quantised)  # the engine runs the int8 network in its place
        try:
            result = evaluate(pipe, root, protocol)
        finally:
            _SHARED.pop(pipe.cache_key(SFACE), None)
    return {"calibration_images": n, "cosine_to_float": {"min": round(float(cos.min()), 4),
                                                         "mean": round(float(cos.mean()), 4)},
            "cpu": speed, **result}


def format_text(r: dict) -> str:
    def line(tag, d):
        tar = ", ".join(f"TAR@FAR{k}={v:.4f}" for k, v in d["tar_at_far"].items())
        return (
            f"{tag:<10} accuracy {d['accuracy']:.4f} ± {d['accuracy_std']:.4f}  threshold {d['threshold']:.4f}  "
            f"{tar}  no_face {d['no_face']}  {d['seconds']:.1f}s"
        )

    lines = [f"{r['model']} on {r['data']} ({r['protocol']}, {r['pairs']} pairs)", line("ours", r)]
    if "int8" in r:
        lines.append(line("int8", r["int8"]))
    if "reference" in r:
        lines.append(line("reference", r["reference"]))
    ap = r.get("all_pairs", {})
    if "systems" in ap:
        lines.append(f"every pair of the test images ({ap['pairs']} pairs, {ap['genuine']} genuine):")
        for name, d in ap["systems"].items():
            lines.append(
                f"  {name:<16} balanced accuracy {d['balanced_accuracy']:.5f}  EER {d['eer']:.5f}  "
                f"false rejects {d['false_rejects']}  false accepts {d['false_accepts']}"
            )
        if "vs_best_single" in ap:
            v = ap["vs_best_single"]
            lines.append(
                f"  vs {v['engine']}: {v['balanced_accuracy_diff']:+.5f} "
                f"(95% [{v['ci95'][0]:+.5f}, {v['ci95'][1]:+.5f}], {v['bootstrap']})"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="lfr bench verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(ap)
    args = ap.parse_args(argv)
    r = run(args)
    print(json.dumps(r, indent=2) if args.json else format_text(r))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
