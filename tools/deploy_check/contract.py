"""Contract rules: the rendered manifests of one overlay agree with the code: a workload per service in
services/, LFR_* names and values that `lfr.runtime.config` accepts, ports, probes, gRPC targets, hardening,
Secrets, the stateful singletons (one replica, Recreate, state on a PersistentVolumeClaim, no autoscaler) and the
watchlist's policy file; security.py and cluster.py hold the transport-security and infrastructure rules."""

from __future__ import annotations

import re
from pathlib import Path

from .cluster import keda_errors, names_errors, nats_errors, network_errors, qdrant_errors, streams
from .objects import (
    as_int,
    base_name,
    by_kind_name,
    claim_of,
    configmap_refs,
    container_env,
    ingress_peers,
    issued_secrets,
    peer_names,
    pod_labels,
    port_number,
    ref,
    secret_file_mounted,
    secret_form,
    secret_refs,
    selects,
    service_port,
    under,
    workloads_of,
)
from .render import REPO
from .security import issuer_errors, security_errors
from .topology import (
    EXTERNAL_CONFIGMAPS,
    EXTERNAL_SECRETS,
    GATEWAY_LABEL,
    MODEL_SERVICES,
    PARTITIONED,
    SINGLETONS,
    WEB_SERVICES,
)

POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def partition_errors(name: str, sts: dict, index: dict, scaled: set) -> list[str]:
    """A service scaled out by NATS subject partitioning (match): a StatefulSet whose replicas know their index
    (the pod-index label), their count and their peers (through its headless Service, names its certificate
    carries), each with its state on a volume of its own; never autoscaled (the count is in its configuration)."""
    from lfr.runtime.config import Config, ConfigError, describe
    from lfr.runtime.subjects import MATCH_PARTITIONS

    why = PARTITIONED[name]
    where = f"{sts['kind']}/{name}"
    if sts["kind"] != "StatefulSet":
        return [f"{where}: partitioned ({why}): must be a StatefulSet (each replica its index and its own volume)"]
    problems = []
    spec = sts["spec"]
    replicas = spec.get("replicas", 1)
    c = spec["template"]["spec"]["containers"][0]
    env = container_env(c, index)
    try:
        keys = {k for k, _, _ in describe()}
        cfg = Config.from_env({k: v for k, v in env.items() if k.startswith("LFR_") and not secret_form(k, keys)
                               and k != "LFR_MATCH_REPLICA"}, service=name)
    except ConfigError:
        return problems  # reported by the configuration rule
    if not 1 <= replicas <= MATCH_PARTITIONS or cfg.match_replicas != replicas:
        problems.append(f"{where}: replicas {replicas} must equal LFR_MATCH_REPLICAS ({cfg.match_replicas}), at most "
                        f"{MATCH_PARTITIONS} (the embeddings' partitions)")
    if ("StatefulSet", name) in scaled:
        problems.append(f"{where}: partitioned ({why}) must not be autoscaled: its replica count is in "
                        "LFR_MATCH_REPLICAS and LFR_MATCH_PEERS")
    item = next((e for e in c.get("env", []) if e.get("name") == "LFR_MATCH_REPLICA"), {})
    if item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != POD_INDEX:
        problems.append(f"{where}: LFR_MATCH_REPLICA must come from the pod's {POD_INDEX} (its partitions)")
    headless = index.get(("Service", spec.get("serviceName", "")))
    if headless is None or headless["spec"].get("clusterIP") != "None" or not selects(
            {"matchLabels": headless["spec"].get("selector", {})}, pod_labels(sts)):
        problems.append(f"{where}: serviceName must be a headless Service selecting its pods (its peers' names)")
    hosts = [f"{name}-{i}.{spec.get('serviceName')}" for i in range(replicas)]
    peers = ",".join(f"{h}:{cfg.grpc_port}" for h in hosts)
    if cfg.match_peers != peers:
        problems.append(f"{where}: LFR_MATCH_PEERS must be {peers} (every replica through the headless Service, "
                        f"in order), not {cfg.match_peers!r}")
    cert = index.get(("Certificate", f"lfr-tls-{name}"))
    missing = [h for h in hosts if cert is not None and h not in cert["spec"].get("dnsNames", [])]
    if missing:
        problems.append(f"Certificate/lfr-tls-{name}: dnsNames lack {', '.join(missing)} (its peers call each "
                        "replica by that name)")
    templates = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    mounted = {m["name"] for m in c.get("volumeMounts", []) if under(cfg.state_dir, m["mountPath"])}
    if not cfg.state_dir or not mounted & set(templates):
        problems.append(f"{where}: LFR_STATE_DIR must be on a volumeClaimTemplate: each replica's state ({why}) "
                        "outlives its pod, on a volume of its own")
    elif any("ReadWriteOnce" not in templates[n]["spec"].get("accessModes", []) for n in mounted & set(templates)):
        problems.append(f"{where}: each replica's state volume needs ReadWriteOnce (one writer)")
    return problems


