"""#17 item 3 in the storage: a gallery's re-embedding builds the next generation's index beside the old one (its
own folder / Qdrant collection), the swap is one record update, and the old or an unfinished generation's vectors
are deleted; a job record of before the re-embedding kind reads as a search job."""

from __future__ import annotations

import dataclasses

import numpy as np
from qdrant_client import QdrantClient

from lfr.galleryindex import IndexParams
from lfr.identification import jobs as J
from lfr.identification.gallery import Component, GalleryRecord, GalleryStore

SMALL = IndexParams(connectivity=16, expansion_add=64, expansion_search=128, threads=1)
OLD = GalleryRecord("custody", "sface-2021dec", "v1", (Component("sface-2021dec", "v1", 8, "cosine"),),
                    "builder", 1, 0.4)
NEW = dataclasses.replace(OLD, model_id="dlib-resnet-v1", model_version="v2", generation=1, default_threshold=0.6,
                          components=(Component("dlib-resnet-v1", "v2", 4, "euclidean"),))


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedded_generations_swap_and_the_old_vectors_go(tmp_path):
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "galleries", SMALL)
    store.create(OLD)
    old = store.index(OLD, OLD.components[0])
    old.add(np.arange(3), unit(3, 8))
    new = store.index(NEW, NEW.components[0])
    new.add(np.arange(3), unit(3, 4, seed=1))
    assert old is not new and len(old) == len(new) == 3
    assert (tmp_path / "galleries" / "custody" / "sface-2021dec" / "vectors.f32").is_file()
    assert (tmp_path / "galleries" / "custody" / "@1" / "dlib-resnet-v1" / "vectors.f32").is_file()
    assert store.get("custody") == OLD  # the record still names the old model until the swap
    store.save_all()
    store.replace(NEW)
    store.drop_indexes(OLD)
    assert store.get("custody") == NEW and not (tmp_path / "galleries" / "custody" / "sface-2021dec").exists()
    store.close()
    # after a restart the new generation's index is found again
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "galleries", SMALL)
    g = store.get("custody")
    assert g.generation == 1 and len(store.index(g, g.components[0])) == 3
    # an unfinished next generation is deleted whole
    later = dataclasses.replace(NEW, generation=2)
    store.index(later, later.components[0]).add(np.arange(1), unit(1, 4))
    store.drop_generation("custody", 2)
    assert not (tmp_path / "galleries" / "custody" / "@2").exists()
    assert (tmp_path / "galleries" / "custody" / "@1" / "dlib-resnet-v1").is_dir()
    # generation 0's model folders (a swap whose deletion a restart interrupted), never the images
    (tmp_path / "galleries" / "custody" / "images").mkdir()
    (tmp_path / "galleries" / "custody" / "sface-2021dec").mkdir()
    store.drop_generation("custody", 0)
    assert sorted(p.name for p in (tmp_path / "galleries" / "custody").iterdir()) == ["@1", "images"]
    store.close()


def test_qdrant_generations_are_their_own_collections(tmp_path):
    client = QdrantClient(path=str(tmp_path / "q"))
    store = GalleryStore(tmp_path / "g.sqlite", tmp_path / "galleries", SMALL, client)
    store.create(OLD)
    store.create(dataclasses.replace(OLD, name="custody_2"))
    store.index(OLD, OLD.components[0]).add(np.arange(2), unit(2, 8))
    other = dataclasses.replace(NEW, name="custody_2")
    store.index(other, other.components[0]).add(np.arange(2), unit(2, 4))
    store.index(NEW, NEW.components[0]).add(np.arange(2), unit(2, 4))
    names = {c.name for c in client.get_collections().collections}
    assert {"lfrg_custody_sface_2021dec_v1", "lfrg_custody_dlib_resnet_v1_v2_g1",
            "lfrg_custody_2_dlib_resnet_v1_v2_g1"} <= names
    fresh = GalleryStore(tmp_path / "g2.sqlite", tmp_path / "galleries", SMALL, client)  # not opened by it
    fresh.create(OLD)
    fresh.create(dataclasses.replace(OLD, name="custody_2"))
    fresh.drop_generation("custody", 1)
    names = {c.name for c in client.get_collections().collections}
    assert "lfrg_custody_dlib_resnet_v1_v2_g1" not in names
    assert {"lfrg_custody_sface_2021dec_v1", "lfrg_custody_2_dlib_resnet_v1_v2_g1"} <= names  # another gallery's
    fresh.drop_generation("custody", 0)
    names = {c.name for c in client.get_collections().collections}
    assert "lfrg_custody_sface_2021dec_v1" not in names and "lfrg_custody_2_dlib_resnet_v1_v2_g1" in names
    client.close()


def test_job_records_of_before_read_as_search_jobs():
    job = J.JobRecord(job_id="j", media=[{"path": "/x"}], gallery="g", deployment_id="", case_reference="c",
                      justification="w", actor="a", k=5, threshold=0.4, investigation=False, fps=1.0,
                      model_id="m", model_version="v", submitted_at_ns=1)
    data = job.to_json()
    del data["kind"]
    assert J.JobRecord.from_json(data).kind == J.SEARCH and not J.JobRecord.from_json(data).reembed
    assert J.JobRecord.from_json(dataclasses.replace(job, kind=J.REEMBED).to_json()).reembed
