"""Operator-initiated (OIFR) and retrospective (RFR) identification end to end: the embedded system (real
nats-server, six services, real models) with a gallery of real faces. Identify ranks the right person first,
answers no-face and several-face photos clearly, never stores the probe, and every search is in the audit; the
open-set benchmark through Identify gives the library's TPIR; jobs over the real videos, a video with known
people at known times and an image folder report appearances with times and progress, can be cancelled, resume
after a restart, and leave no temporary data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import grpc
import pytest
from PIL import Image

from lfr.bench import identify as library_identify
from lfr.bench import metrics
from lfr.bench.identify import _select
from lfr.bench.lfw import list_identities
from lfr.bench.oifr import evaluate_oifr, library_flip
from lfr.models.face_choice import central_index
from lfr.pb import audit_pb2
from lfr.pb import identification_pb2 as pb
from lfr.runtime import clock

GALLERY = "custody"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def lfw(data) -> Path:
    return data / "lfw-dev"


def video_frame(path: Path, index: int = 15) -> bytes:
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == index:
                buf = io.BytesIO()
                frame.to_image().save(buf, format="JPEG", quality=92)
                return buf.getvalue()
    raise AssertionError(f"{path} has fewer than {index + 1} frames")


def people_with(lfw: Path, n_images: int, count: int) -> list[str]:
    ids = list_identities(lfw)
    return [p for p in sorted(ids) if len(ids[p]) >= n_images][:count]


@pytest.fixture(scope="module")
def gallery(clients, lfw, data, ground_truth):
    """A gallery of real faces: the first photo of 12 LFW people with 3+ photos, the enrolled people of the
    ground-truth video, and a still of the person in the webcam videos `again` and `help`."""
    subjects = {p: [lfw / list_identities(lfw)[p][0]] for p in people_with(lfw, 3, 12)}
    subjects |= {name: [path] for name, path in ground_truth.enrolled.items()}
    for subject, paths in subjects.items():
        r = add(clients, subject, [p.read_bytes() for p in paths])
        assert r.images_added == len(paths), r
    r = add(clients, "WEBCAM-A", [video_frame(data / "video/webcam-again-480p30.mkv")])
    assert r.images_added == 1
    return sorted(subjects) + ["WEBCAM-A"]


def add(clients, subject: str, images: list[bytes], gallery: str = GALLERY) -> pb.AddGalleryImagesResponse:
    return clients.identification.AddGalleryImages(pb.AddGalleryImagesRequest(
        gallery=gallery, subject_ref=subject, source_system="custody", legal_basis="PACE s.64A", images=images,
        actor="records-officer"), timeout=120)


def identify(clients, image: bytes, **kw) -> pb.IdentifyResponse:
    req = dict(gallery=GALLERY, case_reference="CASE-42", justification="unconscious person, no identification",
               actor="PC 17 Jones")
    req.update(kw)
    if kw.get("deployment_id"):  # the other target of the oneof
        req.pop("gallery")
    return clients.identification.Identify(pb.IdentifyRequest(image=image, **req), timeout=120)


def audit(clients, prefix: str) -> list[dict]:
    recs = clients.audit.Query(audit_pb2.QueryRequest(type_prefix=prefix), timeout=30).records
    return [json.loads(r.summary_json) | {"_actor": r.actor, "_type": r.type} for r in recs]


def wait_for(predicate, timeout_s=60.0, interval=0.3):  # jobs take longer than the default 20 s
    return clock.wait_for(predicate, timeout_s, interval)


def get_job(clients, job_id: str) -> pb.Job:
    return clients.identification.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)


def wait_job(clients, job_id: str, timeout_s=400.0) -> pb.Job:
    done = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    return wait_for(lambda: (j := get_job(clients, job_id)).state in done and j, timeout_s, 0.5)


def results(clients, job_id: str) -> list[pb.JobResult]:
    return list(clients.identification.StreamResults(pb.StreamResultsRequest(job_id=job_id), timeout=60))


def submit(clients, media: list[Path], **kw) -> pb.Job:
    req = dict(gallery=GALLERY, case_reference="OP-ARCADE", justification="disorder on 12 May: identify suspects",
               actor="DC 9 Price")
    req.update(kw)
    if kw.get("deployment_id"):
        req.pop("gallery")
    return clients.identification.SubmitJob(pb.SubmitJobRequest(
        media=[pb.MediaSource(path=str(m)) for m in media], **req), timeout=60)


# Operator-initiated identification ---------------------------------------------------------------------------
def test_identify_ranks_the_right_person_first_and_audits_the_search(system, clients, lfw, gallery):
    g = clients.identification.GetGallery(pb.GetGalleryRequest(gallery=GALLERY), timeout=30)
    assert g.images == len(gallery) and g.model_id == "sface-2021dec"
    for person in people_with(lfw, 3, 12)[:4]:
        probe = (lfw / list_identities(lfw)[person][1]).read_bytes()  # another photo than the one in the gallery
        r = identify(clients, probe, k=5, investigation=True)
        face = 1
        if r.outcome == pb.IDENTIFY_OUTCOME_SEVERAL_FACES:  # the officer picks the face the photo is about
            face = central_index(r.width, r.height, [(f.box.x1, f.box.y1, f.box.x2, f.box.y2) for f in r.faces]) + 1
            r = identify(clients, probe, k=5, investigation=True, face=face)
        assert r.outcome == pb.IDENTIFY_OUTCOME_SEARCHED and r.face == face
        assert len(r.candidates) == 5 and [c.rank for c in r.candidates] == [1, 2, 3, 4, 5]
        top = r.candidates[0]
        assert top.subject_ref == person and top.above_threshold and top.image_id >= 0
        assert top.source_system == "custody" and top.legal_basis == "PACE s.64A"
        assert all(a.score >= b.score for a, b in zip(r.candidates, r.candidates[1:]))
        assert not any(c.above_threshold for c in r.candidates[1:])  # the others are nobody alike
        # without investigation mode, only candidates at or above the threshold
        strict = identify(clients, probe, k=5, face=face)
        assert [c.subject_ref for c in strict.candidates] == [person]
    # every search is audited: who, when, why, the case, how many candidates; no image, no vector
    records = wait_for(lambda: [x for x in audit(clients, "watchlist.identification_search")
                                if x.get("search_id") == strict.search_id])
    assert records, "no audit record of the search"
    rec = records[0]
    assert rec["_actor"] == "PC 17 Jones" and rec["case_reference"] == "CASE-42"
    assert rec["justification"] == "unconscious person, no identification"
    assert rec["candidates_returned"] == 1 and rec["gallery"] == GALLERY and rec["search_id"] == strict.search_id
    everything = json.dumps(audit(clients, "watchlist.identification_search"))
    assert "image" not in everything and "values" not in everything
    # the probe is never stored: no file of the system holds its bytes
    marker = probe[200:1200]
    for path in Path(system.state_dir).rglob("*"):
        if path.is_file() and path.stat().st_size < 200 << 20 and "logs" not in path.parts:
            assert marker not in path.read_bytes(), f"probe bytes found in {path}"
    assert clients.identification.GetGallery(pb.GetGalleryRequest(gallery=GALLERY), timeout=30).images == len(gallery)


def test_several_faces_no_face_and_bad_requests(clients, data, gallery):
    group = (data / "faces/misc/two_people.jpg").read_bytes()
    r = identify(clients, group)
    assert r.outcome == pb.IDENTIFY_OUTCOME_SEVERAL_FACES and not r.candidates
    assert len(r.faces) == 2 and all(f.crop_jpeg and f.box.x2 > f.box.x1 for f in r.faces)
    assert "choose one" in r.message
    picked = identify(clients, group, face=2, investigation=True, k=3)
    assert picked.outcome == pb.IDENTIFY_OUTCOME_SEARCHED and picked.face == 2 and len(picked.candidates) == 3
    blank = io.BytesIO()
    Image.new("RGB", (320, 240), (120, 130, 140)).save(blank, format="JPEG")
    r = identify(clients, blank.getvalue())
    assert r.outcome == pb.IDENTIFY_OUTCOME_NO_FACE and not r.faces and not r.candidates
    assert "no face" in r.message
    for kw, code, needle in (({"case_reference": ""}, C.INVALID_ARGUMENT, "case_reference"),
                             ({"justification": ""}, C.INVALID_ARGUMENT, "justification"),
                             ({"gallery": "nope"}, C.NOT_FOUND, "no gallery"),
                             ({"face": 3}, C.INVALID_ARGUMENT, "does not exist")):
        with pytest.raises(grpc.RpcError) as info:
            identify(clients, group, **kw)
        assert info.value.code() == code and needle in info.value.details()
    outcomes = wait_for(lambda: {x["reason"] for x in audit(clients, "watchlist.identification_search")}
                        >= {"several_faces", "no_face", "searched"})
    assert outcomes


def test_identify_benchmark_through_the_grpc_path_gives_the_library_tpir(clients, lfw):
    from lfr.bench.pipeline import OursPipeline

    identities = _select(list_identities(lfw), 60)
    fpirs = metrics.fpir_points(sum(1 for v in identities.values() if len(v) == 1))
    pipe = OursPipeline("sface", flip=library_flip(None), quiet=True)  # embed as the embedding service does
    library = library_identify.evaluate(pipe, lfw, identities, fpirs, False)
    oifr = evaluate_oifr(clients.identification, lfw, identities, fpirs, "bench-oifr", pipe.scorer.threshold)
    assert library["no_face"] == 0 and oifr["no_face"] == 0  # both chose the same faces
    assert oifr["mated_probes"] == library["mated_probes"] >= 20 and oifr["nonmated_probes"] >= 20
    assert oifr["rank1"] == library["rank1"]
    assert oifr["tpir_at_fpir"] == library["tpir_at_fpir"]
    assert oifr["at_threshold"] == pytest.approx(library["at_threshold"])


# Retrospective identification ----------------------------------------------------------------------------------
def test_job_over_real_videos_a_known_video_and_an_image_folder(system, clients, data, lfw, gallery, ground_truth,
                                                               tmp_path):
    person = people_with(lfw, 3, 12)[0]
    folder = tmp_path / "stills"
    folder.mkdir()
    for rel in list_identities(lfw)[person][1:3]:  # two other photos of a gallery subject
        (folder / Path(rel).name).write_bytes((lfw / rel).read_bytes())
    Image.new("RGB", (200, 200), (90, 90, 90)).save(folder / "empty-scene.jpg")
    videos = [data / "video/webcam-help-480p30.mkv", data / "video/webcam-book-480p30.mkv",
              data / "video/pedestrians-1080p25.mp4", ground_truth.video]
    job = submit(clients, [*videos, folder])  # at the default rate (LFR_JOB_FPS)
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and job.job_id
    seen_running = wait_for(lambda: (j := get_job(clients, job.job_id)).progress.frames_done > 0 and j, 120)
    assert seen_running and seen_running.progress.items_total == 7 and seen_running.progress.frames_total > 30
    t0 = time.monotonic()
    final = wait_job(clients, job.job_id)
    wall = time.monotonic() - t0
    p = final.progress
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert p.items_done == p.items_total == 7 and p.frames_done >= 0.9 * p.frames_total and p.faces_found > 10
    out = results(clients, final.job_id)
    assert [r.seq for r in out] == list(range(1, len(out) + 1)) and p.results == len(out)
    by_item: dict[str, list] = {}
    for r in out:
        by_item.setdefault(Path(r.item).name, []).append(r)
    # the person of the webcam videos `again` (in the gallery) is found in `help`, as one appearance
    webcam = by_item["webcam-help-480p30.mkv"]
    assert [r.candidates[0].subject_ref for r in webcam] == ["WEBCAM-A"]
    assert webcam[0].video and webcam[0].end_s - webcam[0].start_s >= 1.0 and webcam[0].sightings >= 3
    assert webcam[0].start_s <= webcam[0].best_time_s <= webcam[0].end_s
    assert "webcam-book-480p30.mkv" not in by_item  # another person: nobody of the gallery
    # the ground-truth video: each enrolled person at the time they are shown, once
    known = by_item[ground_truth.video.name]
    assert sorted(r.candidates[0].subject_ref for r in known) == sorted(ground_truth.enrolled)
    for r in known:
        seg = next(s for s in ground_truth.segments if s.subject == r.candidates[0].subject_ref)
        assert seg.start_s - 0.3 <= r.start_s <= r.end_s <= seg.end_s + 0.3, (r, seg)
    # the image folder: the two photos of the gallery subject, nothing for the empty scene
    stills = [r for r in out if Path(r.item).parent == folder]
    assert sorted(Path(r.item).name for r in stills) == sorted(Path(x).name for x in list_identities(lfw)[person][1:3])
    assert all(r.candidates[0].subject_ref == person and not r.video for r in stills)
    # faster than real time: media seconds examined per second of work, measured by the job itself
    assert p.media_seconds_done > 15 and p.realtime_factor > 1.0, (p.realtime_factor, wall)
    assert not (Path(system.state_dir) / "identification" / "jobs" / final.job_id).exists()  # temporary data gone
    records = wait_for(lambda: audit(clients, "watchlist.identification_job_finished"))
    assert records and records[-1]["job_id"] == final.job_id and records[-1]["case_reference"] == "OP-ARCADE"
    assert records[-1]["results"] == len(out)


def test_identify_and_a_job_against_a_deployments_watchlist_go_through_the_watchlist_service(clients, lfw,
                                                                                              data):
    """A deployment's watchlist as the target: identification asks the watchlist service (GetDeployment, then
    Search) over gRPC; the candidate is the entry, the threshold the deployment's, the search audited under the
    deployment; an unknown deployment is the watchlist's NOT_FOUND."""
    from lfr.cli.live import create_deployment, enroll

    person = people_with(lfw, 3, 40)[30]
    photos = list_identities(lfw)[person]
    d = create_deployment(clients, "identify-target", ["c1"])
    entry = enroll(clients, d.id, {person: [lfw / photos[0]]}, authorise_as="")[person]
    assert entry.entry_id, entry
    r = identify(clients, (lfw / photos[1]).read_bytes(), deployment_id=d.id, k=3, investigation=True)
    assert r.outcome == pb.IDENTIFY_OUTCOME_SEARCHED and r.gallery_size == 1 and r.threshold == d.threshold, r
    assert r.candidates[0].entry_id == entry.entry_id and r.candidates[0].subject_ref == person
    records = wait_for(lambda: [x for x in audit(clients, "watchlist.identification_search")
                                if x.get("search_id") == r.search_id])
    assert records[0]["envelope"]["deployment_id"] == d.id
    job = submit(clients, [lfw / photos[2]], deployment_id=d.id, investigation=True)
    final = wait_job(clients, job.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert [c.entry_id for c in results(clients, job.job_id)[0].candidates][:1] == [entry.entry_id]
    with pytest.raises(grpc.RpcError) as info:
        identify(clients, (lfw / photos[1]).read_bytes(), deployment_id="no-such-deployment")
    assert info.value.code() == C.NOT_FOUND and "no-such-deployment" in info.value.details()


def test_cancel_a_job_deletes_its_temporary_data(system, clients, data, gallery):
    job = submit(clients, [data / "video/stage-audience-360p30.mp4", data / "video/pedestrians-1080p25.mp4"],
                 fps=10, investigation=True)
    work = Path(system.state_dir) / "identification" / "jobs" / job.job_id
    assert wait_for(lambda: get_job(clients, job.job_id).progress.frames_done >= 8, 120)
    assert wait_for(lambda: work.exists(), 60)  # open appearances checkpointed while it runs
    cancelled = clients.identification.CancelJob(pb.CancelJobRequest(job_id=job.job_id, actor="DS 4 Khan",
                                                                reason="wrong footage"), timeout=60)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.cancelled_by == "DS 4 Khan"
    assert cancelled.progress.frames_done < cancelled.progress.frames_total
    assert not work.exists()
    with pytest.raises(grpc.RpcError) as info:
        clients.identification.CancelJob(pb.CancelJobRequest(job_id=job.job_id, actor="DS 4 Khan"), timeout=30)
    assert info.value.code() == C.FAILED_PRECONDITION
    records = wait_for(lambda: audit(clients, "watchlist.identification_job_cancelled"))
    assert records[-1]["job_id"] == job.job_id and records[-1]["_actor"] == "DS 4 Khan"


def test_a_job_resumes_after_a_restart_and_cleans_up(system, clients, data, gallery):
    job = submit(clients, [data / "video/stage-audience-360p30.mp4", data / "video/webcam-help-480p30.mkv"],
                 fps=8)
    before = wait_for(lambda: (j := get_job(clients, job.job_id)).progress.frames_done >= 16 and j, 180)
    assert before and before.state == pb.JOB_STATE_RUNNING
    system.restart_service("identification")
    after = get_job(clients, job.job_id)
    assert after.resumes == 1 and after.progress.frames_done >= before.progress.frames_done  # not from zero
    final = wait_job(clients, job.job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.resumes == 1, final.error
    assert final.progress.items_done == 2
    assert final.progress.frames_done <= final.progress.frames_total + 8  # no frame examined twice over
    webcam = [r for r in results(clients, job.job_id) if r.item.endswith("webcam-help-480p30.mkv")]
    assert [r.candidates[0].subject_ref for r in webcam] == ["WEBCAM-A"]
    assert not (Path(system.state_dir) / "identification" / "jobs" / job.job_id).exists()


def test_cli_identify_gallery_import_and_jobs(system, clients, lfw, data, tmp_path, gallery):
    people = people_with(lfw, 2, 20)[12:15]
    folder = tmp_path / "import"
    for p in people:
        (folder / p).mkdir(parents=True)
        rel = list_identities(lfw)[p][0]
        (folder / p / Path(rel).name).write_bytes((lfw / rel).read_bytes())
    env = dict(os.environ, LFR_STATE_DIR=str(system.state_dir))

    def lfr(*args, actor="DC 9 Price"):
        return subprocess.run([sys.executable, "-m", "lfr.cli.main", *args, "--as", system.add_dev_user(actor)], env=env,
                              capture_output=True, text=True, timeout=300)

    r = lfr("gallery", "import", "--gallery", "cli", "--source", "custody", "--legal-basis", "PACE", str(folder),
            "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images_added"] == 3 and "3/3 subjects" in r.stderr  # the progress bar
    r = lfr("gallery", "import", "--gallery", "cli", "--source", "custody", "--legal-basis", "PACE", str(folder),
            "--json")  # run again: resumes, nothing added twice
    again = json.loads(r.stdout)
    assert (again["images_added"], again["images_skipped"], again["gallery_images"]) == (0, 3, 3)
    probe = lfw / list_identities(lfw)[people[0]][1]
    r = lfr("identify", str(probe), "--gallery", "cli", "-k", "2", "--case", "CASE-7", "--why", "refused name",
            "--investigation", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["outcome"] == "searched" and out["candidates"][0]["subject"] == people[0]
    r = lfr("identify", str(probe), "--gallery", "cli", "--case", "CASE-7")
    assert r.returncode == 2  # --why is required
    r = lfr("job", "submit", str(data / "video/webcam-help-480p30.mkv"), "--gallery", GALLERY, "--case", "OP-1",
            "--why", "sighting check", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "SUCCEEDED" and "100.0%" in r.stderr  # the progress bar
    r = lfr("job", "status", job["job_id"])
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout and "[####" in r.stderr
    r = lfr("job", "results", job["job_id"])
    assert r.returncode == 0 and r.stdout.startswith("candidate WEBCAM-A at 00:"), r.stdout
    r = lfr("job", "cancel", job["job_id"])
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
