"""The service runtime written once for all six services.

`main(ServiceClass)` loads config, sets up logging and uvloop, runs `serve()`. `serve()` opens resources in
order (metrics, NATS, gRPC server with health NOT_SERVING, the service's own stores and consumers), warms up,
flips health to SERVING, waits for SIGINT/SIGTERM, then shuts down in a fixed order:

    health NOT_SERVING -> stop taking work -> finish in-flight -> server.stop(grace) -> NATS drain -> close stores
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lfr.errors import Refused
from lfr.runtime import events, metrics, subjects
from lfr.runtime.bus import Bus
from lfr.runtime.config import Config, ConfigError
from lfr.runtime.logs import get_logger, setup_logging
from lfr.runtime.rpc import bounded
from lfr.runtime.security import AuthInterceptor, Guard, Identity, server_credentials
from lfr.runtime.storage import STATUS, StorageGuard


class Service:
    """Base class of a service: a thin adapter layer over a pure core.

    Subclasses set `name`, and override `start` (register servicers and subscriptions), `warmup`,
    `stop_intake` (unsubscribe / stop sources), and `close` (stores).
    """

    name = "service"
    uses_nats = True
    runs_models = False  # detection and embedding: only they import torch (and set its threads)

    def __init__(self, config: Config):
        self.config = config
        self.log = get_logger()
        self.rt: Runtime | None = None

    async def start(self, rt: Runtime) -> None: ...

    async def warmup(self) -> None: ...

    async def stop_intake(self) -> None: ...

    async def close(self) -> None: ...


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Logs and counts every call by code and time. The one place domain errors meet gRPC: a refusal a core
    raised (lfr.errors.Refused and its kinds, lfr.runtime.limits' InputError among them) becomes its status with
    its message; an unexpected exception becomes INTERNAL with a generic message (the details go to the log,
    never to the caller)."""

    def __init__(self, service: str, storage: StorageGuard | None = None):
        self.service = service
        self.storage = storage
        self.log = get_logger(component="grpc")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        service, log, storage = self.service, self.log, self.storage

        def wrap_unary(fn):
            async def inner(request, context):
                code = "OK"
                t0 = time.perf_counter()
                try:
                    return await fn(request, context)
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as exc:
                    if context.code() not in (None, grpc.StatusCode.OK):
                        code = context.code().name
                        raise
                    if isinstance(exc, grpc.aio.AbortError):
                        code = (context.code() or grpc.StatusCode.UNKNOWN).name
                        raise
                    if isinstance(exc, Refused):
                        code = exc.code
                        await context.abort(getattr(grpc.StatusCode, code), bounded(exc.message))
                    refusal = storage.failed(exc, method) if storage is not None else None
                    if refusal is not None:  # a full or read-only disk: the caller is told which, and may retry
                        code = refusal[0]
                        await context.abort(getattr(grpc.StatusCode, code), refusal[1])
                    code = "INTERNAL"
                    log.error("rpc.failed", method=method, error=type(exc).__name__, exc_info=True)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
                finally:
                    if context.code() not in (None, grpc.StatusCode.OK) and code == "OK":
                        code = context.code().name
                    metrics.RPCS.labels(service, method, code).inc()
                    log.debug("rpc", method=method, code=code, ms=round((time.perf_counter() - t0) * 1000, 2))

            return inner

        def wrap_stream(fn):
            async def inner(request, context):
                try:
                    async for item in fn(request, context):
                        yield item
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    if isinstance(exc, Refused):
                        await context.abort(getattr(grpc.StatusCode, exc.code), bounded(exc.message))
                    log.error("rpc.failed", method=method, error=type(exc).__name__, exc_info=True)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
                finally:
                    metrics.RPCS.labels(service, method, (context.code() or grpc.StatusCode.OK).name).inc()

            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        return handler