def contract_errors(objects: list[dict], repo: Path = REPO) -> list[str]:
    """The rendered manifests of one overlay against the code (see the module docstring)."""
    from lfr.models.engines import resolve_model_id
    from lfr.runtime.config import Config, ConfigError, describe
    from lfr.runtime.stage import BUDGET_SHARE

    problems: list[str] = []
    err = problems.append
    index = by_kind_name(objects)
    keys = {k for k, _, _ in describe()}
    services = sorted(p.name for p in (repo / "services").iterdir() if (p / "__main__.py").is_file()
                      and p.name not in WEB_SERVICES)
    # a service's workload: its Deployment, or the StatefulSet of a service scaled out by partitions
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"
                   or (o["kind"] == "StatefulSet" and o["metadata"]["name"] in PARTITIONED)}
    services_by_name = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    workloads = workloads_of(objects)
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
        if not any(o["kind"] == "PodDisruptionBudget" and selects(o["spec"]["selector"], pod_labels(dep))
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
                        and selects(o["spec"]["selector"], pod_labels(dep))):
                spec = pdb["spec"]
                if str(spec.get("maxUnavailable", "")) in ("0", "0%") or str(spec.get("minAvailable", "0")) not in (
                        "0", "0%"):
                    err(f"{ref(pdb)}: a singleton's PDB must allow its one pod to be evicted (maxUnavailable: 1), "
                        "or no node can be drained")
        elif name in PARTITIONED:
            problems.extend(partition_errors(name, dep, index, scaled))
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
            problems.extend(web_errors(name, objects, index, deployments, services_by_name))

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
    stream_names = {s.name for s in streams()}
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
            if key not in keys and not secret_form(key, keys):
                err(f"{where}: {key} is not a configuration key of lfr.runtime.config (see describe())")
        # LFR_X_FILE is the secret-file form of the key LFR_X; LFR_POLICY_FILE and the like are keys themselves.
        # (a value Kubernetes fills in at run time, from the downward API, is checked by its own rule)
        downward = {e["name"] for e in c.get("env", []) if "valueFrom" in e}
        plain = {k: v for k, v in env.items() if k.startswith("LFR_") and not secret_form(k, keys) and k not in downward}
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
            if key.startswith("LFR_") and secret_form(key, keys):
                if not secret_file_mounted(value, mounts, vols):
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
        if svc and not selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(dep)):
            err(f"Service/{name}: its selector does not select Deployment/{name}'s pods")
        for s in services_by_name.values():
            if not selects({"matchLabels": s["spec"].get("selector", {})}, pod_labels(dep)):
                continue
            for sp in s["spec"]["ports"]:
                target = port_number(sp.get("targetPort", sp["port"]), ports)
                if cfg.health_port > 0 and target == cfg.health_port:
                    err(f"{ref(s)}: exposes the health port {cfg.health_port}, which is for the kubelet only")
                if target == cfg.grpc_port and sp.get("appProtocol") == "kubernetes.io/h2c":
                    err(f"{ref(s)}: appProtocol kubernetes.io/h2c on the gRPC port, which is mutual TLS")
        problems.extend(security_errors(where, name, cfg, env, dep, index, objects))
        # gRPC targets resolve to a Service that selects the named service on the right port
        for key, target in (("LFR_DETECTION_TARGET", "detection"), ("LFR_EMBEDDING_TARGET", "embedding"),
                            ("LFR_WATCHLIST_TARGET", "watchlist")):
            value = getattr(cfg, key[4:].lower())
            problems.extend(target_errors(where, key, value, target, services_by_name, deployments, index))
        for url in cfg.nats_url.split(","):
            m = re.fullmatch(r"nats://([a-z0-9.-]+):(\d+)", url.strip())
            if not m or not service_port(services_by_name, m.group(1).split(".")[0], int(m.group(2)), "nats"):
                err(f"{where}: LFR_NATS_URL {url!r} is not a Service port of the NATS StatefulSet")
        if name == "watchlist":
            m = re.fullmatch(r"https?://([a-z0-9.-]+):(\d+)", cfg.qdrant_url)
            if not m or not service_port(services_by_name, m.group(1).split(".")[0], int(m.group(2)), "qdrant"):
                err(f"{where}: LFR_QDRANT_URL {cfg.qdrant_url!r} is not a Service port of the Qdrant StatefulSet")
            if "LFR_QDRANT_API_KEY_FILE" not in env:
                err(f"{where}: the Qdrant API key must come from a Secret file (LFR_QDRANT_API_KEY_FILE)")
        elif cfg.qdrant_url:
            err(f"{where}: only watchlist talks to Qdrant (LFR_QDRANT_URL is set)")
        # NATS: as its own user, with its own password only (lfr.runtime.natsauth)
        if cfg.nats_user != name or "LFR_NATS_PASSWORD_FILE" not in env:
            err(f"{where}: must connect to NATS as the user {name!r} (LFR_NATS_USER) with LFR_NATS_PASSWORD_FILE")
        for v in pod.get("volumes", []):
            if base_name(v.get("secret", {}).get("secretName", "")) == "nats-users" and [
                    i["key"] for i in v["secret"].get("items", [])] != [name]:
                err(f"{where}: may mount only its own key {name!r} of the Secret nats-users")
        if name in SINGLETONS:
            # where the service keeps its SQLite store (see services/<name>/service.py)
            store = {"audit": ("LFR_AUDIT_DB", cfg.audit_db), "match": ("LFR_ALERT_DB", cfg.alert_db)}.get(name)
            state = [("LFR_STATE_DIR", cfg.state_dir)] if not store or not store[1] else [store]
            for key, path in state:
                claim = claim_of(path, c.get("volumeMounts", []), vols) if path else None
                if not claim or ("PersistentVolumeClaim", claim) not in index:
                    also = f" (or {store[0]})" if store and key == "LFR_STATE_DIR" else ""
                    err(f"{where}: {key}{also} must be on a mounted PersistentVolumeClaim: a singleton's state "
                        f"({SINGLETONS[name]}) outlives the pod, and the root filesystem is read-only")
                elif "ReadWriteOnce" not in index[("PersistentVolumeClaim", claim)]["spec"].get("accessModes", []):
                    err(f"PersistentVolumeClaim/{claim}: {name}'s state needs ReadWriteOnce (one writer)")
        if cfg.policy_file:
            problems.extend(policy_errors(where, cfg.policy_file, c.get("volumeMounts", []), vols, index))
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
    issued = issued_secrets(objects)
    for w in workloads:
        for secret in secret_refs(w):
            if ("Secret", secret) not in names and secret not in issued and base_name(secret) not in EXTERNAL_SECRETS:
                err(f"{ref(w)}: Secret {secret!r} is neither rendered, nor issued by a rendered Certificate, nor one "
                    f"of {EXTERNAL_SECRETS}")
        for cm in configmap_refs(w):
            if ("ConfigMap", cm) not in names and base_name(cm) not in EXTERNAL_CONFIGMAPS:
                err(f"{ref(w)}: ConfigMap {cm!r} is neither rendered nor one of {EXTERNAL_CONFIGMAPS}")
    problems.extend(issuer_errors(objects, names, issued))

    problems.extend(nats_errors(objects, index, stream_names))
    problems.extend(qdrant_errors(index))
    problems.extend(names_errors(objects, keys, stream_names))
    problems.extend(keda_errors(objects, services, set(BUDGET_SHARE), stream_names))
    problems.extend(network_errors(objects, deployments, index, services))
    return problems


