"""Contract rules for the shared infrastructure and names: the NATS cluster and its permissions, the Qdrant
cluster, subjects and stream names from lfr.runtime.subjects, KEDA triggers, and NetworkPolicy reachability."""

from __future__ import annotations

import ipaddress
import re

from .objects import (
    NAME,
    as_int,
    base_name,
    container_env,
    ingress_peers,
    peer_names,
    pod_labels,
    ref,
    selects,
    strings,
    workloads_of,
)
from .topology import EXTERNAL_API, GATEWAY_LABEL, INTERNAL_CALLERS, MONITORING_LABEL, STAGE_OF


def streams():
    """Every JetStream stream of the platform: the durable facts and the audit chain."""
    from lfr.runtime import subjects

    return (*subjects.STREAMS, subjects.AUDIT)


def nats_errors(objects, index, stream_names) -> list[str]:
    problems = []
    sts = index.get(("StatefulSet", "nats"))
    conf = next((o for o in objects if o["kind"] == "ConfigMap" and base_name(o["metadata"]["name"]) == "nats-config"),
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
    from lfr.runtime.natsserver import mappings_config
    from lfr.runtime.subjects import PARTITION_MAPPING

    if mappings_config(PARTITION_MAPPING) not in text:
        problems.append("nats.conf: the embeddings' partition mapping must be lfr.runtime.subjects.PARTITION_MAPPING "
                        "(match replicas read partitions of it)")
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


def qdrant_errors(index) -> list[str]:
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


def names_errors(objects, config_keys, stream_names) -> list[str]:
    """Subjects and stream names anywhere in the manifests must be the code's (lfr.runtime.subjects)."""
    from lfr.runtime import subjects

    domains = {s.split(".")[2] for s in (subjects.frames(), subjects.faces(), subjects.embeddings(),
                                         subjects.evidence())}
    domains |= {s.split(".")[2] for stream in streams() for s in stream.subjects}
    problems = set()
    for obj in objects:
        for text in strings(obj):
            for m in re.finditer(r"\blfr\.(v\d+)\.(>|[a-z_]+)", text):
                if m.group(1) != subjects.VERSION or (m.group(2) != ">" and m.group(2) not in domains):
                    problems.add(f"{ref(obj)}: subject {m.group(0)!r} is not in lfr.runtime.subjects")
            for m in re.finditer(r"\bLFR_[A-Z][A-Z0-9_]*\b", text):
                name = m.group(0)
                if name in stream_names or name in config_keys or name.removesuffix("_FILE") in config_keys:
                    continue
                problems.add(f"{ref(obj)}: {name} is neither a stream of lfr.runtime.subjects nor a config key")
    return sorted(problems)


def keda_errors(objects, services, stages, stream_names) -> list[str]:
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


def network_errors(objects, deployments, index, services) -> list[str]:
    problems = []
    if not any(o["kind"] == "NetworkPolicy" and o["spec"].get("podSelector") in ({}, None)
               and set(o["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
               and not o["spec"].get("ingress") and not o["spec"].get("egress") for o in objects):
        problems.append("NetworkPolicy: a default deny of ingress and egress for every pod is required")

    def pod_peer_names(peer) -> set[str] | None:
        """Names of the workloads a peer admits, or None if it admits pods outside this namespace/any."""
        if peer is None or "ipBlock" in peer or "namespaceSelector" in peer:
            return None
        return {pod_labels(w).get(NAME) for w in workloads_of(objects) if selects(peer.get("podSelector"), pod_labels(w))}

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
            problems.append(f"{ref(workload)} port {port}: reachable from {peer_names(peer)}")

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
        port = as_int(env.get("LFR_GRPC_PORT"))
        if port:
            check(dep, port, INTERNAL_CALLERS.get(name, set()), name in EXTERNAL_API)
        metrics = as_int(env.get("LFR_METRICS_PORT"))
        if metrics and metrics > 0:
            check(dep, metrics, set(), False, allow_monitoring=True)
        health = as_int(env.get("LFR_HEALTH_PORT"))
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
