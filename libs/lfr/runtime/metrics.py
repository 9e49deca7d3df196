"""Prometheus metrics shared by every service: per-stage counts, latencies, queue depths, drops."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

PROCESSED = Counter("lfr_items_processed_total", "Items a stage processed", ["service", "stage"], registry=REGISTRY)
DROPPED = Counter(
    "lfr_items_dropped_total", "Items a stage dropped, by reason", ["service", "stage", "reason"], registry=REGISTRY
)
LATENCY = Histogram(
    "lfr_stage_seconds", "Processing time per item or batch", ["service", "stage"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
QUEUE_DEPTH = Gauge("lfr_queue_depth", "Items waiting in a stage's bounded queue", ["service", "stage"],
                    registry=REGISTRY)
DISPOSAL = Histogram(
    "lfr_nonmatch_disposal_seconds", "Capture to disposal time of faces that matched nobody", ["service"],
    registry=REGISTRY, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0),
)
ALERT_LATENCY = Histogram(
    "lfr_alert_latency_seconds", "Capture to alert published", ["service"], registry=REGISTRY,
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
)
RPCS = Counter("lfr_rpcs_total", "gRPC calls by method and status", ["service", "method", "code"], registry=REGISTRY)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics endpoint; returns the bound port (port 0 picks a free one), or -1 when off."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_address[1]
AUTH = Counter("lfr_auth_decisions_total", "Caller authorisation decisions (ALLOWED, DENIED, UNAUTHENTICATED, "
               "RATE_LIMITED)", ["service", "decision"], registry=REGISTRY)
SKIPPED = Counter("lfr_faces_skipped_total", "Faces deliberately not embedded (reason: tracked = their track was "
                  "embedded within LFR_LIVE_EMBED_INTERVAL_MS)", ["service", "reason"], registry=REGISTRY)