def web_errors(name: str, objects: list[dict], index: dict, deployments: dict, services_by_name: dict) -> list[str]:
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
    if not any(o["kind"] == "PodDisruptionBudget" and selects(o["spec"]["selector"], pod_labels(dep)) for o in objects):
        err(f"{where}: no PodDisruptionBudget selects its pods")
    if not c["image"].split("@")[0].rsplit(":", 1)[0].endswith(f"lfr/{name}"):
        err(f"{where}: image {c['image']!r} is not the lfr/{name} image")
    env = container_env(c, index)
    keys = {k for k, _, _ in describe()}
    for key in env:
        if key.startswith("LFR_") and key not in keys and not secret_form(key, keys):
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
        cert = issued_secrets(objects).get(secret["secretName"])
        if cert is None or cert["spec"].get("commonName") != name or "client auth" not in cert["spec"].get("usages", []):
            err(f"{where}: its TLS Secret {secret['secretName']!r} must be issued by a Certificate with common name "
                f"{name!r} for client auth")
    if not cfg.auth_keys_dir or not any(m["mountPath"].rstrip("/") == cfg.auth_keys_dir.rstrip("/")
                                        and m.get("readOnly") for m in mounts):
        err(f"{where}: LFR_AUTH_KEYS_DIR must be a read-only mount of the identity provider's keys")
    for target in WEB_SERVICES[name]:
        problems.extend(target_errors(where, f"LFR_{target.upper()}_TARGET", getattr(cfg, f"{target}_target"),
                                       target, services_by_name, deployments, index))
    # reachable from the single sign-on gateway only
    peers = ingress_peers(objects, dep, cfg.console_port)
    if not peers:
        err(f"{where}: its http port is not reachable from the API gateway (lfr/api-gateway=true)")
    for peer in peers:
        ns = (peer or {}).get("namespaceSelector")
        if not (ns is not None and "podSelector" not in peer and ns.get("matchLabels") == dict([GATEWAY_LABEL])
                and not ns.get("matchExpressions")):
            err(f"{where} port {cfg.console_port}: reachable from {peer_names(peer)}")
    return problems


