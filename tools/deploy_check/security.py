"""Contract rules for transport security and caller authentication (lfr.runtime.security): mutual TLS from a
mounted Secret issued by a cert-manager Certificate, bearer-token keys mounted, no LFR_INSECURE, media read only
from read-only mounts."""

from __future__ import annotations

from .objects import egress_to, issued_secrets, mount_of, pod_labels, ref, selects
from .topology import (
    CERT_USAGES,
    DEV_ISSUER,
    ENVIRONMENT_LABEL,
    EXTERNAL_SECRETS,
    MEDIA_READERS,
    RTSP_PORTS,
)


def security_errors(where: str, name: str, cfg, env: dict, dep: dict, index: dict, objects: list[dict]) -> list[str]:
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
        cert = issued_secrets(objects).get(secret["secretName"])
        if cert is None:
            if ("Secret", secret["secretName"]) not in index:
                err(f"{where}: the TLS Secret {secret['secretName']!r} is not issued by a rendered cert-manager "
                    "Certificate")
        else:
            problems.extend(certificate_errors(where, name, cert, items, dep, objects))
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
        m = mount_of(root, mounts)
        if not root.startswith("/") or m is None or not m.get("readOnly"):
            err(f"{where}: LFR_MEDIA_ROOTS entry {root!r} must lie on a readOnly volume mount (media are only "
                "read; a root on a writable volume, such as the state volume, opens the service's own files to "
                "callers' jobs and lets the service alter evidence)")
    if name in MEDIA_READERS and cfg.source_hosts.strip() and not egress_to(objects, dep, RTSP_PORTS):
        err(f"{where}: LFR_SOURCE_HOSTS lists camera hosts but no NetworkPolicy lets it reach RTSP "
            f"({'/'.join(map(str, RTSP_PORTS))})")
    return problems


def certificate_errors(where, name, cert, items, dep, objects) -> list[str]:
    """The cert-manager Certificate behind a service's TLS Secret: its identity and the names it is reached by."""
    problems: list[str] = []
    spec = cert["spec"]
    what = f"{ref(cert)} (the TLS Secret of {where})"
    if spec.get("commonName") != name:
        problems.append(f"{what}: commonName must be {name!r}: the services know each other by it "
                        f"(is {spec.get('commonName')!r})")
    namespace = dep["metadata"].get("namespace") or cert["metadata"].get("namespace")
    needed = []
    for svc in (o for o in objects if o["kind"] == "Service" and o["spec"].get("clusterIP") != "None"
                and selects({"matchLabels": o["spec"].get("selector", {})}, pod_labels(dep))):
        # (a headless Service names pods, not the service: a partitioned service's pod names are its own rule)
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


def issuer_errors(objects, names, issued) -> list[str]:
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
