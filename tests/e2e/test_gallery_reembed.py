"""A gallery re-embedded after a model change (#17 item 3), end to end on the embedded system: a small gallery of
LFW faces built with SFace; the embedding and detection services restarted with LFR_MODEL=dlib-resnet-v1; the
gallery refuses searches it cannot answer; a cancelled re-embedding leaves it as it was; `lfr gallery reembed`
runs the job (one image per batch here, so its progress is seen step by step) to SUCCEEDED, the gallery swaps to
the new model, its old vectors are deleted, and Identify with the new model returns the same top candidate; then
back to SFace with the identification service restarted mid-job: the job resumes and completes. Also #17 item 2:
`lfr model check`'s false-accept target is read from this running system's GetPolicy."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import grpc
import pytest

from lfr.bench.lfw import list_identities
from lfr.cli.model import policy_far
from lfr.pb import identification_pb2 as pb
from lfr.runtime.embedded import EmbeddedSystem

LFR = [sys.executable, "-m", "lfr.cli.main"]
GALLERY = "reembed-custody"
PEOPLE = 6


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    env = {"LFR_JOB_BATCH": "1", "LFR_MODEL": "sface-2021dec"}
    with EmbeddedSystem(tmp_path_factory.mktemp("state"), env=env) as s:
        yield s


def identify(clients, image: bytes) -> pb.IdentifyResponse:
    return clients.identification.Identify(pb.IdentifyRequest(
        image=image, gallery=GALLERY, k=3, case_reference="CASE-17", justification="model change check",
        actor="investigator", investigation=True), timeout=120)


def test_policy_target_is_read_from_the_running_system(system):
    far, source = policy_far(argparse.Namespace(far=None, state_dir=system.state_dir, actor="auditor"))
    assert far == 1e-5 and "of the running system" in source and "policy default-" in source, source


def test_gallery_reembeds_as_a_job_and_identifies_the_same_person(system, clients, data):
    lfw = data / "lfw-dev"
    ids = list_identities(lfw)
    people = [p for p in sorted(ids) if len(ids[p]) >= 3][:PEOPLE]
    for p in people:
        r = clients.identification.AddGalleryImages(pb.AddGalleryImagesRequest(
            gallery=GALLERY, subject_ref=p, source_system="custody", legal_basis="PACE s.64A",
            images=[(lfw / ids[p][0]).read_bytes()], actor="builder"), timeout=120)
        assert r.images_added == 1, r
    probe = (lfw / ids[people[0]][1]).read_bytes()
    before = identify(clients, probe)
    assert before.model_id == "sface-2021dec" and before.candidates[0].subject_ref == people[0], before
    old_folder = system.state_dir / "identification" / "galleries" / GALLERY / "sface-2021dec"
    assert old_folder.is_dir()
    with pytest.raises(grpc.RpcError) as exc:  # nothing to re-embed yet
        clients.identification.ReembedGallery(pb.ReembedGalleryRequest(gallery=GALLERY, actor="builder"), timeout=60)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already embedded" in exc.value.details()

    system.extra_env["LFR_MODEL"] = "dlib-resnet-v1"
    for service in ("embedding", "detection"):
        system.restart_service(service)
    with pytest.raises(grpc.RpcError) as exc:
        identify(clients, probe)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "re-embed it first" in exc.value.details() and f"lfr gallery reembed {GALLERY}" in exc.value.details()

    # a re-embedding cancelled part way leaves the gallery as it was: its model, its index; the partial one deleted
    j = clients.identification.ReembedGallery(pb.ReembedGalleryRequest(gallery=GALLERY, actor="builder"), timeout=60)
    assert (j.kind, j.model_id, j.progress.frames_total) == ("gallery-reembed", "dlib-resnet-v1", PEOPLE)
    with pytest.raises(grpc.RpcError) as exc:
        clients.identification.ReembedGallery(pb.ReembedGalleryRequest(gallery=GALLERY, actor="builder"), timeout=60)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and j.job_id in exc.value.details()
    j = clients.identification.CancelJob(pb.CancelJobRequest(job_id=j.job_id, actor="investigator"), timeout=60)
    assert j.state == pb.JOB_STATE_CANCELLED, j
    g = clients.identification.GetGallery(pb.GetGalleryRequest(gallery=GALLERY), timeout=30)
    assert g.model_id == "sface-2021dec" and g.reembed_job.job_id == j.job_id and old_folder.is_dir()
    assert not (system.state_dir / "identification" / "galleries" / GALLERY / "@1").exists()
    cancelled = j.job_id

    # the CLI submits and shows progress; meanwhile the job's progress and the gallery's answers are watched
    cli = subprocess.Popen([*LFR, "gallery", "reembed", GALLERY, "--reason", "engine change", "--as", "builder",
                            "--interval", "0.1", "--state-dir", str(system.state_dir)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[int, int, int]] = []  # (state, images done, images)
    refusals: list[str] = []
    deadline = time.monotonic() + 240
    job = None
    while time.monotonic() < deadline:
        jobs = [j for j in clients.identification.ListJobs(pb.ListJobsRequest(), timeout=30).jobs
                if j.kind == "gallery-reembed" and j.gallery == GALLERY and j.job_id != cancelled]
        if jobs:
            job = jobs[-1]
            seen.append((job.state, job.progress.frames_done, job.progress.frames_total))
            if job.state == pb.JOB_STATE_RUNNING and not refusals:
                try:
                    identify(clients, probe)
                except grpc.RpcError as e:
                    refusals.append(f"{e.code().name}: {e.details()}")
            if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
                break
        time.sleep(0.05)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, out + err
    assert job is not None and job.state == pb.JOB_STATE_SUCCEEDED, (job, err)
    assert (job.model_id, job.progress.faces_found, job.progress.frames_total) == ("dlib-resnet-v1", PEOPLE, PEOPLE)
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and any(0 < d < PEOPLE for d in done), seen  # progressed step by step
    # while it ran, the gallery answered with its old model's record, not half an index
    assert refusals and "FAILED_PRECONDITION" in refusals[0] and "under way" in refusals[0], refusals
    # the CLI's progress bar (stderr) and result
    lines = [x for x in err.splitlines() if x.startswith("[")]
    assert lines and f"images {PEOPLE}/{PEOPLE}" in lines[-1] and "100.0% SUCCEEDED" in lines[-1], err
    assert f"{PEOPLE} images re-embedded, 0 not" in out, out

    g = clients.identification.GetGallery(pb.GetGalleryRequest(gallery=GALLERY), timeout=30)
    assert (g.model_id, g.images, g.subjects) == ("dlib-resnet-v1", PEOPLE, PEOPLE)
    assert not old_folder.exists()  # the old model's vectors are deleted after the swap
    assert (system.state_dir / "identification" / "galleries" / GALLERY / "@1" / "dlib-resnet-v1" / "vectors.f32").is_file()
    after = identify(clients, probe)
    assert after.model_id == "dlib-resnet-v1"
    assert after.candidates[0].subject_ref == before.candidates[0].subject_ref == people[0], after
    # and new images are embedded with the new model
    r = clients.identification.AddGalleryImages(pb.AddGalleryImagesRequest(
        gallery=GALLERY, subject_ref=people[1], source_system="custody", legal_basis="PACE s.64A",
        images=[(lfw / ids[people[1]][2]).read_bytes()], actor="builder"), timeout=120)
    assert r.images_added == 1 and r.results[0].image_id == PEOPLE


def test_a_reembedding_interrupted_by_a_restart_resumes_and_completes(system, clients, data):
    """Back to SFace: the identification service is restarted while the job runs; the job resumes at its cursor (the
    vectors written after its last checkpoint are written again) and the gallery answers as before the change."""
    lfw = data / "lfw-dev"
    ids = list_identities(lfw)
    people = [p for p in sorted(ids) if len(ids[p]) >= 3][:PEOPLE]
    g = clients.identification.GetGallery(pb.GetGalleryRequest(gallery=GALLERY), timeout=30)
    assert g.model_id == "dlib-resnet-v1", "runs after the test above"
    system.extra_env["LFR_MODEL"] = "sface-2021dec"
    for service in ("embedding", "detection"):
        system.restart_service(service)
    j = clients.identification.ReembedGallery(pb.ReembedGalleryRequest(gallery=GALLERY, actor="builder"), timeout=60)
    system.restart_service("identification")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = clients.identification.GetJob(pb.GetJobRequest(job_id=j.job_id), timeout=30)
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            break
        time.sleep(0.1)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert job.resumes == 1 and job.progress.faces_found == PEOPLE + 1, job  # the image added after the swap too
    g = clients.identification.GetGallery(pb.GetGalleryRequest(gallery=GALLERY), timeout=30)
    assert (g.model_id, g.images) == ("sface-2021dec", PEOPLE + 1)
    folder = system.state_dir / "identification" / "galleries" / GALLERY
    assert sorted(p.name for p in folder.iterdir()) == ["@2", "images"]  # the dlib vectors are deleted
    r = identify(clients, (lfw / ids[people[0]][1]).read_bytes())
    assert r.model_id == "sface-2021dec" and r.candidates[0].subject_ref == people[0], r
