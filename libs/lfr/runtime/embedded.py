"""The embedded default: a real nats-server, Qdrant local mode and all seven services as separate processes
on loopback, sharing one state folder. Used by `lfr up`, `lfr demo`, `lfr bench pipeline` and the tests.

Supervision (`supervise=True`, as `lfr up` runs it): a process that exits or is killed is started again, as
Kubernetes would, after a backoff (0 s after a stable run, then 1, 2, 4 ... 30 s while it keeps failing); every
restart is counted, logged (`<state>/logs/supervisor.log`) and written to `<state>/endpoints.json`
("supervisor"). No process outlives the system: every child is started with a parent-death signal (SIGKILL when
the thread that started it ends: the supervisor was killed) and in one process group of its own (the
system's: `pgid` in endpoints.json), away from the terminal's, so Ctrl-C reaches the supervisor only and the
supervisor stops them in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lfr.runtime import framering, natsauth
from lfr.runtime.bus import Bus
from lfr.runtime.natsserver import NatsServer, free_ports

SERVICES = ("watchlist", "embedding", "detection", "match", "ingest", "identification", "audit")
# Stop the producers first, the record keepers last, so in-flight facts reach the audit.
STOP_ORDER = ("ingest", "identification", "detection", "embedding", "match", "watchlist", "audit")
TARGET_KEYS = {"detection": "LFR_DETECTION_TARGET", "embedding": "LFR_EMBEDDING_TARGET",
               "watchlist": "LFR_WATCHLIST_TARGET"}
NATS = "nats"  # the supervised nats-server's name in restart counts and status
# Services that may run more than one process here (`lfr up --replicas match=2,detection=2,embedding=2`): detection
# and embedding share the live flow through NATS queue groups, match replicas each read their partitions of the
# embeddings (by camera). Replica 0 keeps the service's name ("match"), the others are "match-1", "match-2", ...
REPLICABLE = ("detection", "embedding", "match")
CONSOLE = "console"  # the operator console (HTTP), started once the services serve (not when insecure)

# Every child starts through this launcher: it sets SIGKILL as its own parent-death signal (kept across the exec)
# and, unless its parent already died, execs the real program. (A preexec_fn would do the same in the forked
# child, but runs Python there: in a process with gRPC threads that child can abort in gRPC's fork handlers,
# as seen in the chaos benchmark; the launcher lets Popen spawn without running any Python in between.)
LAUNCHER = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(args: list[str]) -> list[str]:
    """The command line that runs `args` as a child that gets SIGKILL when the thread that started it ends (its
    supervisor died)."""
    return [sys.executable, "-c", LAUNCHER, str(os.getpid()), *map(str, args)]


class Backoff:
    """Restart delays of one process: 0 s after a run of at least `stable_s`, then 1, 2, 4 ... `max_s`."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0, stable_s: float = 30.0):
        self.first_s, self.max_s, self.stable_s = first_s, max_s, stable_s
        self.failures = 0

    def delay(self, ran_s: float) -> float:
        if ran_s >= self.stable_s:
            self.failures = 0
        d = 0.0 if self.failures == 0 else min(self.max_s, self.first_s * 2 ** (self.failures - 1))
        self.failures += 1
        return d


def service_of(process: str) -> str:
    """The service a process runs: "match-1" -> "match"."""
    base, _, n = process.rpartition("-")
    return base if base and n.isdigit() else process


def replica_of(process: str) -> int:
    base, _, n = process.rpartition("-")
    return int(n) if base and n.isdigit() else 0


