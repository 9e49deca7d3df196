"""``lfr bench capacity``: size a cluster for N cameras (replicas, GPUs, NATS traffic, JetStream and Qdrant).

A calculation, not a measurement: it turns a camera load (cameras x fps x faces per frame) into the number
of detection, embedding and match replicas (CPU or GPU), NATS traffic,
JetStream storage for the durable streams and the audit chain, the state volumes of match and audit, and
Qdrant memory for a watchlist and for galleries. Every throughput and size it uses is a
parameter; each default says where it comes from in ``sources`` (measured here, or an assumption to
replace with your own ``lfr bench speed`` / ``lfr bench pipeline`` figures on your hardware).

Replicas = ceil(load / (per-replica throughput x target utilisation)): the autoscalers aim at 70 % CPU,
so the same headroom is kept here. match replicas split the cameras by NATS subject partitioning (12
partitions, replica i reads k % R == i): the busiest replica carries its share of the partitions times the
hash imbalance of cameras over partitions, and that must fit one replica's planned throughput; at most 12.
watchlist and audit are singletons (one pod each, state in SQLite on a volume), off the per-frame path.
"""

from __future__ import annotations

import argparse
import math

from lfr.runtime import subjects
from lfr.runtime.config import Config

GB = 1e9
MB = 1e6
DAY_S = 86400.0
NATS_NODES = 3  # deploy/k8s: the NATS StatefulSet
NATS_FILE_STORE_GB = 45  # deploy/k8s/base/nats/nats.conf: jetstream max_file_store (on a 50 Gi volume)
STATS_INTERVAL_S = 6.0  # deploy/k8s/base/services/match/config.env: LFR_STATS_INTERVAL_S (each replica publishes)

