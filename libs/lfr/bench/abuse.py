"""Abuse benchmark: hostile traffic against the embedded system for a bounded time (`lfr bench abuse`).

From a few threads it sends oversized messages (over LFR_MAX_MESSAGE_BYTES), malformed protobuf bytes,
decompression-bomb images (a few hundred bytes declaring billions of pixels), calls without valid
credentials (no token, bad tokens, a plaintext connection, an unknown client certificate, no client
certificate), wrong-role and impersonating calls, and a flood from one caller (the per-caller rate limit).
It then checks that no call without valid credentials or with the wrong role got through, that every service
still answers SERVING with its process alive, and how much memory the six service processes hold.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

# Refusals of a caller without valid credentials: by the interceptor, the TLS handshake (the channel never
# becomes ready), or the transport's message size limit. Anything else means the call reached a handler.
UNAUTH_REFUSALS = frozenset({"UNAUTHENTICATED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"})
WRONG_ROLE_REFUSALS = frozenset({"PERMISSION_DENIED"})
SERVER_ERRORS = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS"})

PROVENANCE = {"source_system": "abuse-bench", "legal_basis": "load testing"}
SERVICE_OF = {"lfr.watchlist.v1.WatchlistService": "watchlist", "lfr.match.v1.MatchService": "match",
              "lfr.audit.v1.AuditService": "audit", "lfr.ingest.v1.IngestService": "ingest",
              "lfr.detection.v1.DetectionService": "detection", "lfr.embedding.v1.EmbeddingService": "embedding",
              "lfr.identification.v1.IdentificationService": "identification"}


@dataclass(frozen=True)
class ApiMethod:
    """One external gRPC method, from the descriptor pool."""

    path: str  # /lfr.watchlist.v1.WatchlistService/CreateDeployment
    service: str  # the lfr service that serves it
    request: type  # the request message class
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def api_methods() -> list[ApiMethod]:
    """Every method of the seven services' external APIs, sorted by path."""
    from google.protobuf import descriptor_pool, message_factory

    from lfr.pb import (  # noqa: F401  (registers the descriptors)
        audit_pb2,
        detection_pb2,
        embedding_pb2,
        identification_pb2,
        ingest_pb2,
        match_pb2,
        watchlist_pb2,
    )

    pool = descriptor_pool.Default()
    out = []
    for full, svc in SERVICE_OF.items():
        for m in pool.FindServiceByName(full).methods:
            out.append(ApiMethod(f"/{full}/{m.name}", svc, message_factory.GetMessageClass(m.input_type),
                                 m.client_streaming, m.server_streaming))
    return sorted(out, key=lambda m: m.path)


def _raw(b: bytes) -> bytes:
    return b


def call_full(channel: grpc.Channel, method: ApiMethod, body: bytes | list[bytes], metadata: Iterable = (),
              timeout: float = 15.0, stream_timeout: float = 1.0) -> tuple[str, str, bytes | None]:
    """One call with raw bytes (a client stream sends each of a list): (status code name, details, the response
    bytes or None). A server stream is read until its first message and then cancelled (OK: the stream was
    open), or until ``stream_timeout`` (DEADLINE_EXCEEDED: open, nothing to send yet)."""
    metadata = tuple(metadata)
    try:
        if method.client_streaming:
            bodies = body if isinstance(body, list) else [body]
            out = channel.stream_unary(method.path, _raw, _raw)(iter(bodies), timeout=timeout, metadata=metadata)
        elif method.server_streaming:
            stream = channel.unary_stream(method.path, _raw, _raw)(body, timeout=stream_timeout, metadata=metadata)
            out = next(iter(stream), None)
            stream.cancel()
        else:
            out = channel.unary_unary(method.path, _raw, _raw)(body, timeout=timeout, metadata=metadata)
        return "OK", "", out
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.CANCELLED and method.server_streaming:
            return "OK", "", None  # our own cancel after the first message
        return code.name, exc.details() or "", None


