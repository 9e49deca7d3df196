"""What the platform looks like in a cluster: the stateful singletons, the model services, who calls whom,
what is external, the labels the policies rely on. The contract rules check the manifests against these."""

from __future__ import annotations

# Stateful services (SQLite on a volume, one writer): exactly one replica, Recreate, their state on a PVC, no
# autoscaler.
SINGLETONS = {"watchlist": "deployment/watchlist metadata in SQLite",
              "audit": "the audit index in SQLite",
              "identification": "galleries and jobs in SQLite, the galleries' HNSW indexes on its volume"}
# Services scaled out by NATS subject partitioning (lfr.runtime.subjects.PARTITION_MAPPING): a StatefulSet whose
# replica i reads the partitions k % replicas == i, each replica's state on its own volume (volumeClaimTemplates),
# LFR_MATCH_REPLICAS = its replicas, LFR_MATCH_PEERS = its pods through its headless Service; no autoscaler.
PARTITIONED = {"match": "per-camera tracking in memory and an alert book in SQLite per replica"}
MODEL_SERVICES = ("detection", "embedding")
# The bounded-queue stage of each NATS-fed service (lfr_queue_depth{stage=...}); see services/*/service.py.
STAGE_OF = {"detection": "detect", "embedding": "embed", "match": "match"}
# Services with an external gRPC API (reached through the API gateway); the others are internal.
EXTERNAL_API = ("ingest", "watchlist", "identification", "match", "audit")
# Web applications in services/ (HTTP, not gRPC; no NATS, no store): checked by web_errors. -> the gRPC services
# they call (as the signed-in person, with their own client certificate).
WEB_SERVICES = {"console": ("ingest", "watchlist", "match", "audit", "identification")}
# Who calls whom over gRPC inside the platform (callee -> callers).
INTERNAL_CALLERS = {"watchlist": {"ingest", "match", "console", "identification"},
                    "detection": {"watchlist", "identification"}, "embedding": {"watchlist", "identification"},
                    "ingest": {"console"}, "match": {"console", "match"}, "audit": {"console"}, "identification": {"console"}}
# Secrets the prod overlay expects to exist already (deploy/k8s/README.md says what each holds): lfr-ca is the CA
# (tls.crt, tls.key) the Issuer lfr-ca signs the services' certificates with, from the force's PKI.
EXTERNAL_SECRETS = ("qdrant-api-key", "qdrant-read-only-api-key", "nats-users", "lfr-ca")
# ConfigMaps created outside the manifests: the identity provider's JWT public keys (<kid>.pem).
EXTERNAL_CONFIGMAPS = ("lfr-auth-keys",)
# Services that read media: retrospective job media (identification) and file sources (ingest), from LFR_MEDIA_ROOTS;
# rtsp(s) media from LFR_SOURCE_HOSTS.
MEDIA_READERS = ("ingest", "identification")
RTSP_PORTS = (554, 8554)
# The development identity provider's issuer (lfr.runtime.devidp): accepted only in an overlay labelled dev.
DEV_ISSUER = "lfr-dev-idp"
ENVIRONMENT_LABEL = "lfr/environment"
# What a service's certificate must allow: it serves with it, and calls the other services with it.
CERT_USAGES = ("server auth", "client auth")
GATEWAY_LABEL = ("lfr/api-gateway", "true")
MONITORING_LABEL = ("lfr/monitoring", "true")