# Where each default comes from (printed with the result, so nobody mistakes an assumption for a measurement).
SOURCES = {
    "detect_fps_per_core": "measured: YuNet (torch, CPU) on 1080p frames, lfr bench speed on a 2-core machine",
    "embed_faces_per_s": "measured: SFace (torch, CPU) batch 32 on 2 cores, lfr bench speed",
    "detect_fps_per_gpu": "ASSUMED per replica: the YuNet model alone measured 770-800 frames/s at 960x540 in "
                          "batches of 8-32 on an H200 (float32); a replica is bounded by its CPU side (1080p JPEG "
                          "decode ~8 ms, downscale, chips per frame), not measured end to end on a GPU",
    "embed_faces_per_s_per_gpu": "ASSUMED per replica: SFace alone measured 12,000 faces/s at batch 256 on an H200 "
                                 "(float32); a replica is bounded by its CPU side (chip messages), not measured end "
                                 "to end on a GPU",
    "match_events_per_s": "derived from a measurement: one match replica (one event loop, one core) searches the "
                          "watchlist in memory (lfr.models.scoring.ExactIndex): 2.6 ms CPU for a frame of 4 faces "
                          "against 10,000 SFace entries on this 2-core machine (~380 frames/s a core; 0.22 ms at "
                          "1,000); less decoding and tracking: 300 frames with faces/s per replica. Measure with "
                          "lfr bench match",
    "match_imbalance": "measured: how many times the mean load the busiest match replica carries, cameras "
                       "cam-000... of 40 random deployments through the real nats-server mapping: 50 cameras on "
                       "3 replicas 1.09 (p95 1.14), on 2 or 4 replicas 1.00-1.04, on 6 replicas 1.21 (p95 1.32); "
                       "10 cameras on 3 replicas 1.2",
    "ingest_fps_per_replica": "ASSUMED: RTSP decode + 1080p JPEG encode on 2 cores (pushed frames cost less)",
    "frame_bytes": "measured: 1080p pedestrian video frame as JPEG quality 90 (LFR_JPEG_QUALITY)",
    "face_bytes": "measured: one DetectedFace (112x112 RGB chip + review crop) from that video",
    "embedded_face_bytes": "measured: one FaceEmbedding (128-d vector + review crop)",
    "alert_bytes": "estimate: review crop (measured ~2.8 KB) + alert fields",
    "matchstats_bytes": "estimate: MatchStats message + JetStream per-message overhead",
    "audit_record_bytes": "measured: an lfr.audit.v1.Record of a match.stats fact is ~0.77 KB; + JetStream"
                          " per-message overhead (estimate)",
    "audit_records_per_alert": "estimate: raised, one update, adjudicated, crops deleted",
    "alert_book_row_bytes": "estimate: the alert without its crop, its adjudication, SQLite row and index",
    "audit_index_bytes": "estimate: one record in audit's SQLite index, with its indexes",
    "qdrant_overhead": "Qdrant's sizing rule: vectors x dim x 4 bytes x 1.5 (index and bookkeeping)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument("--cameras", type=int, default=50, help="cameras streaming at once (default 50)")
    load.add_argument("--fps", type=float, default=10.0, help="frames per second per camera (default 10)")
    load.add_argument("--faces-per-frame", type=float, default=4.0, help="mean faces per frame (default 4)")
    load.add_argument("--deployments", type=int, default=1, help="deployments running at once (default 1)")
    load.add_argument("--alerts-per-camera-hour", type=float, default=2.0,
                      help="alerts (matches) per camera per hour (default 2)")
    load.add_argument("--target-utilization", type=float, default=0.7,
                      help="fraction of a replica's throughput to plan on (default 0.7, as the autoscalers)")

    rate = parser.add_argument_group("per-replica throughput")
    rate.add_argument("--detect-fps-per-core", type=float, default=10.0, help="detection, 1080p frames/s per CPU core")
    rate.add_argument("--detect-cores", type=int, default=2, help="CPU cores per CPU detection replica (default 2)")
    rate.add_argument("--embed-faces-per-s", type=float, default=60.0,
                      help="embedding, faces/s per CPU replica of --embed-cores cores")
    rate.add_argument("--embed-cores", type=int, default=2, help="CPU cores per CPU embedding replica (default 2)")
    rate.add_argument("--detect-fps-per-gpu", type=float, default=100.0, help="detection frames/s per GPU replica")
    rate.add_argument("--embed-faces-per-s-per-gpu", type=float, default=1000.0,
                      help="embedding faces/s per GPU replica")
    rate.add_argument("--match-events-per-s", type=float, default=300.0,
                      help="frames with faces/s one match replica serves")
    rate.add_argument("--match-imbalance", type=float, default=1.15,
                      help="the busiest match replica's load over the mean (cameras hash unevenly onto partitions)")
    rate.add_argument("--ingest-fps-per-replica", type=float, default=60.0, help="ingest frames/s per replica")

    size = parser.add_argument_group("message sizes (bytes)")
    size.add_argument("--frame-bytes", type=int, default=300_000)
    size.add_argument("--face-bytes", type=int, default=40_600, help="per face in a FacesEvent")
    size.add_argument("--embedded-face-bytes", type=int, default=3_500, help="per face in an EmbeddingsEvent")
    size.add_argument("--alert-bytes", type=int, default=3_500)
    size.add_argument("--matchstats-bytes", type=int, default=300)
    size.add_argument("--audit-record-bytes", type=int, default=900, help="per record of the audit chain (LFR_AUDIT)")
    size.add_argument("--audit-records-per-alert", type=float, default=4.0,
                      help="audit records an alert causes (default 4: raised, updated, adjudicated, crops deleted)")
    size.add_argument("--alert-book-row-bytes", type=int, default=1_000,
                      help="match's alert book: per alert kept after its crop is deleted")
    size.add_argument("--audit-index-bytes", type=int, default=1_500, help="audit's SQLite index, per record")
    size.add_argument("--nats-file-store-gb", type=float, default=NATS_FILE_STORE_GB,
                      help=f"JetStream max_file_store per NATS node (default {NATS_FILE_STORE_GB}, as deploy/k8s)")
    size.add_argument("--stats-interval-s", type=float, default=STATS_INTERVAL_S,
                      help="LFR_STATS_INTERVAL_S of match: each replica publishes a deployment's counts this often "
                           f"(default {STATS_INTERVAL_S:g}, as deploy/k8s); each is an audit record")
    size.add_argument("--stream-replicas", type=int, default=3, help="JetStream replicas per stream (default 3)")
    size.add_argument("--events-retention-days", type=float, default=365.0,
                      help="LFR_EVENTS and LFR_AUDIT keep everything: storage is shown for this many days"
                           " (default 365)")

    q = parser.add_argument_group("Qdrant")
    q.add_argument("--model", default="sface-2021dec", help="live model id (its vector size is used)")
    q.add_argument("--watchlist-size", type=int, default=10_000, help="entries in the live watchlists (default 10000)")
    q.add_argument("--gallery", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="gallery sizes for retrospective search (default 1M and 10M)")
    q.add_argument("--qdrant-nodes", type=int, default=3)
    q.add_argument("--qdrant-replication", type=int, default=3, help="replicas of each shard (default 3)")
    q.add_argument("--qdrant-overhead", type=float, default=1.5)


def recipe_components(model_id: str) -> tuple[str, ...]:
    from lfr.models import scoring

    try:
        return scoring.recipe(model_id).components
    except (KeyError, ValueError):
        return (model_id,)


def _replicas(load: float, per_replica: float, utilization: float) -> int:
    if load <= 0:
        return 0
    return max(1, math.ceil(load / (per_replica * utilization) - 1e-9))


def _qdrant(vectors: int, dim: int, overhead: float, replication: int, nodes: int) -> dict:
    """RAM for `vectors` vectors: float32 in RAM, or int8 scalar quantisation in RAM with originals on disk."""
    copy = vectors * dim * 4 * overhead
    copy_int8 = vectors * dim * 1 * overhead
    per_node = copy * replication / nodes
    per_node_int8 = copy_int8 * replication / nodes
    return {
        "vectors": vectors,
        "ram_gb_one_copy": round(copy / GB, 3),
        "ram_gb_cluster": round(copy * replication / GB, 3),
        "ram_gb_per_node": round(per_node / GB, 3),
        "ram_gb_per_node_int8_quantized": round(per_node_int8 / GB, 3),
        "disk_gb_per_node_vectors": round(vectors * dim * 4 * replication / nodes / GB, 3),
    }


def capacity(args: argparse.Namespace) -> dict:
    from lfr.models.engines import model_info  # light: no torch

    util = args.target_utilization
    if not 0 < util <= 1:
        raise ValueError("--target-utilization must be in (0, 1]")
    frames = args.cameras * args.fps
    faces = frames * args.faces_per_frame
    # match decides once per frame that has faces; with >= 1 face per frame on average, nearly every frame does
    # (upper bound: all of them).
    searches = frames * min(1.0, args.faces_per_frame)
    cpu_det_per_replica = args.detect_fps_per_core * args.detect_cores
    det_cpu = _replicas(frames, cpu_det_per_replica, util)
    emb_cpu = _replicas(faces, args.embed_faces_per_s, util)
    det_gpu = _replicas(frames, args.detect_fps_per_gpu, util)
    emb_gpu = _replicas(faces, args.embed_faces_per_s_per_gpu, util)

    msg = {
        "frames": (frames, frames * args.frame_bytes),
        "faces": (frames, faces * args.face_bytes),
        "embeddings": (frames, faces * args.embedded_face_bytes),
    }
    published = sum(b for _, b in msg.values())
    alerts_per_s = args.cameras * args.alerts_per_camera_hour / 3600
    alerts_age_days = subjects.ALERTS.max_age_s / DAY_S
    alerts_retained = alerts_per_s * DAY_S * alerts_age_days * args.alert_bytes
    # match replicas: the busiest carries ceil(P/R) of the P partitions, times the cameras' hash imbalance
    parts = subjects.MATCH_PARTITIONS
    match_planned = args.match_events_per_s * util

    def busiest(r: int) -> float:
        return searches * math.ceil(parts / r) / parts * (args.match_imbalance if r > 1 else 1.0)

    match_replicas = next((r for r in range(1, parts + 1) if busiest(r) <= match_planned), None)
    match_over = match_replicas is None
    match_replicas = match_replicas or parts
    # each match replica: one MatchStats per running deployment every LFR_STATS_INTERVAL_S
    stats_per_s = args.deployments * match_replicas / args.stats_interval_s
    kept_days = args.events_retention_days
    events_retained = stats_per_s * DAY_S * kept_days * args.matchstats_bytes
    # the audit chain: one record per durable fact (every MatchStats and every alert fact), kept forever
    audit_per_s = stats_per_s + alerts_per_s * args.audit_records_per_alert
    audit_retained = audit_per_s * DAY_S * kept_days * args.audit_record_bytes
    js_total = (alerts_retained + events_retained + audit_retained) * args.stream_replicas

    # the most cameras 12 replicas take at this fps (each busiest partition share at most the planned load)
    per_camera = args.fps * min(1.0, args.faces_per_frame)
    max_cameras = (math.floor(match_planned / (args.match_imbalance / parts) / per_camera + 1e-9)
                   if per_camera > 0 else None)
    retention_s = Config().alert_retention_s
    alert_book = (alerts_per_s * min(retention_s, kept_days * DAY_S) * args.alert_bytes
                  + alerts_per_s * DAY_S * kept_days * args.alert_book_row_bytes)

    dim = model_info(args.model).dim
    warnings = []
    if match_over:
        warnings.append(
            f"match would receive {searches:.0f} frames with faces/s: even {parts} replicas (one per partition of"
            f" the embeddings) leave the busiest above the {match_planned:.0f}/s planned for one: beyond that its"
            " bounded queue drops the oldest embeddings (lfr_items_dropped_total{service=\"match\"}, counted as"
            " stale_dropped in MatchStats), and those faces are never matched. Give match faster cores, or split"
            " the cameras over two platforms")
    js_per_node = js_total / NATS_NODES / GB
    if js_per_node > args.nats_file_store_gb:
        warnings.append(
            f"JetStream needs {js_per_node:.1f} GB per NATS node for {kept_days:.0f} days, above max_file_store"
            f" ({args.nats_file_store_gb:g} GB): when the store is full, durable facts (alerts, audit records)"
            " cannot be written. Raise max_file_store and the NATS volumes, or LFR_STATS_INTERVAL_S")
    if published / MB > 100:
        warnings.append(
            f"NATS carries {published / MB:.0f} MB/s of biometric flow (in) and as much out: give the NATS nodes"
            " 10 Gbit/s networking, or lower LFR_INGEST_FPS / LFR_JPEG_QUALITY")
    for what, gpus in (("detection", det_gpu), ("embedding", emb_gpu)):
        key = "detect_fps_per_gpu" if what == "detection" else "embed_faces_per_s_per_gpu"
        if gpus:
            warnings.append(f"{what} GPU count rests on an assumed throughput ({key}): measure it on your GPUs")

    return {
        "benchmark": "capacity",
        "inputs": {k: v for k, v in vars(args).items() if not callable(v) and k not in ("json", "bench", "command")},
        "sources": SOURCES,
        "load": {"frames_per_s": frames, "faces_per_s": faces, "frames_with_faces_per_s": searches,
                 "alerts_per_s": round(alerts_per_s, 4)},
        "cpu_only": {
            "detection": {"replicas": det_cpu, "cores": det_cpu * args.detect_cores},
            "embedding": {"replicas": emb_cpu, "cores": emb_cpu * args.embed_cores},
        },
        "gpu": {
            "detection": {"replicas": det_gpu, "gpus": det_gpu},
            "embedding": {"replicas": emb_gpu, "gpus": emb_gpu},
            "gpus": det_gpu + emb_gpu,
        },
        "match": {
            "replicas": match_replicas,
            "partitions": parts,
            "frames_with_faces_per_s": searches,
            "planned_per_replica": round(match_planned, 1),
            "busiest_replica_per_s": round(busiest(match_replicas), 1),
            "max_cameras": max_cameras,
            "over_limit": match_over,
            "alert_book_gb": round(alert_book / GB, 3),
            "alert_book_gb_per_replica": round(alert_book * math.ceil(parts / match_replicas) / parts
                                               * (args.match_imbalance if match_replicas > 1 else 1.0) / GB, 3),
            "watchlist_vectors_mb_per_replica": round(args.watchlist_size * dim * 4 * max(
                1, len(recipe_components(args.model))) / MB, 1),
            "note": "replicas split the cameras by NATS subject partitioning (a camera's faces always reach the same"
                    " replica); each holds every live watchlist's vectors in memory; max_cameras is at this fps"
                    " with 12 replicas",
        },
        "ingest": {"replicas": _replicas(frames, args.ingest_fps_per_replica, util)},
        "watchlist": {"replicas": 1, "note": "off the per-frame path: each match replica loads a live watchlist's"
                                             " vectors once (GetWatchlistVectors), at its start or the deployment's"},
        "audit": {"replicas": 1, "records_per_day": round(audit_per_s * DAY_S),
                  "index_gb": round(audit_per_s * DAY_S * kept_days * args.audit_index_bytes / GB, 3)},
        "nats": {
            "core_msgs_per_s": sum(n for n, _ in msg.values()),
            "core_mb_per_s": {k: round(b / MB, 2) for k, (_, b) in msg.items()},
            "core_mb_per_s_in": round(published / MB, 1),
            "core_mb_per_s_in_plus_out": round(2 * published / MB, 1),
            "note": "each message goes in once and out once (one queue-group member); a route hop between"
                    " NATS nodes adds up to one more copy",
        },
        "jetstream": {
            "stream_replicas": args.stream_replicas,
            subjects.ALERTS.name: {
                "msgs_per_day": round(alerts_per_s * DAY_S),
                "retention_days": alerts_age_days,
                "gb_retained_one_copy": round(alerts_retained / GB, 3),
            },
            subjects.EVENTS.name: {
                "matchstats_msgs_per_day": round(stats_per_s * DAY_S),
                "retention_days_shown": kept_days,
                "gb_retained_one_copy": round(events_retained / GB, 3),
            },
            subjects.AUDIT.name: {
                "records_per_day": round(audit_per_s * DAY_S),
                "retention_days_shown": kept_days,
                "gb_retained_one_copy": round(audit_retained / GB, 3),
            },
            "gb_total_all_replicas": round(js_total / GB, 3),
            "gb_per_node": round(js_per_node, 3),
            "max_file_store_gb_per_node": args.nats_file_store_gb,
        },
        "qdrant": {
            "model": args.model,
            "dim": dim,
            "nodes": args.qdrant_nodes,
            "replication": args.qdrant_replication,
            "watchlist": _qdrant(args.watchlist_size, dim, args.qdrant_overhead, args.qdrant_replication,
                                 args.qdrant_nodes),
            "galleries": [_qdrant(n, dim, args.qdrant_overhead, args.qdrant_replication, args.qdrant_nodes)
                          for n in args.gallery],
        },
        "warnings": warnings,
    }


def run(args: argparse.Namespace) -> dict:
    return capacity(args)
