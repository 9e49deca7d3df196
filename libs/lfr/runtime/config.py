"""Typed configuration from LFR_* environment variables (and *_FILE secret files).

One frozen dataclass serves every service; each reads the fields it needs. A bad value raises ConfigError
naming the key (never the environment's contents).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "LFR_"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def _opt(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Config:
    service: str = _opt("", "service name (set by the entry point)")
    nats_url: str = _opt("nats://127.0.0.1:4222", "NATS server URL(s), comma separated")
    grpc_host: str = _opt("127.0.0.1", "gRPC listen address (0.0.0.0 in a container)")
    grpc_port: int = _opt(0, "gRPC listen port (0 = pick a free port and report it)")
    metrics_port: int = _opt(0, "Prometheus metrics port (0 = pick a free port, -1 = off)")
    health_port: int = _opt(-1, "plaintext gRPC port serving only grpc.health.v1 (status, no data) for Kubernetes "
                            "probes, which cannot present a client certificate (-1 = off)")
    log_level: str = _opt("info", "debug, info, warning or error")
    state_dir: str = _opt("", "folder for the embedded default's state (NATS store, Qdrant, audit DB)")
    model: str = _opt("", "live model id (empty = the library default)")
    device: str = _opt("", "torch device: cpu, cuda, or empty for cuda-when-present")
    threads: int = _opt(0, "torch intra-op threads (0 = torch default)")
    freshness_ms: int = _opt(1000, "frames, faces and embeddings older than this are dropped")
    max_message_bytes: int = _opt(8 * 1024 * 1024, "largest gRPC message accepted")
    max_image_pixels: int = _opt(40_000_000, "largest image (width x height) decoded")
    detect_max_side: int = _opt(960, "frames are downscaled so the longer side is at most this before detection")
    detect_fast_side: int = _opt(640, "live: frames are detected at this longer side, and one in "
                                 "LFR_DETECT_FULL_EVERY per camera at LFR_DETECT_MAX_SIDE (a second look for faces "
                                 "too small at the fast scale, followed by the tracker in between); 0 = every frame "
                                 "at LFR_DETECT_MAX_SIDE")
    detect_full_every: int = _opt(5, "live: one frame in this many per camera is detected at LFR_DETECT_MAX_SIDE")
    detection_batch: int = _opt(1, "frames per detector batch (more helps on a GPU; on a CPU it only adds latency)")
    embedding_batch: int = _opt(4, "faces per embedder batch (frames are batched until their faces reach this)")
    flip: str = _opt("off", "test-time flip averaging in the embedding service: on, off, or model (the model's "
                     "default); on doubles the embedding cost")
    queue_size: int = _opt(8, "bounded queue per stage; the oldest item is dropped (and counted) when full")
    ingest_fps: float = _opt(10.0, "default sampling rate of pulled sources")
    jpeg_quality: int = _opt(90, "JPEG quality of frames published by ingest")
    frame_encoding: str = _opt("raw", "how ingest hands a pulled source's frames to detection: shm (the decoded "
                               "YUV 4:2:0 planes in a shared-memory ring, only their place on NATS: least CPU, for "
                               "ingest and detection on one machine; `lfr up` sets it), raw (the planes on NATS, "
                               "3 MB a 1080p frame) or jpeg (about 10x less traffic than raw)")
    live_embed_interval_ms: float = _opt(300.0, "live: a face tracked from frame to frame (by box overlap, per "
                                         "camera) is embedded at most this often, or sooner when clearly better; "
                                         "0 = embed every face of every frame")
    live_embed_max_per_s: float = _opt(20.0, "live: in a crowd, a camera's tracked faces are re-embedded at most "
                                       "this often a second together (LFR_LIVE_EMBED_INTERVAL_MS grows with the "
                                       "faces in view; a new face is always embedded at once); 0 = no limit")
    live_embed_follow_ms: float = _opt(250.0, "live: a new face's next LFR_ALERT_MIN_FRAMES - 1 embeddings, and the "
                                       "next one of a face whose pass match waits on, are due this soon after the "
                                       "last (evidence for the pass rule, LFR_ALERT_EVIDENCE_GAP_MS apart, without "
                                       "waiting for a crowd's longer interval); 0 = they wait for the interval")
    min_face_px: float = _opt(16.0, "faces with a smaller inter-eye distance (px) are not embedded or matched live")
    detection_target: str = _opt("127.0.0.1:50052", "detection service gRPC address")
    embedding_target: str = _opt("127.0.0.1:50053", "embedding service gRPC address")
    watchlist_target: str = _opt("127.0.0.1:50054", "watchlist service gRPC address")
    identification_target: str = _opt("127.0.0.1:50057", "identification service gRPC address (console)")
    qdrant_url: str = _opt("", "Qdrant server URL (empty = local mode under the state dir)")
    qdrant_api_key: str = _opt("", "Qdrant API key (use LFR_QDRANT_API_KEY_FILE for a secret file)")
    audit_db: str = _opt("", "audit index SQLite path (empty = <state dir>/audit.sqlite)")
    watchlist_dir: str = _opt("", "folder of the watchlist's own stores: its database (deployments, entries, its "
                              "outbox), the watchlist and reference images, Qdrant local mode (empty = the state "
                              "dir); its own volume lets a full or read-only disk be met by the watchlist alone")
    stream_replicas: int = _opt(1, "JetStream replicas of the platform's durable streams (3 on a 3-node cluster)")
    stats_interval_s: float = _opt(2.0, "how often match publishes its counters")
    track_gap_s: float = _opt(1.5, "a pass ends when its tracked face has not been matched for this long")
    alert_min_frames: int = _opt(2, "a pass raises its alert once this many of its frames match the same entry "
                                 "(1 = the first matching frame raises: the per-frame rule; the rules are "
                                 "compared on the walk-by suite in docs/benchmarks.md)")
    alert_strong_margin: float = _opt(0.08, "... or at once when one frame scores this far above the threshold "
                                      "(0 = never)")
    alert_evidence_gap_ms: float = _opt(250.0, "matching frames of a pass count as separate evidence only this far "
                                        "apart (neighbouring frames of one face are nearly the same picture)")
    realert_window_s: float = _opt(120.0, "a watchlist entry raises no new alert in a deployment until it has gone "
                                   "unseen this long; sightings within the window update its open alert")
    alert_update_interval_s: float = _opt(1.0, "while a pass goes on, its alert is re-published with a better "
                                          "probe at most this often")
    adjudication_due_s: float = _opt(900.0, "an alert not adjudicated this long after it was raised is flagged")
    alert_retention_s: float = _opt(31 * 86400.0, "alert probe crops and reference copies are deleted this long "
                                    "after the alert (default 31 days); the deletion is audited")
    alert_sweep_interval_s: float = _opt(5.0, "how often match applies the retention and adjudication-due rules")
    alert_db: str = _opt("", "match's alert review store, SQLite (empty = <state dir>/match-alerts.sqlite, "
                         "replica i > 0: match-alerts-<i>.sqlite)")
    match_replicas: int = _opt(1, "match replicas: they share the embeddings' partitions by camera (at most "
                               "lfr.runtime.subjects.MATCH_PARTITIONS, 12)")
    match_replica: int = _opt(0, "this match replica's index, 0 to LFR_MATCH_REPLICAS - 1 (Kubernetes: the "
                              "StatefulSet's pod index); it reads the partitions k with k % replicas == index")
    match_peers: str = _opt("", "every match replica's gRPC address, comma separated, in replica order (with more "
                            "than one replica): each answers for its own alerts and forwards or fans out the rest")
    clock_offset_file: str = _opt("", "drills and tests: a file holding seconds added to the clock of the time "
                                  "rules (retention, adjudication due); empty = the wall clock")
    policy_file: str = _opt("", "deployment policy file (JSON; empty = the example policy shipped with LFR)")
    purge_after_s: float = _opt(0.0, "an ended deployment's watchlist vectors and images are purged this long "
                                "after its end (0 = at once; at most 86400)")
    sweep_interval_s: float = _opt(1.0, "how often the watchlist sweeper ends expired deployments and purges")
    gallery_connectivity: int = _opt(48, "gallery index (embedded HNSW): graph degree, fixed when a gallery's index "
                                     "is first built; more = better recall, slower inserts")
    gallery_ef: int = _opt(1536, "gallery index: candidates examined per search; more = better recall, slower")
    gallery_expansion_add: int = _opt(128, "gallery index: candidates examined while adding a vector to the graph; "
                                      "fewer = a faster build, a slightly worse graph (lfr bench gallery)")
    job_fps: float = _opt(2.0, "retrospective jobs: default video sampling rate (frames per second examined)")
    job_batch: int = _opt(8, "retrospective jobs: frames per batch sent through detection and embedding")
    grace_s: float = _opt(5.0, "graceful shutdown: seconds for in-flight RPCs")
    cuda_tf32: bool = _opt(False, "CUDA: allow TF32 convolutions (about 1.3-2x faster on Hopper; scores move ~1e-4 "
                           "from the CPU's)")
    # security (#8) ------------------------------------------------------------------------------------------
    insecure: bool = _opt(False, "development only: plaintext gRPC, and callers unauthenticated unless "
                          "LFR_AUTH_KEYS_DIR is set (logs a warning); otherwise LFR_TLS_DIR and LFR_AUTH_KEYS_DIR are required")
    tls_dir: str = _opt("", "TLS material: ca.pem (the CA callers and services are checked against) and "
                        "<service>.pem / <service>.key (this service's certificate, server and client)")
    auth_keys_dir: str = _opt("", "JWT verification keys: <kid>.pem public keys (EC P-256 or RSA); a token names "
                              "its key by kid, so keys rotate by adding a file")
    auth_issuer: str = _opt("lfr-dev-idp", "required JWT issuer (iss)")
    auth_audience: str = _opt("lfr", "required JWT audience (aud)")
    access_summary_s: float = _opt(60.0, "allowed calls between the platform's own services are audited as one "
                                   "summary per caller and method this often (people's calls: each one)")
    rate_limit_rps: float = _opt(50.0, "requests per second allowed per caller and service (token bucket)")
    rate_limit_burst: int = _opt(100, "burst size of the per-caller rate limit")
    rpc_timeout_s: float = _opt(120.0, "longest a unary RPC may run on the server (DEADLINE_EXCEEDED after)")
    max_image_bytes: int = _opt(20 * 1024 * 1024, "largest encoded image accepted, checked before decoding")
    media_roots: str = _opt("", "folders (os.pathsep separated) that file inputs (retrospective media, file "
                            "sources) must lie in, after resolving links; empty = none accepted")
    source_hosts: str = _opt("", "camera hosts that rtsp:// / rtsps:// sources may name (comma separated; "
                             "empty = no network sources)")
    nats_user: str = _opt("", "NATS user name of this service (the server gives it only its own subjects)")
    nats_password: str = _opt("", "NATS password (use LFR_NATS_PASSWORD_FILE)")
    # the operator console (#13): a web client of the gRPC APIs ---------------------------------------------
    console_host: str = _opt("127.0.0.1", "console: HTTP listen address (0.0.0.0 in a container)")
    console_port: int = _opt(8080, "console: HTTP listen port (0 = pick a free port)")
    console_auth: str = _opt("proxy", "console: 'proxy' (the force's single sign-on forwards each request's "
                             "bearer token in Authorization) or 'dev' (a login page minting development IdP "
                             "tokens from LFR_STATE_DIR)")
    console_secure_cookie: str = _opt("auto", "console: the session cookie's Secure flag: on, off, or auto (on "
                                      "unless the console listens on loopback)")
    ingest_target: str = _opt("127.0.0.1:50051", "ingest service gRPC address (console)")
    match_target: str = _opt("127.0.0.1:50055", "match service gRPC address (console)")
    audit_target: str = _opt("127.0.0.1:50056", "audit service gRPC address (console)")
    client_cert: str = _opt("console", "console: the name of its client certificate in LFR_TLS_DIR "
                            "(<name>.pem / <name>.key)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Config:
        env = os.environ if env is None else env
        values: dict = {}
        for f in dataclasses.fields(cls):
            key = PREFIX + f.name.upper()
            raw = env.get(key)
            file_key = key + "_FILE"
            if raw is None and env.get(file_key):
                try:
                    raw = Path(env[file_key]).read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"{file_key}: cannot read the file ({exc.strerror})") from None
            if raw is None:
                continue
            values[f.name] = _parse(key, f.type, raw)
        values.update(overrides)
        return cls(**values).validated()

    def validated(self) -> Config:
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("LFR_LOG_LEVEL: must be one of debug, info, warning, error")
        for name in ("grpc_port",):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"LFR_{name.upper()}: {port} is not a port number")
        if not -1 <= self.health_port <= 65535:
            raise ConfigError("LFR_HEALTH_PORT: must be -1 (off), 0 (any) or a port number")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("LFR_METRICS_PORT: must be -1 (off), 0 (any) or a port number")
        for name in ("freshness_ms", "max_message_bytes", "max_image_pixels", "detect_max_side",
                     "detection_batch", "embedding_batch", "queue_size", "jpeg_quality"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LFR_{name.upper()}: must be positive")
        if not 0 <= self.purge_after_s <= 86400:
            raise ConfigError("LFR_PURGE_AFTER_S: must be between 0 and 86400 (a watchlist is never kept "
                              "beyond 24 h after its deployment)")
        if self.sweep_interval_s <= 0:
            raise ConfigError("LFR_SWEEP_INTERVAL_S: must be positive")
        if not 1 <= self.stream_replicas <= 5:
            raise ConfigError("LFR_STREAM_REPLICAS: must be between 1 and 5")
        for name in ("track_gap_s", "alert_update_interval_s", "adjudication_due_s", "alert_retention_s",
                     "alert_sweep_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LFR_{name.upper()}: must be positive")
        if self.live_embed_max_per_s < 0:
            raise ConfigError("LFR_LIVE_EMBED_MAX_PER_S: must be 0 or more")
        if self.alert_evidence_gap_ms < 0:
            raise ConfigError("LFR_ALERT_EVIDENCE_GAP_MS: must be 0 or more")
        if self.live_embed_follow_ms < 0:
            raise ConfigError("LFR_LIVE_EMBED_FOLLOW_MS: must be 0 or more")
        if self.live_embed_interval_ms < 0:
            raise ConfigError("LFR_LIVE_EMBED_INTERVAL_MS: must be 0 or more")
        if self.alert_min_frames < 1:
            raise ConfigError("LFR_ALERT_MIN_FRAMES: must be 1 or more")
        if self.alert_strong_margin < 0:
            raise ConfigError("LFR_ALERT_STRONG_MARGIN: must be 0 or more")
        if not 1 <= self.match_replicas <= 12 or not 0 <= self.match_replica < self.match_replicas:
            raise ConfigError("LFR_MATCH_REPLICAS / LFR_MATCH_REPLICA: replicas must be 1 to 12 and the replica's "
                              "index 0 to replicas - 1")
        peers = [p for p in self.match_peers.split(",") if p.strip()]
        if self.match_replicas > 1 and len(peers) != self.match_replicas:
            raise ConfigError(f"LFR_MATCH_PEERS: must list the {self.match_replicas} match replicas' addresses in "
                              f"replica order (it lists {len(peers)})")
        if self.realert_window_s < 0:
            raise ConfigError("LFR_REALERT_WINDOW_S: must be 0 or more")
        if self.detect_fast_side < 0 or self.detect_full_every < 1:
            raise ConfigError("LFR_DETECT_FAST_SIDE must be 0 or more and LFR_DETECT_FULL_EVERY 1 or more")
        if self.frame_encoding not in ("shm", "raw", "jpeg"):
            raise ConfigError("LFR_FRAME_ENCODING: must be shm, raw or jpeg")
        if self.flip not in ("on", "off", "model"):
            raise ConfigError("LFR_FLIP: must be on, off or model")
        for name in ("gallery_connectivity", "gallery_ef", "gallery_expansion_add", "job_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LFR_{name.upper()}: must be positive")
        if not 0 < self.job_fps <= 30:
            raise ConfigError("LFR_JOB_FPS: must be above 0 and at most 30")
        if self.ingest_fps <= 0:
            raise ConfigError("LFR_INGEST_FPS: must be positive")
        for name in ("rate_limit_rps", "rate_limit_burst", "rpc_timeout_s", "max_image_bytes", "access_summary_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LFR_{name.upper()}: must be positive")
        if self.console_auth not in ("proxy", "dev"):
            raise ConfigError("LFR_CONSOLE_AUTH: must be proxy or dev")
        if self.console_secure_cookie not in ("on", "off", "auto"):
            raise ConfigError("LFR_CONSOLE_SECURE_COOKIE: must be on, off or auto")
        if not 0 <= self.console_port <= 65535:
            raise ConfigError(f"LFR_CONSOLE_PORT: {self.console_port} is not a port number")
        if self.device not in ("", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("LFR_DEVICE: must be cpu, cuda, cuda:N or empty")
        return self

    def watchlist_path(self, *parts: str) -> Path:
        """A path under the watchlist's own stores' folder (LFR_WATCHLIST_DIR, else the state dir)."""
        return Path(self.watchlist_dir).joinpath(*parts) if self.watchlist_dir else self.state_path(*parts)

    def state_path(self, *parts: str) -> Path:
        if not self.state_dir:
            raise ConfigError("LFR_STATE_DIR: required for the embedded default's local state")
        return Path(self.state_dir).joinpath(*parts)


def _parse(key: str, typ, raw: str):
    typ = typ if isinstance(typ, type) else {"int": int, "float": float, "str": str, "bool": bool}[typ]
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{key}: expected {typ.__name__}") from None


def describe() -> list[tuple[str, str, str]]:
    """(key, default, doc) for the README's configuration table."""
    return [
        (PREFIX + f.name.upper(), repr(f.default), f.metadata.get("doc", ""))
        for f in dataclasses.fields(Config)
        if f.name != "service"
    ]
