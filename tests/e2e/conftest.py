"""One embedded system (real nats-server, Qdrant local mode, six services as separate processes, real
models) per test module, and a video with exact ground truth built from LFW images."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lfr.bench.synthvideo import Segment, make_video
from lfr.cli.client import Clients
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.paths import data_dir
from lfr.runtime.security import ROLES

# The functional tests act as whoever their requests name, with every role: the role table itself is tested
# role by role in test_security.py.
HARNESS_ROLES = sorted(ROLES)

MARGIN = 0.12  # ground truth is chosen so the library's decision is clear on either side of the threshold


def _embed(engine, path: Path) -> dict[str, np.ndarray] | None:
    from PIL import Image

    from lfr.models.engines import central_face

    img = np.asarray(Image.open(path).convert("RGB"))
    face = central_face(img, engine.detect([img])[0])
    if face is None:
        return None
    return engine.embed_faces(img, [face])


@dataclass
class GroundTruth:
    enrolled: dict[str, Path]  # subject -> enrollment photo
    segments: list[Segment]  # what the video shows, when
    strangers: set[str]
    threshold: float
    video: Path


def choose_people(lfw: Path, engine, n_enrolled: int = 3, n_strangers: int = 3, seed: int = 7):
    """Enrolled: a person's 1st photo enrolled, their 2nd shown. Strangers: people with one photo, shown.
    Chosen with the library so that the expected decision is clear; the test then checks the platform."""
    thr = engine.info.threshold
    people = sorted(p for p in lfw.iterdir() if p.is_dir())
    rng = random.Random(seed)
    rng.shuffle(people)
    enrolled, refs = {}, {}
    shown = []
    for p in people:
        imgs = sorted(p.glob("*.jpg"))
        if len(imgs) < 2 or len(enrolled) >= n_enrolled:
            continue
        a, b = _embed(engine, imgs[0]), _embed(engine, imgs[1])
        if a is None or b is None:
            continue
        if float(engine.score(b, a)[0]) > thr + MARGIN:
            enrolled[p.name], refs[p.name] = imgs[0], a
            shown.append((p.name, imgs[1]))
    strangers = []
    for p in people:
        imgs = sorted(p.glob("*.jpg"))
        if len(imgs) != 1 or len(strangers) >= n_strangers:
            continue
        s = _embed(engine, imgs[0])
        if s is None:
            continue
        if max(float(engine.score(s, r)[0]) for r in refs.values()) < thr - MARGIN:
            strangers.append((p.name, imgs[0]))
    assert len(enrolled) == n_enrolled and len(strangers) == n_strangers
    order = shown + strangers
    rng.shuffle(order)
    return enrolled, order, {n for n, _ in strangers}


@pytest.fixture(scope="session")
def ground_truth(data, tmp_path_factory) -> GroundTruth:
    from lfr.models.engines import get_engine

    engine = get_engine()
    enrolled, order, strangers = choose_people(data / "lfw-dev", engine)
    video = tmp_path_factory.mktemp("video") / "ground-truth.mp4"
    segments = make_video(video, order, seconds_each=1.5, fps=10)
    return GroundTruth(enrolled, segments, strangers, engine.info.threshold, video)


def media_env(tmp_path_factory) -> dict[str, str]:
    """LFR_MEDIA_ROOTS of a test system: pytest's temporary folder (the videos and stills fixtures build, the
    state folder) and the shared data; anything else (/etc, another temporary folder) is outside."""
    roots = [tmp_path_factory.getbasetemp(), data_dir(required=False)]
    # and service-to-service calls summarised in the audit every 2 s (60 s by default), so a test can see them
    return {"LFR_MEDIA_ROOTS": os.pathsep.join(str(r) for r in roots if r), "LFR_ACCESS_SUMMARY_S": "2"}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env=media_env(tmp_path_factory)) as s:
        yield s


@pytest.fixture(scope="module")
def clients(system):
    c = Clients.connect(system.endpoints(), access=system.access(user="e2e", follow_actor=True, roles=HARNESS_ROLES))
    yield c
    c.close()

