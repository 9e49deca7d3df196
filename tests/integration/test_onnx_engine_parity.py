"""The plug-in path proved on the platform's own engines (#17): the built-in dlib ResNet and SFace (torch modules)
exported to ONNX, installed by manifest, run by onnxruntime through the generic embedder and alignment, give the
built-in engines' vectors (cosine >= 0.9999) on real images."""

from __future__ import annotations

import numpy as np
import pytest

from lfr.bench.export_engines import EXPORTS, export
from lfr.models import engines, onnx_engine

IMAGES = ["lfw-dev/Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "lfw-dev/Abdullah_Gul/Abdullah_Gul_0013.jpg",
          "faces/misc/obama-480p.jpg", "faces/knn_examples/test/kit_with_rose.jpg", "crowd/multiface.jpg"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, model_registry_kept):
    folder = tmp_path_factory.mktemp("exported")
    mp = pytest.MonkeyPatch()
    mp.setenv("LFR_ENGINES_DIR", str(folder / "engines"))
    manifests = export(folder)
    with model_registry_kept():  # the exported engines are registered for this module only
        yield {eid: onnx_engine.add(path) for eid, path in manifests.items()}
    mp.undo()


@pytest.fixture(scope="module")
def faces(data):
    from lfr.models.images import decode_image

    eng = engines.FaceEngine("sface", parts=("detector",))
    out = []
    for rel in IMAGES:
        img = decode_image((data / rel).read_bytes())
        found = eng.detect([img])[0]
        assert found, rel
        out += [(img, f) for f in found[:3]]  # up to three faces of each photo (the crowd's are small)
    return out


@pytest.mark.parametrize("plugged", sorted(EXPORTS))
def test_exported_engine_gives_the_built_in_vectors(installed, faces, plugged):
    built_in = EXPORTS[plugged]
    m = installed[plugged]
    a = engines.FaceEngine(built_in, parts=("chips", "embedders"))
    b = engines.FaceEngine(plugged, parts=("chips", "embedders"))
    assert b.info.version == m.version != a.info.version and b.info.dim == a.info.dim
    assert list(b.flips.values()) == list(a.flips.values()) == [True]  # the manifest's flip, as the built-in's
    ca = np.stack([a.chips(img, f)[built_in] for img, f in faces])
    cb = np.stack([b.chips(img, f)[plugged] for img, f in faces])
    # alignment through the manifest: dlib's own chip, or SFace's template by a generic similarity transform
    assert np.abs(ca.astype(int) - cb.astype(int)).mean() < 0.05, plugged
    va = a.embed({built_in: ca})[built_in].astype(np.float64)
    vb = b.embed({plugged: cb})[plugged].astype(np.float64)
    cos = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
    assert cos.min() >= 0.9999, (plugged, cos.min())
    # and the scores a deployment sees: the same similarity matrices within 1e-3
    assert np.abs(a.scorer.score_matrix({built_in: va}, {built_in: va})
                  - b.scorer.score_matrix({plugged: vb}, {plugged: vb})).max() < 1e-3
