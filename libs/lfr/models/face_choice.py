"""Which face a photo is about: one rule for galleries (always one face) and for watchlist enrollment (one face
only when it clearly dominates). Pure: boxes and landmark distances in, an index out.

The rule ranks the faces as a portrait is read: the largest box containing the image centre, else the box whose
centre is nearest the image centre (`central_index`). Enrollment asks more: that face must be *dominant*
(`dominant_index`): its inter-eye distance at least ``min_size_ratio`` times that of every other face, and its
centre within ``max_centre_offset`` of the image centre (per axis, as a fraction of the half width / height).
A gallery uses the rule with no margins (ratio 0, offset 1: the central face is always taken); a watchlist
policy sets the margins (``enrollment.dominant_min_size_ratio``, ``enrollment.dominant_max_centre_offset``)
measured by ``lfr bench dominant`` on photos whose subject is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Candidate:
    """One face found in a photo: its box and inter-eye distance (pixels of the photo)."""

    box: Box
    inter_eye_px: float
    score: float = 0.0


def central_index(width: int, height: int, boxes: list[Box]) -> int:
    """Index of the face the photo is about (-1 when there is none): the largest box containing the image centre,
    else the box whose centre is nearest the centre."""
    if not boxes:
        return -1
    cx, cy = width / 2.0, height / 2.0
    inside = [i for i, b in enumerate(boxes) if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
    if inside:
        return max(inside, key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
    return min(range(len(boxes)),
               key=lambda i: math.hypot((boxes[i][0] + boxes[i][2]) / 2 - cx, (boxes[i][1] + boxes[i][3]) / 2 - cy))


def centre_offset(width: int, height: int, box: Box) -> float:
    """How far a box's centre is from the image centre: the larger of |dx| / (W/2) and |dy| / (H/2) (0 = centred,
    1 = on an edge)."""
    dx = abs((box[0] + box[2]) / 2 - width / 2.0) / max(width / 2.0, 1e-9)
    dy = abs((box[1] + box[3]) / 2 - height / 2.0) / max(height / 2.0, 1e-9)
    return max(dx, dy)


def size_ratio(faces: list[Candidate], index: int) -> float:
    """The chosen face's inter-eye distance over the largest of the others' (inf when it is alone)."""
    others = [f.inter_eye_px for i, f in enumerate(faces) if i != index]
    if not others:
        return math.inf
    return faces[index].inter_eye_px / max(max(others), 1e-9)


@dataclass(frozen=True)
class Choice:
    index: int       # -1: no face dominates
    ratio: float     # size_ratio of the central face
    offset: float    # centre_offset of the central face
    why: str         # one line a person reads


def dominant_index(width: int, height: int, faces: list[Candidate], min_size_ratio: float,
                   max_centre_offset: float) -> Choice:
    """The central face (`central_index`) when it dominates by the given margins, else index -1 and why not."""
    i = central_index(width, height, [f.box for f in faces])
    if i < 0:
        return Choice(-1, 0.0, 0.0, "no face found")
    ratio, offset = size_ratio(faces, i), centre_offset(width, height, faces[i].box)
    shown = "alone" if math.isinf(ratio) else f"{ratio:.2f}x the next largest"
    if ratio < min_size_ratio:
        return Choice(-1, ratio, offset, f"the central face (face {i + 1}) is {shown} between the eyes, not the "
                      f"{min_size_ratio:g}x that makes it dominant")
    if offset > max_centre_offset:
        return Choice(-1, ratio, offset, f"the central face (face {i + 1}) is off centre ({offset:.2f} of the half "
                      f"image, at most {max_centre_offset:g} for a dominant face)")
    return Choice(i, ratio, offset, f"face {i + 1} of {len(faces)} dominates: {shown} between the eyes, "
                  f"centre offset {offset:.2f}")
