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


def evidence(deployment: str = "*", camera: str = "*") -> str:
    """match asks detection for more frames of face tracks its pass rule waits on (track ids only)."""
    return _subject("evidence", deployment, camera)


def embeddings(deployment: str = "*", camera: str = "*") -> str:
    """Where embedding publishes a frame's vectors. The nats-server maps it (PARTITION_MAPPING) to
    `embeddings_partition`: subscribers read the partitioned subject, never this one."""
    return _subject("embeddings", deployment, camera)


# match scales out by camera with NATS's own deterministic subject partitioning: the server maps every
# `lfr.v1.embeddings.<deployment>.<camera>` to `...<camera>.<k>`, k = partition(MATCH_PARTITIONS) of the
# deployment and camera tokens, and match replica i of R reads the partitions k with k % R == i. So one
# camera's faces always reach the same replica (its tracker and its one alert per pass hold), with no router of
# our own. The number of partitions is fixed (the server's mapping never changes); replicas can be 1 ... it.
MATCH_PARTITIONS = 12
PARTITION_MAPPING = {
    f"lfr.{VERSION}.embeddings.*.*":
        f"lfr.{VERSION}.embeddings.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({MATCH_PARTITIONS},1,2)}}}}",
}


def embeddings_partition(partition: int | str = "*", deployment: str = "*", camera: str = "*") -> str:
    """The partitioned subject of a camera's embeddings (as the server's mapping rewrites it)."""
    return f"{embeddings(deployment, camera)}.{partition}"


def match_partitions(replica: int, replicas: int) -> list[int]:
    """The embeddings' partitions match replica `replica` (0-based) of `replicas` reads."""
    if not 1 <= replicas <= MATCH_PARTITIONS or not 0 <= replica < replicas:
        raise ValueError(f"match replica {replica} of {replicas}: replicas must be 1 to {MATCH_PARTITIONS} and "
                         f"the replica 0 to replicas - 1")
    return [k for k in range(MATCH_PARTITIONS) if k % replicas == replica]


# Durable facts (JetStream, file storage) ----------------------------------------------------------
def alerts(deployment: str = "*", camera: str = "*") -> str:
    return _subject("alerts", deployment, camera)


def lifecycle(deployment: str = "*") -> str:
    return _subject("lifecycle", deployment)


def watchlist(deployment: str = "*") -> str:
    return _subject("watchlist", deployment)


def matchstats(deployment: str = "*") -> str:
    return _subject("matchstats", deployment)


def adjudications(deployment: str = "*") -> str:
    """An officer's decision on an alert (lfr.match.v1.AlertAdjudicated)."""
    return _subject("adjudications", deployment)


def alertflags(deployment: str = "*") -> str:
    """An alert left unadjudicated past the limit (lfr.match.v1.AlertOverdue)."""
    return _subject("alertflags", deployment)


def retention(deployment: str = "*") -> str:
    """Alert crops and reference copies deleted at the end of the retention period (lfr.match.v1.CropsDeleted)."""
    return _subject("retention", deployment)


def access(service: str = "*") -> str:
    """Who called which API, on what (lfr.audit.v1.AccessEvent)."""
    return _subject("access", service)


NO_DEPLOYMENT = "_"  # the subject token of audit records about no deployment (reference collection, access)


def audit(deployment: str = "*") -> str:
    """A chained audit record (lfr.audit.v1.Record), written by the audit service only. A record about no
    deployment, or about an id that is no valid token (a caller's typo), goes under NO_DEPLOYMENT."""
    if deployment != "*" and not _TOKEN.match(deployment or ""):
        deployment = NO_DEPLOYMENT
    return _subject("audit", deployment)


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float  # 0 = keep forever (retention rules act on the stores, not the stream)
    deny_delete: bool = True


ALERTS = Stream("LFR_ALERTS", ("lfr.v1.alerts.>",), max_age_s=31 * 86400)
EVENTS = Stream("LFR_EVENTS", ("lfr.v1.lifecycle.>", "lfr.v1.watchlist.>", "lfr.v1.matchstats.>",
                               "lfr.v1.adjudications.>", "lfr.v1.alertflags.>", "lfr.v1.retention.>",
                               "lfr.v1.access.>"), max_age_s=0)
STREAMS = (ALERTS, EVENTS)  # the durable facts, declared by every service; the audit service records them all
# The audit chain: the source of truth of the audit record (the SQLite index is rebuilt from it). Declared and
# written by the audit service only.
AUDIT = Stream("LFR_AUDIT", ("lfr.v1.audit.>",), max_age_s=0)

# Queue groups: one consumer per stage shares the work.
QUEUE = {"detection": "lfr-detection", "embedding": "lfr-embedding", "match": "lfr-match"}
