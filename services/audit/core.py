"""Pure core of the audit service: turn a durable event into a record with no biometric in it."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from lfr.pb import audit_pb2, match_pb2, watchlist_pb2


@dataclass(frozen=True)
class RecordData:
    time_ns: int
    type: str
    actor: str
    deployment_id: str
    subject: str
    payload_digest: str
    summary_json: str


def record_from_event(subject: str, data: bytes) -> RecordData | None:
    """None for subjects that are not audited."""
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != "lfr":
        return None
    domain = parts[2]
    digest = hashlib.sha256(data).hexdigest()
    try:
        return _record(domain, data, digest)
    except DecodeError:  # recorded all the same: the chain shows that something unreadable was published
        return RecordData(time_ns=time.time_ns(), type="event.malformed", actor="", deployment_id="",
                          subject=subject, payload_digest=digest, summary_json="{}")


def _record(domain: str, data: bytes, digest: str) -> RecordData | None:
    if domain == "alerts":
        msg = match_pb2.Alert.FromString(data)
        msg.ClearField("probe_jpeg")  # the record holds no image
        typ = "alert.raised" if msg.revision == 0 else "alert.updated"
        actor, subj = msg.envelope.producer, msg.alert_id
    elif domain == "lifecycle":
        msg = watchlist_pb2.DeploymentEvent.FromString(data)
        typ, actor, subj = f"deployment.{msg.action}", msg.actor, msg.deployment.id
    elif domain == "watchlist":
        msg = watchlist_pb2.WatchlistEvent.FromString(data)
        # reference_added -> reference.added (the reference collection); entry_added -> watchlist.entry_added
        typ = ("reference." + msg.action.removeprefix("reference_") if msg.action.startswith("reference_")
               else f"watchlist.{msg.action}")
        # what it was about: the entry, an identification search or job, the subject, a gallery, the deployment
        actor = msg.actor
        subj = (msg.entry_id or msg.search_id or msg.job_id or msg.subject_ref or msg.gallery
                or msg.envelope.deployment_id)
    elif domain == "matchstats":
        msg = match_pb2.MatchStats.FromString(data)
        typ, actor, subj = "match.stats", msg.envelope.producer, msg.envelope.deployment_id
    elif domain == "adjudications":
        msg = match_pb2.AlertAdjudicated.FromString(data)
        typ = "alert.adjudicated" if msg.previous_outcome == match_pb2.OUTCOME_UNSPECIFIED else "alert.amended"
        actor, subj = msg.adjudication.actor, msg.alert_id
    elif domain == "alertflags":
        msg = match_pb2.AlertOverdue.FromString(data)
        typ, actor, subj = "alert.overdue", msg.envelope.producer, msg.alert_id
    elif domain == "retention":
        msg = match_pb2.CropsDeleted.FromString(data)
        typ, actor, subj = "retention.crops_deleted", msg.envelope.producer, msg.envelope.deployment_id
    elif domain == "access":
        msg = audit_pb2.AccessEvent.FromString(data)
        typ, actor, subj = f"access.{msg.service}.{msg.method}", msg.actor, msg.subject
    else:
        return None
    env = msg.envelope
    summary = MessageToDict(msg, preserving_proto_field_name=True)
    return RecordData(
        time_ns=env.emit_time.ToNanoseconds() or env.capture_time.ToNanoseconds(), type=typ, actor=actor,
        deployment_id=env.deployment_id, subject=subj, payload_digest=digest,
        summary_json=json.dumps(summary, sort_keys=True))
