"""Deployment governance end to end: the embedded system (real nats-server, Qdrant local mode, six services,
real models) with a test policy file. Every transition and refusal through the gRPC API, the operator CLI
walkthrough, the audit of every decision, and the purge checked in Qdrant itself and in the image store,
including a purge completed by the sweeper after a restart."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageFilter

from lfr.pb import audit_pb2, ingest_pb2
from lfr.pb import watchlist_pb2 as pb
from lfr.runtime import clock
from lfr.runtime.embedded import EmbeddedSystem
from lfr.runtime.events import ts_from_ns

S = 1_000_000_000
DAY = 86_400 * S
SITE = "Test Square"
POLICY = {
    "version": "e2e-1",
    "categories": ["wanted-by-court", "wanted-by-police", "missing-vulnerable"],
    "max_watchlist_size": 3,
    "enrollment": {"min_inter_eye_px": 30, "min_sharpness": 40, "max_abs_yaw_deg": 45, "max_abs_pitch_deg": 30,
                   "max_image_age_days": 3650},
    "approved_sites": [{"name": SITE, "latitude": 51.5, "longitude": -0.12}],
    "second_authoriser": {"unapproved_site": True, "under_18": True},
}
# LFW photos with one good face each (inter-eye 44-53 px, sharp, near frontal)
GOOD = ["Aaron_Sorkin/Aaron_Sorkin_0001.jpg", "Adam_Scott/Adam_Scott_0002.jpg", "Ali_Naimi/Ali_Naimi_0001.jpg",
        "Abdullah_Gul/Abdullah_Gul_0013.jpg"]
TWO_FACES = "Al_Gore/Al_Gore_0003.jpg"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env={"LFR_POLICY_FILE": str(policy)}) as s:
        yield s


@pytest.fixture(scope="module")
def lfw(data) -> Path:
    return data / "lfw-dev"


def image(lfw: Path, rel: str) -> bytes:
    return (lfw / rel).read_bytes()


def code_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=60, **kw)
    return info.value.code(), info.value.details()


def create(clients, site=SITE, start_s=-60, end_s=3600, actor="builder", cameras=("c1",)) -> pb.Deployment:
    now = time.time_ns()
    return clients.watchlist.CreateDeployment(pb.CreateDeploymentRequest(
        name="e2e", purpose="test", site=site, cameras=list(cameras), actor=actor,
        planned_start=ts_from_ns(now + start_s * S), planned_end=ts_from_ns(now + end_s * S)), timeout=30)


def enroll(clients, d, ref, images, category=pb.CATEGORY_WANTED_BY_POLICE, actor="builder", captured_ns=None,
           under_18=False, timeout=120) -> pb.EnrollEntryResponse:
    captured = ts_from_ns(captured_ns or time.time_ns() - 30 * DAY)
    return clients.watchlist.EnrollEntry(pb.EnrollEntryRequest(
        deployment_id=d.id, subject_ref=ref, category=category, source_system="custody", legal_basis="PACE s.64A",
        images=images, captured_at=[captured], actor=actor, under_18=under_18), timeout=timeout)


def authorise(clients, d, actor, digest="", timeout=30) -> pb.Deployment:
    return clients.watchlist.AuthoriseDeployment(pb.AuthoriseRequest(deployment_id=d.id, actor=actor,
                                                                     watchlist_digest=digest), timeout=timeout)


def transition(clients, rpc, d, actor="operator", timeout=60) -> pb.Deployment:
    return getattr(clients.watchlist, rpc)(pb.TransitionRequest(deployment_id=d.id, actor=actor), timeout=timeout)


def get(clients, d) -> pb.Deployment:
    return clients.watchlist.GetDeployment(pb.GetDeploymentRequest(deployment_id=d.id), timeout=30)


def push(clients, d, jpeg, camera="c1", timeout=30):
    return clients.ingest.PushFrames(iter([ingest_pb2.PushFrameRequest(deployment_id=d.id, camera_id=camera,
                                                                       image=jpeg)]), timeout=timeout)


wait_for = clock.wait_for


def audit_types(clients, deployment_id) -> list[str]:
    recs = clients.audit.Query(audit_pb2.QueryRequest(deployment_id=deployment_id), timeout=30).records
    return [r.type for r in recs]


# Policy refusals -----------------------------------------------------------------------------------------
def test_entry_refusals_category_size_and_poor_images(clients, lfw):
    d = create(clients)
    # a category the policy does not allow: refused with the reason, nothing enrolled
    r = enroll(clients, d, "N1", [image(lfw, GOOD[0])], category=pb.CATEGORY_RISK_OF_HARM)
    assert not r.entry_id and "risk-of-harm is not allowed by policy e2e-1" in r.reason
    assert all(not x.accepted and "not allowed" in x.reason for x in r.results)
    # poor images: two faces, too small, blurred, too old; one good image is enough for an entry
    small = Image.open(io.BytesIO(image(lfw, GOOD[0]))).resize((120, 120))
    blurred = Image.open(io.BytesIO(image(lfw, GOOD[0]))).filter(ImageFilter.GaussianBlur(4))
    imgs = [image(lfw, TWO_FACES), jpeg(small), jpeg(blurred), image(lfw, GOOD[0])]
    r = enroll(clients, d, "N1", imgs)
    assert [x.accepted for x in r.results] == [False, False, False, True] and r.entry_id
    assert "exactly one" in r.results[0].reason
    assert "too small" in r.results[1].reason
    assert "blurred" in r.results[2].reason
    old = enroll(clients, d, "N2", [image(lfw, GOOD[1])], captured_ns=time.time_ns() - 4000 * DAY)
    assert not old.entry_id and "too old" in old.results[0].reason
    # the list may hold three entries: the fourth is refused
    for i, rel in enumerate(GOOD[1:3], start=2):
        assert enroll(clients, d, f"N{i}", [image(lfw, rel)]).entry_id
    full = enroll(clients, d, "N4", [image(lfw, GOOD[3])])
    assert not full.entry_id and "at most 3 entries" in full.reason
    assert get(clients, d).watchlist_size == 3
    # missing provenance is an invalid request
    code, msg = code_of(clients.watchlist.EnrollEntry, pb.EnrollEntryRequest(
        deployment_id=d.id, subject_ref="N5", category=pb.CATEGORY_WANTED_BY_POLICE, images=[b"x"], actor="b"))
    assert code == C.INVALID_ARGUMENT and "required" in msg
    # every decision is in the audit record
    assert wait_for(lambda: audit_types(clients, d.id).count("watchlist.entry_refused") >= 3)
    assert "watchlist.entry_added" in audit_types(clients, d.id)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# Lifecycle and authorisation -----------------------------------------------------------------------------
def test_every_transition_and_its_refusals(clients, lfw, data):
    frame = (data / "faces/misc/obama.jpg").read_bytes()
    d = create(clients)
    assert d.status == pb.DEPLOYMENT_STATUS_DRAFT and d.site_approved and d.policy_version == "e2e-1"
    # nothing may run before authorisation: frames for a DRAFT deployment are refused
    code, msg = code_of(push, clients, d, frame)
    assert code == C.FAILED_PRECONDITION and "DRAFT" in msg
    for rpc in ("StartDeployment", "EndDeployment"):
        code, msg = code_of(transition, clients, rpc, d)
        assert code == C.FAILED_PRECONDITION and "DRAFT" in msg
    # an empty list cannot be authorised
    code, msg = code_of(authorise, clients, d, "officer")
    assert code == C.FAILED_PRECONDITION and "empty" in msg
    assert enroll(clients, d, "P1", [image(lfw, GOOD[0])]).entry_id
    assert enroll(clients, d, "P2", [image(lfw, GOOD[1])], actor="helper").entry_id
    # self-authorisation: neither the creator nor anyone who changed the list may authorise it
    for builder in ("builder", "helper"):
        code, msg = code_of(authorise, clients, d, builder)
        assert code == C.PERMISSION_DENIED and "cannot authorise" in msg
    # approval of a composition other than the current one is refused
    code, msg = code_of(authorise, clients, d, "officer", "0" * 64)
    assert code == C.FAILED_PRECONDITION and "changed since" in msg
    current = get(clients, d).watchlist_digest
    a = authorise(clients, d, "officer", current)
    assert a.status == pb.DEPLOYMENT_STATUS_AUTHORISED and a.authorised_digest == current
    assert [x.actor for x in a.approvals] == ["officer"]
    code, msg = code_of(push, clients, d, frame)
    assert code == C.FAILED_PRECONDITION and "AUTHORISED" in msg
    # a change after authorisation returns it to DRAFT: it needs approval again
    assert enroll(clients, d, "P3", [image(lfw, GOOD[2])]).entry_id
    back = get(clients, d)
    assert back.status == pb.DEPLOYMENT_STATUS_DRAFT and not back.approvals and back.watchlist_digest != current
    code, msg = code_of(transition, clients, "StartDeployment", d)
    assert code == C.FAILED_PRECONDITION and "DRAFT" in msg
    a = authorise(clients, d, "officer")
    assert a.status == pb.DEPLOYMENT_STATUS_AUTHORISED
    # remove is a change too
    entry = clients.watchlist.ListEntries(pb.ListEntriesRequest(deployment_id=d.id)).entries[-1]
    clients.watchlist.RemoveEntry(pb.RemoveEntryRequest(deployment_id=d.id, entry_id=entry.entry_id,
                                                        actor="builder"), timeout=30)
    assert get(clients, d).status == pb.DEPLOYMENT_STATUS_DRAFT
    assert authorise(clients, d, "officer").status == pb.DEPLOYMENT_STATUS_AUTHORISED
    code, msg = code_of(authorise, clients, d, "officer-2")
    assert code == C.FAILED_PRECONDITION and "AUTHORISED" in msg
    # start, then no change, no cancel, no second start
    s = transition(clients, "StartDeployment", d)
    assert s.status == pb.DEPLOYMENT_STATUS_ACTIVE and s.started_at.seconds
    assert push(clients, d, frame).frames_accepted == 1
    code, msg = code_of(enroll, clients, d, "P4", [image(lfw, GOOD[3])])
    assert code == C.FAILED_PRECONDITION and "cannot change" in msg
    for rpc in ("StartDeployment", "CancelDeployment"):
        code, msg = code_of(transition, clients, rpc, d)
        assert code == C.FAILED_PRECONDITION and "ACTIVE" in msg
    # end: purged at once by default; only the nominal ids, categories and counts remain
    e = transition(clients, "EndDeployment", d)
    assert e.status == pb.DEPLOYMENT_STATUS_PURGED and e.purged_at.seconds and e.watchlist_size == 2
    code, msg = code_of(push, clients, d, frame)
    assert code == C.FAILED_PRECONDITION and "PURGED" in msg
    for rpc in ("StartDeployment", "EndDeployment", "CancelDeployment"):
        assert code_of(transition, clients, rpc, d)[0] == C.FAILED_PRECONDITION
    left = clients.watchlist.ListEntries(pb.ListEntriesRequest(deployment_id=d.id))
    assert left.purged and [x.subject_ref for x in left.entries] == ["P1", "P2"]
    assert all(not x.images and not x.vectors and not x.source_system and x.image_count == 1 for x in left.entries)
    expected = ["deployment.created", "deployment.approved", "deployment.authorised", "deployment.returned_to_draft",
                "deployment.started", "deployment.ended", "deployment.purged", "deployment.authorisation_refused",
                "deployment.start_refused", "watchlist.entry_added", "watchlist.entry_removed",
                "watchlist.watchlist_purged"]
    assert wait_for(lambda: set(expected) <= set(audit_types(clients, d.id))), audit_types(clients, d.id)


def test_cancel_purges_and_keeps_cancelled(clients, lfw):
    d = create(clients)
    assert enroll(clients, d, "Q1", [image(lfw, GOOD[0])]).entry_id
    c = transition(clients, "CancelDeployment", d)
    assert c.status == pb.DEPLOYMENT_STATUS_CANCELLED and c.purged_at.seconds
    assert code_of(authorise, clients, d, "officer")[0] == C.FAILED_PRECONDITION


def test_unapproved_site_and_under_18_need_a_second_authoriser(clients, lfw):
    d = create(clients, site="Somewhere Else")
    assert not d.site_approved and d.authorisers_required == 2
    assert enroll(clients, d, "U1", [image(lfw, GOOD[0])]).entry_id
    first = authorise(clients, d, "officer-1")
    assert first.status == pb.DEPLOYMENT_STATUS_DRAFT and len(first.approvals) == 1
    assert "not an approved site" in first.second_authoriser_reasons[0]
    code, msg = code_of(authorise, clients, d, "officer-1")
    assert code == C.FAILED_PRECONDITION and "second authoriser" in msg
    assert authorise(clients, d, "officer-2").status == pb.DEPLOYMENT_STATUS_AUTHORISED
    # an approved site with an entry under 18
    d = create(clients)
    assert enroll(clients, d, "U2", [image(lfw, GOOD[1])], category=pb.CATEGORY_MISSING_VULNERABLE,
                  under_18=True).entry_id
    first = authorise(clients, d, "officer-1")
    assert first.status == pb.DEPLOYMENT_STATUS_DRAFT and "under 18" in " ".join(first.second_authoriser_reasons)
    assert authorise(clients, d, "officer-2").status == pb.DEPLOYMENT_STATUS_AUTHORISED


def test_window_frames_for_an_expired_deployment_and_the_automatic_end(clients, lfw, data):
    frame = (data / "faces/misc/obama.jpg").read_bytes()
    video = data / "video/stage-audience-360p30.mp4"
    # not before the planned start
    later = create(clients, start_s=3600, end_s=7200)
    assert enroll(clients, later, "W1", [image(lfw, GOOD[0])]).entry_id
    authorise(clients, later, "officer")
    code, msg = code_of(transition, clients, "StartDeployment", later)
    assert code == C.FAILED_PRECONDITION and "opens at" in msg
    # a deployment whose window closes soon: frames accepted inside it, refused once it has passed
    d = create(clients, end_s=20)
    assert enroll(clients, d, "W2", [image(lfw, GOOD[1])]).entry_id
    authorise(clients, d, "officer")
    transition(clients, "StartDeployment", d)
    assert push(clients, d, frame).frames_accepted == 1
    end_ns = get(clients, d).planned_end.ToNanoseconds()
    time.sleep(max(0.0, (end_ns - time.time_ns()) / 1e9) + 0.2)
    code, msg = code_of(push, clients, d, frame)
    assert code == C.FAILED_PRECONDITION and ("planned end" in msg or "expired" in msg), msg
    code, msg = code_of(clients.ingest.StartSource, ingest_pb2.StartSourceRequest(
        deployment_id=d.id, camera_id="c1", url=str(video), target_fps=5))
    assert code == C.FAILED_PRECONDITION
    # ended by itself (by the sweeper, or by the first read after the end), then purged at once
    final = wait_for(lambda: (x := get(clients, d)).status == pb.DEPLOYMENT_STATUS_PURGED and x)
    assert final and final.end_reason == "planned end passed"
    assert final.ended_at.ToNanoseconds() >= end_ns
    assert wait_for(lambda: "deployment.ended" in audit_types(clients, d.id))


# Operator CLI -----------------------------------------------------------------------------------------------
def lfr(system, *args, actor="PC Builder") -> subprocess.CompletedProcess:
    env = dict(os.environ, LFR_STATE_DIR=str(system.state_dir))
    return subprocess.run([sys.executable, "-m", "lfr.cli.main", *args, "--as", system.add_dev_user(actor)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_walkthrough(system, lfw, tmp_path):
    folder = tmp_path / "watchlist"
    for rel in GOOD[:2]:
        (folder / rel.split("/")[0]).mkdir(parents=True)
        (folder / rel).write_bytes(image(lfw, rel))
    r = lfr(system, "deployment", "create", "--name", "Walkthrough", "--site", SITE, "--start", "now", "--end", "+2h",
            "--threshold", "0.5", "--camera", "cam-1", "--camera", "cam-2", "--purpose", "find wanted people",
            "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["status"] == "DRAFT" and d["threshold"] == pytest.approx(0.5) and d["cameras"] == ["cam-1", "cam-2"]
    r = lfr(system, "watchlist", "import", "--deployment", d["id"], "--category", "wanted-by-court", "--source",
            "custody", "--legal-basis", "PACE s.64A", "--captured", "2024-05-01T00:00:00Z", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    assert "2/2 subjects" in r.stderr  # the progress bar
    imported = json.loads(r.stdout)
    assert imported["entries_added"] == 2 and all(x["accepted"] for x in imported["results"])
    r = lfr(system, "watchlist", "add", "--deployment", d["id"], "--subject", "X9", "--category", "risk-of-harm",
            "--source", "custody", "--legal-basis", "PACE", str(lfw / GOOD[2]), "--json")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not allowed" in r.stderr
    assert json.loads(r.stdout)[0]["accepted"] is False
    r = lfr(system, "deployment", "authorise", d["id"])
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    r = lfr(system, "deployment", "authorise", d["id"], actor="Insp. Jones")
    assert r.returncode == 0 and "AUTHORISED" in r.stdout
    assert lfr(system, "deployment", "start", d["id"], actor="Sgt Ops").returncode == 0
    r = lfr(system, "deployment", "show", d["id"], "--json")
    shown = json.loads(r.stdout)
    assert {k: shown[k] for k in ("id", "status", "watchlist_size", "site")} == \
        {"id": d["id"], "status": "ACTIVE", "watchlist_size": 2, "site": SITE}
    assert shown["start"] and shown["end"] and shown["threshold"] == pytest.approx(0.5)
    wl = json.loads(lfr(system, "watchlist", "show", "--deployment", d["id"], "--json").stdout)
    assert wl["size"] == 2 and not wl["purged"]
    assert {e["subject"] for e in wl["entries"]} == {"Aaron_Sorkin", "Adam_Scott"}
    for e in wl["entries"]:
        assert e["category"] == "wanted-by-court" and e["added_by"] == "PC Builder"
        assert e["provenance"] == {"source_system": "custody", "legal_basis": "PACE s.64A",
                                   "captured": ["2024-05-01T00:00:00Z"],
                                   "faces": [{"face": 0, "choice": ""}]}  # one face: no choice was made
    listed = json.loads(lfr(system, "deployment", "list", "--json").stdout)
    assert d["id"] in {x["id"] for x in listed}
    assert lfr(system, "deployment", "end", d["id"], actor="Sgt Ops").returncode == 0
    wl = json.loads(lfr(system, "watchlist", "show", "--deployment", d["id"], "--json").stdout)
    assert wl["purged"] is True and sorted(wl["kept_subjects"]) == ["Aaron_Sorkin", "Adam_Scott"]
    r = lfr(system, "deployment", "start", d["id"])
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
    assert lfr(system, "deployment", "show", "nope").returncode == 1


def test_reference_collection_selection(clients, lfw):
    r = clients.watchlist.AddReference(pb.AddReferenceRequest(
        subject_ref="CUST-1", source_system="custody", legal_basis="PACE s.64A", actor="records",
        images=[image(lfw, GOOD[3]), b"junk"], captured_at=[ts_from_ns(time.time_ns() - DAY)]), timeout=30)
    assert r.images_stored == 1 and not r.results[1].accepted
    refs = clients.watchlist.ListReferences(pb.ListReferencesRequest()).subjects
    assert "CUST-1" in {s.subject_ref for s in refs}
    d = create(clients)
    resp = clients.watchlist.AddFromReference(pb.AddFromReferenceRequest(
        deployment_id=d.id, subject_refs=["CUST-1", "CUST-404"], category=pb.CATEGORY_WANTED_BY_COURT,
        actor="builder"), timeout=60)
    assert resp.entries[0].entry_id and not resp.entries[1].entry_id
    assert "not in the reference collection" in resp.entries[1].reason
    e = clients.watchlist.ListEntries(pb.ListEntriesRequest(deployment_id=d.id)).entries[0]
    assert e.from_reference and e.source_system == "custody" and e.legal_basis == "PACE s.64A"
    transition(clients, "CancelDeployment", d)


# Purge: Qdrant and the image store, also after a restart --------------------------------------------------
def qdrant_points(system, deployment_id: str) -> int:
    """Count a deployment's points in Qdrant itself (the watchlist service must be stopped: local mode)."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(system.state_dir / "qdrant"))
    try:
        flt = models.Filter(must=[models.FieldCondition(key="deployment_id",
                                                        match=models.MatchValue(value=deployment_id))])
        return sum(client.count(c.name, count_filter=flt, exact=True).count
                   for c in client.get_collections().collections)
    finally:
        client.close()


