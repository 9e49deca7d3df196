"""The audit hash chain. Pure: no I/O.

Each record's hash is the sha256 of its canonical form: every field (sequence, time, type, actor, deployment,
subject, payload digest, summary, source) and the previous record's hash. Changing, deleting, inserting or
reordering a record therefore breaks the chain at that record (or, if the attacker recomputed its hash, at the
next one); comparison with the durable copy (the LFR_AUDIT stream, which denies delete and purge) names the
record itself even then, and catches a truncated tail.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace

from lfr.audit.core import RecordData

GENESIS = "0" * 64


@dataclass(frozen=True)
class ChainRecord:
    sequence: int
    time_ns: int
    type: str
    actor: str
    deployment_id: str
    subject: str
    payload_digest: str
    summary_json: str
    source: str
    prev_hash: str
    hash: str


def record_hash(sequence: int, data: RecordData, source: str, prev_hash: str) -> str:
    canonical = json.dumps([sequence, data.time_ns, data.type, data.actor, data.deployment_id, data.subject,
                            data.payload_digest, data.summary_json, source, prev_hash],
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def link(head: ChainRecord | None, data: RecordData, source: str) -> ChainRecord:
    """The record that follows `head` (None: the first record)."""
    seq = head.sequence + 1 if head else 1
    prev = head.hash if head else GENESIS
    return ChainRecord(seq, data.time_ns, data.type, data.actor, data.deployment_id, data.subject,
                       data.payload_digest, data.summary_json, source, prev, record_hash(seq, data, source, prev))


def data_of(r: ChainRecord) -> RecordData:
    return RecordData(r.time_ns, r.type, r.actor, r.deployment_id, r.subject, r.payload_digest, r.summary_json)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    first_bad: int = 0  # the sequence (position) of the first broken link; 0 when ok
    reason: str = ""
    head_hash: str = GENESIS

    def worst(self, other: Verdict) -> Verdict:
        """The earlier of two failures (self's record count is kept)."""
        if other.ok or (not self.ok and self.first_bad <= other.first_bad):
            return self
        return replace(other, records=self.records, head_hash=self.head_hash)


def verify(records: Iterable[ChainRecord]) -> Verdict:
    """Walk the chain in the given order: positions 1, 2, ...; each record's hash recomputed; each linked to the
    one before."""
    prev = GENESIS
    n = 0
    for n, r in enumerate(records, start=1):
        if r.sequence != n:
            if r.sequence > n:
                return Verdict(False, n - 1, n, f"record {n} is missing or out of place (found record {r.sequence} "
                                                "in its place)", prev)
            return Verdict(False, n - 1, n, f"record {r.sequence} appears at position {n}: out of order or "
                                            "duplicated", prev)
        if record_hash(r.sequence, data_of(r), r.source, r.prev_hash) != r.hash:
            return Verdict(False, n - 1, n, f"record {n} was altered: its hash does not match its content", prev)
        if r.prev_hash != prev:
            return Verdict(False, n - 1, n, f"record {n} does not link to record {n - 1}: a record before it was "
                                            "altered, removed or inserted", prev)
        prev = r.hash
    return Verdict(True, n, head_hash=prev)


def compare(index: Iterable[ChainRecord], durable: Iterable[ChainRecord]) -> Verdict:
    """The index against the durable copy, record by record: the first position where they differ."""
    it_index, it_durable = iter(index), iter(durable)
    n = 0
    last = GENESIS
    while True:
        a, b = next(it_index, None), next(it_durable, None)
        if a is None and b is None:
            return Verdict(True, n, head_hash=last)
        n += 1
        if b is None:
            return Verdict(False, n - 1, n, f"record {n} is in the index but not in the durable stream", last)
        if a is None:
            return Verdict(False, n - 1, n, f"record {n} is missing from the index (the durable stream has it)",
                           last)
        if a != b:
            return Verdict(False, n - 1, n, f"record {n} differs from its durable copy", last)
        last = a.hash
