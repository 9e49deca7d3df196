"""The service images' Dockerfile: one target per service, non-root, no build tools or pip in the final images,
torch only in detection and embedding, pins equal to pyproject.toml, weights checked at build time."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from .render import DOCKERFILE, REPO
from .topology import MODEL_SERVICES

BUILD_TOOLS = ("gcc", "g++", "make", "cmake", "build-essential", "git", "curl", "wget", "clang")


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
