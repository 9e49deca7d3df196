"""The live path with LFR_MODEL=fusion-v1 (both engines, log-odds scores, agreement floors), end to end: a real
nats-server, the six services as processes, real models, a video of LFW people at known times.

- the deployment's default threshold (the fused model's, 5.44 in log-odds) is accepted;
- enrolled people alert and strangers do not;
- a person whose video face SFace matches confidently but dlib scores below its floor does not alert: the
  fused log-odds without the floors would pass the threshold (checked on the very frame the video shows), and
  the watchlist's own Search gives that entry a vetoed score (at most 0) for that face.

The people are chosen with the running system's own Detect and Embed and lfr.models.scoring, so the expected
decision is clear; the test then checks what the platform decides."""

from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from lfr.bench.synthvideo import make_video
from lfr.cli.client import Clients
from lfr.cli.live import AlertCollector, create_deployment, enroll, stream_video
from lfr.models import scoring
from lfr.pb import detection_pb2, embedding_pb2, match_pb2, watchlist_pb2
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.paths import data_dir
from lfr.runtime.security import ROLES

CAMERA = "cam-fusion"
MARGIN = 2.0  # log-odds: the chosen people are clearly on either side of the threshold
# Found by scanning LFW (tests/e2e/test_fusion_live.py's premise is checked again below): SFace 0.72, dlib 0.34
# (under its floor 0.4) between these two photos; without the floors the fused log-odds would be 6.9 >= 5.44.
VETO = ("Emile_Lahoud", "Emile_Lahoud_0001.jpg", "Emile_Lahoud_0002.jpg")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    roots = [tmp_path_factory.getbasetemp(), data_dir(required=False)]  # the video, and the shared data
    env = {"LFR_MEDIA_ROOTS": os.pathsep.join(str(r) for r in roots if r), "LFR_MODEL": scoring.FUSION}
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env=env) as s:
        yield s


@pytest.fixture(scope="module")
def clients(system):
    c = Clients.connect(system.endpoints(), access=system.access(user="e2e", follow_actor=True, roles=sorted(ROLES)))
    yield c
    c.close()


def vectors(clients: Clients, image: bytes) -> dict[str, np.ndarray] | None:
    """The platform's vectors of the one face of an image (None unless exactly one face is found)."""
    det = clients.detection.Detect(detection_pb2.DetectRequest(image=image, include_chips=True), timeout=60)
    if len(det.faces) != 1:
        return None
    emb = clients.embedding.Embed(embedding_pb2.EmbedRequest(chips=list(det.faces[0].chips)), timeout=60)
    return {v.model_id: np.asarray(v.values, dtype=np.float64) for v in emb.vectors}


def component_scores(recipe: scoring.Recipe, probe, ref) -> dict[str, float]:
    return {c: float(recipe.similarity(c, probe[c], ref[c])[0, 0]) for c in recipe.components}


def unfloored(recipe: scoring.Recipe, s: dict[str, float]) -> float:
    return recipe.bias + sum(recipe.weights[c] * s[c] for c in recipe.components)


def video_frame_jpeg(video: Path, t: float) -> bytes:
    import av
    from PIL import Image

    with av.open(str(video)) as src:
        for frame in src.decode(video=0):
            if frame.time is not None and frame.time >= t:
                buf = io.BytesIO()
                Image.fromarray(frame.to_ndarray(format="rgb24")).save(buf, "JPEG", quality=95)
                return buf.getvalue()
    raise AssertionError(f"no frame at {t} s")


@pytest.fixture(scope="module")
def cast(clients, data, tmp_path_factory):
    """(enrolled: name -> enrollment photo, shown: [(name, photo)], strangers, video, segments)."""
    recipe = scoring.recipe(scoring.FUSION)
    lfw = data / "lfw-dev"
    veto_ref, veto_shown = lfw / VETO[0] / VETO[1], lfw / VETO[0] / VETO[2]
    refs = {VETO[0]: vectors(clients, veto_ref.read_bytes())}
    people = sorted(p for p in lfw.iterdir() if p.is_dir() and p.name != VETO[0])
    random.Random(5).shuffle(people)
    enrolled, shown = {}, []
    for p in people:
        imgs = sorted(p.glob("*.jpg"))
        if len(imgs) < 2 or len(enrolled) >= 3:
            continue
        a, b = vectors(clients, imgs[0].read_bytes()), vectors(clients, imgs[1].read_bytes())
        if a is None or b is None:
            continue
        s = component_scores(recipe, b, a)
        if float(recipe.combine(s)) > recipe.threshold + MARGIN and all(s[c] > recipe.floors[c] + 0.1 for c in s):
            enrolled[p.name], refs[p.name] = imgs[0], a
            shown.append((p.name, imgs[1]))
    strangers = []
    for p in people:
        imgs = sorted(p.glob("*.jpg"))
        if len(imgs) != 1 or len(strangers) >= 3:
            continue
        v = vectors(clients, imgs[0].read_bytes())
        if v is not None and max(float(recipe.combine(component_scores(recipe, v, r))) for r in refs.values()) \
                < recipe.threshold - MARGIN:
            strangers.append((p.name, imgs[0]))
    assert len(enrolled) == 3 and len(strangers) == 3
    order = [*shown, (VETO[0], veto_shown), *strangers]
    random.Random(6).shuffle(order)
    video = tmp_path_factory.mktemp("video") / "fusion.mp4"
    segments = make_video(video, order, seconds_each=1.5, fps=10)
    return {**enrolled, VETO[0]: veto_ref}, {n for n, _ in strangers}, video, segments, refs


