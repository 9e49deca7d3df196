"""python -m tools.deploy_check: render and check every overlay (or those named) and the Dockerfile."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from .contract import contract_errors
from .dockerfile import dockerfile_errors
from .render import DOCKERFILE, REPO, overlays, render
from .schemas import CRD_SCHEMAS, MIN_K8S, latest_k8s, schema_errors


def check_overlay(path: Path, versions: Iterable[str]) -> tuple[list[dict], list[str]]:
    objects = render(path)
    problems = []
    for v in dict.fromkeys(versions):
        problems += schema_errors(objects, v)
    problems += contract_errors(objects)
    return objects, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.deploy_check", description=__doc__.split("\n\n")[0])
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
