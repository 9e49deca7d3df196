"""The embedded default: a real nats-server, Qdrant local mode and all six services as separate processes
on loopback, sharing one state folder. Used by `lfr up`, `lfr demo`, `lfr bench pipeline` and the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lfr.runtime import natsauth
from lfr.runtime.bus import Bus
from lfr.runtime.natsserver import NatsServer, free_ports

SERVICES = ("watchlist", "embedding", "detection", "match", "ingest", "audit")
# Stop the producers first, the record keepers last, so in-flight facts reach the audit.
STOP_ORDER = ("ingest", "detection", "embedding", "match", "watchlist", "audit")
TARGET_KEYS = {"detection": "LFR_DETECTION_TARGET", "embedding": "LFR_EMBEDDING_TARGET",
               "watchlist": "LFR_WATCHLIST_TARGET"}


class EmbeddedSystem:
    def __init__(self, state_dir: str | Path, env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 insecure: bool = False, media_roots=()):
        self.state_dir = Path(state_dir).resolve()
        self.host = host
        self.extra_env = dict(env or {})
        self.insecure = insecure  # plaintext and unauthenticated: only when asked for explicitly
        self.media_roots = [Path(r).resolve() for r in media_roots]  # beyond <state>/media and the shared data
        self.security: dict[str, str] = {}
        ports = free_ports(2 * len(SERVICES) + 1, host)
        self.nats = NatsServer(self.state_dir / "nats", port=ports.pop())
        self.nats_secrets = self.state_dir / "security" / "nats"  # a password per service (and admin), 0600
        self.ports = {s: ports.pop() for s in SERVICES}
        self.metrics_ports = {s: ports.pop() for s in SERVICES}
        self.procs: dict[str, subprocess.Popen] = {}

    def endpoint(self, service: str) -> str:
        return f"{self.host}:{self.ports[service]}"

    def service_env(self, service: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "LFR_NATS_URL": self.nats.url, "LFR_STATE_DIR": str(self.state_dir), "LFR_GRPC_HOST": self.host,
            "LFR_GRPC_PORT": str(self.ports[service]), "LFR_METRICS_PORT": str(self.metrics_ports[service]),
            "LFR_NATS_USER": service, "LFR_NATS_PASSWORD_FILE": str(natsauth.password_file(self.nats_secrets, service)),
        })
        env.update({key: self.endpoint(s) for s, key in TARGET_KEYS.items()})
        if self.insecure:
            env["LFR_INSECURE"] = "1"
        else:
            env.update({"LFR_TLS_DIR": self.security["tls_dir"], "LFR_AUTH_KEYS_DIR": self.security["auth_keys_dir"],
                        "LFR_AUTH_ISSUER": "lfr-dev-idp", "LFR_AUTH_AUDIENCE": "lfr"})
        env.setdefault("LFR_THREADS", "1" if (os.cpu_count() or 1) <= 2 else "")
        # torch threads spin between layers by default; several model processes on few cores then stall.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from lfr.runtime.paths import data_dir  # file inputs must lie in LFR_MEDIA_ROOTS; unless set: these
        roots = (self.state_dir / "media", data_dir(required=False), *self.media_roots)
        env.setdefault("LFR_MEDIA_ROOTS", os.pathsep.join(str(r) for r in roots if r))
        env.update(self.extra_env)
        return env

    def start_service(self, service: str) -> None:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{service}.log", "ab")
        self.procs[service] = subprocess.Popen(
            [sys.executable, "-m", f"lfr.{service}"], env=self.service_env(service), stdout=out, stderr=out,
            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def start(self, timeout_s: float = 180.0) -> EmbeddedSystem:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.insecure:  # a development CA, certificates and identity provider under <state>/security
            from lfr.runtime.devidp import create_dev_security

            self.security = create_dev_security(self.state_dir, SERVICES, hosts=("localhost", self.host))
        # NATS: a user per service with only its own subjects; mutual TLS with the development CA unless insecure
        files = natsauth.write_credentials(self.nats_secrets, natsauth.PERMISSIONS)
        self.nats.auth = natsauth.server_auth_config(natsauth.read_passwords(files))
        self.nats.tls_dir = None if self.insecure else Path(self.security["tls_dir"])
        self.nats.start()
        try:
            for s in SERVICES:
                self.start_service(s)
            self.wait_healthy(SERVICES, timeout_s)
        except BaseException:
            self.stop()
            raise
        (self.state_dir / "endpoints.json").write_text(json.dumps(self.endpoints(), indent=2))
        return self

    def endpoints(self) -> dict:
        return {"nats": self.nats.url, **{s: self.endpoint(s) for s in SERVICES},
                "metrics": {s: f"http://{self.host}:{p}/metrics" for s, p in self.metrics_ports.items()}}

    def wait_healthy(self, services, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(services)
        while pending:
            for s in pending:  # a service that died fails the start at once, with its log
                proc = self.procs[s]
                if proc.poll() is not None:
                    tail = (self.state_dir / "logs" / f"{s}.log").read_text()[-2000:]
                    raise RuntimeError(f"service {s} exited with {proc.returncode}:\n{tail}")
            if check_health(self.endpoint(pending[0]), access=self.access()) == "SERVING":
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {pending[0]} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop_service(self, service: str, timeout_s: float = 20.0) -> None:
        proc = self.procs.pop(service, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart_service(self, service: str, timeout_s: float = 120.0) -> None:
        self.stop_service(service)
        self.start_service(service)
        self.wait_healthy([service], timeout_s)

    def stop(self) -> None:
        for s in STOP_ORDER:
            self.stop_service(s)
        self.nats.stop()

    def nats_admin_credentials(self) -> tuple[str, str]:
        """(user, password) of the NATS admin user: reads the durable facts, never the biometric flow."""
        return natsauth.ADMIN, natsauth.password_file(self.nats_secrets, natsauth.ADMIN).read_text().strip()

    def nats_admin_bus(self, name: str = "admin") -> Bus:
        """A Bus (not connected) as the NATS admin user, with the 'client' certificate when TLS is on."""
        user, password = self.nats_admin_credentials()
        return Bus(self.nats.url, name, service=user, user=user, password=password,
                   tls_dir=self.nats.tls_dir or "", tls_cert="client")

    def access(self, user: str | None = None, follow_actor: bool = False, roles=None):
        """How a client reaches this system (see lfr.runtime.access): mTLS + dev-IdP tokens, or plaintext."""
        from lfr.runtime.access import Access

        if self.insecure:
            return Access.insecure()
        return Access.dev(self.state_dir, user=user, follow_actor=follow_actor, roles=roles)

    def add_dev_user(self, name: str, roles=None) -> str:
        """Add a user to the development identity provider (default: every human role); returns the name."""
        from lfr.runtime.devidp import find_dev_idp
        from lfr.runtime.security import HUMAN_ROLES

        find_dev_idp(self.state_dir).add_user(name, HUMAN_ROLES if roles is None else roles)
        return name

    def __enter__(self) -> EmbeddedSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_health(target: str, service: str = "", timeout: float = 1.0, access=None) -> str:
    """Health status name of a service; ``access`` supplies the TLS client certificate (health needs no token)."""
    try:
        with (access.channel(target) if access is not None else grpc.insecure_channel(target)) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                       timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as exc:
        return exc.code().name
