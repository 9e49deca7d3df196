"""Audit service: the only writer of the audit record. Consumes every durable fact (LFR_ALERTS, LFR_EVENTS) with
durable pull consumers, chains each into a record, appends it to the LFR_AUDIT stream (file storage, delete
and purge denied: the source of truth, its stream sequence = the record's position) and then to the SQLite
index. Verifies the chain, and computes the published deployment records from its own records."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from dataclasses import replace

from google.protobuf.message import DecodeError
from nats.js import api
from nats.js.errors import APIError

from lfr.audit import chain, report
from lfr.audit.chain import ChainRecord
from lfr.audit.core import RecordData, record_from_event
from lfr.audit.store import AuditStore
from lfr.pb import audit_pb2 as pb
from lfr.pb import audit_pb2_grpc
from lfr.runtime import events, outbox, subjects
from lfr.runtime.rpc import abort
from lfr.runtime.security import caller_name
from lfr.runtime.service import Runtime, Service

JETSTREAM_STORE = "NATS JetStream store (LFR_AUDIT stream)"
WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Sequence did not hold


def record_pb(r: ChainRecord) -> pb.Record:
    return pb.Record(sequence=r.sequence, time=events.ts_from_ns(r.time_ns), type=r.type, actor=r.actor,
                     deployment_id=r.deployment_id, subject=r.subject, payload_digest=r.payload_digest,
                     summary_json=r.summary_json, source=r.source, prev_hash=r.prev_hash, hash=r.hash)


def audit_msg_id(r: ChainRecord) -> str:
    """The dedup id of a chain record in the durable stream."""
    return f"audit-{r.sequence}-{r.hash[:16]}"


def chain_record(m: pb.Record) -> ChainRecord:
    return ChainRecord(m.sequence, m.time.ToNanoseconds(), m.type, m.actor, m.deployment_id, m.subject,
                       m.payload_digest, m.summary_json, m.source, m.prev_hash, m.hash)


def stream_record(seq: int, data: bytes) -> ChainRecord:
    """The record at a position of the durable stream. Something there that is not the audit's record of that
    position (written by another client) is kept as a foreign record: it holds the position, and Verify names it."""
    try:
        r = chain_record(pb.Record.FromString(data))
        if r.sequence == seq:
            return r
    except DecodeError:
        pass
    return ChainRecord(seq, 0, "audit.foreign", "", "", "", hashlib.sha256(data).hexdigest(), "{}", f"foreign:{seq}",
                       "", "")


def published_pb(p: report.Published) -> pb.PublishedRecord:
    out = pb.PublishedRecord(
        deployment_id=p.deployment_id, date=p.date, start_time=events.ts_from_ns(p.start_ns), site=p.site,
        purpose_category=p.purpose_category, watchlist_size=p.watchlist_size, faces_seen=p.faces_seen,
        alerts=p.alerts, confirmed_alerts=p.confirmed_alerts, false_alerts=p.false_alerts,
        not_engaged=p.not_engaged, unadjudicated=p.unadjudicated, arrests=p.arrests, threshold=p.threshold,
        model=p.model, false_alert_rate=p.false_alert_rate, false_alert_one_in=p.false_alert_one_in,
        status=p.status, threshold_below_floor=p.threshold_below_floor, threshold_floor=p.threshold_floor,
        threshold_reason=p.threshold_reason, urgent=p.urgent, urgent_confirmed=p.urgent_confirmed,
        engagements=engagements_pb(p), equitability=[pb.EquitabilityRow(**r) for r in p.equitability.rows()],
        suppress_below=p.equitability.min_count, expected_false_alerts_per_10k=p.expected_false_alerts_per_10k)
    if p.end_ns:
        out.end_time.CopyFrom(events.ts_from_ns(p.end_ns))
    return out


def engagements_pb(c: report.Counts) -> pb.Engagements:
    return pb.Engagements(none=c.engagements_none, words_of_advice=c.words_of_advice, arrests=c.arrests,
                          other_outcome=c.other_outcome, minutes=c.engagement_minutes,
                          false_alerts_informed=c.false_alerts_informed)


def totals_pb(from_date: str, to_date: str, n: int, t: report.Counts,
              eq: report.Breakdown | None = None) -> pb.PeriodTotals:
    eq = eq or report.Breakdown()
    return pb.PeriodTotals(from_date=from_date, to_date=to_date, deployments=n, faces_seen=t.faces_seen,
                           alerts=t.alerts, confirmed_alerts=t.confirmed_alerts, false_alerts=t.false_alerts,
                           not_engaged=t.not_engaged, unadjudicated=t.unadjudicated, arrests=t.arrests,
                           false_alert_rate=t.false_alert_rate, false_alert_one_in=t.false_alert_one_in,
                           engagements=engagements_pb(t), equitability=[pb.EquitabilityRow(**r) for r in eq.rows()],
                           suppress_below=eq.min_count, below_floor=t.below_floor, urgent=t.urgent_uses)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, svc: AuditService):
        self.svc = svc

    async def Query(self, request, context):
        limit = request.limit or 1000
        if not 1 <= limit <= 10_000:
            await abort(context, "INVALID_ARGUMENT", "limit must be between 1 and 10000")
        self.svc.accessed(context, "Query", request.deployment_id, request.deployment_id)
        rows = self.svc.store.query(request.deployment_id, request.type_prefix, request.after_sequence, limit)
        return pb.QueryResponse(records=[record_pb(ChainRecord(*(r[c] for c in (
            "sequence", "time_ns", "type", "actor", "deployment_id", "subject", "payload_digest", "summary_json",
            "source", "prev_hash", "hash")))) for r in rows])

    async def Verify(self, request, context):
        svc = self.svc
        unrecorded = await svc.unrecorded()
        async with svc.lock:  # index and durable copy taken at the same point of the chain
            index = list(svc.store.chain())
            durable = [] if request.index_only else await svc.read_audit_stream(1)
        verdict = await svc.rt.run_cpu(chain.verify, index)
        if not request.index_only:
            verdict = verdict.worst(await svc.rt.run_cpu(chain.compare, index, durable))
        svc.accessed(context, "Verify", "", "")
        return pb.VerifyResponse(ok=verdict.ok, records=len(index), stream_records=len(durable),
                                 first_bad_sequence=verdict.first_bad, reason=verdict.reason,
                                 head_hash=index[-1].hash if index else chain.GENESIS, unrecorded=unrecorded)

    async def DeploymentReport(self, request, context):
        if not request.deployment_id:
            await abort(context, "INVALID_ARGUMENT", "deployment_id is required")
        self.svc.accessed(context, "DeploymentReport", request.deployment_id, request.deployment_id)
        p = report.published_record(self.svc.store.of_types(report.TYPES, request.deployment_id))
        if p is None:
            await abort(context, "NOT_FOUND", f"deployment {request.deployment_id!r} has no published record: "
                                              "it never started")
        return published_pb(p)

    async def PublicRecords(self, request, context):
        records = await self._period(request, context, "PublicRecords")
        n, t = report.totals(records)
        return pb.PublicRecordsResponse(records=[published_pb(p) for p in records],
                                        totals=totals_pb(request.from_date, request.to_date, n, t,
                                                         report.breakdown(records)))

    async def Totals(self, request, context):
        records = await self._period(request, context, "Totals")
        n, t = report.totals(records)
        return totals_pb(request.from_date, request.to_date, n, t, report.breakdown(records))

    async def _period(self, request, context, method: str) -> list[report.Published]:
        try:
            start, end = report.period_ns(request.from_date, request.to_date)
        except ValueError as exc:
            await abort(context, "INVALID_ARGUMENT", str(exc))
        self.svc.accessed(context, method, "", f"{request.from_date}..{request.to_date}")
        store = self.svc.store
        started = [r for r in store.of_types(("deployment.started",)) if start <= r.time_ns < end]
        out = []
        for dep in dict.fromkeys(r.deployment_id for r in started):
            p = report.published_record(store.of_types(report.TYPES, dep))
            if p is not None:
                out.append(p)
        return sorted(out, key=lambda p: p.start_ns)


class AuditService(Service):
    name = "audit"

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.store = AuditStore(cfg.audit_db or cfg.state_path("audit.sqlite"))
        # the audit's own durable facts (access summaries) wait in its database; its chain appends publish directly
        # through the outbox module (they must expect the stream's last sequence)
        rt.bus.use_outbox(outbox.Outbox(self.store.db, self.store.lock, self.name))
        self.lock = asyncio.Lock()  # one append at a time: the chain has one head
        self.closing = False
        self.access_tasks: set[asyncio.Task] = set()
        rt.add_servicer(audit_pb2_grpc.add_AuditServiceServicer_to_server, AuditServicer(self),
                        pb.DESCRIPTOR.services_by_name["AuditService"])

    async def warmup(self) -> None:
        await self.rt.bus.ensure_streams((subjects.AUDIT,), replicas=self.config.stream_replicas)
        async with self.lock:
            await self._sync()
        for stream in subjects.STREAMS:
            for subject in stream.subjects:
                durable = "audit-" + stream.name.lower() + "-" + subject.split(".")[2]
                await self.rt.bus.consume_durable(stream.name, subject, durable, self._on_event(stream.name))

    def _on_event(self, stream: str):
        async def handle(data: bytes, subject: str, seq: int) -> None:
            record = record_from_event(subject, data)
            if record is not None:
                await self.record(f"{stream}:{seq}", record)

        return handle

    async def record(self, source: str, data: RecordData) -> None:
        """Append, retrying until it is done: a fact is acknowledged only once recorded, never skipped."""
        delay = 0.1
        while True:
            try:
                await self.append(source, data)
                self.rt.storage.succeeded(JETSTREAM_STORE)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # a full or read-only index (or JetStream's store): NOT_SERVING, saying which, until it is writable
                self.rt.storage.failed(exc, "append", remote="" if isinstance(exc, (OSError, sqlite3.Error))
                                       else JETSTREAM_STORE)
                self.log.warning("audit.append_retry", source=source, error=type(exc).__name__,
                                 detail=str(exc)[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # The chain ---------------------------------------------------------------------------------------
    async def append(self, source: str, data: RecordData) -> None:
        """Chain a record onto the head: durable stream first (expecting the head's position), then index."""
        async with self.lock:
            while not self.store.has_source(source):
                rec = chain.link(self.store.head(), data, source)
                try:  # the outbox module's publish: acknowledged, deduplicated, and only onto the head's position
                    ack = await outbox.publish(self.rt.bus.js, subjects.audit(rec.deployment_id),
                                               record_pb(rec).SerializeToString(), audit_msg_id(rec),
                                               expected_last_seq=rec.sequence - 1)
                except APIError as exc:
                    if exc.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    self.log.warning("audit.stream_ahead_of_index", sequence=rec.sequence)
                    await self._sync()  # e.g. a crash after the stream took a record, before the index did
                    continue
                if ack.seq != rec.sequence:
                    await self._sync()
                    continue
                self.store.insert(rec)

    async def _sync(self) -> None:
        """Bring the index and the durable stream to the same length (call with the lock held)."""
        info = await self.rt.bus.js.stream_info(subjects.AUDIT.name)
        last = info.state.last_seq
        head = self.store.head()
        indexed = head.sequence if head else 0
        if last > indexed:
            for r in await self.read_audit_stream(indexed + 1):
                try:
                    self.store.insert(r)
                except sqlite3.IntegrityError:  # a copy of a recorded fact's source: foreign as well
                    self.store.insert(replace(r, type="audit.foreign", source=f"foreign:{r.sequence}"))
            self.log.info("audit.index_filled_from_stream", records=last - indexed)
        elif last < indexed:  # the stream's storage was lost: restore the durable copy from the index
            for r in self.store.chain(after=last):
                await outbox.publish(self.rt.bus.js, subjects.audit(r.deployment_id), record_pb(r).SerializeToString(),
                                     audit_msg_id(r), timeout_s=5, expected_last_seq=r.sequence - 1)
            self.log.warning("audit.stream_restored_from_index", records=indexed - last)

    async def read_audit_stream(self, start_seq: int) -> list[ChainRecord]:
        """The records of the durable stream from `start_seq` to its current end."""
        js = self.rt.bus.js
        last = (await js.stream_info(subjects.AUDIT.name)).state.last_seq
        if last < start_seq:
            return []
        psub = await js.pull_subscribe(subjects.audit(), stream=subjects.AUDIT.name, config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq, inactive_threshold=30.0))
        out: list[ChainRecord] = []
        try:
            seq = start_seq - 1
            while seq < last:
                for m in await psub.fetch(256, timeout=5):
                    seq = m.metadata.sequence.stream
                    if seq <= last:
                        out.append(stream_record(seq, m.data))
        finally:
            await psub.unsubscribe()
        return out

    async def unrecorded(self) -> int:
        """Durable facts in the audited streams that are not recorded yet (consumer lag)."""
        n = 0
        for stream in subjects.STREAMS:
            state = (await self.rt.bus.js.stream_info(stream.name)).state
            if state.messages:
                n += state.messages - self.store.recorded_from(stream.name, state.first_seq)
        return n

    def accessed(self, context, method: str, subject: str, deployment_id: str) -> None:
        """An access to the audit's own API: the audit records it directly (the answer does not wait for it)."""
        if self.closing:
            return
        actor = caller_name()  # the authenticated caller (lfr.runtime.security)
        ev = pb.AccessEvent(envelope=events.envelope(self.name, deployment_id=deployment_id), service=self.name,
                            method=method, actor=actor, subject=subject, peer=context.peer() or "")
        data = record_from_event(subjects.access(self.name), ev.SerializeToString())
        task = asyncio.create_task(self.record(f"access:{ev.envelope.event_id}", data), name="audit-access")
        self.access_tasks.add(task)
        task.add_done_callback(self.access_tasks.discard)

    async def stop_intake(self) -> None:
        self.closing = True  # no new access records; facts already fetched are still recorded

    async def close(self) -> None:
        # Called after the NATS drain (the runtime's shutdown order), so every fact fetched is recorded by now.
        if self.access_tasks:
            await asyncio.wait(list(self.access_tasks), timeout=5)
        if hasattr(self, "store"):
            self.store.close()
