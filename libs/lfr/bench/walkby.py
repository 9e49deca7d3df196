"""Walk-by videos with exact ground truth, built from the development images (`lfr bench walkby --out DIR`).

People (LFW-layout folders) cross a real background — a frame of the shared pedestrians video with its own faces
blurred away — from either side, at several sizes (pixels between the eyes, growing as they approach) and
speeds, with head turns (the person's other photos in turn), motion blur in proportion to their speed, partial
occlusion by a pillar some of them walk behind, and crowds (several people at once). Watchlisted people are
enrolled from one photo and shown in their others; strangers are people never enrolled.

Written to DIR: ``walkby.mp4`` (H.264), ``enroll/<person>/<photo>`` (the watchlist, as `lfr watchlist import` and
`lfr bench pipeline --enroll` read it) and ``truth.json``: per pass the person, whether they are on the list, the
first and last frame (and time) their face is in view, the frames it is more than half hidden, its size and
speed. `lfr bench pipeline --truth DIR/truth.json` scores a run per pass (`score_passes`).

``--suite DIR`` builds the fixed suite (`SUITE`) into DIR, and `lfr bench pipeline --suite DIR` runs and scores all of it
in one JSON.

``--clear-margin M`` keeps only people the library itself decides clearly (every shown photo of a watchlisted
person scores above the model's threshold + M against their enrollment photo, every stranger below threshold - M
against every enrollment photo): for tests, where the expected outcome must not depend on borderline faces.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lfr.runtime.paths import data_dir

LFW_EYE_PX = 43.6  # YuNet's median inter-eye distance in a 250-px LFW image (lfr.models.engines._CENTRE_LANDMARKS)
SPRITE_BOX = (45, 25, 205, 235)  # head and shoulders in a 250-px LFW image
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


@dataclass
class Pass:
    person: str
    watchlisted: bool
    images: list[str]
    first_frame: int = -1
    last_frame: int = -1
    first_s: float = 0.0
    last_s: float = 0.0
    hidden_frames: int = 0  # frames with the face more than half behind the pillar
    eye_px: tuple[float, float] = (0.0, 0.0)  # at entry, at exit
    speed_px_s: float = 0.0
    start_s: float = 0.0
    direction: int = 1
    y_frac: float = 0.5
    turn_s: float = 0.6
    faces_in_view: int = 0  # frames with the face in the picture (detected or not)
    _sprites: list = field(default_factory=list, repr=False)


# The walk-by suite (`lfr bench walkby --suite DIR`, scored by `lfr bench pipeline --suite DIR`): fixed parameters and
# seeds, so the same videos are built again from the same development images (the videos are not kept in the
# repository). 720p and 1080p, crowds of 10 to 40, one with more than 30 people in view at once. Add entries to grow
# it; change none (numbers measured on it would no longer compare).
SUITE = {
    "quiet-1080p": dict(resolution="1080p", seconds=30.0, watchlisted=8, strangers=8, seed=1),
    "blur-720p": dict(resolution="720p", seconds=30.0, watchlisted=8, strangers=8, blur=0.5, occluded=0.3, seed=2),
    "crowd10-1080p": dict(resolution="1080p", seconds=30.0, watchlisted=6, strangers=14, crowd=10, seed=21),
    "crowd20-720p": dict(resolution="720p", seconds=40.0, watchlisted=10, strangers=20, crowd=20, occluded=0.3,
                         seed=22),
    "crowd32-1080p": dict(resolution="1080p", seconds=40.0, watchlisted=12, strangers=24, crowd=32, seed=3),
    "crowd40-720p": dict(resolution="720p", seconds=40.0, watchlisted=12, strangers=32, crowd=40, blur=0.7, seed=24),
}


def suite_truths(folder: Path) -> dict[str, Path]:
    """The suite's truth files under `folder` (one sub-folder per video), those already built."""
    return {name: folder / name / "truth.json" for name in SUITE if (folder / name / "truth.json").is_file()}