class Runtime:
    """What a running service gets: config, logger, bus, gRPC server, executor for CPU-heavy work."""

    def __init__(self, config: Config, bus: Bus | None, server: grpc.aio.Server, health: HealthServicer):
        self.config = config
        self.bus = bus
        self.server = server
        self.health = health
        self.service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=config.service)
        self.inflight = 0
        self.storage = StorageGuard(config.service, [])  # replaced by serve()'s, which knows the stores

    def add_servicer(self, add_fn: Callable, servicer, descriptor) -> None:
        add_fn(servicer, self.server)
        self.service_names.append(descriptor.full_name)

    async def run_cpu(self, fn, *args):
        """Run CPU-heavy work (inference, decoding) off the event loop, one job at a time per process."""
        self.inflight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.inflight -= 1


def grpc_options(config: Config) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


async def serve(service_cls: type[Service], config: Config, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    log = get_logger()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)

    if config.threads and service_cls.runs_models:
        import torch  # only services that run a model pay for the import (and its ~400 MB of libraries)

        torch.set_num_threads(config.threads)
    if config.cuda_tf32:
        from lfr.models.device import allow_tf32

        allow_tf32(True)

    guard = Guard(config)  # fails fast on missing TLS/auth settings, before anything is opened
    metrics_port = metrics.start_metrics_server(config.metrics_port, config.grpc_host)
    health = HealthServicer()
    storage = StorageGuard(config.service, store_folders(config))
    creds = server_credentials(config)
    address = f"{config.grpc_host}:{config.grpc_port}"
    if storage.failing():  # a store refuses writes already: wait serving NOT_SERVING, not crash in a loop
        await refuse_until_writable(storage, config, creds, address, stop)
        if stop.is_set():
            return
    server = grpc.aio.server(interceptors=[ErrorInterceptor(config.service, storage), AuthInterceptor(guard)],
                             options=grpc_options(config))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"LFR_GRPC_PORT: cannot bind {config.grpc_host}:{config.grpc_port}")
    probe_server = None
    if config.health_port >= 0:  # status only, for probes that cannot do mutual TLS
        probe_server = grpc.aio.server(options=grpc_options(config))
        health_pb2_grpc.add_HealthServicer_to_server(health, probe_server)
        if probe_server.add_insecure_port(f"{config.grpc_host}:{config.health_port}") == 0:
            raise ConfigError(f"LFR_HEALTH_PORT: cannot bind {config.grpc_host}:{config.health_port}")

    bus = None
    service = service_cls(config)
    async with contextlib.AsyncExitStack() as stack:
        # Exit runs in reverse: executor -> NATS drain (outbox flushed, consumers done) -> close stores.
        stack.push_async_callback(service.close)
        if service.uses_nats:
            # the durable outbox is a file in the state folder when there is one (a killed process loses no fact)
            outbox = config.state_path("outbox", f"{config.service}.sqlite") if config.state_dir else ""
            bus = Bus(config.nats_url, name=f"lfr-{config.service}", service=config.service, user=config.nats_user,
                      password=config.nats_password, tls_dir=config.tls_dir, outbox_path=outbox)
            await bus.connect()
            stack.push_async_callback(bus.drain)
            await bus.ensure_streams(replicas=config.stream_replicas)
            guard.publish = access_recorder(bus, config.service)
            summaries = asyncio.create_task(_summarise(guard, config.access_summary_s), name="access-summary")
            stack.callback(guard.flush)  # the last period's summary, before the NATS drain publishes it
            stack.callback(summaries.cancel)
        rt = Runtime(config, bus, server, health)
        rt.storage = storage
        storage.bind(health, rt.service_names)
        service.rt = rt
        stack.callback(rt.executor.shutdown, wait=True)
        await service.start(rt)
        reflection.enable_server_reflection(rt.service_names, server)
        for name in rt.service_names:
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        if probe_server is not None:
            await probe_server.start()
        t0 = time.monotonic()
        await service.warmup()
        for name in rt.service_names:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("service.serving", grpc=f"{config.grpc_host}:{port}", metrics_port=metrics_port,
                 warmup_s=round(time.monotonic() - t0, 3), services=rt.service_names)
        if ready is not None:
            ready.set()
        await stop.wait()

        log.info("service.stopping")
        await health.enter_graceful_shutdown()
        await service.stop_intake()
        deadline = time.monotonic() + config.grace_s
        while rt.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await server.stop(config.grace_s)
        if probe_server is not None:
            await probe_server.stop(0)
    log.info("service.stopped")


