"""Investigators' commands: `lfr identify`, `lfr gallery ...`, `lfr job ...` (operator-initiated and retrospective
identification). Like the operator commands (lfr/cli/ops.py) they talk gRPC, to the identification service of a
running system (--state-dir / --target), act --as a person, print --json, and exit 1 with a one-line reason on a
refusal.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import grpc

from lfr.cli import ops
from lfr.cli.client import subject_images
from lfr.cli.ops import Failure, Progress, _common, captured, emit, image_paths, iso, parse_time
from lfr.pb import identification_pb2 as pb
from lfr.pb import identification_pb2_grpc
from lfr.runtime.events import ts_from_ns

STATES = {v: k.removeprefix("JOB_STATE_") for k, v in pb.JobState.items()}


def identification_stub(args) -> identification_pb2_grpc.IdentificationServiceStub:
    return ops.service_stub(args, "identification", identification_pb2_grpc.IdentificationServiceStub)


def run(args) -> None:
    ops.run(args, identification_stub)


def clock(seconds: float) -> str:
    s = max(0, int(seconds + 1e-6))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def candidate_json(c: pb.IdentifyCandidate) -> dict:
    out = {"rank": c.rank, "subject": c.subject_ref, "score": round(c.score, 4),
           "above_threshold": c.above_threshold}
    if c.entry_id:
        out["entry_id"] = c.entry_id
    else:
        out |= {"reference_id": c.image_id, "source_system": c.source_system, "legal_basis": c.legal_basis,
                "captured": iso(c.captured_at)}
    return out


def _target(args, msg) -> None:
    if bool(args.gallery) == bool(args.deployment):
        raise Failure("give one target: --gallery NAME or --deployment ID (its watchlist)")
    if args.gallery:
        msg.gallery = args.gallery
    else:
        msg.deployment_id = args.deployment


# lfr identify ---------------------------------------------------------------------------------------------------
def identify(args, stub) -> None:
    path = image_paths([args.image])[0]
    req = pb.IdentifyRequest(image=path.read_bytes(), k=args.k, case_reference=args.case, justification=args.why,
                             actor=args.actor, investigation=args.investigation, threshold=args.threshold,
                             face=args.face)
    _target(args, req)
    r = stub.Identify(req, timeout=120)
    outcome = pb.IdentifyOutcome.Name(r.outcome).removeprefix("IDENTIFY_OUTCOME_").lower()
    data = {"outcome": outcome, "message": r.message, "search_id": r.search_id, "face": r.face,
            "faces": [{"face": f.face, "box": [round(f.box.x1), round(f.box.y1), round(f.box.x2), round(f.box.y2)],
                       "inter_eye_px": round(f.quality.inter_eye_px, 1)} for f in r.faces],
            "threshold": round(r.threshold, 4), "model": {"id": r.model_id, "version": r.model_version},
            "searched": r.gallery_size, "candidates": [candidate_json(c) for c in r.candidates]}
    if args.crops and r.faces:
        folder = Path(args.crops)
        folder.mkdir(parents=True, exist_ok=True)
        for f in r.faces:
            (folder / f"face-{f.face}.jpg").write_bytes(f.crop_jpeg)
        data["crops"] = str(folder)
    lines = [r.message]
    if r.outcome == pb.IDENTIFY_OUTCOME_SEVERAL_FACES:
        lines += [f"  face {f['face']}: box {f['box']}, inter-eye {f['inter_eye_px']} px" for f in data["faces"]]
        lines.append("  search again with --face N" + ("" if args.crops else " (--crops DIR saves each face)"))
    for c in r.candidates:
        mark = "above" if c.above_threshold else "below"
        ref = f"entry {c.entry_id}" if c.entry_id else f"reference {c.image_id}"
        lines.append(f"  {c.rank:>3}. {c.subject_ref:<28} {c.score:.3f} ({mark} threshold)  {ref}")
    lines.append(f"search {r.search_id} recorded in the audit (case {args.case})")
    emit(args, data, "\n".join(lines))


# lfr gallery ----------------------------------------------------------------------------------------------------
def _add(args, stub, subject: str, paths: list[Path]) -> pb.AddGalleryImagesResponse:
    dates = captured(args, paths)
    return stub.AddGalleryImages(pb.AddGalleryImagesRequest(
        gallery=args.gallery, subject_ref=subject, source_system=args.source, legal_basis=args.legal_basis,
        images=[p.read_bytes() for p in paths], captured_at=[ts_from_ns(ns) for ns, _ in dates], actor=args.actor),
        timeout=600)


def gallery_add(args, stub) -> None:
    paths = image_paths(args.images)
    r = _add(args, stub, args.subject, paths)
    data = {"gallery": r.gallery, "subject": r.subject_ref, "images_added": r.images_added,
            "results": [{"image": str(paths[x.index]), "accepted": x.accepted, "reason": x.reason,
                         "reference_id": x.image_id if x.accepted else None, "faces_found": x.faces_found,
                         "duplicate": x.duplicate} for x in r.results]}
    emit(args, data, f"{r.images_added} of {len(paths)} images of {args.subject} added to gallery {r.gallery}"
         + "".join(f"\n  {x['image']}: {x['reason']}" for x in data["results"] if not x["accepted"]))


def gallery_import(args, stub) -> None:
    """One subject per call; images the gallery already holds (by digest) are skipped: an interrupted import
    run again continues where it stopped."""
    try:
        subjects = subject_images(args.dir)
    except FileNotFoundError as exc:
        raise Failure(str(exc)) from None
    if not subjects:
        raise Failure(f"no <subject>/<image> files in {args.dir}")
    present: set[str] = set()
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for ps in subjects.values() for p in ps}
    try:
        all_digests = list(digests.values())
        for start in range(0, len(all_digests), 1000):
            present |= set(stub.FindGalleryImages(pb.FindGalleryImagesRequest(
                gallery=args.gallery, sha256=all_digests[start: start + 1000]), timeout=60).present)
    except grpc.RpcError as exc:  # a new gallery: nothing present yet
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    progress = Progress(len(subjects), "subjects")
    added = skipped = refused = 0
    reasons = []
    for subject, paths in subjects.items():
        todo = [p for p in paths if digests[p] not in present]
        skipped += len(paths) - len(todo)
        if not todo:
            progress.step(f"{subject}: already in the gallery")
            continue
        r = _add(args, stub, subject, todo)
        added += r.images_added
        skipped += sum(x.duplicate for x in r.results)
        bad = [x for x in r.results if not x.accepted and not x.duplicate]
        refused += len(bad)
        reasons += [f"{todo[x.index]}: {x.reason}" for x in bad]
        progress.step(f"{subject}: {r.images_added}/{len(todo)} added")
    g = stub.GetGallery(pb.GetGalleryRequest(gallery=args.gallery), timeout=30)
    emit(args, {"gallery": args.gallery, "subjects": len(subjects), "images_added": added,
                "images_skipped": skipped, "images_refused": refused, "refused": reasons, "gallery_images": g.images},
         f"gallery {args.gallery}: {added} images added, {skipped} already there, {refused} refused; "
         f"{g.images} images of {g.subjects} subjects in all" + "".join(f"\n  refused {x}" for x in reasons[:20]))


def gallery_json(g: pb.Gallery) -> dict:
    return {"name": g.name, "images": g.images, "subjects": g.subjects, "model": {"id": g.model_id,
            "version": g.model_version}, "default_threshold": round(g.default_threshold, 4), "index": g.index,
            "created_by": g.created_by, "created_at": iso(g.created_at),
            **({"reembed": {"job_id": g.reembed_job.job_id, "state": STATES[g.reembed_job.state],
                            "model": g.reembed_job.model_id, "progress": bar(g.reembed_job)}}
               if g.HasField("reembed_job") else {})}


def gallery_list(args, stub) -> None:
    gs = stub.ListGalleries(pb.ListGalleriesRequest(), timeout=30).galleries
    emit(args, [gallery_json(g) for g in gs],
         "\n".join(f"{g.name:<24} {g.images:>9} images {g.subjects:>9} subjects  {g.model_id}" for g in gs)
         or "no galleries")


def gallery_reembed(args, stub) -> None:
    j = stub.ReembedGallery(pb.ReembedGalleryRequest(gallery=args.name, actor=args.actor, reason=args.reason),
                            timeout=60)
    if not args.no_wait:  # followed through GetGallery (GetJob is the investigators' and auditors')
        j = _watch(args, stub, j.job_id, lambda: stub.GetGallery(pb.GetGalleryRequest(gallery=args.name),
                                                                 timeout=30).reembed_job)
    text = f"job {j.job_id} {STATES[j.state]}: gallery {j.gallery} re-embedding with {j.model_id} {j.model_version}"
    if j.state == pb.JOB_STATE_SUCCEEDED:
        text += (f": {j.progress.faces_found} images re-embedded, {j.progress.results} not (no face with the new "
                 "model); the gallery now searches with it")
    elif j.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
        text += f" (follow it: lfr gallery show {j.gallery})"
    emit(args, job_json(j) | {"kind": j.kind, "model": {"id": j.model_id, "version": j.model_version}},
         text + (f"; {j.error}" if j.error else ""))
    if j.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        sys.exit(1)


def gallery_show(args, stub) -> None:
    g = stub.GetGallery(pb.GetGalleryRequest(gallery=args.name), timeout=30)
    j = gallery_json(g)
    emit(args, j, "\n".join(f"{k:<18} {v}" for k, v in j.items()))


# lfr job --------------------------------------------------------------------------------------------------------
def job_json(j: pb.Job) -> dict:
    p = j.progress
    return {"job_id": j.job_id, "kind": j.kind or "search", "state": STATES[j.state],
            "case_reference": j.case_reference,
            "justification": j.justification, "actor": j.actor,
            "target": {"gallery": j.gallery} if j.gallery else {"deployment": j.deployment_id},
            "media": [m.url or m.path for m in j.media], "k": j.k, "threshold": round(j.threshold, 4),
            "investigation": j.investigation, "fps": j.fps,
            "progress": {"items_done": p.items_done, "items_total": p.items_total, "frames_done": p.frames_done,
                         "frames_total": p.frames_total, "faces_found": p.faces_found,
                         "appearances": p.appearances, "results": p.results, "eta_s": round(p.eta_s, 1),
                         "realtime_factor": round(p.realtime_factor, 2), "current_item": p.current_item},
            "submitted_at": iso(j.submitted_at), "started_at": iso(j.started_at), "finished_at": iso(j.finished_at),
            "resumes": j.resumes, "error": j.error, "cancelled_by": j.cancelled_by}


def bar(j: pb.Job, width: int = 30) -> str:
    p = j.progress
    frac = p.frames_done / p.frames_total if p.frames_total else (1.0 if j.state == pb.JOB_STATE_SUCCEEDED else 0.0)
    frac = min(1.0, frac)
    filled = int(width * frac)
    eta = f", ETA {clock(p.eta_s)}" if p.eta_s else ""
    if j.kind == "gallery-reembed":
        return (f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% {STATES[j.state]}: gallery {j.gallery} "
                f"to {j.model_id}: images {p.frames_done}/{p.frames_total}, re-embedded {p.faces_found}, "
                f"not embedded {p.results}{eta}")
    speed = f", {p.realtime_factor:.1f}x real time" if p.realtime_factor else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% {STATES[j.state]}: items "
            f"{p.items_done}/{p.items_total}, frames {p.frames_done}/{p.frames_total}, faces {p.faces_found}, "
            f"candidates {p.results}{eta}{speed}")


def job_submit(args, stub) -> None:
    media = []
    for m in args.media:
        if "://" in m:
            media.append(pb.MediaSource(url=m))
        else:
            p = Path(m).resolve()
            if not p.exists():
                raise Failure(f"no such file or folder: {m}")
            media.append(pb.MediaSource(path=str(p)))
    req = pb.SubmitJobRequest(media=media, case_reference=args.case, justification=args.why, actor=args.actor,
                              k=args.k, threshold=args.threshold, investigation=args.investigation, fps=args.fps)
    _target(args, req)
    j = stub.SubmitJob(req, timeout=60)
    if args.wait:
        j = _watch(args, stub, j.job_id)
    emit(args, job_json(j), f"job {j.job_id} {STATES[j.state]} (case {j.case_reference})")


def _watch(args, stub, job_id: str, get=None) -> pb.Job:
    tty = sys.stderr.isatty()
    while True:
        j = get() if get else stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
        line = bar(j)
        sys.stderr.write(("\r" + line[:150].ljust(150)) if tty else line + "\n")
        sys.stderr.flush()
        if j.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            if tty:
                sys.stderr.write("\n")
            return j
        time.sleep(args.interval)


def job_status(args, stub) -> None:
    if args.watch:
        j = _watch(args, stub, args.id)
    else:
        j = stub.GetJob(pb.GetJobRequest(job_id=args.id), timeout=30)
        print(bar(j), file=sys.stderr)
    emit(args, job_json(j), f"job {j.job_id} {STATES[j.state]}: case {j.case_reference}, "
         f"{j.progress.results} appearance(s) with candidates" + (f"; {j.error}" if j.error else ""))


def result_json(r: pb.JobResult) -> dict:
    return {"seq": r.seq, "item": r.item, "video": r.video, "start_s": round(r.start_s, 2),
            "end_s": round(r.end_s, 2), "best_time_s": round(r.best_time_s, 2), "best_frame": r.best_frame_index,
            "best_box": [round(r.best_box.x1), round(r.best_box.y1), round(r.best_box.x2), round(r.best_box.y2)],
            "sightings": r.sightings, "candidates": [candidate_json(c) for c in r.candidates]}


def result_line(r: pb.JobResult) -> str:
    top = r.candidates[0]
    where = (f"at {clock(r.start_s)}-{clock(r.end_s)} (best frame {clock(r.best_time_s)} #{r.best_frame_index}, "
             f"score {top.score:.3f})" if r.video else f"(score {top.score:.3f})")
    others = ", ".join(f"{c.subject_ref} {c.score:.3f}" for c in r.candidates[1:])
    return (f"candidate {top.subject_ref} {where} in {r.item}" + (f"; also {others}" if others else ""))


def job_results(args, stub) -> None:
    stream = stub.StreamResults(pb.StreamResultsRequest(job_id=args.id, follow=args.follow), timeout=None)
    out = []
    for r in stream:
        if args.json:
            out.append(result_json(r))
        else:
            print(result_line(r), flush=True)
    if args.json:
        emit(args, out, "")


def job_cancel(args, stub) -> None:
    j = stub.CancelJob(pb.CancelJobRequest(job_id=args.id, actor=args.actor, reason=args.reason), timeout=60)
    emit(args, job_json(j), f"job {j.job_id} {STATES[j.state]}; its temporary data is deleted")


def job_list(args, stub) -> None:
    js = stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs
    emit(args, [job_json(j) for j in js], "\n".join(
        f"{j.job_id}  {STATES[j.state]:<9} case {j.case_reference:<16} {j.progress.results:>4} results  "
        f"{iso(j.submitted_at)}" for j in js) or "no jobs")


# Parser ---------------------------------------------------------------------------------------------------------
def _targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", default="", help="gallery to search")
    p.add_argument("--deployment", default="", help="or: a deployment whose watchlist to search")
    p.add_argument("--case", required=True, help="case reference (recorded in the audit)")
    p.add_argument("--why", required=True, help="justification (recorded in the audit)")
    p.add_argument("--threshold", type=float, default=0.0, help="default: the model's (a gallery) or the deployment's")
    p.add_argument("--investigation", action="store_true",
                   help="the top k whatever the score, each marked above or below the threshold")


def add_parsers(sub) -> None:
    common = _common()

    p = sub.add_parser("identify", parents=[common], help="operator-initiated identification: a photo -> candidates")
    p.add_argument("image", metavar="IMAGE")
    _targets(p)
    p.add_argument("-k", type=int, default=10, help="candidates at most (default 10)")
    p.add_argument("--face", type=int, default=0, help="which face when the photo holds several (1-based)")
    p.add_argument("--crops", default="", help="folder to save the crop of each face found")
    p.set_defaults(func=run, run=identify)

    g = sub.add_parser("gallery", help="galleries for identification: import, add, list, show, reembed")
    gsub = g.add_subparsers(dest="action", required=True)
    for name, fn, helptext in (("import", gallery_import, "import a folder of <subject>/<image> files (resumable)"),
                               ("add", gallery_add, "add images of one subject")):
        p = gsub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--gallery", required=True)
        p.add_argument("--source", required=True, help="source system of the images (e.g. the custody system)")
        p.add_argument("--legal-basis", required=True, help="legal basis for holding and using the images")
        p.add_argument("--captured", type=parse_time, default=None,
                       help="capture date (default: each file's EXIF date, else its modification time)")
        if name == "import":
            p.add_argument("dir", metavar="DIR")
        else:
            p.add_argument("--subject", required=True)
            p.add_argument("images", nargs="+", metavar="IMAGE")
        p.set_defaults(run=fn)
    p = gsub.add_parser("list", parents=[common], help="the galleries")
    p.set_defaults(run=gallery_list)
    p = gsub.add_parser("show", parents=[common], help="one gallery")
    p.add_argument("name")
    p.set_defaults(run=gallery_show)
    p = gsub.add_parser("reembed", parents=[common], help="re-embed a gallery's stored images with the embedding "
                        "service's model, as a job (progress on stderr); the gallery swaps when it completes")
    p.add_argument("name")
    p.add_argument("--reason", default="", help="why (recorded in the audit), e.g. the engine change")
    p.add_argument("--no-wait", action="store_true", help="submit and return (follow with lfr job status ID)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(run=gallery_reembed)

    j = sub.add_parser("job", help="retrospective identification jobs: submit, status, results, cancel, list")
    jsub = j.add_subparsers(dest="action", required=True)
    p = jsub.add_parser("submit", parents=[common], help="search videos, image folders or URLs")
    p.add_argument("media", nargs="+", metavar="MEDIA", help="video file, image file, folder, or URL")
    _targets(p)
    p.add_argument("-k", type=int, default=5, help="candidates per appearance (default 5)")
    p.add_argument("--fps", type=float, default=0.0, help="video frames examined per second (default LFR_JOB_FPS)")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(run=job_submit)
    p = jsub.add_parser("status", parents=[common], help="state and progress (a progress bar on stderr)")
    p.add_argument("id")
    p.add_argument("--watch", action="store_true", help="follow until the job ends")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(run=job_status)
    p = jsub.add_parser("results", parents=[common], help="appearances with candidates")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true", help="wait for new results until the job ends")
    p.set_defaults(run=job_results)
    p = jsub.add_parser("cancel", parents=[common], help="stop a job (its temporary data is deleted)")
    p.add_argument("id")
    p.add_argument("--reason", default="")
    p.set_defaults(run=job_cancel)
    p = jsub.add_parser("list", parents=[common], help="all jobs")
    p.set_defaults(run=job_list)
    for parser in (g, j):
        parser.set_defaults(func=run)
