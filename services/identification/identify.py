"""Pure core of operator-initiated identification: request checks, which face to search, ranking of gallery
hits into candidates (one per subject, its best image). No I/O."""

from __future__ import annotations

from dataclasses import dataclass

from lfr.pb import identification_pb2 as pb

NO_FACE, SEVERAL, SEARCHED = (pb.IDENTIFY_OUTCOME_NO_FACE, pb.IDENTIFY_OUTCOME_SEVERAL_FACES,
                              pb.IDENTIFY_OUTCOME_SEARCHED)


def validate_identify(req: pb.IdentifyRequest) -> str:
    """'' when acceptable, else the reason (INVALID_ARGUMENT)."""
    if not req.image:
        return "image is required"
    if req.WhichOneof("target") is None:
        return "a target is required: a gallery or a deployment's watchlist"
    for name in ("case_reference", "justification", "actor"):
        if not getattr(req, name).strip():
            return f"{name} is required: every search records who searched, why and for which case"
    if not 0 <= req.k <= 100:
        return "k must be between 1 and 100"
    if req.face < 0:
        return "face must be 0 (exactly one face) or a face number from a previous answer"
    # the threshold's range depends on the target's model: checked once the target is known (lfr.models.scoring)
    return ""


def choose_face(n_faces: int, face: int) -> tuple[int, int, str]:
    """(outcome, 0-based index of the face to search or -1, message)."""
    if n_faces == 0:
        return NO_FACE, -1, "no face found in the image"
    if face:
        if face > n_faces:
            return -1, -1, f"face {face} does not exist: the image holds {n_faces} face(s)"
        return SEARCHED, face - 1, ""
    if n_faces > 1:
        return SEVERAL, -1, (f"{n_faces} faces found: choose one (face = 1..{n_faces}, see the crops) and "
                             "search again")
    return SEARCHED, 0, ""


@dataclass(frozen=True)
class Ranked:
    key: str             # subject_ref (a gallery) or entry_id (a watchlist)
    score: float
    above: bool
    info: dict           # subject_ref, image_id / entry_id, category, provenance


def rank(hits: list[tuple[str, float, dict]], k: int, threshold: float, investigation: bool) -> list[Ranked]:
    """hits: (key, score, info), several per key possible (a subject's images): each key's best, ranked; the
    top k (investigation mode) or the top k at or above the threshold."""
    best: dict[str, tuple[float, dict]] = {}
    for key, score, info in hits:
        if key not in best or score > best[key][0]:
            best[key] = (score, info)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
    out = [Ranked(key, float(s), bool(s >= threshold), info) for key, (s, info) in ranked]
    if not investigation:
        out = [r for r in out if r.above]
    return out[:k]


def candidate_pb(rank_no: int, r: Ranked) -> pb.IdentifyCandidate:
    i = r.info
    c = pb.IdentifyCandidate(rank=rank_no, subject_ref=i.get("subject_ref", ""), image_id=int(i.get("image_id", 0)),
                             score=r.score, above_threshold=r.above, source_system=i.get("source_system", ""),
                             legal_basis=i.get("legal_basis", ""), entry_id=i.get("entry_id", ""),
                             category=int(i.get("category", 0)))
    if i.get("captured_ns"):
        c.captured_at.FromNanoseconds(int(i["captured_ns"]))
    return c