def test_fusion_live_default_threshold_alerts_and_floor_veto(system, clients, cast):
    recipe = scoring.recipe(scoring.FUSION)
    enrolled, strangers, video, segments, refs = cast

    # The premise of the veto, on the frame the video shows: SFace is sure, dlib is under its floor, and
    # without the floors the fused score would pass the threshold.
    seg = next(s for s in segments if s.subject == VETO[0])
    probe = vectors(clients, video_frame_jpeg(video, (seg.start_s + seg.end_s) / 2))
    assert probe is not None
    s = component_scores(recipe, probe, refs[VETO[0]])
    assert s[scoring.DLIB] < recipe.floors[scoring.DLIB] and s[scoring.SFACE] > recipe.floors[scoring.SFACE], s
    assert unfloored(recipe, s) >= recipe.threshold, (s, unfloored(recipe, s))

    # A deployment with the model's default threshold is accepted (log-odds, not a similarity in [-1, 1]).
    d = create_deployment(clients, "fusion-e2e", [CAMERA])
    assert d.model_id == scoring.FUSION and d.threshold == pytest.approx(recipe.threshold, rel=1e-6)
    results = enroll(clients, d.id, {name: [path] for name, path in enrolled.items()})
    for name, r in results.items():
        assert r.entry_id and all(x.accepted for x in r.results), (name, r)
    clients.watchlist.StartDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))

    # The live search itself vetoes: the watchlist's Search scores that face against the entry at most 0.
    probe_pb = watchlist_pb2.Probe()
    model = clients.embedding.GetModel(embedding_pb2.GetModelRequest())
    for c in model.components:
        probe_pb.vectors.add(model_id=c.model_id, model_version=c.model_version, values=probe[c.model_id].tolist())
    found = clients.watchlist.Search(watchlist_pb2.SearchRequest(deployment_id=d.id, probes=[probe_pb], k=10))
    veto = [c for c in found.results[0].candidates if c.subject_ref == VETO[0]]
    assert veto and veto[0].score <= 0.0 < d.threshold, found

    collector = AlertCollector(clients, d.id)
    src = stream_video(clients, d.id, CAMERA, str(video), fps=10, realtime=True)
    assert src.frames_published >= 0.9 * 10 * segments[-1].end_s
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = clients.match.GetStats(match_pb2.GetStatsRequest(deployment_id=d.id))
        if len(collector.alerts) >= stats.alerts:
            break
        time.sleep(0.3)
    collector.close()
    assert not collector.error
    alerts = [a for a, _ in collector.alerts]
    alerted = {a.subject_ref for a in alerts}
    assert alerted == set(enrolled) - {VETO[0]}, f"alerted {alerted}"  # the vetoed person and strangers: none
    for a in alerts:
        assert a.score >= a.threshold == pytest.approx(d.threshold) and a.envelope.model_id == scoring.FUSION
    assert stats.alerts >= len(set(enrolled) - {VETO[0]})
    # match decided with the watchlist's vectors in memory (loaded once), and forgets them when it ends
    log = system.state_dir / "logs" / "match.log"

    def events_of(kind: str) -> list[dict]:
        return [e for e in map(json.loads, log.read_text().splitlines()) if e.get("event") == kind
                and e.get("deployment_id") == d.id]
    assert [e["entries"] for e in events_of("match.watchlist_loaded")] == [len(enrolled)]
    clients.watchlist.EndDeployment(watchlist_pb2.TransitionRequest(deployment_id=d.id, actor="op"))
    deadline = time.monotonic() + 10
    while not events_of("match.watchlist_dropped") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert events_of("match.watchlist_dropped")


def test_models_only_where_they_run(system):
    """In the running system: the four model-free services have no libtorch mapped (they never import torch);
    detection built the detector and the fused model's chip makers, embedding only its embedders."""
    from lfr.runtime.embedded import SERVICES

    pids = system.pids()
    for service in SERVICES:
        maps = Path(f"/proc/{pids[service]}/maps").read_text()
        assert ("libtorch" in maps) == (service in ("detection", "embedding")), service
    built = {}
    for service in ("detection", "embedding"):
        for line in (system.state_dir / "logs" / f"{service}.log").read_text().splitlines():
            if '"models.built"' in line:
                built[service] = json.loads(line)
    both = sorted([scoring.DLIB, scoring.SFACE])
    assert built["detection"]["detector"] and built["detection"]["chip_makers"] == both
    assert built["detection"]["embedders"] == [] and built["embedding"]["chip_makers"] == []
    assert built["embedding"]["detector"] is None and built["embedding"]["embedders"] == both