def store_folders(config: Config) -> list[Path]:
    """The folders this service writes, where a write failing on a full or read-only disk is refused precisely
    and which the start gate probes: its outbox's folder, and its own stores' (each store's setting, else the
    state folder). Not the state folder's logs and endpoints.json: a read-only log folder stops nothing."""
    setting = {"audit": os.path.dirname(config.audit_db), "match": os.path.dirname(config.alert_db),
               "watchlist": config.watchlist_dir, "identification": ""}
    own = setting.get(config.service, "")
    if not config.state_dir:
        return [Path(own)] if own else []
    own = own or (config.state_dir if config.service in setting else "")
    return [Path(p) for p in dict.fromkeys((str(config.state_path("outbox")), own)) if p]


async def refuse_until_writable(storage: StorageGuard, config: Config, creds, address: str,
                                stop: asyncio.Event) -> None:
    """A store of this service refuses writes at start (a read-only or full disk): opening its databases would
    fail, and a restart loop tells no one why. Instead serve on the service's port, with its TLS, health
    NOT_SERVING and every call refused with the storage status naming the store (UNAVAILABLE read-only,
    RESOURCE_EXHAUSTED full), probe the stores every `storage.interval_s`, and return once all take writes again
    (the normal start follows) or when asked to stop."""
    refusal = storage.blocked(storage.failing())
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    async def refuse(request, context):
        await context.abort(getattr(grpc.StatusCode, STATUS[storage.kind]), storage.reason)

    class Refuse(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method.startswith("/grpc.health."):
                return None
            return grpc.unary_unary_rpc_method_handler(refuse)

    gate = grpc.aio.server(options=grpc_options(config))
    health_pb2_grpc.add_HealthServicer_to_server(health, gate)
    gate.add_generic_rpc_handlers((Refuse(),))
    if (gate.add_secure_port(address, creds) if creds else gate.add_insecure_port(address)) == 0:
        raise ConfigError(f"LFR_GRPC_PORT: cannot bind {address}")
    probe = None
    if config.health_port >= 0:  # the plaintext status port (Kubernetes probes): health only, as in serve()
        probe = grpc.aio.server(options=grpc_options(config))
        health_pb2_grpc.add_HealthServicer_to_server(health, probe)
        if probe.add_insecure_port(f"{config.grpc_host}:{config.health_port}") == 0:
            raise ConfigError(f"LFR_HEALTH_PORT: cannot bind {config.grpc_host}:{config.health_port}")
    await gate.start()
    if probe is not None:
        await probe.start()
    try:
        while refusal and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), storage.interval_s)
            refusal = storage.blocked(storage.failing())
    finally:
        await gate.stop(0)
        if probe is not None:
            await probe.stop(0)


async def _summarise(guard: Guard, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        guard.flush()


def access_recorder(bus: Bus, service: str) -> Callable[..., None]:
    """Every authorisation decision becomes a durable AccessEvent (the outbox retries until JetStream acks)."""
    from lfr.pb import audit_pb2

    decisions = audit_pb2.AccessDecision

    def record(method: str, ident: Identity | None, decision: str, reason: str, peer: str, count: int = 0,
               since_ns: int = 0) -> None:
        ev = audit_pb2.AccessEvent(
            envelope=events.envelope(service), service=service, method=method,
            actor=ident.subject if ident else "", peer=peer, reason=reason,
            decision=decisions.Value(f"ACCESS_DECISION_{decision}"),
            roles=sorted(ident.roles) if ident else [], credential=ident.credential if ident else "", count=count)
        if since_ns:
            ev.since.CopyFrom(events.ts_from_ns(since_ns))
        bus.publish_durable(subjects.access(service), ev, ev.envelope.event_id)

    return record


def main(service_cls: type[Service]) -> None:
    try:
        config = Config.from_env(service=service_cls.name)
    except ConfigError as exc:
        print(json.dumps({"level": "error", "event": "config.invalid", "error": str(exc)}), file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(service_cls.name, config.log_level)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        run = asyncio.run
    try:
        run(serve(service_cls, config))
    except (ConfigError, ConnectionError) as exc:
        get_logger().error("service.failed", error=str(exc))
        raise SystemExit(1) from None