def call(channel: grpc.Channel, method: ApiMethod, body: bytes | list[bytes], metadata: Iterable = (),
         timeout: float = 15.0, stream_timeout: float = 1.0) -> tuple[str, str]:
    """:func:`call_full` without the response: (status code name, details)."""
    return call_full(channel, method, body, metadata, timeout, stream_timeout)[:2]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# Hostile images ---------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height RGB pixels (30 GB at the
    default); decoding it would inflate all of them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)) * 4, 9)  # the first rows; the rest is implied
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def tiny_image(fmt: str = "JPEG", size: int = 8) -> bytes:
    """A small valid image (grey noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def jpeg_bomb(width: int = 65_500, height: int = 65_500) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to declare width x height pixels."""
    data = bytearray(tiny_image("JPEG", 16))
    at = data.find(b"\xff\xc0")
    if at < 0:
        raise ValueError("no baseline SOF0 marker in the encoded JPEG")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def images_accepted(method: str, response: bytes) -> int:
    """How many images a batch method's OK answer says it took (they answer per image, not with a status)."""
    from lfr.pb import identification_pb2, watchlist_pb2

    if method == "EnrollEntry":
        return sum(r.accepted for r in watchlist_pb2.EnrollEntryResponse.FromString(response).results)
    if method == "AddReference":
        return watchlist_pb2.AddReferenceResponse.FromString(response).images_stored
    if method == "AddGalleryImages":
        return identification_pb2.AddGalleryImagesResponse.FromString(response).images_added
    return 0


def rss_mb(pids: Iterable[int]) -> float | None:
    """Sum of VmRSS over the processes (MB), or None when none can be read."""
    total, seen = 0, 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    seen += 1
                    break
        except (OSError, ValueError):
            continue
    return round(total / 1024, 1) if seen else None


def find_service_pids(state_dir: Path, services: Iterable[str]) -> dict[str, int]:
    """The processes of a running embedded system (`python -m lfr.<service>` with its LFR_STATE_DIR)."""
    want = {f"lfr.{s}": s for s in services}
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"-m" not in argv:
                continue
            module = argv[argv.index(b"-m") + 1].decode()
            if module not in want:
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if Path(env.get(b"LFR_STATE_DIR", b"").decode()).resolve() == state_dir.resolve():
            found[want[module]] = int(proc.name)
    return found


# The run ----------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=30.0, help="how long to send hostile traffic (default 30)")
    p.add_argument("--threads", type=int, default=4, help="sending threads, one of them the flood (default 4)")
    p.add_argument("--state-dir", default="", help="a running embedded system's state folder (`lfr up`), else "
                   "where to start one (default: a temporary folder)")
    p.add_argument("--flood-rps", type=float, default=250.0, help="rate of the one flooding caller (default 250, "
                   "5x the default LFR_RATE_LIMIT_RPS; 0 = as fast as one thread goes)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--json", action="store_true", help="one-line JSON")


