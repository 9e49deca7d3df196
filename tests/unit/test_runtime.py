"""Pure pieces of the shared runtime: config, log stripping, subjects, the bounded stage."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import structlog

from lfr.runtime import metrics, subjects
from lfr.runtime.config import Config, ConfigError, describe
from lfr.runtime.logs import setup_logging, strip_biometrics
from lfr.runtime.stage import Stage


def test_config_parses_types_and_secret_files(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    cfg = Config.from_env({"LFR_GRPC_PORT": "5000", "LFR_FRESHNESS_MS": "800", "LFR_INGEST_FPS": "12.5",
                           "LFR_QDRANT_API_KEY_FILE": str(secret)})
    assert (cfg.grpc_port, cfg.freshness_ms, cfg.ingest_fps, cfg.qdrant_api_key) == (5000, 800, 12.5, "s3cret")


@pytest.mark.parametrize("env, key", [
    ({"LFR_GRPC_PORT": "abc"}, "LFR_GRPC_PORT"),
    ({"LFR_GRPC_PORT": "70000"}, "LFR_GRPC_PORT"),
    ({"LFR_QUEUE_SIZE": "0"}, "LFR_QUEUE_SIZE"),
    ({"LFR_LOG_LEVEL": "loud"}, "LFR_LOG_LEVEL"),
    ({"LFR_DEVICE": "tpu"}, "LFR_DEVICE"),
    ({"LFR_QDRANT_API_KEY_FILE": "/nonexistent/secret"}, "LFR_QDRANT_API_KEY_FILE"),
])
def test_config_error_names_the_key_and_not_the_value(env, key):
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert str(info.value).startswith(key)
    assert "nonexistent" not in str(info.value)


def test_every_config_key_is_documented():
    for key, _default, doc in describe():
        assert key.startswith("LFR_") and doc


def test_log_processor_strips_images_vectors_and_names(capsys):
    event = strip_biometrics(None, "info", {"event": "x", "image": b"\xff\xd8", "vector": [0.1] * 128,
                                            "blob": b"abc", "arr": np.zeros(3), "name": "Jane", "ok": 3})
    assert event["image"] == event["vector"] == event["name"] == "[stripped]"
    assert "bytes stripped" in event["blob"] and event["arr"] == "[array stripped]" and event["ok"] == 3
    setup_logging("test")
    try:
        structlog.get_logger().info("hello", chip=b"\x01\x02", deployment_id="d1")
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:  # the logger writes to this test's captured stdout: do not leave it configured for others
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
    assert line["chip"] == "[stripped]" and line["deployment_id"] == "d1" and line["service"] == "test"


def test_log_processor_strips_secrets_and_tokens_inside_messages():
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJidWlsZGVyIn0.c2lnbmF0dXJl"
    event = strip_biometrics(None, "info", {"event": "x", "authorization": f"Bearer {jwt}", "password": "pw",
                                            "detail": f"bad header Bearer {jwt} from peer", "ok": "plain"})
    assert event["authorization"] == event["password"] == "[stripped]"
    assert jwt not in event["detail"] and "[token stripped]" in event["detail"] and event["ok"] == "plain"


def test_subjects_are_versioned_and_tokens_validated():
    assert subjects.frames("d1", "c1") == "lfr.v1.frames.d1.c1"
    assert subjects.alerts("d1") == "lfr.v1.alerts.d1.*"
    assert all(s.startswith("lfr.v1.") for st in subjects.STREAMS for s in st.subjects)
    # the biometric flow is never captured by a file-backed stream
    for st in subjects.STREAMS:
        for s in st.subjects:
            assert not any(d in s for d in ("frames", "faces", "embeddings"))
    for bad in ("a.b", "a b", "*", ">", "", "x" * 65):
        with pytest.raises(ValueError):
            subjects.token(bad, "camera id")


async def test_stage_drops_oldest_when_full_and_stale_items():
    seen: list[int] = []

    async def process(batch):
        seen.extend(i for i, _ in batch)

    dropped = []
    stage = Stage("t", "unit", maxsize=3, batch=2, process=process, age_ms=lambda it: it[1], budget_ms=100,
                  on_drop=lambda it, why: dropped.append((it[0], why)))
    for i in range(5):
        stage.offer((i, 0.0))
    stage.offer((5, 500.0))  # stale on arrival at the worker
    task = asyncio.create_task(stage.run())
    await stage.drain(2.0)
    await task
    assert seen == [3, 4]
    assert dropped == [(0, "queue_full"), (1, "queue_full"), (2, "queue_full"), (5, "stale")]
    assert metrics.DROPPED.labels("t", "unit", "queue_full")._value.get() == 3


async def test_stage_batches_by_weight_and_drops_what_cannot_finish_in_budget():
    batches: list[list[int]] = []

    async def process(batch):
        batches.append([i for i, _w, _age in batch])
        await asyncio.sleep(0.05)

    dropped = []
    stage = Stage("t", "weighted", maxsize=10, batch=4, process=process, age_ms=lambda it: it[2], budget_ms=100,
                  on_drop=lambda it, why: dropped.append((it[0], why)), weight=lambda it: it[1])
    for i, w in enumerate([3, 1, 2, 5, 1]):  # faces per frame
        stage.offer((i, w, 0.0))
    task = asyncio.create_task(stage.run())
    await stage.drain(2.0)
    await task
    assert batches == [[0, 1], [2], [3], [4]]  # never over 4 faces, except a single heavy item
    assert dropped == [] and 40 < stage.batch_ms < 200
    assert 10 < stage.unit_ms < 60  # 50 ms batches of 1-5 faces
    # an item whose age plus its predicted processing time exceeds the budget is dropped, not started
    stage = Stage("t", "late", maxsize=10, batch=1, process=process, age_ms=lambda it: it[2], budget_ms=100,
                  on_drop=lambda it, why: dropped.append((it[0], why)))
    stage.unit_ms = 50.0
    stage.offer((7, 1, 60.0))
    stage.offer((8, 1, 10.0))
    task = asyncio.create_task(stage.run())
    await stage.drain(2.0)
    await task
    assert dropped == [(7, "stale")] and batches[-1] == [8]
    # by weight: a 1-face frame fits where a 4-face frame of the same age does not (10 ms per face)
    dropped.clear()
    stage = Stage("t", "cost", maxsize=10, batch=8, process=process, age_ms=lambda it: it[2], budget_ms=100,
                  on_drop=lambda it, why: dropped.append((it[0], why)), weight=lambda it: it[1])
    stage.unit_ms = 10.0
    stage.offer((20, 4, 70.0))  # 70 + 4 x 10 > 100
    stage.offer((21, 1, 70.0))  # 70 + 1 x 10 <= 100
    task = asyncio.create_task(stage.run())
    await stage.drain(2.0)
    await task
    assert dropped == [(20, "stale")] and batches[-1] == [21]


async def test_stage_recovers_from_one_slow_batch():
    """A prediction learnt from one slow batch (a restarted detection's first inference took 5 s) dropped every
    later item before it was tried, so it never learnt otherwise: the stage stayed blind for good. Now an item
    still inside its budget goes through as a probe once nothing was processed for a second."""
    import time

    done: list[int] = []

    async def process(batch):
        done.extend(i for i, _t in batch)
        await asyncio.sleep(0.005)

    stage = Stage("t", "probe", maxsize=10, batch=2, process=process,
                  age_ms=lambda it: (time.monotonic() - it[1]) * 1000, budget_ms=100)
    stage.unit_ms = 5000.0  # as learnt from the slow batch
    task = asyncio.create_task(stage.run())
    for i in range(100):  # 2 s of frames at 50 fps
        stage.offer((i, time.monotonic()))
        await asyncio.sleep(0.02)
    await stage.drain(2.0)
    await task
    assert stage.unit_ms < 50, stage.unit_ms
    assert len(done) > 30, done  # after the first probe (about 1 s in), frames are processed again


def test_the_configuration_page_documents_every_config_key():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [key for key, _d, _doc in describe() if f"`{key}`" not in page]
    assert not missing, f"docs/configuration.md lacks {missing} (python -m lfr.runtime.configdoc --write)"
