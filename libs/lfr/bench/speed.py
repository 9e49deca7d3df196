"""``lfr bench speed``: our torch models beside their reference implementations, in the same run.

- Embedding, faces/s at batch 1 and 32 on ``--threads`` CPU threads (or the torch device):
  dlib ResNet (torch) vs dlib-bin ``face_recognition_model_v1`` → ``embed_speedup`` = ours / dlib;
  SFace (torch) vs ``cv2.FaceRecognizerSF.feature`` → ``sface_speedup`` = ours / OpenCV. The chips are real
  aligned LFW faces. OpenCV has no batch call: its batch-32 figure is 32 single calls.
- Detection, ms per image: YuNet (torch) vs ``cv2.FaceDetectorYN`` on the first frames of the 1080p
  pedestrian video (decoded with PyAV) and on the largest crowd photo → ``detect_time_ratio`` = ours / OpenCV
  (below 1 = we are faster).

Timing: after a warm-up call each, ours and the reference are called alternately (so both see the same
machine load) for at least ``--seconds`` each; each figure is the median time per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from lfr.bench.pipeline import default_data_dir, load_rgb, require_dir, set_threads

VIDEO = "video/pedestrians-1080p25.mp4"
CROWD = "crowd/0_Parade_marchingband_1_765.jpg"
LFW_SAMPLE = ("lfw-dev/Aaron_Peirsol/Aaron_Peirsol_0001.jpg",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="shared data folder (default $LFR_DATA_DIR or <repo>/../shared/data)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV (default 2)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum measuring time per figure")
    parser.add_argument("--frames", type=int, default=5, help="video frames to time")
    parser.add_argument(
        "--embed-batches", default="1,32", help="comma-separated embedding batch sizes (default 1,32)"
    )
    parser.add_argument(
        "--detect-batch", type=int, default=1, help="images per detector call, ours (OpenCV: one at a time)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")


def _time_pair(ours, ref, min_seconds: float, warmup: int = 1, min_runs: int = 5) -> tuple[float, float]:
    """Median seconds per call of ours() and ref(), called alternately (both see the same machine load)."""
    for _ in range(warmup):
        ours()
        ref()
    a, b = [], []
    t_end = time.perf_counter() + 2 * min_seconds
    while len(a) < min_runs or time.perf_counter() < t_end:
        t = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref()
        b.append(time.perf_counter() - t)
        if len(a) >= 200:
            break
    return statistics.median(a), statistics.median(b)


def _video_frames(path: Path, n: int) -> list[np.ndarray]:
    try:
        import av
    except ImportError:  # a machine with OpenCV but no PyAV (the reference side needs OpenCV anyway)
        import cv2

        cap, frames = cv2.VideoCapture(str(path)), []
        while len(frames) < n:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(bgr[..., ::-1]))
        cap.release()
        return frames
    frames = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    return frames


def _lfw_faces(data: Path, n: int = 32) -> tuple[list[np.ndarray], list]:
    """n LFW images and their central YuNet faces (for real chips)."""
    from lfr.bench.lfw import list_identities
    from lfr.models.engines import central_face, centre_face
    from lfr.models.yunet import YuNetDetector

    ids = list_identities(data / "lfw-dev")
    rels = [v[0] for _, v in sorted(ids.items())[:n]]
    imgs = [load_rgb(data / "lfw-dev", r) for r in rels]
    det = YuNetDetector(device="cpu")
    faces = []
    for img, fs in zip(imgs, det.detect(imgs)):
        faces.append(central_face(img, fs) or centre_face(img))
    return imgs, faces


def bench_embedding(data: Path, device, secs: float, log, batches=(1, 32)) -> dict:
    from lfr.bench.pipeline import DlibReference, SFaceReference
    from lfr.models import dlib_resnet, sface
    from lfr.models.dlib_chip import dlib_face_chip

    imgs, faces = _lfw_faces(data)
    reps = -(-max(batches) // len(faces))  # a batch larger than the sample repeats its faces
    imgs, faces = (imgs * reps)[: max(batches, default=1)], (faces * reps)[: max(batches, default=1)]
    out: dict = {}

    # dlib: chips from dlib's own shape predictor on dlib-like boxes (identical input for both)
    ref = DlibReference()
    from lfr.models.engines import dlib_box_from_yunet as dbox

    dchips = np.stack([dlib_face_chip(img, ref.points(img, dbox(f.box))) for img, f in zip(imgs, faces)])
    model = dlib_resnet.load_dlib_resnet(device=device)
    d = {}
    for bs in batches:
        x = dchips[:bs]
        ours, theirs = _time_pair(
            lambda x=x: dlib_resnet.embed_chips(model, x), lambda x=x: ref.descriptors(list(x)), secs
        )
        d[str(bs)] = _figures(bs, ours, theirs)
        log(
            f"dlib batch {bs}: ours {d[str(bs)]['ours_faces_per_s']:.1f}/s, dlib-bin {d[str(bs)]['ref_faces_per_s']:.1f}/s"
        )
    out["dlib"] = d

    sref = SFaceReference()
    schips = np.stack([sface.sface_chip(img, f.landmarks) for img, f in zip(imgs, faces)])
    bgr = [np.ascontiguousarray(c[:, :, ::-1]) for c in schips]
    smodel = sface.load_sface(device=device)
    s = {}
    for bs in batches:
        x = schips[:bs]
        ours, theirs = _time_pair(
            lambda x=x: sface.embed_chips(smodel, x),
            lambda bs=bs: [sref.rec.feature(c) for c in bgr[:bs]],
            secs,
        )
        s[str(bs)] = _figures(bs, ours, theirs)
        log(
            f"sface batch {bs}: ours {s[str(bs)]['ours_faces_per_s']:.1f}/s, OpenCV {s[str(bs)]['ref_faces_per_s']:.1f}/s"
        )
    out["sface"] = s
    return out


def _figures(bs: int, ours_s: float, ref_s: float) -> dict:
    return {
        "ours_ms_per_batch": round(ours_s * 1000, 3),
        "ref_ms_per_batch": round(ref_s * 1000, 3),
        "ours_faces_per_s": round(bs / ours_s, 2),
        "ref_faces_per_s": round(bs / ref_s, 2),
        "speedup": round(ref_s / ours_s, 3),
    }


def bench_detection(data: Path, device, secs: float, n_frames: int, log, batch: int = 1) -> dict:
    from lfr.bench.pipeline import SFaceReference
    from lfr.models.yunet import YuNetDetector

    det = YuNetDetector(device=device)
    ref = SFaceReference()
    out = {}
    cases = {"frame_1080p": _video_frames(data / VIDEO, n_frames), "crowd": [load_rgb(data, CROWD)]}
    for name, images in cases.items():
        k = {"ours": 0, "ref": 0}  # each side walks through the same frames

        def ours(images=images, k=k):
            k["ours"] += batch
            return det.detect([images[(k["ours"] + i) % len(images)] for i in range(batch)])

        def theirs(images=images, k=k):
            k["ref"] += 1
            return ref.detect(images[k["ref"] % len(images)])

        t_ours, t_ref = _time_pair(ours, theirs, secs)
        t_ours /= batch
        out[name] = {
            "image": f"{images[0].shape[1]}x{images[0].shape[0]}",
            "batch_ours": batch,
            "ours_ms": round(t_ours * 1000, 2),
            "ref_ms": round(t_ref * 1000, 2),
            "faces_ours": len(det.detect([images[0]])[0]),
            "faces_ref": len(ref.detect(images[0])),
            "time_ratio": round(t_ours / t_ref, 3),
        }
        log(f"detect {name}: ours {out[name]['ours_ms']} ms, OpenCV {out[name]['ref_ms']} ms")
    return out


def run(args) -> dict:
    set_threads(args.threads)
    data = require_dir(Path(args.data) if args.data else default_data_dir(), "shared data folder")
    import sys

    import torch

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = tuple(int(b) for b in str(args.embed_batches).split(",") if b.strip())
    emb = bench_embedding(data, device, args.seconds, log, batches)
    det = bench_detection(data, device, args.seconds, args.frames, log, args.detect_batch)
    return {
        "threads": args.threads,
        "device": device,
        "embedding": emb,
        "embed_speedup": {bs: v["speedup"] for bs, v in emb["dlib"].items()},
        "sface_speedup": {bs: v["speedup"] for bs, v in emb["sface"].items()},
        "detection": det,
        "detect_time_ratio": {k: v["time_ratio"] for k, v in det.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="lfr bench speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(ap)
    args = ap.parse_args(argv)
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"threads {r['threads']} on {r['device']}")
        for m in ("dlib", "sface"):
            for bs, v in r["embedding"][m].items():
                print(
                    f"{m:<6} batch {bs:>2}: ours {v['ours_faces_per_s']:8.1f} faces/s  reference "
                    f"{v['ref_faces_per_s']:8.1f} faces/s  speedup {v['speedup']:.2f}x"
                )
        for k, v in r["detection"].items():
            print(
                f"detect {k} ({v['image']}): ours {v['ours_ms']:.1f} ms  OpenCV {v['ref_ms']:.1f} ms  ratio {v['time_ratio']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
