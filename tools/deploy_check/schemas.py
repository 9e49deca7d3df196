"""Strict schema validation of rendered objects: Kubernetes kinds against the OpenAPI schema bundled by
`kubernetes-validate` (unknown fields are errors); the custom resources in CRD_SCHEMAS against our own strict
schema (deploy/k8s/schemas/). A kind with no schema anywhere is an error, never skipped silently."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from .objects import ref
from .render import K8S

# Oldest Kubernetes release the manifests target (native gRPC probes, PDB unhealthyPodEvictionPolicy and
# topology-spread matchLabelKeys are all available), and the newest whose schema kubernetes-validate bundles.
MIN_K8S = "1.31"

# Custom resources: (apiVersion, kind) -> our schema file under deploy/k8s/schemas/.
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh-v1alpha1-scaledobject.json",
               ("cert-manager.io/v1", "Certificate"): "cert-manager.io-v1-certificate.json",
               ("cert-manager.io/v1", "Issuer"): "cert-manager.io-v1-issuer.json"}


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