def add_arguments(p) -> None:
    p.add_argument("--out", default="", help="folder to write the video, the watchlist and truth.json into")
    p.add_argument("--suite", default="", help="build the whole walk-by suite (SUITE: fixed parameters and seeds) into "
                   "this folder, one sub-folder per video; videos already there are kept (--rebuild to build again)")
    p.add_argument("--only", default="", help="with --suite: these videos only (comma separated names)")
    p.add_argument("--rebuild", action="store_true", help="with --suite: build videos already there again")
    p.add_argument("--data", default="", help="shared data folder (default: ../shared/data)")
    p.add_argument("--resolution", choices=sorted(SIZES), default="720p")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--watchlisted", type=int, default=6, help="people on the list who walk by")
    p.add_argument("--strangers", type=int, default=6, help="people not on the list who walk by")
    p.add_argument("--crowd", type=int, default=0, help="at most this many people in view at once (0 = as the "
                   "passes fall)")
    p.add_argument("--eye-px", default="28,60", help="smallest,largest inter-eye distance at entry (px)")
    p.add_argument("--speed", default="150,400", help="slowest,fastest walking speed across the picture (px/s)")
    p.add_argument("--occluded", type=float, default=0.3, help="share of passes that go behind the pillar")
    p.add_argument("--blur", type=float, default=0.5, help="exposure as a share of the frame time (motion blur)")
    p.add_argument("--clear-margin", type=float, default=0.0, help="keep only people the library decides with this "
                   "margin around the threshold (for tests); 0 = any")
    p.add_argument("--seed", type=int, default=1)


def _pair(text: str) -> tuple[float, float]:
    a, b = (float(v) for v in text.split(","))
    return a, b


