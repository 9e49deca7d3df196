"""Engines plugged in by manifest (#17): refusals naming the field, the check gate on authorisation, and
separation of engines' vectors. Tiny ONNX models built here stand in for a vendor's file (real onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfr.models import engines, onnx_engine, scoring
from lfr.models.onnx_engine import ManifestError

TEMPLATE = [[11.0, 13.0], [21.0, 13.0], [16.0, 18.0], [12.0, 24.0], [20.0, 24.0]]


def tiny_onnx(path: Path, size: int = 32, dim: int = 8, opset: int = 17, seed: int = 0) -> Path:
    """chips (N, 3, size, size) -> one conv over the whole chip -> (N, dim)."""
    w = np.random.default_rng(seed).normal(size=(dim, 3, size, size)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["chips", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["vectors"])],
        "tiny", [helper.make_tensor_value_info("chips", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["n", dim])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def manifest(folder: Path, model_id: str = "acme-face-v1", file: str = "acme.onnx", **changes) -> Path:
    onnx_path = folder / file
    raw = {"id": model_id, "version": "1.0.0", "file": file,
           "sha256": onnx_engine.file_sha256(onnx_path) if onnx_path.is_file() else "0" * 64,
           "input": {"size": 32, "layout": "NCHW", "colour": "RGB", "mean": [127.5] * 3, "std": [128.0] * 3},
           "alignment": {"kind": "template", "landmarks": TEMPLATE},
           "output": {"dim": 8, "normalise": True}, "metric": "cosine", "threshold": 0.5}
    for key, value in changes.items():
        head, _, tail = key.partition("__")
        if tail:
            raw[head][tail] = value
        else:
            raw[head] = value
    p = folder / f"{model_id}.json"
    p.write_text(json.dumps(raw))
    return p


@pytest.fixture
def engines_dir(tmp_path, monkeypatch, model_registry_kept):
    """A fresh engines folder; afterwards the model registry is as it was (engines registered here leave it)."""
    d = tmp_path / "engines"
    monkeypatch.setenv("LFR_ENGINES_DIR", str(d))
    with model_registry_kept():
        yield d


def refused(path: Path) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        onnx_engine.add(path)
    return info.value


def test_wrong_sha256_is_refused_naming_the_field(tmp_path, engines_dir):
    tiny_onnx(tmp_path / "acme.onnx")
    err = refused(manifest(tmp_path, sha256="ab" * 32))
    assert err.field == "sha256" and "sha256" in str(err) and "refusing to load" in str(err)
    assert not (engines_dir / "acme-face-v1").exists()


def test_wrong_input_size_is_refused_naming_the_field(tmp_path, engines_dir):
    tiny_onnx(tmp_path / "acme.onnx", size=32)
    err = refused(manifest(tmp_path, input__size=48))
    assert err.field == "input.size" and "48" in str(err)


def test_wrong_output_dim_is_refused_naming_the_field(tmp_path, engines_dir):
    tiny_onnx(tmp_path / "acme.onnx", dim=8)
    err = refused(manifest(tmp_path, output__dim=512))
    assert err.field == "output.dim" and "512" in str(err) and "[8]" in str(err)


def test_missing_file_is_refused_naming_the_field(tmp_path, engines_dir):
    err = refused(manifest(tmp_path, file="absent.onnx"))
    assert err.field == "file" and "absent.onnx" in str(err)


def test_opset_the_runtime_cannot_run_is_refused_naming_the_field(tmp_path, engines_dir):
    tiny_onnx(tmp_path / "acme.onnx", opset=99)
    err = refused(manifest(tmp_path))
    assert err.field == "opset" and "onnxruntime" in str(err) and "99" in str(err)


@pytest.mark.parametrize("change, field", [
    ({"metric": "manhattan"}, "metric"), ({"alignment__kind": "mtcnn"}, "alignment.kind"),
    ({"input__colour": "YUV"}, "input.colour"), ({"id": "sface-2021dec"}, "id"), ({"threshold": 3.0}, "threshold"),
    ({"output__normalise": False}, "output.normalise"), ({"licence_key": "x"}, "licence_key"),
])
def test_manifest_form_errors_name_the_field(tmp_path, engines_dir, change, field):
    tiny_onnx(tmp_path / "acme.onnx")
    assert refused(manifest(tmp_path, **change)).field == field


def test_an_installed_engine_is_a_model_id_like_the_built_ins(tmp_path, engines_dir):
    tiny_onnx(tmp_path / "acme.onnx")
    m = onnx_engine.add(manifest(tmp_path))
    assert (engines_dir / "acme-face-v1" / "acme.onnx").is_file() and [e.model_id for e in onnx_engine.installed()] \
        == ["acme-face-v1"]
    eng = engines.FaceEngine("acme-face-v1", parts=engines.EMBEDDING_PARTS, flip=False)
    assert eng.info.version == "1.0.0" and eng.scorer.threshold == 0.5 and eng.info.dim == 8
    chips = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    v = eng.embed({"acme-face-v1": chips})["acme-face-v1"]
    assert v.shape == (3, 8) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # the file's own arithmetic, by hand: (pixel - mean) / std, NCHW, one conv over the chip, then L2
    w = numpy_helper.to_array(onnx.load(str(m.file)).graph.initializer[0]).astype(np.float64)
    x = ((chips.astype(np.float64) - 127.5) / 128.0).transpose(0, 3, 1, 2)
    ref = np.einsum("nchw,dchw->nd", x, w)
    assert np.allclose(v, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-4)
    # a tampered file is refused where it is loaded, not only when it is added
    (engines_dir / "acme-face-v1" / "acme.onnx").write_bytes(b"\0" + m.file.read_bytes()[1:])
    with pytest.raises(ManifestError, match="sha256"):
        onnx_engine.OnnxEmbedder(m)


def test_only_a_checked_engine_can_be_authorised(tmp_path, engines_dir):
    assert onnx_engine.authorisation_refusal(scoring.SFACE, scoring.COMPONENTS[scoring.SFACE].version) == ""
    assert "acme-face-v1 is not installed" in onnx_engine.authorisation_refusal("acme-face-v1", "1.0.0")
    tiny_onnx(tmp_path / "acme.onnx")
    m = onnx_engine.add(manifest(tmp_path))
    why = onnx_engine.authorisation_refusal("acme-face-v1", "1.0.0")
    assert "engine acme-face-v1 1.0.0 has no completed check" in why and "lfr model check acme-face-v1" in why
    rec = {"completed": True, "model_id": m.model_id, "model_version": m.version, "sha256": m.sha256,
           "threshold": {"value": 0.61, "resolved": True}}
    onnx_engine.write_check(m.model_id, rec)
    assert onnx_engine.authorisation_refusal("acme-face-v1", "1.0.0") == ""
    # the checked engine's default threshold is the one its check derived
    assert onnx_engine.register_installed("acme-face-v1") and scoring.recipe("acme-face-v1").threshold == 0.61
    # vectors of another version than the installed one: re-embed first
    assert "re-embed" in onnx_engine.authorisation_refusal("acme-face-v1", "0.9")
    # a new file under the same id drops the check: the new file needs its own
    tiny_onnx(tmp_path / "acme.onnx", seed=5)
    onnx_engine.add(manifest(tmp_path, version="1.1.0"))
    assert onnx_engine.check_record("acme-face-v1") is None
    assert "no completed check" in onnx_engine.authorisation_refusal("acme-face-v1", "1.1.0")
    # a check record of other bytes (same version, another sha256) does not count
    onnx_engine.write_check("acme-face-v1", dict(rec, model_version="1.1.0"))
    assert "no completed check" in onnx_engine.authorisation_refusal("acme-face-v1", "1.1.0")


def test_two_engines_vectors_never_meet_in_one_search(tmp_path, engines_dir):
    from lfr.embedding.core import ChipError, embed_chips
    from lfr.pb import common_pb2
    from lfr.vectorindex import VectorIndex, collection_name

    # two engines of the same dimension and metric: nothing but their ids tells their vectors apart
    for mid, seed in (("acme-a", 0), ("acme-b", 1)):
        tiny_onnx(tmp_path / f"{mid}.onnx", seed=seed)
        onnx_engine.add(manifest(tmp_path, model_id=mid, file=f"{mid}.onnx"))
    a = engines.FaceEngine("acme-a", parts=engines.EMBEDDING_PARTS, flip=False)
    b = engines.FaceEngine("acme-b", parts=engines.EMBEDDING_PARTS, flip=False)
    chips = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    va, vb = a.embed({"acme-a": chips})["acme-a"], b.embed({"acme-b": chips})["acme-b"]
    assert not np.allclose(va, vb, atol=1e-3)
    # the embedding service of engine A refuses a chip cut for engine B
    chip_b = common_pb2.Chip(model_id="acme-b", size=32, rgb=chips[0].tobytes())
    with pytest.raises(ChipError, match="not served here"):
        embed_chips(a, [chip_b])
    # scoring is keyed by engine: A's recipe has no use for B's vectors
    with pytest.raises(KeyError):
        a.scorer.score({"acme-b": vb[0]}, {"acme-b": vb})
    # the watchlist store keeps each engine (id and version) in its own collection
    ca, cb = collection_name("acme-a", "1.0.0"), collection_name("acme-b", "1.0.0")
    assert ca != cb
    index = VectorIndex(tmp_path / "qdrant")
    try:
        for coll, vecs, who in ((ca, va, "a"), (cb, vb, "b")):
            index.ensure_collection(coll, 8, "cosine")
            for i, v in enumerate(vecs):
                index.upsert(coll, [v.tolist()], {"deployment_id": "d1", "entry_id": f"{who}{i}"})
        hits = index.search(ca, [vb[0].tolist(), va[1].tolist()], "d1", 8)
        assert all(p["entry_id"].startswith("a") for h in hits for p, _ in h) and len(hits[0]) == 4
        assert hits[1][0][0]["entry_id"] == "a1"
    finally:
        index.close()
