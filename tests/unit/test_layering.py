"""Layers point down: no module under libs/ imports a service package, and no service package imports another.

The import graph is read from the source with `ast` (every `import` and `from ... import`, at module level or
inside a function, relative imports resolved, and `importlib.import_module("...")` with a literal name), for every
module under libs/ and services/. Which packages are services, and where each lives, is read from the
package-dir table in pyproject.toml, so a new service is covered as soon as it is packaged.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Known violations (importer, imported service package), each still a real edge (test_allow_list_is_not_stale).
# Empty since #15 moved the gallery index to lfr.galleryindex and the identification code to its own service.
ALLOWED: set[tuple[str, str]] = set()


def package_dirs() -> dict[str, Path]:
    """Package name -> its folder, from [tool.setuptools] package-dir."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {name: REPO / folder for name, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def service_packages() -> dict[str, Path]:
    """The deployable services: the packages whose folder is under services/."""
    return {name: d for name, d in package_dirs().items() if d.parent == REPO / "services"}


def module_name(path: Path, dirs: dict[str, Path]) -> str:
    """The dotted name of a source file, from the package whose folder holds it (the deepest one)."""
    pkg, root = max(((n, d) for n, d in dirs.items() if path.is_relative_to(d)), key=lambda x: len(x[1].parts))
    parts = [*pkg.split("."), *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name the source imports, anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.add(node.args[0].value)
    return out


def owner(name: str, services: dict[str, Path]) -> str | None:
    """The service package a module name belongs to, or None."""
    return next((s for s in services if name == s or name.startswith(s + ".")), None)


def forbidden_edges(modules: dict[str, set[str]], library_modules: set[str], services: dict[str, Path]
                    ) -> set[tuple[str, str]]:
    """(importer, imported service package) for every library -> service or service -> other service edge."""
    edges = set()
    for module, names in modules.items():
        mine = owner(module, services)
        for name in names:
            theirs = owner(name, services)
            if theirs is None or theirs == mine:
                continue
            if module in library_modules or mine is not None:
                edges.add((module, theirs))
    return edges


def import_graph() -> tuple[dict[str, set[str]], set[str]]:
    """Module -> the names it imports, for every module under libs/ and services/; and which are libraries."""
    dirs = package_dirs()
    modules: dict[str, set[str]] = {}
    library: set[str] = set()
    for top in ("libs", "services"):
        for path in sorted((REPO / top).rglob("*.py")):
            if not any(path.is_relative_to(d) for d in dirs.values()):
                continue
            name = module_name(path, dirs)
            tree = ast.parse(path.read_text(), filename=str(path))
            modules[name] = imported_names(tree, name, path.name == "__init__.py")
            if top == "libs":
                library.add(name)
    return modules, library


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_service_list_comes_from_pyproject():
    services = service_packages()
    assert {"lfr.ingest", "lfr.detection", "lfr.embedding", "lfr.watchlist", "lfr.match", "lfr.audit",
            "lfr.console", "lfr.identification"} <= set(services)
    assert "lfr" not in services
    for d in services.values():
        assert d.is_dir(), d


def test_every_folder_under_services_is_a_packaged_service():
    """A service folder missing from package-dir would escape the check (and the wheel)."""
    folders = {p.parent for p in (REPO / "services").glob("*/__init__.py")}
    assert folders == set(service_packages().values())


def test_the_graph_sees_every_module_and_function_level_imports(graph):
    modules, library = graph
    assert "lfr.runtime.service" in library and "lfr.cli.main" in library
    assert "lfr.audit.service" in modules and "lfr.audit.service" not in library
    # an import inside a function counts (lfr.cli.model imports lfr.cli.client inside policy_far)
    assert "lfr.cli.client" in modules["lfr.cli.model"]
    # a relative import is resolved against the importing module's package
    tree = ast.parse("from .core import x\nfrom . import store\n")
    assert imported_names(tree, "lfr.audit.service", False) >= {"lfr.audit.core", "lfr.audit.store"}
    assert imported_names(tree, "lfr.audit", True) >= {"lfr.audit.core", "lfr.audit.store"}


def test_libraries_never_import_a_service_and_services_never_import_each_other(graph):
    modules, library = graph
    edges = forbidden_edges(modules, library, service_packages())
    unexpected = sorted(edges - ALLOWED)
    assert not unexpected, "forbidden imports (importer -> service package): " + "; ".join(
        f"{a} -> {b}" for a, b in unexpected)


def test_allow_list_is_not_stale(graph):
    modules, library = graph
    edges = forbidden_edges(modules, library, service_packages())
    assert not (ALLOWED - edges), f"no longer violations, remove from ALLOWED: {sorted(ALLOWED - edges)}"


def test_a_forbidden_edge_fails():
    """The check can fail: synthetic graphs with each kind of bad edge, and the allowed kinds."""
    services = {"lfr.watchlist": Path("w"), "lfr.match": Path("m")}
    src = {
        "lfr.cli.ops": "def f():\n    from lfr.watchlist.store import VectorIndex\n",       # library -> service
        "lfr.bench.x": "import importlib\nimportlib.import_module('lfr.match.core')\n",     # dynamic, literal
        "lfr.match.service": "from lfr.watchlist import core\n",                            # service -> service
        "lfr.watchlist.service": "from lfr.watchlist.core import x\nfrom lfr.runtime import rpc\n",  # own, libs
        "lfr.runtime.rpc": "import grpc\nfrom lfr.pb import common_pb2\n",                  # library -> library
    }
    modules = {m: imported_names(ast.parse(s), m, False) for m, s in src.items()}
    edges = forbidden_edges(modules, {"lfr.cli.ops", "lfr.bench.x", "lfr.runtime.rpc"}, services)
    assert edges == {("lfr.cli.ops", "lfr.watchlist"), ("lfr.bench.x", "lfr.match"),
                     ("lfr.match.service", "lfr.watchlist")}
