"""``lfr bench identify-oifr``: ``lfr bench identify``'s open-set protocol run through the platform's
operator-initiated identification path (gRPC): the gallery images go in with ``AddGalleryImages``, every probe
is searched with ``Identify`` (investigation mode, k = 2), and the library path runs on the same identities in
the same process, so the two TPIRs can be compared.

Faces are chosen as the library chooses them (:func:`lfr.models.engines.central_face`): an image with several
faces is searched again with the central one. What the library does that the platform must not: when no face is
found, the library embeds a stand-in box in the middle of the image; the platform answers "no face". Such images
are counted (``no_face``): a gallery image without a face is not in the gallery, a probe without a face is a
search with no candidate. Where neither path met such an image, the TPIRs must be equal.

Needs a running system (``--state-dir`` of ``lfr up``, or ``--target`` for the identification service) running the same
model as ``--model``, or ``--embedded`` to start one in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lfr.bench import metrics
from lfr.bench.identify import _select
from lfr.bench.lfw import list_identities
from lfr.bench.pipeline import data_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="LFW-layout folder (default: the shared lfw-dev)")
    parser.add_argument("--model", default="sface", help="the model the running system uses (for the library path)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N identities")
    parser.add_argument("--gallery", default="", help="gallery name (default: a new one per run)")
    parser.add_argument("--state-dir", default="", help="state folder of a running system (lfr up)")
    parser.add_argument("--target", default="", help="identification service HOST:PORT")
    parser.add_argument("--embedded", action="store_true", help="start an embedded system for the run")
    parser.add_argument("--flip", choices=("on", "off", "model"), default=None,
                        help="flip averaging of the library path: set it as the embedding service's LFR_FLIP "
                             "(default: this environment's LFR_FLIP, else the platform default)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the library path")
    parser.add_argument("--json", action="store_true")


def library_flip(flip: str | None) -> str:
    """The library pipeline's flip argument that embeds as an embedding service with LFR_FLIP = flip does."""
    from lfr.runtime.config import Config

    flip = flip or Config.from_env().flip
    return {"on": "on", "off": "off", "model": "default"}[flip]


def _central(resp) -> int:
    from lfr.models.face_choice import central_index

    return central_index(resp.width, resp.height, [(f.box.x1, f.box.y1, f.box.x2, f.box.y2) for f in resp.faces])


def search(stub, image: bytes, gallery: str, case: str) -> tuple[str, float, bool]:
    """(top subject or '', top score or -inf, no face) of one probe through Identify."""
    from lfr.pb import identification_pb2 as pb

    req = pb.IdentifyRequest(image=image, gallery=gallery, k=2, investigation=True, case_reference=case,
                             justification="benchmark: lfr bench identify-oifr", actor="")
    r = stub.Identify(req, timeout=120)
    if r.outcome == pb.IDENTIFY_OUTCOME_SEVERAL_FACES:
        req.face = _central(r) + 1
        r = stub.Identify(req, timeout=120)
    if r.outcome == pb.IDENTIFY_OUTCOME_NO_FACE:
        return "", -np.inf, True
    if not r.candidates:
        return "", -np.inf, False
    return r.candidates[0].subject_ref, float(r.candidates[0].score), False


def evaluate_oifr(stub, root: Path, identities: dict[str, list[str]], fpirs, gallery: str, threshold=None) -> dict:
    """The open-set protocol through AddGalleryImages + Identify."""
    from lfr.pb import identification_pb2 as pb

    t0 = time.perf_counter()
    split = metrics.open_set_split(identities)
    no_face = 0
    for rel, person in zip(split.gallery, split.gallery_ids, strict=True):
        r = stub.AddGalleryImages(pb.AddGalleryImagesRequest(
            gallery=gallery, subject_ref=person, source_system="LFW", legal_basis="benchmark",
            images=[(root / rel).read_bytes()], actor=""), timeout=120)
        no_face += sum(1 for x in r.results if not x.accepted and x.faces_found == 0 and not x.duplicate)
    case = f"bench-{gallery}"
    mated, correct, nonmated = [], [], []
    for rel, person in zip(split.mated, split.mated_ids, strict=True):
        top, score, nf = search(stub, (root / rel).read_bytes(), gallery, case)
        mated.append(score)
        correct.append(top == person)
        no_face += nf
    for rel in split.nonmated:
        _top, score, nf = search(stub, (root / rel).read_bytes(), gallery, case)
        nonmated.append(score)
        no_face += nf
    res = metrics.open_set_metrics(np.array(mated), np.array(correct), np.array(nonmated), fpirs, threshold=threshold)
    return {"gallery": len(split.gallery), "mated_probes": len(split.mated), "nonmated_probes": len(split.nonmated),
            **res, "no_face": no_face, "seconds": round(time.perf_counter() - t0, 2)}


def run(args) -> dict:

    from lfr.bench import identify
    from lfr.bench.pipeline import OursPipeline, set_threads
    from lfr.pb import identification_pb2_grpc

    set_threads(args.threads)
    root = data_dir(args)
    identities = _select(list_identities(root), args.limit)
    fpirs = metrics.fpir_points(sum(1 for v in identities.values() if len(v) == 1))
    gallery = args.gallery or f"bench-{int(time.time())}"
    system, temp = None, ""
    try:
        if args.embedded:
            from lfr.models.engines import resolve_model_id
            from lfr.runtime.embedded import EmbeddedSystem

            temp = tempfile.mkdtemp(prefix="lfr-oifr-")  # the gallery's images, the development keys: removed
            system = EmbeddedSystem(temp,
                                    env={"LFR_MODEL": resolve_model_id(args.model)}).start()
            target = system.endpoint("identification")
            access = system.access(user="bench", follow_actor=True, roles=["watchlist_manager", "investigator"])
        else:
            from lfr.cli.client import cli_access, state_dir_of

            if args.target:
                target = args.target
            else:
                target = json.loads((state_dir_of(args) / "endpoints.json").read_text())["identification"]
            access = cli_access(args)
        with access.channel(target) as ch:
            stub = identification_pb2_grpc.IdentificationServiceStub(ch)
            pipe = OursPipeline(args.model, flip=library_flip(args.flip), quiet=True)
            oifr = evaluate_oifr(stub, root, identities, fpirs, gallery, pipe.scorer.threshold)
        library = identify.evaluate(pipe, root, identities, fpirs, False)
    finally:
        if system is not None:
            system.stop()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    keys = ("rank1", "tpir_at_fpir", "at_threshold", "no_face", "gallery", "mated_probes", "nonmated_probes",
            "seconds")
    return {"model": pipe.model_id, "data": str(root), "identities": len(identities),
            "oifr": {k: oifr[k] for k in keys}, "library": {k: library[k] for k in keys},
            "same_tpir": oifr["tpir_at_fpir"] == library["tpir_at_fpir"]}
