"""Audit service: consumes durable facts (lifecycle, watchlist, alerts, match counts) into the audit index."""

from __future__ import annotations

from lfr.audit.core import record_from_event
from lfr.audit.store import AuditStore
from lfr.pb import audit_pb2 as pb
from lfr.pb import audit_pb2_grpc
from lfr.runtime import events, subjects
from lfr.runtime.rpc import abort
from lfr.runtime.service import Runtime, Service


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, svc: AuditService):
        self.svc = svc

    async def Query(self, request, context):
        limit = request.limit or 1000
        if not 1 <= limit <= 10_000:
            await abort(context, "INVALID_ARGUMENT", "limit must be between 1 and 10000")
        rows = self.svc.store.query(request.deployment_id, request.type_prefix, request.after_sequence, limit)
        return pb.QueryResponse(records=[
            pb.Record(sequence=r["sequence"], time=events.ts_from_ns(r["time_ns"]), type=r["type"],
                      actor=r["actor"] or "", deployment_id=r["deployment_id"] or "", subject=r["subject"] or "",
                      payload_digest=r["payload_digest"], summary_json=r["summary_json"])
            for r in rows])


class AuditService(Service):
    name = "audit"

    async def start(self, rt: Runtime) -> None:
        cfg = self.config
        self.store = AuditStore(cfg.audit_db or cfg.state_path("audit.sqlite"))
        rt.add_servicer(audit_pb2_grpc.add_AuditServiceServicer_to_server, AuditServicer(self),
                        pb.DESCRIPTOR.services_by_name["AuditService"])

    async def warmup(self) -> None:
        for stream in subjects.STREAMS:
            for subject in stream.subjects:
                durable = "audit-" + stream.name.lower() + "-" + subject.split(".")[2]
                await self.rt.bus.consume_durable(stream.name, subject, durable, self._on_event(stream.name))

    def _on_event(self, stream: str):
        async def handle(data: bytes, subject: str, seq: int) -> None:
            record = record_from_event(subject, data)
            if record is not None:
                self.store.append(f"{stream}:{seq}", record)

        return handle

    async def close(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
