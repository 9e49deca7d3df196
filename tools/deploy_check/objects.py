"""Reading rendered Kubernetes objects: names, the environment a container gets, label selectors, the peers a
NetworkPolicy admits, mounts, and the Secrets and ConfigMaps a workload refers to."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

NAME = "app.kubernetes.io/name"


def ref(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def by_kind_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def base_name(name: str) -> str:
    """Rendered names of generated ConfigMaps/Secrets carry a hash suffix: lfr-common-abc123 -> lfr-common."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def workloads_of(objects: list[dict]) -> list[dict]:
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


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def port_number(port, container_ports: dict[str, int]):
    return container_ports.get(port, port) if isinstance(port, str) else port


def ingress_peers(objects: list[dict], workload: dict, port: int) -> list[dict]:
    """Every `from` peer that some NetworkPolicy admits to `port` of the workload's pods (None = anyone)."""
    labels = pod_labels(workload)
    cports = {p["name"]: p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
              for p in c.get("ports", []) if "name" in p}
    peers: list = []
    for pol in objects:
        if pol["kind"] != "NetworkPolicy" or not selects(pol["spec"].get("podSelector"), labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(port_number(p.get("port"), cports) in (port, None) for p in ports):
                continue
            peers.extend(rule.get("from") or [None])
    return peers


def peer_names(peer: dict | None) -> str:
    if peer is None:
        return "anyone"
    return json.dumps(peer, sort_keys=True)


def egress_to(objects: list[dict], workload: dict, ports: Iterable[int]) -> bool:
    """Whether some NetworkPolicy lets the workload's pods open connections to one of the ports."""
    labels = pod_labels(workload)
    for pol in objects:
        if pol["kind"] != "NetworkPolicy" or not selects(pol["spec"].get("podSelector"), labels):
            continue
        for rule in pol["spec"].get("egress", []):
            allowed = [p.get("port") for p in rule.get("ports") or [{}]]
            if any(p is None or p in ports for p in allowed):
                return True
    return False


def under(path: str, mount_path: str) -> bool:
    return path == mount_path.rstrip("/") or path.startswith(mount_path.rstrip("/") + "/")


def mount_of(path: str, mounts: list[dict]) -> dict | None:
    """The deepest volumeMount that holds path, or None."""
    return next((m for m in sorted(mounts, key=lambda m: len(m["mountPath"]), reverse=True)
                 if under(path, m["mountPath"])), None)


def claim_of(path: str, mounts: list[dict], vols: dict) -> str | None:
    """The PersistentVolumeClaim a path lies on (the deepest mount that holds it), or None."""
    for m in sorted(mounts, key=lambda m: len(m["mountPath"]), reverse=True):
        if under(path, m["mountPath"]):
            claim = vols.get(m["name"], {}).get("persistentVolumeClaim")
            return claim["claimName"] if claim and not m.get("readOnly") else None
    return None


def issued_secrets(objects: list[dict]) -> dict[str, dict]:
    """Secret name -> the rendered cert-manager Certificate that writes it."""
    return {o["spec"]["secretName"]: o for o in objects if o["kind"] == "Certificate" and "secretName" in o["spec"]}


def secret_form(key: str, keys: set[str]) -> bool:
    """LFR_X_FILE, the secret-file form of the configuration key LFR_X (not a key in its own right)."""
    return key.endswith("_FILE") and key not in keys and key[:-5] in keys


def secret_file_mounted(path: str, mounts: dict, vols: dict) -> bool:
    for mount in mounts.values():
        secret = vols.get(mount["name"], {}).get("secret")
        root = mount["mountPath"].rstrip("/") + "/"
        if secret and path.startswith(root):
            rel = path[len(root):]
            items = secret.get("items")
            return rel in [i["path"] for i in items] if items else True
    return False


def secret_refs(workload: dict) -> set[str]:
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


def configmap_refs(workload: dict) -> set[str]:
    pod = workload["spec"]["template"]["spec"]
    out = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        out |= {i["configMapRef"]["name"] for i in c.get("envFrom", []) if "configMapRef" in i}
    return out


def service_port(services: dict, host: str, port: int, app: str) -> bool:
    svc = services.get(host)
    return bool(svc and svc["spec"].get("selector", {}).get(NAME) == app
                and any(p["port"] == port for p in svc["spec"]["ports"]))


def as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def strings(node) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