def stored_images(system, deployment_id: str) -> int:
    folder = system.state_dir / "watchlist-images" / "watchlists" / deployment_id
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def active_with_entries(clients, lfw, refs) -> pb.Deployment:
    d = create(clients)
    for ref, rel in refs:
        assert enroll(clients, d, ref, [image(lfw, rel)]).entry_id
    authorise(clients, d, "officer")
    return transition(clients, "StartDeployment", d)


def test_purge_leaves_no_vector_in_qdrant_and_no_image_in_storage(system, clients, lfw):
    at_once = active_with_entries(clients, lfw, [("A1", GOOD[0]), ("A2", GOOD[1])])
    delayed = active_with_entries(clients, lfw, [("B1", GOOD[2]), ("B2", GOOD[3])])
    assert stored_images(system, at_once.id) == 2 and stored_images(system, delayed.id) == 2
    # the default: purged as part of the end
    assert transition(clients, "EndDeployment", at_once).status == pb.DEPLOYMENT_STATUS_PURGED
    assert stored_images(system, at_once.id) == 0
    # a purge delay, and the service stopped before the purge is due: the sweeper completes it after the restart
    system.extra_env["LFR_PURGE_AFTER_S"] = "4"
    try:
        system.restart_service("watchlist")
        ended = transition(clients, "EndDeployment", delayed)
        assert ended.status == pb.DEPLOYMENT_STATUS_ENDED and ended.purge_due.seconds
        system.stop_service("watchlist")
        assert qdrant_points(system, delayed.id) == 2 and stored_images(system, delayed.id) == 2
        assert qdrant_points(system, at_once.id) == 0
        time.sleep(4.5)  # the purge falls due while the service is down
        system.start_service("watchlist")
        system.wait_healthy(["watchlist"], 120)
        final = wait_for(lambda: (x := get(clients, delayed)).status == pb.DEPLOYMENT_STATUS_PURGED and x)
        assert final and final.watchlist_size == 2
        system.stop_service("watchlist")
        assert qdrant_points(system, delayed.id) == 0 and qdrant_points(system, at_once.id) == 0
        assert stored_images(system, delayed.id) == 0 and stored_images(system, at_once.id) == 0
    finally:
        system.extra_env.pop("LFR_PURGE_AFTER_S", None)
        system.restart_service("watchlist")
    kept = clients.watchlist.ListEntries(pb.ListEntriesRequest(deployment_id=delayed.id))
    assert kept.purged and [e.subject_ref for e in kept.entries] == ["B1", "B2"]

    def purge_record():
        recs = clients.audit.Query(audit_pb2.QueryRequest(deployment_id=delayed.id,
                                                          type_prefix="watchlist.watchlist_purged")).records
        return [json.loads(r.summary_json) for r in recs]

    records = wait_for(purge_record)
    assert records and sorted(records[0]["kept_subject_refs"]) == ["B1", "B2"]
    assert records[0]["vectors_deleted"] == 2 and records[0]["images_deleted"] == 2


