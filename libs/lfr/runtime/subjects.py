"""Every NATS subject and JetStream stream of the platform, in one place.

Subjects are `lfr.v1.<domain>.<deployment>[.<camera>]`: the version comes second so v2 can run beside v1.
Biometric flow (frames, faces, embeddings) is core NATS only: in memory, never on disk.
Durable facts go to JetStream streams with file storage; the audit-facing streams deny delete and purge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VERSION = "v1"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def token(value: str, what: str) -> str:
    """Validate an id used as a subject token (no dots, spaces or wildcards)."""
    if not _TOKEN.match(value or ""):
        raise ValueError(f"{what} must be 1-64 characters of letters, digits, '-' or '_'")
    return value


def _subject(domain: str, deployment: str = "*", camera: str | None = None) -> str:
    parts = ["lfr", VERSION, domain, deployment]
    if camera is not None:
        parts.append(camera)
    return ".".join(parts)


# Biometric flow (core NATS, memory only) ---------------------------------------------------------
def frames(deployment: str = "*", camera: str = "*") -> str:
    return _subject("frames", deployment, camera)


def faces(deployment: str = "*", camera: str = "*") -> str:
    return _subject("faces", deployment, camera)


def embeddings(deployment: str = "*", camera: str = "*") -> str:
    return _subject("embeddings", deployment, camera)


# Durable facts (JetStream, file storage) ----------------------------------------------------------
def alerts(deployment: str = "*", camera: str = "*") -> str:
    return _subject("alerts", deployment, camera)


def lifecycle(deployment: str = "*") -> str:
    return _subject("lifecycle", deployment)


def watchlist(deployment: str = "*") -> str:
    return _subject("watchlist", deployment)


def matchstats(deployment: str = "*") -> str:
    return _subject("matchstats", deployment)


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float  # 0 = keep forever (retention rules act on the stores, not the stream)
    deny_delete: bool = True


ALERTS = Stream("LFR_ALERTS", ("lfr.v1.alerts.>",), max_age_s=31 * 86400)
EVENTS = Stream("LFR_EVENTS", ("lfr.v1.lifecycle.>", "lfr.v1.watchlist.>", "lfr.v1.matchstats.>"), max_age_s=0)
STREAMS = (ALERTS, EVENTS)

# Queue groups: one consumer per stage shares the work.
QUEUE = {"detection": "lfr-detection", "embedding": "lfr-embedding", "match": "lfr-match"}
