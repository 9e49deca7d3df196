"""Pure cores of the services (no I/O)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from lfr.audit.core import record_from_event
from lfr.errors import Refused
from lfr.ingest.core import check_frame
from lfr.match.core import Counters, decide_top
from lfr.media import Sampler
from lfr.models import scoring
from lfr.pb import common_pb2, match_pb2, watchlist_pb2
from lfr.policy import enrollment_verdict
from lfr.runtime import events
from lfr.watchlist.core import DeploymentRecord, validate_new_deployment


def jpeg(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_check_frame_accepts_images_and_refuses_bad_ones():
    assert check_frame(jpeg(), 1 << 20, 10_000) == (64, 48)
    good = jpeg()
    for data, why in [(b"", "empty"), (b"hello", "not a JPEG"), (good[:-40], "truncated"),
                      (jpeg(200, 200), "exceeds the limit"), (b"\0" * (2 << 20), "exceeds")]:
        with pytest.raises(ValueError, match=why):
            check_frame(data, 1 << 20, 10_000)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(ValueError, match="GIF"):
        check_frame(gif.getvalue(), 1 << 20, 10_000)


def test_sampler_keeps_target_rate():
    s = Sampler(10.0)
    kept = [i for i in range(250) if s.keep(i / 25.0)]  # 10 s of 25 fps
    assert len(kept) == 100
    s = Sampler(10.0)
    assert sum(s.keep(i / 5.0) for i in range(50)) == 50  # source slower than target: keep all


def test_deployment_transitions():
    d = DeploymentRecord("d1", "n", "", "", 0, 10, ("c",), 0.5, "m", "v", builders=("builder",))
    with pytest.raises(Refused) as info:
        d.start(1, "digest")  # DRAFT: not authorised
    assert info.value.code == "FAILED_PRECONDITION" and "DRAFT" in info.value.message
    d = d.approve("officer", "digest", "", 1, [], 0)
    d = d.start(1, "digest")
    assert d.status == watchlist_pb2.DEPLOYMENT_STATUS_ACTIVE
    with pytest.raises(Refused) as info:
        d.start(2, "digest")
    assert info.value.code == "FAILED_PRECONDITION" and "ACTIVE" in info.value.message
    d = d.end(3, "operator")
    with pytest.raises(Refused):
        d.end(4, "again")


def test_new_deployment_validation():
    sface = scoring.recipe("sface")
    req = watchlist_pb2.CreateDeploymentRequest(name="x", cameras=["c1"])
    assert validate_new_deployment(req, sface) == ("", sface.threshold)
    for bad in [watchlist_pb2.CreateDeploymentRequest(cameras=["c"]),
                watchlist_pb2.CreateDeploymentRequest(name="x"),
                watchlist_pb2.CreateDeploymentRequest(name="x", cameras=["a.b"]),
                watchlist_pb2.CreateDeploymentRequest(name="x", cameras=["c", "c"]),
                watchlist_pb2.CreateDeploymentRequest(name="x", cameras=["c"], threshold=3)]:
        assert validate_new_deployment(bad, sface)[0]
    # fusion's scores are log-odds: its default (5.44) is accepted, a threshold at or below even odds is not
    fusion = scoring.recipe("fusion")
    assert validate_new_deployment(req, fusion) == ("", fusion.threshold)
    assert "above 0" in validate_new_deployment(watchlist_pb2.CreateDeploymentRequest(
        name="x", cameras=["c"], threshold=-0.5), fusion)[0]


def test_enrollment_verdict():
    assert enrollment_verdict(1, 60, 20) == ""
    assert "no face" in enrollment_verdict(0, 0, 20)
    assert "exactly one" in enrollment_verdict(3, 60, 20)
    assert "too small" in enrollment_verdict(1, 10, 20)


def test_decide_uses_threshold_on_top_candidate():
    d = decide_top([[("e", 0.7)], [("e", 0.3)], []], {"e": "subject-e"}, 0.5)
    assert [x.matched for x in d] == [True, False, False] and (d[0].entry_id, d[0].subject_ref) == ("e", "subject-e")
    assert d[1].score == 0.3 and not d[1].entry_id


def test_counters_keep_numbers_only():
    c = Counters()
    for ms in (100, 300, 200):
        c.disposed(ms)
    assert (c.nonmatches_disposed, c.disposal_ms_max, c.disposal_ms_p50) == (3, 300, 200)


def test_audit_record_holds_no_image():
    alert = match_pb2.Alert(envelope=events.envelope("match", "d1", "c1"), alert_id="a1", entry_id="e1",
                            score=0.8, probe_jpeg=b"\xff\xd8\xff" + b"x" * 100,
                            box=common_pb2.Box(x1=1, y1=2, x2=3, y2=4))
    data = alert.SerializeToString()
    r = record_from_event("lfr.v1.alerts.d1.c1", data)
    assert r.type == "alert.raised" and r.subject == "a1" and r.deployment_id == "d1"
    assert "probe_jpeg" not in json.loads(r.summary_json) and len(r.payload_digest) == 64
    assert record_from_event("lfr.v1.frames.d1.c1", b"") is None