def background(data: Path, size: tuple[int, int]) -> np.ndarray:
    """A real street scene without faces: the pedestrians video's first frame, its faces blurred away."""
    import av

    from lfr.models.yunet import YuNetDetector

    with av.open(str(data / "video/pedestrians-1080p25.mp4")) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    im = Image.fromarray(frame).resize(size, Image.BILINEAR)
    arr = np.asarray(im).copy()
    for f in YuNetDetector(score_threshold=0.3).detect_one(arr):
        x1, y1, x2, y2 = (int(v) for v in f.box)
        w, h = x2 - x1, y2 - y1
        box = (max(0, x1 - w // 2), max(0, y1 - h // 2), min(size[0], x2 + w // 2), min(size[1], y2 + h // 2))
        region = Image.fromarray(arr).crop(box).filter(ImageFilter.GaussianBlur(max(4, w // 2)))
        arr[box[1]:box[3], box[0]:box[2]] = np.asarray(region)
    return arr


def _sprite(path: Path) -> Image.Image:
    """Head and shoulders of an LFW photo with a soft oval edge (RGBA)."""
    im = Image.open(path).convert("RGB").crop(SPRITE_BOX)
    mask = Image.new("L", im.size, 0)
    ImageDraw.Draw(mask).ellipse((6, 4, im.width - 6, im.height + 40), fill=255)
    im.putalpha(mask.filter(ImageFilter.GaussianBlur(5)))
    return im


def _motion_blur(sprite: Image.Image, length: int) -> Image.Image:
    if length < 2:
        return sprite
    a = np.asarray(sprite).astype(np.float32)
    out = np.zeros_like(a)
    for k in range(length):
        out += np.roll(a, k - length // 2, axis=1)
    return Image.fromarray((out / length).astype(np.uint8), "RGBA")


def choose_people(lfw: Path, n_list: int, n_strangers: int, rng: random.Random, margin: float
                  ) -> tuple[dict[str, Path], list[tuple[str, list[Path]]], list[tuple[str, list[Path]]]]:
    """(enrollment photo per watchlisted person, [(person, photos shown)] listed, [(person, photos)] strangers)."""
    people = sorted(p for p in lfw.iterdir() if p.is_dir())
    rng.shuffle(people)
    engine = embed = None
    if margin:
        from lfr.models.engines import central_face, get_engine

        engine = get_engine()

        def embed(path: Path):
            img = np.asarray(Image.open(path).convert("RGB"))
            face = central_face(img, engine.detect([img])[0])
            return None if face is None else engine.embed_faces(img, [face])

    enroll, listed, strangers, refs = {}, [], [], {}
    thr = engine.info.threshold if engine else 0.0
    for p in people:
        imgs = sorted(p.glob("*.jpg"))
        if len(listed) >= n_list or len(imgs) < 3:
            continue
        if engine:
            ref = embed(imgs[0])
            shown = [embed(i) for i in imgs[1:4]]
            if ref is None or any(s is None or float(engine.score(s, ref)[0]) <= thr + margin for s in shown):
                continue
            refs[p.name] = ref
        enroll[p.name] = imgs[0]
        listed.append((p.name, imgs[1:4]))
    for p in people:
        imgs = sorted(p.glob("*.jpg"))
        if len(strangers) >= n_strangers or p.name in enroll or not imgs:
            continue
        if engine:
            shown = [embed(i) for i in imgs[:3]]
            if any(s is None or max(float(engine.score(s, r)[0]) for r in refs.values()) >= thr - margin
                   for s in shown):
                continue
        strangers.append((p.name, imgs[:3]))
    return enroll, listed, strangers


def generate(out: Path, data: Path, resolution: str = "720p", fps: int = 25, seconds: float = 20.0,
             watchlisted: int = 6, strangers: int = 6, crowd: int = 0, eye_px=(28.0, 60.0), speed=(150.0, 400.0),
             occluded: float = 0.3, blur: float = 0.5, clear_margin: float = 0.0, seed: int = 1) -> dict:
    import av

    rng = random.Random(seed)
    size = SIZES[resolution]
    W, H = size
    out.mkdir(parents=True, exist_ok=True)
    enroll, listed, others = choose_people(data / "lfw-dev", watchlisted, strangers, rng, clear_margin)
    passes = [Pass(n, True, [str(i) for i in imgs]) for n, imgs in listed]
    passes += [Pass(n, False, [str(i) for i in imgs]) for n, imgs in others]
    rng.shuffle(passes)
    scale = W / 1280
    pillar = (int(W * 0.62), int(W * 0.62 + 70 * scale))  # x range of a pillar in the foreground
    for k, p in enumerate(passes):
        e0 = rng.uniform(*eye_px) * scale
        p.eye_px = (round(e0, 1), round(e0 * rng.uniform(1.0, 1.3), 1))
        p.speed_px_s = round(rng.uniform(*speed) * scale, 1)
        crossing = (W + 200 * scale) / p.speed_px_s
        if crowd:  # keep about `crowd` people in view: a new one every crossing/crowd seconds
            p.start_s = round(k * crossing / crowd + rng.uniform(0, 0.3), 2)
        else:
            p.start_s = round(rng.uniform(0, max(0.1, seconds - crossing)), 2)
        p.direction = rng.choice((1, -1))
        behind = rng.random() < occluded
        p.y_frac = rng.uniform(0.35, 0.65) if not behind else rng.uniform(0.4, 0.6)
        p.turn_s = rng.uniform(0.4, 0.9)
        p._sprites = [_sprite(Path(i)) for i in p.images]
        p.__dict__["behind"] = behind
    total = round(max(seconds, max(p.start_s + (W + 200 * scale) / p.speed_px_s for p in passes) + 0.2
                      if crowd else seconds) * fps)
    bg = background(data, size)
    video = out / "walkby.mp4"
    faces_in_view = 0
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for f in range(total):
            t = f / fps
            frame = Image.fromarray(bg)
            for p in passes:
                dt = t - p.start_s
                if dt < 0:
                    continue
                eye = p.eye_px[0] + (p.eye_px[1] - p.eye_px[0]) * min(1.0, dt * p.speed_px_s / W)
                s = eye / LFW_EYE_PX
                sw, sh = int(160 * s), int(210 * s)
                travel = dt * p.speed_px_s - sw
                x = int(travel) if p.direction > 0 else int(W - travel - sw)
                y = int(p.y_frac * H - sh / 2 + 3 * scale * np.sin(dt * 9))
                if x + sw < 0 or x > W:
                    continue
                sprite = p._sprites[int(dt / p.turn_s) % len(p._sprites)].resize((sw, sh), Image.BILINEAR)
                sprite = _motion_blur(sprite, int(round(p.speed_px_s / fps * blur)))
                frame.paste(sprite, (x, y), sprite)
                fx = x + sw / 2  # the face's centre (eyes at about 45 % of the sprite height)
                if 0 <= fx < W and 0 <= y + 0.45 * sh < H:
                    if p.first_frame < 0:
                        p.first_frame, p.first_s = f, round(t, 3)
                    p.last_frame, p.last_s = f, round(t, 3)
                    p.faces_in_view += 1
                    faces_in_view += 1
                    face_half = 0.3 * sw
                    hidden = max(0.0, min(fx + face_half, pillar[1]) - max(fx - face_half, pillar[0]))
                    if p.__dict__["behind"] and hidden > face_half:
                        p.hidden_frames += 1
            ImageDraw.Draw(frame).rectangle((pillar[0], int(0.12 * H), pillar[1], H), fill=(92, 84, 78))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    shutil.rmtree(out / "enroll", ignore_errors=True)
    for name, photo in enroll.items():
        (out / "enroll" / name).mkdir(parents=True)
        shutil.copy(photo, out / "enroll" / name / photo.name)
    truth = {"video": str(video), "enroll": str(out / "enroll"), "fps": fps, "frames": total,
             "width": W, "height": H, "seed": seed, "clear_margin": clear_margin, "pillar_x": list(pillar),
             "faces_in_view": faces_in_view,
             "passes": [{k: v for k, v in asdict(p).items() if not k.startswith("_")}
                        | {"behind_pillar": p.__dict__["behind"]} for p in passes if p.first_frame >= 0]}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return {"video": str(video), "truth": str(out / "truth.json"), "frames": total, "passes": len(truth["passes"]),
            "watchlisted_passes": sum(p["watchlisted"] for p in truth["passes"]), "resolution": resolution,
            "faces_in_view": faces_in_view}


def score_passes(truth: dict, alerts: list[dict], faces: int = 0, slack_s: float = 1.6, until_s: float = 0.0) -> dict:
    """Per pass: a watchlisted pass is alerted when an alert for that person falls inside it (first frame to
    last + `slack_s`, the time a pass can take to end in the pipeline); any other alert is false. `alerts`:
    dicts with subject and video_time_s (of the alert's first probe). `faces`: faces seen, for the rate per
    10,000 faces (the truth's faces in view when 0). `until_s`: only this much of the video was played; passes
    that began less than a second before its end (or after) are not scored (an alert for one is not false)."""
    passes = truth["passes"]
    if until_s:
        late = [p for p in passes if p["first_s"] + 1.0 > until_s]
        alerts = [a for a in alerts if not any(p["person"] == a["subject"] and a["video_time_s"] >= p["first_s"] - 0.2
                                               for p in late)]
        passes = [p for p in passes if p["first_s"] + 1.0 <= until_s]
    alerted: dict[int, list[dict]] = {}
    false = []
    for a in alerts:
        hit = next((i for i, p in enumerate(passes) if p["watchlisted"] and p["person"] == a["subject"]
                    and p["first_s"] - 0.2 <= a["video_time_s"] <= p["last_s"] + slack_s), None)
        if hit is None:
            false.append(a)
        else:
            alerted.setdefault(hit, []).append(a)
    listed = [i for i, p in enumerate(passes) if p["watchlisted"]]
    delays = sorted(min(a["video_time_s"] for a in alerted[i]) - passes[i]["first_s"] for i in alerted)
    faces = faces or truth.get("faces_in_view", 0)
    return {
        "passes": len(passes), "watchlisted_passes": len(listed),
        "watchlisted_alerted": len(alerted),
        "missed": sorted(passes[i]["person"] for i in listed if i not in alerted),
        "duplicate_alerts": sum(len(v) - 1 for v in alerted.values()),
        "false_alerts": len(false), "false_alert_subjects": sorted({a["subject"] for a in false}),
        "false_alerts_per_pass": round(len(false) / max(1, len(passes)), 4),
        "false_alerts_per_10k_faces": round(1e4 * len(false) / max(1, faces), 2),
        "appearance_to_alert_s": {"p50": round(float(np.percentile(delays, 50)), 2) if delays else None,
                                  "max": round(max(delays), 2) if delays else None},
    }


def build_suite(folder: Path, data: Path, only: list[str] | None = None, rebuild: bool = False) -> dict:
    out = {}
    for name, params in SUITE.items():
        if only and name not in only:
            continue
        if rebuild or not (folder / name / "truth.json").is_file():
            out[name] = generate(folder / name, data, **params)
        else:
            truth = json.loads((folder / name / "truth.json").read_text())
            out[name] = {"truth": str(folder / name / "truth.json"), "kept": True, "passes": len(truth["passes"])}
    return {"suite": str(folder), "videos": out}


def run(args) -> dict:
    data = Path(args.data) if args.data else data_dir()
    if args.suite:
        return build_suite(Path(args.suite), data, [n for n in args.only.split(",") if n], args.rebuild)
    if not args.out:
        raise SystemExit("--out DIR (one video) or --suite DIR (the walk-by suite) is required")
    return generate(Path(args.out), data, args.resolution, args.fps, args.seconds, args.watchlisted, args.strangers,
                    args.crowd, _pair(args.eye_px), _pair(args.speed), args.occluded, args.blur, args.clear_margin,
                    args.seed)