def parse_replicas(text: str) -> dict[str, int]:
    """`match=2,detection=2` -> {"match": 2, "detection": 2}; ValueError naming what is wrong."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, _, n = item.partition("=")
        if name not in REPLICABLE:
            raise ValueError(f"--replicas: {name!r} cannot run replicas here (only {', '.join(REPLICABLE)}: "
                             "watchlist and audit are single writers, ingest holds its sources)")
        if not n.isdigit() or not 1 <= int(n) <= 12:
            raise ValueError(f"--replicas: {item!r}: the number of replicas must be 1 to 12")
        out[name] = int(n)
    return out


class EmbeddedSystem:
    def __init__(self, state_dir: str | Path, env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 insecure: bool = False, media_roots=(), supervise: bool = False, log=None, console: bool = True,
                 replicas: dict[str, int] | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.host = host
        self.extra_env = dict(env or {})
        self.insecure = insecure  # plaintext and unauthenticated: only when asked for explicitly
        self.media_roots = [Path(r).resolve() for r in media_roots]  # beyond <state>/media and the shared data
        self.security: dict[str, str] = {}
        self.replicas = {s: n for s, n in (replicas or {}).items() if n != 1}
        parse_replicas(",".join(f"{s}={n}" for s, n in self.replicas.items()))  # the same checks as the CLI's
        # every process: a service's replicas right after it ("match", "match-1", ...)
        self.names = [f"{s}-{i}" if i else s for s in SERVICES for i in range(self.replicas.get(s, 1))]
        ports = free_ports(2 * len(self.names) + 2, host)
        self.console_port = ports.pop() if console and not insecure else 0  # the console needs the dev IdP
        self.nats = NatsServer(self.state_dir / "nats", port=ports.pop())
        self.nats_secrets = self.state_dir / "security" / "nats"  # a password per service (and admin), 0600
        self.ports = {s: ports.pop() for s in self.names}
        self.metrics_ports = {s: ports.pop() for s in self.names}
        self.procs: dict[str, subprocess.Popen] = {}
        # Supervision: restarts per process, what ended each one last, when each was started
        self.supervised = supervise
        self.restarts: dict[str, int] = {}
        self.last_exit: dict[str, dict] = {}
        self.started_at: dict[str, float] = {}
        self.backoff: dict[str, Backoff] = {}
        self.due: dict[str, float] = {}  # process -> monotonic time of its planned restart
        self.pgid = 0  # the system's process group (every child), 0 until the first child starts
        self.stopping = threading.Event()  # set by stop(): nothing is restarted any more, start() gives up
        self.lock = threading.RLock()  # one change of the process table at a time
        self._log = log  # callable(dict) for supervisor events, besides <state>/logs/supervisor.log
        self._thread: threading.Thread | None = None
        self._thread_exit = threading.Event()
        self.supervisor_metrics = ""  # URL of the supervisor's own metrics (restarts), when it serves them
        self.nats.popen = self._popen

    def endpoint(self, service: str) -> str:
        return f"{self.host}:{self.ports[service]}"

    def replica_endpoints(self, service: str) -> list[str]:
        """The gRPC addresses of a service's processes, replica 0 first."""
        return [self.endpoint(p) for p in self.names if service_of(p) == service]

    def service_env(self, service: str) -> dict[str, str]:
        process, service = service, service_of(service)  # a replica runs its service as the service's user
        env = dict(os.environ)
        env.update({
            "LFR_NATS_URL": self.nats.url, "LFR_STATE_DIR": str(self.state_dir), "LFR_GRPC_HOST": self.host,
            "LFR_GRPC_PORT": str(self.ports[process]), "LFR_METRICS_PORT": str(self.metrics_ports[process]),
            "LFR_NATS_USER": service, "LFR_NATS_PASSWORD_FILE": str(natsauth.password_file(self.nats_secrets, service)),
        })
        if service == "match" and self.replicas.get("match", 1) > 1:  # its partitions, its peers (lfr.match.replicas)
            env.update({"LFR_MATCH_REPLICAS": str(self.replicas["match"]), "LFR_MATCH_REPLICA": str(replica_of(process)),
                        "LFR_MATCH_PEERS": ",".join(self.replica_endpoints("match"))})
        env.update({key: self.endpoint(s) for s, key in TARGET_KEYS.items()})
        if self.insecure:
            env["LFR_INSECURE"] = "1"
        else:
            env.update({"LFR_TLS_DIR": self.security["tls_dir"], "LFR_AUTH_KEYS_DIR": self.security["auth_keys_dir"],
                        "LFR_AUTH_ISSUER": "lfr-dev-idp", "LFR_AUTH_AUDIENCE": "lfr"})
        env.setdefault("LFR_THREADS", "1" if (os.cpu_count() or 1) <= 2 else "")
        if framering.available():  # every service on this machine: frames go from ingest to detection in memory
            env.setdefault("LFR_FRAME_ENCODING", "shm")
        # torch threads spin between layers by default; several model processes on few cores then stall.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from lfr.runtime.paths import data_dir  # file inputs must lie in LFR_MEDIA_ROOTS; unless set: these
        roots = (self.state_dir / "media", data_dir(required=False), *self.media_roots)
        env.setdefault("LFR_MEDIA_ROOTS", os.pathsep.join(str(r) for r in roots if r))
        env.update(self.extra_env)
        return env

    def console_env(self) -> dict[str, str]:
        """The console: a client of ingest, watchlist, match, audit and identification with the generic client
        certificate, signing people in with the development identity provider (see docs/console.md)."""
        env = dict(os.environ)
        env.update({"LFR_STATE_DIR": str(self.state_dir), "LFR_CONSOLE_HOST": self.host,
                    "LFR_CONSOLE_PORT": str(self.console_port), "LFR_CONSOLE_AUTH": "dev",
                    "LFR_TLS_DIR": self.security["tls_dir"], "LFR_CLIENT_CERT": "client",
                    "LFR_AUTH_KEYS_DIR": self.security["auth_keys_dir"], "LFR_AUTH_ISSUER": "lfr-dev-idp",
                    "LFR_AUTH_AUDIENCE": "lfr"})
        env.update({f"LFR_{s.upper()}_TARGET": self.endpoint(s)
                    for s in ("ingest", "watchlist", "match", "audit", "identification")})
        env.update(self.extra_env)
        return env

    def console_url(self) -> str:
        return f"http://{self.host}:{self.console_port}/" if self.console_port else ""

    def wait_console(self, timeout_s: float = 30.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.console_url() + "healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            proc = self.procs.get(CONSOLE)
            if (proc is not None and proc.poll() is not None and not self.supervised) or time.monotonic() > deadline:
                tail = (self.state_dir / "logs" / f"{CONSOLE}.log").read_text()[-2000:]
                raise RuntimeError(f"the console did not start at {self.console_url()}:\n{tail}")
            time.sleep(0.1)

    def _spawn_kwargs(self) -> dict:
        """Popen arguments of every child: the system's process group, and death with the supervisor."""
        group = self.pgid
        if group:
            try:
                os.killpg(group, 0)
            except OSError:  # every member ended: the next child leads a new group
                group = 0
        return {"process_group": group}

    def _popen(self, args, **kwargs) -> subprocess.Popen:
        args = die_with_parent(args)
        spawn = self._spawn_kwargs()
        try:
            proc = subprocess.Popen(args, **spawn, **kwargs)
        except PermissionError:  # the group ended between the check and the child joining it
            proc = subprocess.Popen(args, **{**spawn, "process_group": 0}, **kwargs)
            spawn["process_group"] = 0
        if not spawn["process_group"]:
            self.pgid = proc.pid
        return proc

    def start_service(self, service: str) -> None:
        with self.lock, self._log_file(service) as out:
            env = self.console_env() if service == CONSOLE else self.service_env(service)
            self.procs[service] = self._popen([sys.executable, "-m", f"lfr.{service_of(service)}"], env=env,
                                              stdout=out, stderr=out, stdin=subprocess.DEVNULL)
            self.started_at[service] = time.monotonic()

    def _log_file(self, service: str):
        """<state>/logs/<service>.log opened for appending; where it cannot be (the state folder full or
        read-only) the service starts all the same, its output discarded, and the supervisor logs why."""
        logs = self.state_dir / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
            return open(logs / f"{service}.log", "ab")
        except OSError as exc:
            self.log_event("process.log_unwritable", process=service, error=str(exc)[:300])
            return open(os.devnull, "ab")

    def start(self, timeout_s: float = 180.0) -> EmbeddedSystem:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.insecure:  # a development CA, certificates and identity provider under <state>/security
            from lfr.runtime.devidp import create_dev_security

            self.security = create_dev_security(self.state_dir, SERVICES, hosts=("localhost", self.host))
        # NATS: a user per service with only its own subjects; mutual TLS with the development CA unless insecure
        files = natsauth.write_credentials(self.nats_secrets, natsauth.PERMISSIONS)
        self.nats.auth = natsauth.server_auth_config(natsauth.read_passwords(files))
        self.nats.tls_dir = None if self.insecure else Path(self.security["tls_dir"])
        self.stopping.clear()
        try:
            with self.lock:
                self.nats.start()
                self.started_at[NATS] = time.monotonic()
            for s in self.names:
                self.start_service(s)
            self.wait_healthy(self.names, timeout_s)
            if self.console_port:
                self.start_service(CONSOLE)
                self.wait_console()
        except BaseException:
            self.stop()
            raise
        self.write_endpoints()
        if self.supervised:
            self.supervise()
        return self

    def endpoints(self) -> dict:
        metrics = {s: f"http://{self.host}:{p}/metrics" for s, p in self.metrics_ports.items()}
        if self.supervisor_metrics:
            metrics["supervisor"] = self.supervisor_metrics
        return {"nats": self.nats.url, **{s: self.endpoint(s) for s in SERVICES},
                **({"console": self.console_url()} if self.console_port else {}), "metrics": metrics,
                "replicas": {s: self.replica_endpoints(s) for s in self.replicas},
                "supervisor": self.status()}

    def write_endpoints(self) -> None:
        """endpoints.json, replaced atomically (readers never see half a file)."""
        path = self.state_dir / "endpoints.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.endpoints(), indent=2))
        tmp.replace(path)

    # Supervision -------------------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        """The pid of every process of the system now running (services, nats-server)."""
        with self.lock:
            out = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
            if self.nats.proc is not None and self.nats.proc.poll() is None:
                out[NATS] = self.nats.proc.pid
        return out

    def status(self) -> dict:
        """What `lfr status` and endpoints.json show: supervisor, process group, per process pid and restarts."""
        pids = self.pids()
        names = [NATS, *self.procs, *(n for n in self.restarts if n not in self.procs and n != NATS)]
        return {"pid": os.getpid(), "supervising": self.supervised, "pgid": self.pgid,
                "processes": {n: {"pid": pids.get(n, 0), "restarts": self.restarts.get(n, 0),
                                  "last_exit": self.last_exit.get(n)} for n in dict.fromkeys(names)}}

    def log_event(self, event: str, **fields) -> None:
        """A supervisor event: one JSON line in <state>/logs/supervisor.log and to the `log` callable; a failed
        write (a full disk, a closed pipe) is never raised."""
        line = {"time": round(time.time(), 3), "level": "warning" if event != "process.restarted" else "info",
                "event": event, **fields}
        try:
            (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / "logs" / "supervisor.log", "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:
            pass
        if self._log is not None:
            try:
                self._log(line)
            except Exception:  # noqa: BLE001 - a broken output never stops the supervisor
                pass

    def _exited(self) -> dict[str, int]:
        """Managed processes that ended without being asked to: name -> exit code (-N: signal N)."""
        out = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if self.nats.proc is not None and self.nats.proc.poll() is not None:
            out[NATS] = self.nats.proc.returncode
        return out

    def supervise_once(self) -> list[str]:
        """One look at every process: plan the restart of those that ended, do the restarts that are due.
        Returns the names restarted now. Never waits for health (the restarted service reports it)."""
        restarted = []
        with self.lock:
            if self.stopping.is_set():
                return restarted
            now = time.monotonic()
            for name, code in self._exited().items():
                if name not in self.due:
                    ran = now - self.started_at.get(name, now)
                    delay = self.backoff.setdefault(name, Backoff()).delay(ran)
                    self.due[name] = now + delay
                    self.last_exit[name] = {"code": code, "signal": signal.Signals(-code).name if code < 0 else "",
                                            "ran_s": round(ran, 2), "at": round(time.time(), 3)}
                    self.log_event("process.exited", process=name, code=code, ran_s=round(ran, 2),
                                   restart_in_s=delay)
                if self.due[name] > now:
                    continue
                try:
                    if name == NATS:
                        self.nats.proc = None
                        self.nats.start()
                        self.started_at[NATS] = time.monotonic()
                    else:
                        self.start_service(name)
                except Exception as exc:  # noqa: BLE001 - e.g. the port still held: try again later
                    self.due[name] = now + self.backoff[name].delay(0.0)
                    self.log_event("process.restart_failed", process=name, error=str(exc)[:300])
                    continue
                del self.due[name]
                self.restarts[name] = self.restarts.get(name, 0) + 1
                RESTARTS.labels(name).inc()
                restarted.append(name)
                self.log_event("process.restarted", process=name, restarts=self.restarts[name],
                               pid=self.pids().get(name, 0))
            if restarted:
                try:
                    self.write_endpoints()
                except OSError:
                    pass
        return restarted

    def supervise(self, interval_s: float = 0.25) -> None:
        """Supervise in a background thread until stop() (which ends the thread only after every process it
        started has stopped: their parent-death signal belongs to this thread)."""
        self.supervised = True
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread_exit.clear()

        def loop() -> None:
            while not self._thread_exit.wait(interval_s):
                try:
                    self.supervise_once()
                except Exception as exc:  # noqa: BLE001 - the supervisor itself never dies of one error
                    self.log_event("supervisor.error", error=str(exc)[:300])

        self._thread = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._thread.start()

    def wait_healthy(self, services, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(services)
        while pending:
            if self.stopping.is_set():
                raise RuntimeError("stopped while starting")
            for s in pending:  # a service that died fails the start at once, with its log
                proc = self.procs[s]
                if proc.poll() is not None and not self.supervised:
                    tail = (self.state_dir / "logs" / f"{s}.log").read_text()[-2000:]
                    raise RuntimeError(f"service {s} exited with {proc.returncode}:\n{tail}")
            if check_health(self.endpoint(pending[0]), access=self.access()) == "SERVING":
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {pending[0]} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop_service(self, service: str, timeout_s: float = 20.0) -> None:
        with self.lock:
            proc = self.procs.pop(service, None)
            self.due.pop(service, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart_service(self, service: str, timeout_s: float = 120.0) -> None:
        self.stop_service(service)
        self.start_service(service)
        self.wait_healthy([service], timeout_s)

    def stop(self) -> None:
        """Stop every process, producers first, nats-server last; then the supervisor thread (after them)."""
        self.stopping.set()
        try:
            order = {s: i for i, s in enumerate(STOP_ORDER)}  # a service's replicas stop with it
            for s in sorted(self.procs, key=lambda p: order.get(service_of(p), len(order))):
                try:
                    self.stop_service(s)
                except Exception as exc:  # noqa: BLE001 - one failure never leaves the others running
                    self.log_event("stop.failed", process=s, error=str(exc)[:300])
                    with self.lock:
                        proc = self.procs.pop(s, None)
                    if proc is not None:
                        proc.kill()
            with self.lock:
                self.due.clear()
            self.nats.stop()
        finally:
            self._thread_exit.set()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(5)

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


def _restarts_counter():
    from prometheus_client import Counter

    return Counter("lfr_process_restarts", "restarts of an embedded system's process by its supervisor",
                   ["process"])


RESTARTS = _restarts_counter()


def check_health(target: str, service: str = "", timeout: float = 1.0, access=None) -> str:
    """Health status name of a service; ``access`` supplies the TLS client certificate (health needs no token)."""
    try:
        with (access.channel(target) if access is not None else grpc.insecure_channel(target)) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                       timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as exc:
        return exc.code().name
