"""`lfr bench chaos`'s Qdrant-server round (#19 item 2): chosen only when LFR_QDRANT_URL is set, refused without
a way to kill and restart the server, and the benchmark's handling of the server process (start, readiness,
SIGKILL, start again on the same command).

No Qdrant server can be installed on this machine (no registry package ships its binary; see docs/operations.md),
so the process handling is checked against a stand-in HTTP process that answers Qdrant's readiness path; the
round itself runs only where a real server is given."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import pytest

from lfr.bench.chaos import QDRANT, VICTIMS, QdrantServer, add_arguments, choose_victims


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_the_qdrant_round_is_chosen_only_with_a_server():
    assert choose_victims(args(), env={}) == (list(VICTIMS), None)  # local mode: the store dies with the watchlist
    with pytest.raises(SystemExit, match="needs LFR_QDRANT_URL"):
        choose_victims(args("--victims", "qdrant", "--qdrant-pid", "1"), env={})
    server = {"LFR_QDRANT_URL": "http://127.0.0.1:6333"}
    with pytest.raises(SystemExit, match="--qdrant-pid PID and/or the --qdrant-command"):
        choose_victims(args(), env=server)
    victims, qdrant = choose_victims(args("--qdrant-pid", "4242"), env=server)
    assert victims == [*VICTIMS, QDRANT] and qdrant.pid == 4242 and qdrant.url == "http://127.0.0.1:6333"
    victims, qdrant = choose_victims(args("--victims", "qdrant,match", "--qdrant-command", "qdrant --x"), env=server)
    assert victims == [QDRANT, "match"] and qdrant.command == "qdrant --x" and not qdrant.pid
    with pytest.raises(SystemExit, match="unknown victims"):
        choose_victims(args("--victims", "qdrant-server"), env=server)


STAND_IN = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_the_server_is_killed_and_started_again_on_its_command(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    server = QdrantServer(f"http://127.0.0.1:{port}/", command=f"{sys.executable} {script} {port}",
                          log=tmp_path / "server.log")
    try:
        assert not server.ready()
        server.start(wait_s=30)
        first = server.pid
        assert server.ready()
        killed, t = server.kill()
        assert killed == first and not Path(f"/proc/{first}").exists()  # killed and reaped
        assert server.pid and server.pid != first and server.restarts == 1  # started again at once
        deadline = time.monotonic() + 30
        while not server.ready():
            assert time.monotonic() < deadline, "the restarted server never answered"
            time.sleep(0.1)
    finally:
        server.stop()
    assert server.proc.poll() is not None
    given = QdrantServer("http://127.0.0.1:1")  # neither PID nor command: nothing to kill
    with pytest.raises(RuntimeError, match="PID is not known"):
        given.kill()