class Tally:
    """Status counts per category, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_category: dict[str, Counter] = {}
        self.unauthenticated_allowed: list[str] = []
        self.wrong_role_allowed: list[str] = []
        self.server_errors: list[str] = []
        self.bombs_accepted: list[str] = []
        self.client_errors: list[str] = []  # the bench's own failures (a bug here, not in the services)

    def add(self, category: str, method: ApiMethod, code: str, details: str) -> None:
        with self.lock:
            self.by_category.setdefault(category, Counter())[code] += 1
            note = f"{category} {method.name}: {code} {details[:160]}"
            if category.startswith("unauthenticated") and code not in UNAUTH_REFUSALS:
                self.unauthenticated_allowed.append(note)
            if category in ("wrong_role", "impersonation") and code not in WRONG_ROLE_REFUSALS:
                self.wrong_role_allowed.append(note)
            if code in SERVER_ERRORS:
                self.server_errors.append(note)
            if code == "BOMB_ACCEPTED":
                self.bombs_accepted.append(note)


class Abuser:
    """The hostile callers of one system: channels, tokens, payloads."""

    def __init__(self, state_dir: Path, endpoints: dict[str, str], seed: int, work_dir: Path):
        from lfr.pb import detection_pb2, identification_pb2
        from lfr.runtime.access import Access
        from lfr.runtime.config import Config
        from lfr.runtime.devidp import find_dev_idp
        from lfr.runtime.pki import create_dev_pki
        from lfr.runtime.security import POLICY, ROLES, tls_files

        self.methods = api_methods()
        self.by_name = {m.name: m for m in self.methods}
        self.policy, self.roles = POLICY, sorted(ROLES)
        self.idp = find_dev_idp(state_dir)
        if self.idp is None:
            raise RuntimeError(f"no development identity provider under {state_dir}/security: the abuse bench "
                               "needs an embedded system's (it mints the tokens it abuses)")
        tls_dir = state_dir / "security" / "tls"
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self.endpoints = endpoints
        self.mtls = {s: Access(tls_dir, "client").channel(endpoints[s], options=opts) for s in SERVICE_OF.values()}
        ca, _, _ = tls_files(tls_dir, "client")
        foreign = create_dev_pki(work_dir / "foreign-ca", ["client"])
        _, fcert, fkey = tls_files(foreign, "client")
        self.plaintext = {s: grpc.insecure_channel(endpoints[s]) for s in SERVICE_OF.values()}
        self.unknown_cert = {s: grpc.secure_channel(endpoints[s], grpc.ssl_channel_credentials(ca, fkey, fcert))
                             for s in SERVICE_OF.values()}
        self.no_cert = {s: grpc.secure_channel(endpoints[s], grpc.ssl_channel_credentials(ca))
                        for s in SERVICE_OF.values()}
        self.tokens: dict[str, str] = {}
        self.token_lock = threading.Lock()
        self.seed = seed
        # the payloads, built once
        limit = int(os.environ.get("LFR_MAX_MESSAGE_BYTES") or Config().max_message_bytes)
        self.max_message_bytes = limit
        junk = b"\xff\xd8\xff\xe0" + random.Random(seed).randbytes(limit + 64 * 1024)
        self.oversized_bodies = {  # over the gRPC message limit: refused by the transport before any handler
            "Detect": detection_pb2.DetectRequest(image=junk).SerializeToString(),
            "Identify": identification_pb2.IdentifyRequest(image=junk, gallery="abuse", case_reference="abuse-1",
                                                      justification="abuse bench").SerializeToString(),
        }
        self.near_limit = detection_pb2.DetectRequest(image=junk[: limit - 4096]).SerializeToString()
        self.bombs = [png_bomb(), png_bomb(20_000, 20_000), jpeg_bomb(), jpeg_bomb(8_000, 8_000)]  # all > 40 Mpx
        self.deployment_id = ""

    def close(self) -> None:
        for group in (self.mtls, self.plaintext, self.unknown_cert, self.no_cert):
            for ch in group.values():
                ch.close()

    def token(self, subject: str, roles: list[str] | None = None, ttl_s: int = 900) -> str:
        key = f"{subject}|{','.join(roles if roles is not None else self.roles)}|{ttl_s}"
        with self.token_lock:
            if key not in self.tokens:
                self.tokens[key] = self.idp.mint(subject, ttl_s=ttl_s, roles=self.roles if roles is None else roles)
            return self.tokens[key]

    def setup(self) -> None:
        """A draft deployment, so that enrolment reaches image decoding."""
        from lfr.cli.live import DEMO_SITE
        from lfr.pb import watchlist_pb2
        from lfr.runtime import events

        now = time.time_ns()
        req = watchlist_pb2.CreateDeploymentRequest(
            name="abuse", purpose="abuse benchmark", legal_basis="load testing", site=DEMO_SITE,
            planned_start=events.ts_from_ns(now - 60 * 10**9), planned_end=events.ts_from_ns(now + 3600 * 10**9),
            cameras=["abuse-camera"], actor="abuse-builder")
        m = self.by_name["CreateDeployment"]
        stub = self.mtls["watchlist"].unary_unary(m.path, watchlist_pb2.CreateDeploymentRequest.SerializeToString,
                                                  watchlist_pb2.Deployment.FromString)
        self.deployment_id = stub(req, timeout=30, metadata=bearer(self.token("abuse-builder"))).id

    # one hostile call of each kind; each returns (category, method, code, details) -----------------------------
    def image_request(self, name: str, image: bytes) -> bytes:
        from lfr.pb import detection_pb2, identification_pb2, watchlist_pb2

        if name == "Detect":
            return detection_pb2.DetectRequest(image=image).SerializeToString()
        if name == "Identify":
            return identification_pb2.IdentifyRequest(image=image, gallery="abuse", case_reference="abuse-1",
                                                 justification="abuse bench").SerializeToString()
        if name == "EnrollEntry":
            return watchlist_pb2.EnrollEntryRequest(deployment_id=self.deployment_id, subject_ref="abuse-1",
                                                    category=1, images=[image], **PROVENANCE).SerializeToString()
        if name == "AddReference":
            return watchlist_pb2.AddReferenceRequest(subject_ref="abuse-ref", images=[image],
                                                     **PROVENANCE).SerializeToString()
        return identification_pb2.AddGalleryImagesRequest(gallery="abuse", subject_ref="abuse-1", images=[image],
                                                     **PROVENANCE).SerializeToString()

    def bomb(self, rng: random.Random, subject: str):
        m = self.by_name[rng.choice(["Detect", "Identify", "EnrollEntry", "AddReference", "AddGalleryImages"])]
        body = self.image_request(m.name, rng.choice(self.bombs))
        code, details, out = call_full(self.mtls[m.service], m, body, bearer(self.token(subject)))
        if out is not None and images_accepted(m.name, out):
            code, details = "BOMB_ACCEPTED", f"{m.name} accepted a decompression bomb"
        return ("bomb", m, code, details)

    def oversized(self, rng: random.Random, subject: str):
        if rng.random() < 0.25:  # as large as the transport allows: the handler's own checks
            m = self.by_name["Detect"]
            return ("oversized", m, *call(self.mtls[m.service], m, self.near_limit, bearer(self.token(subject))))
        name = rng.choice(sorted(self.oversized_bodies))
        m = self.by_name[name]
        body = self.oversized_bodies[name]
        return ("oversized", m, *call(self.mtls[m.service], m, body, bearer(self.token(subject))))

    def malformed(self, rng: random.Random, subject: str):
        m = rng.choice(self.methods)
        kind = rng.random()
        if kind < 0.4:
            body = rng.randbytes(rng.randint(1, 512))
        elif kind < 0.7:  # a valid message, truncated
            full = m.request(**({"actor": subject} if "actor" in m.request.DESCRIPTOR.fields_by_name else {}))
            for f in m.request.DESCRIPTOR.fields:
                if f.type == f.TYPE_STRING and not f.is_repeated and f.name != "actor" and not f.containing_oneof:
                    setattr(full, f.name, "x" * rng.randint(1, 64))
            raw = full.SerializeToString()
            body = raw[: rng.randint(0, max(0, len(raw) - 1))] + rng.randbytes(rng.randint(0, 3))
        else:  # hand-made wire format errors: bad UTF-8, a length past the end, deep nesting, a bad wire type
            body = rng.choice([b"\x0a\x02\xff\xfe", b"\x0a\xff\xff\xff\xff\x0f", b"\x0f\x00", b"\x08" + b"\xff" * 11,
                               b"\x12\x7f" + b"\x0a\x7f" * 60, b"\x0b" * 200, b"\xf8\xff\xff\xff\xff\x01\x00"])
        bodies: bytes | list[bytes] = [body, body] if m.client_streaming else body
        return ("malformed", m, *call(self.mtls[m.service], m, bodies, bearer(self.token(subject))))

    def unauthenticated(self, rng: random.Random, subject: str):
        m = rng.choice(self.methods)
        kind = rng.choice(["no_token", "bad_token", "expired_token", "plaintext", "unknown_cert", "no_cert"])
        meta: tuple = ()
        channels = {"plaintext": self.plaintext, "unknown_cert": self.unknown_cert,
                    "no_cert": self.no_cert}.get(kind, self.mtls)
        if kind == "bad_token":
            good = self.token(subject)
            meta = rng.choice([bearer("not-a-jwt"), (("authorization", "Basic YWRtaW46YWRtaW4="),),
                               bearer(good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")),
                               bearer(good.split(".")[0] + ".e30.")])
        elif kind == "expired_token":
            meta = bearer(self.token(subject, ttl_s=-3600))
        elif kind in ("plaintext", "unknown_cert", "no_cert"):
            meta = bearer(self.token(subject))  # a valid token does not help without the transport
        return (f"unauthenticated/{kind}", m, *call(channels[m.service], m, b"", meta, timeout=15.0))

    def wrong_role(self, rng: random.Random, subject: str):
        m = rng.choice(self.methods)
        fields = m.request.DESCRIPTOR.fields_by_name
        allowed = self.policy.get(m.path, frozenset())
        if "actor" in fields and not m.client_streaming and rng.random() < 0.3:  # right role, someone else's name
            body = m.request(actor="someone-else").SerializeToString()
            role = sorted(allowed)[0] if allowed else "auditor"
            return ("impersonation", m, *call(self.mtls[m.service], m, body,
                                              bearer(self.token(f"{subject}-{role}", [role]))))
        wrong = [r for r in self.roles if r not in allowed]
        roles = [rng.choice(wrong)] if wrong else []  # a method open to every role: a token with no role
        token = self.token(f"{subject}-wrong-{'-'.join(roles) or 'none'}", roles)
        return ("wrong_role", m, *call(self.mtls[m.service], m, b"", bearer(token)))

    def flood(self, tally: Tally, deadline: float, rps: float) -> None:
        """One caller well over its rate: the per-caller rate limit answers RESOURCE_EXHAUSTED."""
        m = self.by_name["GetPolicy"]
        meta = bearer(self.token("abuse-flood", ["auditor"]))
        t0, n = time.monotonic(), 0
        while (now := time.monotonic()) < deadline:
            if rps > 0 and n > rps * (now - t0):
                time.sleep(min(0.01, deadline - now))
                continue
            tally.add("flood", m, *call(self.mtls[m.service], m, b"", meta))
            n += 1

    def worker(self, index: int, tally: Tally, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        cycle: list[Callable] = ([self.malformed] * 4 + [self.unauthenticated] * 4 + [self.wrong_role] * 4
                                 + [self.bomb] * 2 + [self.oversized])
        n = 0
        while time.monotonic() < deadline:
            fn = cycle[n % len(cycle)]
            subject = f"abuse-{index}-{n % 16}"  # spread over callers: only the flood trips the rate limit
            n += 1
            try:
                category, method, code, details = fn(rng, subject)
            except Exception as exc:
                with tally.lock:
                    tally.client_errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}"[:300])
                continue
            tally.add(category, method, code, details)


def _total(values: dict[str, float | None]) -> float | None:
    known = [v for v in values.values() if v is not None]
    return round(sum(known), 1) if known else None


def run(args) -> dict:
    from lfr.runtime.access import Access
    from lfr.runtime.embedded import SERVICES, EmbeddedSystem, check_health

    state = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="lfr-abuse-"))
    endpoints_file = state / "endpoints.json"
    system = None
    if endpoints_file.is_file():
        endpoints = json.loads(endpoints_file.read_text())
        if check_health(endpoints["watchlist"], access=Access.dev(state)) != "SERVING":
            endpoints = {}
    else:
        endpoints = {}
    if not endpoints:
        system = EmbeddedSystem(state).start()
        endpoints = system.endpoints()
    work = Path(tempfile.mkdtemp(prefix="lfr-abuse-work-"))
    abuser = None
    try:
        pids = ({s: p.pid for s, p in system.procs.items()} if system is not None
                else find_service_pids(state, SERVICES))
        abuser = Abuser(state, endpoints, args.seed, work)
        abuser.setup()
        rss_before = {s: rss_mb([p]) for s, p in pids.items()}
        tally = Tally()
        threads_n = max(2, args.threads)
        t0 = time.monotonic()
        deadline = t0 + max(0.0, args.seconds)
        threads = [threading.Thread(target=abuser.flood, args=(tally, deadline, args.flood_rps), daemon=True)]
        threads += [threading.Thread(target=abuser.worker, args=(i, tally, deadline), daemon=True)
                    for i in range(1, threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let the services settle (in-flight work, the audit of the decisions)
        access = Access.dev(state)
        health = {s: check_health(endpoints[s], access=access, timeout=5.0) for s in SERVICES}
        alive = {s: (system.procs[s].poll() is None) if system is not None else (s in pids) for s in SERVICES}
        rss_after = {s: rss_mb([p]) for s, p in pids.items()}
    finally:
        if abuser is not None:
            abuser.close()
        if system is not None:
            system.stop()
        shutil.rmtree(work, ignore_errors=True)
        if not args.state_dir:  # its own temporary system: the development keys, the images it sent
            shutil.rmtree(state, ignore_errors=True)
    status = Counter()
    for counts in tally.by_category.values():
        status.update(counts)
    healthy = all(v == "SERVING" for v in health.values()) and all(alive.values())
    result = {
        "requests": sum(status.values()),
        "status_counts": dict(sorted(status.items())),
        "categories": {k: {"requests": sum(v.values()), "status_counts": dict(sorted(v.items()))}
                       for k, v in sorted(tally.by_category.items())},
        "unauthenticated_allowed": len(tally.unauthenticated_allowed),
        "wrong_role_allowed": len(tally.wrong_role_allowed),
        "rate_limited": tally.by_category.get("flood", Counter())["RESOURCE_EXHAUSTED"],
        "server_errors": len(tally.server_errors),
        "client_errors": len(tally.client_errors),
        "healthy_after": healthy,
        "health": health,
        "alive": alive,
        "bombs_accepted": len(tally.bombs_accepted),
        "rss_mb_before": _total(rss_before),
        "rss_mb_after": _total(rss_after),
        "rss_mb_by_service": {s: [rss_before.get(s), rss_after.get(s)] for s in SERVICES},
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(sum(status.values()) / elapsed, 1) if elapsed else 0.0,
        "threads": threads_n,
        "max_message_bytes": abuser.max_message_bytes,
        "examples": {"unauthenticated_allowed": tally.unauthenticated_allowed[:5],
                     "wrong_role_allowed": tally.wrong_role_allowed[:5], "server_errors": tally.server_errors[:5],
                     "client_errors": tally.client_errors[:5]},
        "state_dir": args.state_dir or "(a temporary folder, removed)",
    }
    result["ok"] = (healthy and not result["unauthenticated_allowed"] and not result["wrong_role_allowed"]
                    and not result["bombs_accepted"] and not result["client_errors"])
    return result
