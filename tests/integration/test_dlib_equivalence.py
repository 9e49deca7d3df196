"""Our numpy/PyTorch dlib engine against dlib-bin itself on real faces from ../shared/data.

Faces are found with dlib's own HOG detector; the same boxes, landmarks and chips are fed to both
sides so each stage is compared on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
if not DATA.is_dir():
    pytest.skip(
        f"test data folder {DATA} is absent (it sits beside the checkout as ../shared/data)",
        allow_module_level=True,
    )
dlib = pytest.importorskip("dlib", reason="dlib-bin (the 'test' extra) is the oracle for these tests")

from PIL import Image  # noqa: E402

from lfr.models.dlib_chip import dlib_face_chip, face_chip_details, pyramid_down_2  # noqa: E402
from lfr.models.dlib_resnet import embed_chips, load_dlib_resnet  # noqa: E402
from lfr.models.shape_predictor import ShapePredictor, box_to_dlib_rect, dlib_rect_to_box  # noqa: E402
from lfr.models.weights import weight_path  # noqa: E402

N_LFW = 26  # LFW images sampled (one face each), plus the large faces below
LARGE = ["faces/misc/obama-1080p.jpg", "faces/misc/biden.jpg"]


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def dlib_models():
    sp = dlib.shape_predictor(str(weight_path("dlib_shape5")))
    fr = dlib.face_recognition_model_v1(str(weight_path("dlib_resnet")))
    return sp, fr


@pytest.fixture(scope="module")
def faces(dlib_models):
    """[(name, image, dlib.rectangle, dlib full_object_detection)] — at least 20 faces."""
    sp, _ = dlib_models
    detector = dlib.get_frontal_face_detector()
    lfw = sorted((DATA / "lfw-dev").glob("*/*.jpg"))
    if len(lfw) < N_LFW:
        pytest.skip(f"need LFW images in {DATA / 'lfw-dev'}")
    step = max(1, len(lfw) // (N_LFW + 6))
    paths = lfw[::step][: N_LFW + 6] + [DATA / p for p in LARGE if (DATA / p).is_file()]
    out = []
    n_lfw = 0
    for path in paths:
        is_lfw = "lfw-dev" in path.parts
        if is_lfw and n_lfw >= N_LFW:
            continue
        img = _load_rgb(path)
        dets = detector(img, 0)
        if len(dets) == 0:
            continue
        rect = max(dets, key=lambda r: r.area())
        out.append((path.name, img, rect, sp(img, rect)))
        n_lfw += is_lfw
    assert len(out) >= 20, f"only {len(out)} faces found"
    return out


@pytest.fixture(scope="module")
def predictor():
    return ShapePredictor.load()


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ),
    ],
)
def resnet(request):
    """The descriptor net on each device (CUDA runs full float32 by default: lfr.models.device)."""
    return load_dlib_resnet(device=request.param)


def _parts(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def test_landmarks_match_dlib(faces, predictor):
    agree = 0
    worst = []
    for name, img, rect, shape in faces:
        ours = predictor.predict_rects(img, [(rect.left(), rect.top(), rect.right(), rect.bottom())])[0]
        # the project's box convention maps onto the same dlib rectangle
        assert box_to_dlib_rect(dlib_rect_to_box(rect)) == (
            rect.left(),
            rect.top(),
            rect.right(),
            rect.bottom(),
        )
        np.testing.assert_array_equal(predictor.predict(img, dlib_rect_to_box(rect)), ours)
        err = float(np.abs(ours - _parts(shape)).max())
        agree += err <= 1.0
        worst.append((err, name))
    frac = agree / len(faces)
    assert len(faces) >= 20
    assert frac >= 0.95, f"landmarks within 1 px on {frac:.0%} of faces; worst {sorted(worst)[-3:]}"


def test_chips_match_dlib_including_pyramid(faces):
    big = 0
    for name, img, _rect, shape in faces:
        ref = np.asarray(dlib.get_face_chip(img, shape, size=150, padding=0.25))
        ours = dlib_face_chip(img, _parts(shape), size=150, padding=0.25)
        assert ours.shape == (150, 150, 3) and ours.dtype == np.uint8
        mad = np.abs(ours.astype(np.int16) - ref.astype(np.int16)).mean()
        assert mad <= 1.0, f"{name}: chip mean abs difference {mad:.3f}"
        left, _, right, _ = face_chip_details(_parts(shape)).rect
        big += (right - left + 1) > 300  # dlib samples these from a 2x pyramid level
    assert big >= 1, "no face large enough to exercise dlib's pyramid step"


def test_pyramid_down_matches_dlib():
    rng = np.random.default_rng(1)
    pyr = dlib.pyramid_down(2)
    for shape in [(9, 9, 3), (37, 41, 3), (120, 77, 3), (64, 65)]:
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        np.testing.assert_array_equal(pyramid_down_2(img), np.asarray(pyr(img)))


def test_descriptors_match_dlib(faces, dlib_models, resnet):
    _, fr = dlib_models
    chips = np.stack([np.asarray(dlib.get_face_chip(img, shape, 150, 0.25)) for _, img, _, shape in faces])
    ref = np.array([np.asarray(fr.compute_face_descriptor(c)) for c in chips], dtype=np.float64)
    ours = embed_chips(resnet, chips, batch_size=16)
    assert ours.shape == (len(faces), 128) and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    assert len(faces) >= 20
    assert diff <= 1e-4, f"max abs descriptor difference {diff:.2e}"


def test_full_pipeline_matches_dlib(faces, dlib_models, predictor, resnet):
    """Our landmarks -> our chip -> our descriptor against dlib's compute_face_descriptor(img, shape)."""
    _, fr = dlib_models
    sample = faces[:: max(1, len(faces) // 8)]
    chips = []
    refs = []
    for _, img, rect, shape in sample:
        lm = predictor.predict(img, dlib_rect_to_box(rect))
        chips.append(dlib_face_chip(img, lm))
        refs.append(np.asarray(fr.compute_face_descriptor(img, shape)))
    ours = embed_chips(resnet, np.stack(chips))
    dist = np.linalg.norm(ours - np.array(refs), axis=1)
    assert (dist <= 1e-3).mean() >= 0.95, f"pipeline distances {np.round(dist, 5)}"


def test_flip_averaging(faces, resnet):
    chips = np.stack([dlib_face_chip(img, _parts(shape)) for _, img, _, shape in faces[:4]])
    plain = embed_chips(resnet, chips)
    flipped = embed_chips(resnet, chips, flip=True)
    mirror = embed_chips(resnet, chips[:, :, ::-1])
    np.testing.assert_allclose(flipped, (plain + mirror) / 2, atol=1e-5)
    assert np.all(np.linalg.norm(flipped - plain, axis=1) < 0.6)  # still the same person
    one = embed_chips(resnet, chips[0])  # a single (150, 150, 3) chip
    np.testing.assert_allclose(one[0], plain[0], atol=1e-5)
