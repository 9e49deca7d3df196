"""``lfr model check ID``: what a force needs to see before it trusts an engine it plugged in.

On an evaluation folder in the LFW layout (default: the development data; a force passes its own with ``--data``)
it runs, for the engine and beside it the current live model (or ``--beside``), with the same code as
``lfr bench verify`` and ``lfr bench identify``:

- verification: accuracy (threshold fitted on the training pairs), TAR at FAR 0.01 / 0.001;
- open-set identification: rank-1, TPIR at FPIR 0.01 / 0.001 (gallery = first image of each person with 2+);
- speed: chips embedded per second on this machine (same real chips, after a warm-up), as a ratio to the other;
- the default threshold: the similarity at which the share of impostor pairs accepted is the false-accept target
  (the policy's ``engines.false_accept_target``, default 1e-5: the rule the built-in thresholds follow; ``--far``
  overrides it and the output says so), over every pair of different people among
  the verification images. It becomes the engine's default only when the target lets at least 10 impostor pairs
  through (10/target pairs or more); else the record says it was not resolved and the manifest's value stays.

It records a completed check (``check.json`` beside the engine's manifest, tied to its version and sha256); an
engine needs one before a deployment on it can be authorised. What it does not measure: demographic
differentials (these need the force's own labelled evaluation data), image conditions of the force's cameras, or
anything the folder does not hold. ``--limit N`` runs on N pairs per pair file and N identities (smoke runs).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lfr.bench import identify, metrics, verify
from lfr.bench.lfw import find_protocol, list_identities, pair_images
from lfr.bench.pipeline import OursPipeline, data_dir, load_rgb, set_threads
from lfr.models import onnx_engine

DEFAULT_FAR = 1e-5
SPEED_CHIPS = 32
MIN_ACCEPTED = 10  # impostor pairs the target must let through for the threshold to count as measured


def _speed(pipe: OursPipeline, root: Path, rels: list[str], repeats: int = 2) -> dict:
    eng = pipe.engine
    faces, _ = pipe.select([load_rgb(root, r) for r in rels])
    chips = [eng.chips(load_rgb(root, r), f) for r, f in zip(rels, faces)]
    batch = {c: np.stack([ch[c] for ch in chips]) for c in eng.components}
    eng.embed({c: v[:2] for c, v in batch.items()})  # warm-up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.embed(batch)
        best = min(best, time.perf_counter() - t0)
    return {"chips": len(rels), "seconds": round(best, 4), "chips_per_s": round(len(rels) / best, 2),
            "flip": eng.flips}


def _threshold(pipe: OursPipeline, root: Path, rels: list[str], far: float) -> dict:
    v = pipe.embed(root, rels).get(rels)
    iu = np.triu_indices(len(rels), 1)
    s = np.asarray(pipe.scorer.score_matrix(v, v))[iu]
    person = np.array([r.split("/")[0] for r in rels])
    impostor = s[person[iu[0]] != person[iu[1]]]
    resolved = far * len(impostor) >= MIN_ACCEPTED  # as `lfr bench verify`'s all_pairs: 10 impostors above it
    value = metrics.threshold_at_fpr(impostor, far) if resolved else float(np.nextafter(impostor.max(), np.inf))
    return {"value": round(float(value), 6), "far_target": far, "impostor_pairs": int(len(impostor)),
            "images": len(rels), "resolved": bool(resolved),
            "note": "" if resolved else (f"fewer than {MIN_ACCEPTED}/{far:g} impostor pairs: above the highest impostor score; "
                                         "not resolved, so the manifest's threshold stays the default")}


def _evaluate(pipe: OursPipeline, root: Path, protocol, identities, fpirs, speed_rels: list[str]) -> dict:
    v = verify.evaluate(pipe, root, protocol)
    i = identify.evaluate(pipe, root, identities, fpirs, False)
    return {
        "model": pipe.model_id,
        "version": pipe.engine.info.version,
        "verification": {"accuracy": v["accuracy"], "threshold": v["threshold"], "tar_at_far": v["tar_at_far"],
                         "pairs": v["pairs"], "no_face": v["no_face"]},
        "identification": {"rank1": i["rank1"], "tpir_at_fpir": i["tpir_at_fpir"], "gallery": i["gallery"],
                           "mated_probes": i["mated_probes"], "nonmated_probes": i["nonmated_probes"]},
        "speed": _speed(pipe, root, speed_rels),
    }


def run(model_id: str, beside: str | None, data: Path | None, limit: int | None, far: float = DEFAULT_FAR,
        threads: int = 2, device: str | None = None, quiet: bool = True, record: bool = True,
        far_source: str = "") -> dict:
    """Check an installed engine; writes its check record (``record``) and returns the result."""
    import argparse
    import os

    from lfr.models.engines import DEFAULT_MODEL

    m = onnx_engine.installed_manifest(model_id)
    if m is None:
        raise SystemExit(f"engine {model_id!r} is not installed in {onnx_engine.engines_dir()}: "
                         "`lfr model add MANIFEST` first")
    onnx_engine.verify(m, device="cpu")  # sha256 and the file's form, before spending time on it
    set_threads(threads)
    os.environ.setdefault("LFR_ONNX_THREADS", str(threads))  # onnxruntime's threads, as torch's
    root = data_dir(argparse.Namespace(data=data))
    protocol = find_protocol(root, None, limit)
    identities = identify._select(list_identities(root), limit)
    fpirs = metrics.fpir_points(sum(1 for v in identities.values() if len(v) == 1))
    live = beside or os.environ.get("LFR_MODEL") or DEFAULT_MODEL
    rels = sorted(set(sum((pair_images(pf.pairs) for pf in protocol.files.values()), [])))
    speed_rels = rels[:SPEED_CHIPS]
    t0 = time.perf_counter()
    engine_pipe = OursPipeline(model_id, device=device, quiet=quiet)
    result = {"engine": _evaluate(engine_pipe, root, protocol, identities, fpirs, speed_rels)}
    result["engine"]["threshold_at_far"] = _threshold(engine_pipe, root, rels, far) | {"far_source": far_source}
    live_pipe = OursPipeline(live, device=device, quiet=quiet)
    result["beside"] = _evaluate(live_pipe, root, protocol, identities, fpirs, speed_rels)
    result["beside"]["threshold_at_far"] = _threshold(live_pipe, root, rels, far)
    result["speed_ratio"] = round(result["engine"]["speed"]["chips_per_s"] / result["beside"]["speed"]["chips_per_s"], 3)
    rec = {
        "completed": True,
        "model_id": m.model_id,
        "model_version": m.version,
        "sha256": m.sha256,
        "completed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": str(root),
        "limit": limit,
        "threshold": result["engine"]["threshold_at_far"],
        "seconds": round(time.perf_counter() - t0, 1),
        "not_measured": "demographic differentials (need the force's own labelled evaluation data); the force's "
                        "camera conditions; anything outside the evaluation folder",
        **result,
    }
    if record:
        rec["record"] = str(onnx_engine.write_check(model_id, rec))
    return rec


def format_text(r: dict) -> str:
    def row(tag: str, d: dict) -> str:
        v, i, s = d["verification"], d["identification"], d["speed"]
        tar = " ".join(f"{v['tar_at_far'][k]:.4f}" for k in sorted(v["tar_at_far"], key=float, reverse=True))
        tpir = " ".join(f"{i['tpir_at_fpir'][k]:.4f}" for k in sorted(i["tpir_at_fpir"], key=float, reverse=True))
        return (f"{tag:<8} {d['model']:<22} acc {v['accuracy']:.4f}  TAR@FAR .01/.001 {tar}  rank1 {i['rank1']:.4f}  "
                f"TPIR@FPIR .01/.001 {tpir}  {s['chips_per_s']:.1f} chips/s  thr@FAR {d['threshold_at_far']['value']:.4f}")

    e, b = r["engine"], r["beside"]
    v, i = e["verification"], e["identification"]
    t = r["threshold"]
    lines = [
        f"check of {r['model_id']} {r['model_version']} on {r['data']}" + (f" (--limit {r['limit']})" if r["limit"] else ""),
        f"  verification: {v['pairs']} test pairs; identification: gallery {i['gallery']}, "
        f"{i['mated_probes']} mated and {i['nonmated_probes']} non-mated searches",
        row("engine", e),
        row("beside", b),
        f"  speed: {r['speed_ratio']:.2f}x the {b['model']} chips/s on this machine",
        f"  default threshold at FAR {t['far_target']:g}: {t['value']:.4f} over {t['impostor_pairs']} impostor pairs"
        + (f" ({t['note']})" if t["note"] else ""),
        f"  false-accept target from: {t.get('far_source') or 'the caller'}",
        f"  not measured: {r['not_measured']}",
        f"  recorded: {r.get('record', '(not recorded)')} ({r['seconds']:.0f} s)",
    ]
    return "\n".join(lines)