def test_a_model_change_needs_re_embedding_before_authorisation(system, clients, lfw):
    d = create(clients)
    for ref, rel in (("M1", GOOD[0]), ("M2", GOOD[1])):
        assert enroll(clients, d, ref, [image(lfw, rel)]).entry_id
    before = get(clients, d)
    system.extra_env["LFR_MODEL"] = "dlib-resnet-v1"
    try:
        for service in ("embedding", "detection"):
            system.restart_service(service)
        code, msg = code_of(authorise, clients, d, "officer")
        assert code == C.FAILED_PRECONDITION and "re-embed" in msg
        r = clients.watchlist.ReembedWatchlist(pb.TransitionRequest(deployment_id=d.id, actor="builder"),
                                               timeout=120)
        after = r.deployment
        assert (after.model_id, after.status) == ("dlib-resnet-v1", pb.DEPLOYMENT_STATUS_DRAFT)
        assert after.threshold != pytest.approx(before.threshold)  # the new model's default threshold
        assert after.watchlist_digest != before.watchlist_digest and after.watchlist_size == 2
        assert all(e.entry_id for e in r.entries)
        entries = clients.watchlist.ListEntries(pb.ListEntriesRequest(deployment_id=d.id)).entries
        assert [e.vectors for e in entries] == [1, 1]
        assert authorise(clients, d, "officer").status == pb.DEPLOYMENT_STATUS_AUTHORISED
        assert transition(clients, "StartDeployment", d).status == pb.DEPLOYMENT_STATUS_ACTIVE
        assert transition(clients, "EndDeployment", d).status == pb.DEPLOYMENT_STATUS_PURGED
        assert wait_for(lambda: "deployment.reembedded" in audit_types(clients, d.id))
    finally:
        system.extra_env.pop("LFR_MODEL", None)
        for service in ("embedding", "detection"):
            system.restart_service(service)