def target_errors(where, key, value, target, services, deployments, index) -> list[str]:
    m = re.fullmatch(r"(?:dns:///)?([a-z0-9.-]+):(\d+)", value or "")
    if not m:
        return [f"{where}: {key}={value!r} is not host:port"]
    host, port = m.group(1).split(".")[0], int(m.group(2))
    if not service_port(services, host, port, target):
        return [f"{where}: {key}={value} is not a port of a Service selecting {target}"]
    dep = deployments.get(target)
    if dep is not None:
        env = container_env(dep["spec"]["template"]["spec"]["containers"][0], index)
        svc_port = next(p for p in services[host]["spec"]["ports"] if p["port"] == port)
        if svc_port.get("targetPort") not in ("grpc", str(env.get("LFR_GRPC_PORT")), as_int(env.get("LFR_GRPC_PORT"))):
            return [f"{where}: {key}={value} reaches {target} on a port other than its LFR_GRPC_PORT"]
    return []


def policy_errors(where: str, path: str, mounts: list[dict], vols: dict, index: dict) -> list[str]:
    """LFR_POLICY_FILE names a file of a mounted, rendered ConfigMap, and the watchlist accepts that policy."""
    from lfr.policy import PolicyError, parse_policy

    mount = next((m for m in sorted(mounts, key=lambda m: len(m["mountPath"]), reverse=True)
                  if under(path, m["mountPath"])), None)
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
        return [f"{where}: LFR_POLICY_FILE={path}: ConfigMap {base_name(source['name'])} has no such file"]
    try:
        parse_policy(cm["data"][key])
    except PolicyError as exc:
        return [f"{where}: LFR_POLICY_FILE: the watchlist would refuse ConfigMap {base_name(source['name'])}: {exc}"]
    return []
