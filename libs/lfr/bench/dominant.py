"""Thresholds of the dominant-face rule (`lfr.models.face_choice`), measured (`lfr bench dominant`).

LFW's deep-funneled images are centred on their subject, so in every LFW image where the detector finds more
than one face the subject is known: the face whose box holds the image centre (nearest centre if several).
For each size-ratio margin the benchmark reports how many of those photos the rule would accept (the dominant
face is the subject), and how many it would get wrong (a dominant face that is *not* the subject) — the margin
to choose is the smallest with no wrong choice, plus headroom. Because the rule starts from the central face, which in LFW is the subject by construction, the table also
counts how often the *largest* face alone, at the same margin, would be a bystander: the evidence for the size
margin when a photo is not centred. The centre offset of the subject faces is
reported too, with the offset of the subject of every single-face portrait of the shared photos (faces/, which
sets the centre margin), and the rule is applied to the shared multi-face photos (faces/, crowd/).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lfr.models.face_choice import Candidate, centre_offset, dominant_index, size_ratio
from lfr.models.images import decode_image
from lfr.runtime.paths import data_dir

RATIOS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5)


def add_arguments(p) -> None:
    p.add_argument("--data", default="", help="shared data folder (default: ../shared/data)")
    p.add_argument("--limit", type=int, default=0, help="at most this many LFW images (0 = all)")
    p.add_argument("--json", action="store_true", help="one-line JSON")


def _candidates(faces) -> list[Candidate]:
    out = []
    for f in faces:
        lm = np.asarray(f.landmarks, dtype=np.float64).reshape(5, 2)
        out.append(Candidate(tuple(float(v) for v in f.box), float(np.hypot(*(lm[1] - lm[0]))), float(f.score)))
    return out


def _subject(w: int, h: int, faces: list[Candidate]) -> int:
    cx, cy = w / 2, h / 2
    holding = [i for i, f in enumerate(faces) if f.box[0] <= cx <= f.box[2] and f.box[1] <= cy <= f.box[3]]
    pool = holding or range(len(faces))
    return min(pool, key=lambda i: math.hypot((faces[i].box[0] + faces[i].box[2]) / 2 - cx,
                                              (faces[i].box[1] + faces[i].box[3]) / 2 - cy))


def run(args) -> dict:
    from lfr.models.yunet import YuNetDetector

    root = Path(args.data) if args.data else data_dir()
    det = YuNetDetector()
    paths = sorted((root / "lfw-dev").glob("*/*.jpg"))
    if args.limit:
        paths = paths[: args.limit]
    multi = []  # (ratio of the subject over the largest other, offset, subject index, faces, w, h)
    for start in range(0, len(paths), 16):
        imgs = [decode_image(p.read_bytes()) for p in paths[start:start + 16]]
        for img, faces in zip(imgs, det.detect(imgs), strict=True):
            if len(faces) < 2:
                continue
            cands = _candidates(faces)
            h, w = img.shape[:2]
            s = _subject(w, h, cands)
            multi.append((size_ratio(cands, s), centre_offset(w, h, cands[s].box), s, cands, w, h))
    table = []
    for r in RATIOS:
        right = wrong = 0
        for _, _, s, cands, w, h in multi:
            c = dominant_index(w, h, cands, r, 1.0)
            right += c.index == s
            wrong += c.index >= 0 and c.index != s
        # the same margin on size alone (no centrality): how often the largest face would be a bystander
        largest_wrong = 0
        for _, _, s, cands, _, _ in multi:
            big = max(range(len(cands)), key=lambda i: cands[i].inter_eye_px)
            largest_wrong += big != s and size_ratio(cands, big) >= r
        table.append({"min_size_ratio": r, "accepted_subject": right, "accepted_wrong_face": wrong,
                      "refused": len(multi) - right - wrong, "largest_face_alone_wrong": largest_wrong})
    ratios = np.array([m[0] for m in multi]) if multi else np.zeros(1)
    offsets = np.array([m[1] for m in multi]) if multi else np.zeros(1)
    shared, single = {}, []
    for p in sorted([*(root / "faces").rglob("*.jpg"), *(root / "faces").rglob("*.png"),
                     *(root / "crowd").glob("*.jpg")]):
        try:
            img = decode_image(p.read_bytes())
        except Exception:  # noqa: BLE001 - a photo the platform would refuse is simply not part of the table
            continue
        cands = _candidates(det.detect_one(img))
        h, w = img.shape[:2]
        if len(cands) == 1:  # a portrait: how far from the centre its subject may be
            single.append(centre_offset(w, h, cands[0].box))
        if len(cands) < 2:
            continue
        c = dominant_index(w, h, cands, 0.0, 1.0)
        shared[str(p.relative_to(root))] = {"faces": len(cands), "central_face": c.index + 1,
                                            "ratio": round(c.ratio, 2), "offset": round(c.offset, 2)}
    return {"lfw_images": len(paths), "lfw_multi_face": len(multi),
            "subject_ratio_percentiles": {q: round(float(np.percentile(ratios, q)), 2) for q in (1, 5, 10, 50)},
            "subject_offset_percentiles": {q: round(float(np.percentile(offsets, q)), 3) for q in (50, 95, 99, 100)},
            "by_ratio": table, "shared_single_face_photos": len(single),
            "single_face_offset_percentiles": {q: round(float(np.percentile(single or [0], q)), 3)
                                               for q in (50, 95, 100)},
            "shared_multi_face_photos": shared}


