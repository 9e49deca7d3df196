"""Pure core of the watchlist service: deployment records, transitions, enrollment decisions. No I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from lfr.pb import watchlist_pb2 as pb

S = pb.DeploymentStatus

# Allowed transitions (governance of who may do what comes with the deployments issue).
TRANSITIONS: dict[str, tuple[set[int], int]] = {
    "start": ({S.DEPLOYMENT_STATUS_DRAFT, S.DEPLOYMENT_STATUS_AUTHORISED}, S.DEPLOYMENT_STATUS_ACTIVE),
    "end": ({S.DEPLOYMENT_STATUS_ACTIVE}, S.DEPLOYMENT_STATUS_ENDED),
}


class Refused(Exception):
    """A request the core refuses; `code` names the gRPC status the adapter returns."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DeploymentRecord:
    id: str
    name: str
    purpose: str
    site: str
    planned_start_ns: int
    planned_end_ns: int
    cameras: tuple[str, ...]
    threshold: float
    model_id: str
    model_version: str
    status: int = S.DEPLOYMENT_STATUS_DRAFT
    created_by: str = ""
    created_at_ns: int = field(default_factory=time.time_ns)

    def transition(self, action: str) -> DeploymentRecord:
        allowed, target = TRANSITIONS[action]
        if self.status not in allowed:
            raise Refused(
                "FAILED_PRECONDITION",
                f"cannot {action} deployment {self.id}: it is {S.Name(self.status).removeprefix('DEPLOYMENT_STATUS_')}",
            )
        return replace(self, status=target)

    @property
    def active(self) -> bool:
        return self.status == S.DEPLOYMENT_STATUS_ACTIVE


def validate_new_deployment(req: pb.CreateDeploymentRequest, default_threshold: float) -> tuple[str, float]:
    """Returns (error, threshold): error is '' when the request is acceptable."""
    from lfr.runtime.subjects import token

    if not req.name.strip():
        return "name is required", 0.0
    if not req.cameras:
        return "at least one camera is required", 0.0
    for cam in req.cameras:
        try:
            token(cam, "camera id")
        except ValueError as exc:
            return f"camera {cam!r}: {exc}", 0.0
    if len(set(req.cameras)) != len(req.cameras):
        return "camera ids must be unique", 0.0
    threshold = req.threshold or default_threshold
    if not -1.0 <= threshold <= 1.0:
        return "threshold must be a similarity between -1 and 1", 0.0
    if req.planned_end.seconds and req.planned_end.ToNanoseconds() <= req.planned_start.ToNanoseconds():
        return "planned_end must be after planned_start", 0.0
    return "", threshold


def enrollment_verdict(n_faces: int, inter_eye_px: float, min_inter_eye_px: float) -> str:
    """'' if an enrollment image is acceptable, else the reason it is refused."""
    if n_faces == 0:
        return "no face found"
    if n_faces > 1:
        return f"{n_faces} faces found; an enrollment image must show exactly one"
    if inter_eye_px < min_inter_eye_px:
        return f"face too small: {inter_eye_px:.0f} px between the eyes (minimum {min_inter_eye_px:.0f})"
    return ""
