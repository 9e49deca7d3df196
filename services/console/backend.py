"""The console's side of gRPC: one mutual-TLS channel per service (the console's own client certificate),
and every call made with the signed-in person's bearer token, so the services decide and audit as that person.
gRPC refusals become ``ApiError`` with the HTTP status a page answers with and the service's own message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from lfr.pb import (
    audit_pb2_grpc,
    identification_pb2_grpc,
    ingest_pb2_grpc,
    match_pb2_grpc,
    watchlist_pb2_grpc,
)
from lfr.runtime.access import Access
from lfr.runtime.config import Config, ConfigError

# What a page answers when a service refuses: the gRPC status decides the HTTP status.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
STUBS = {"watchlist": watchlist_pb2_grpc.WatchlistServiceStub, "match": match_pb2_grpc.MatchServiceStub,
         "ingest": ingest_pb2_grpc.IngestServiceStub, "audit": audit_pb2_grpc.AuditServiceStub,
         "identification": identification_pb2_grpc.IdentificationServiceStub}


class ApiError(Exception):
    """A refusal to show the person: HTTP status, a title, and the service's message."""

    def __init__(self, status: int, title: str, message: str, code: str = ""):
        super().__init__(message)
        self.status, self.title, self.message, self.code = status, title, message, code


def api_error(exc: grpc.RpcError, what: str) -> ApiError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    status = HTTP_STATUS.get(code, 502)
    titles = {401: "Not signed in", 403: "Not allowed", 404: "Not found", 409: "Not possible now",
              400: "Request refused", 429: "Too many requests", 503: "Service unavailable",
              504: "The service took too long"}
    return ApiError(status, titles.get(status, "The service failed"), f"{what}: {exc.details() or code.name}",
                    code.name)


@dataclass(frozen=True)
class Targets:
    watchlist: str
    match: str
    ingest: str
    audit: str
    identification: str

    @classmethod
    def from_config(cls, cfg: Config) -> Targets:
        return cls(cfg.watchlist_target, cfg.match_target, cfg.ingest_target, cfg.audit_target,
                   cfg.identification_target)


def console_access(cfg: Config) -> Access:
    """The console's transport: its own client certificate; tokens are added per call (never its own)."""
    if cfg.tls_dir:
        for suffix in ("pem", "key"):
            if not (Path(cfg.tls_dir) / f"{cfg.client_cert}.{suffix}").is_file():
                raise ConfigError(f"LFR_CLIENT_CERT: {cfg.client_cert}.{suffix} is not in LFR_TLS_DIR")
        return Access(cfg.tls_dir, cfg.client_cert)
    if cfg.insecure:
        return Access.insecure()
    raise ConfigError("LFR_TLS_DIR: required (or LFR_INSECURE=1 for plaintext development use)")


class Backend:
    """aio channels to the five services the console uses; ``as_person(token)`` gives their stubs' calls."""

    def __init__(self, targets: Targets, access: Access):
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self.channels = {name: access.channel(getattr(targets, name), aio=True, options=opts) for name in STUBS}
        self.stubs = {name: STUBS[name](ch) for name, ch in self.channels.items()}

    def as_person(self, token: str) -> Calls:
        return Calls(self, token)

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


class Calls:
    """Calls made as one person: ``await calls.unary("watchlist", "ListDeployments", request)``."""

    def __init__(self, backend: Backend, token: str):
        self.backend = backend
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def unary(self, service: str, method: str, request, timeout: float = 30.0, what: str = ""):
        fn = getattr(self.backend.stubs[service], method)
        try:
            return await fn(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise api_error(exc, what or f"{service} {method}") from None

    def stream(self, service: str, method: str, request, timeout: float | None = None):
        """The call object of a server-streaming method (iterate it; cancel() it when done)."""
        fn = getattr(self.backend.stubs[service], method)
        return fn(request, metadata=self.metadata, timeout=timeout)
