"""Fit how YuNet detections feed dlib's alignment; writes ``lfr/models/dlib_align_v1.json``.

dlib's 5-point shape predictor was trained on boxes from dlib's own HOG detector. On LFW View 1 *training*
images, where both dlib's detector and YuNet find the central face, this fits:

- ``box_calibration``: YuNet box → dlib-detector-like box (centre shift in box widths/heights, scale),
  medians over the faces; used by the ``predictor`` path (YuNet box → calibrated box → shape predictor);
- ``dlib_template``: dlib's 5 points expressed in a canonical YuNet-landmark frame (each face's YuNet
  landmarks mapped by a similarity transform onto ``yunet_canonical``), averaged; used by the ``landmarks``
  path (YuNet's 5 landmarks → similarity transform → dlib's 5 points, no predictor).

Target points come from the reference (dlib's detector + dlib's shape predictor). Also reports the mean
point error of each path against the reference, in % of the inter-ocular distance. Which path the engine
uses (``method``) is decided by LFW accuracy (``lfr bench verify --model dlib --dlib-align ...``) and
kept from the existing file unless ``--method`` is given.

    python -m lfr.bench.fit_alignment [--data DIR] [--limit N] [--method landmarks|predictor]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from lfr.bench.lfw import pair_images, read_pairs
from lfr.bench.pipeline import DlibReference, data_dir, load_rgb, set_threads
from lfr.models.boxes import iou
from lfr.models.engines import _CENTRE_LANDMARKS, apply_transform, central_face, similarity_transform

OUT_NAME = "dlib_align_v1.json"


def _calibrate(box, c):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + c["dx"] * w, (y1 + y2) / 2 + c["dy"] * h
    return (cx - c["sw"] * w / 2, cy - c["sh"] * h / 2, cx + c["sw"] * w / 2, cy + c["sh"] * h / 2)


def _point_error(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean point distance / inter-ocular distance (eye centres: mean of points 0-1 and 2-3)."""
    iod = np.linalg.norm(ref[0:2].mean(0) - ref[2:4].mean(0))
    return float(np.linalg.norm(pred - ref, axis=1).mean() / iod)


def fit(root: Path, rels: list[str], quiet: bool = False) -> dict:
    from lfr.models.shape_predictor import ShapePredictor
    from lfr.models.yunet import YuNetDetector

    ref = DlibReference()
    det = YuNetDetector()
    sp = ShapePredictor.load()
    ybox, dbox, ylm, dpts, imgs_kept = [], [], [], [], []
    t0 = time.perf_counter()
    for i, rel in enumerate(rels):
        img = load_rgb(root, rel)
        yf = central_face(img, det.detect([img])[0])
        df = central_face(img, ref.detect(img))
        if yf is None or df is None or iou(yf.box, df.box) < 0.3:
            continue
        ybox.append(yf.box)
        dbox.append(df.box)
        ylm.append(np.asarray(yf.landmarks, np.float64))
        dpts.append(ref.points(img, df.box))
        imgs_kept.append(rel)
        if not quiet and (i + 1) % 200 == 0:
            print(
                f"[fit_alignment] {i + 1}/{len(rels)} images, {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
            )
    yb, db = np.array(ybox), np.array(dbox)
    yw, yh = yb[:, 2] - yb[:, 0], yb[:, 3] - yb[:, 1]
    dw, dh = db[:, 2] - db[:, 0], db[:, 3] - db[:, 1]
    cal = {
        "dx": float(np.median(((db[:, 0] + db[:, 2]) - (yb[:, 0] + yb[:, 2])) / 2 / yw)),
        "dy": float(np.median(((db[:, 1] + db[:, 3]) - (yb[:, 1] + yb[:, 3])) / 2 / yh)),
        "sw": float(np.median(dw / yw)),
        "sh": float(np.median(dh / yh)),
    }
    canon = _CENTRE_LANDMARKS.astype(np.float64)
    mapped = np.stack([apply_transform(similarity_transform(y, canon), p) for y, p in zip(ylm, dpts)])
    template = mapped.mean(0)

    # point errors against the reference (on a subsample: the predictor is the slow part)
    errs = {"predictor_calibrated": [], "predictor_raw_box": [], "landmarks": []}
    for k in range(0, len(imgs_kept), max(1, len(imgs_kept) // 300)):
        img = load_rgb(root, imgs_kept[k])
        errs["predictor_calibrated"].append(_point_error(sp.predict(img, _calibrate(ybox[k], cal)), dpts[k]))
        errs["predictor_raw_box"].append(_point_error(sp.predict(img, ybox[k]), dpts[k]))
        m = similarity_transform(canon, ylm[k])
        errs["landmarks"].append(_point_error(apply_transform(m, template), dpts[k]))
    return {
        "box_calibration": cal,
        "yunet_canonical": canon.round(3).tolist(),
        "dlib_template": template.round(3).tolist(),
        "fit": {
            "faces": len(imgs_kept),
            "images": len(rels),
            "mean_point_error_pct_iod": {k: round(100 * float(np.mean(v)), 2) for k, v in errs.items()},
        },
    }


def _dumps(doc: dict) -> str:
    """JSON with each innermost list of numbers on one line."""
    text = json.dumps(doc, indent=2)
    return (
        re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        + "\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use at most N training images")
    ap.add_argument("--method", choices=("landmarks", "predictor"), default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default: lfr/models/dlib_align_v1.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    root = data_dir(args)
    rels = pair_images(read_pairs(root / "pairsDevTrain.txt").pairs)
    if args.limit:
        rels = rels[: args.limit]
    out = args.out or Path(str(resources.files("lfr.models").joinpath(OUT_NAME)))
    old = json.loads(out.read_text()) if out.is_file() else {}
    res = fit(root, rels, args.quiet)
    doc = {
        "model": "dlib-resnet-v1 alignment from YuNet detections",
        "method": args.method or old.get("method", "landmarks"),
        **res,
        "fitted_on": f"{root.name}/pairsDevTrain.txt images (dlib detector + shape_predictor_5 as targets)",
        "produced_by": "python -m lfr.bench.fit_alignment",
    }
    if "measured" in old:
        doc["measured"] = old["measured"]
    text = _dumps(doc)
    out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
