"""The layering contract of autoprune's import graph, checked by `make lint` and the test suite.

The graph counts every import a module can execute: top-level ones, those inside functions
(lazy imports still tie two modules together) and those under ``if TYPE_CHECKING`` (a type
that crosses a layer is a dependency that crosses it). The contract (the design card's
"Layers enforced, not hoped for"):

- **Layers**, lowest first: core (``autoprune.*``) <- envs (``autoprune.envs``) <- agents
  (``autoprune.agents``) <- the top layer: the search runner (``autoprune.runner``), the
  benchmark (``autoprune.bench``), the service (``autoprune.service``) and the CLI
  (``autoprune.cli``). A module imports only its own layer and the layers below; within the
  top layer the runner imports none of the other three, bench and service import the runner,
  and nothing imports the CLI.
- **The public facade** ``autoprune/__init__.py`` (``import autoprune as ap``) may name any
  module; no library module imports names from it (each imports the defining module).
- **No import cycles**: no two modules reach each other through imports.
- **Scripts** in ``experiments/`` import neither ``tests`` nor a private (``_name``) member.

Run ``python tests/layering.py [ROOT]`` for the report; it exits 1 on any breach.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Source folder -> the package it installs as (pyproject.toml's package-dir).
SOURCES = {"autoprune": "autoprune", "envs": "autoprune.envs", "agents": "autoprune.agents"}
FACADE = "autoprune"
TOP = ("autoprune.runner", "autoprune.bench", "autoprune.service", "autoprune.cli")
# Layer -> the layers it may import (its own included).
ALLOWED = {
    "core": {"core"},
    "envs": {"core", "envs"},
    "agents": {"core", "envs", "agents"},
    "autoprune.runner": {"core", "envs", "agents", "autoprune.runner"},
    "autoprune.bench": {"core", "envs", "agents", "autoprune.runner", "autoprune.bench"},
    "autoprune.service": {"core", "envs", "agents", "autoprune.runner", "autoprune.service"},
    "autoprune.cli": {
        "core",
        "envs",
        "agents",
        "autoprune.runner",
        "autoprune.bench",
        "autoprune.service",
        "autoprune.cli",
    },
}


@dataclass
class Graph:
    """Modules of the project and, for each, the project modules it imports (with line)."""

    files: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, dict[str, int]] = field(default_factory=dict)


def module_name(root: Path, path: Path) -> str | None:
    """The importable name of a source file, or None when it is not part of the package."""
    rel = path.relative_to(root)
    package = SOURCES.get(rel.parts[0])
    if package is None:
        return None
    parts = [package, *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, here: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(module, names imported from it) for one import statement."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, []
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = here.split(".")
            anchor = anchor if is_package else anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        yield base, [alias.name for alias in node.names]


def _resolve(target: str, names: list[str], modules: set[str]) -> list[str]:
    """Project modules an import reaches: ``from pkg import mod`` reaches ``pkg.mod``."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    if len(found) < len(names) or not names:
        # Names that are not submodules come from the target module itself.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found.append(target)
    return found


def build_graph(root: Path) -> Graph:
    """Parse every source file under ``root``'s package folders into an import graph."""
    graph = Graph()
    for folder in SOURCES:
        for path in sorted((root / folder).rglob("*.py")):
            name = module_name(root, path)
            if name is not None:
                graph.files[name] = path
    modules = set(graph.files)
    for name, path in graph.files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            for target, names in _imported(node, name, path.name == "__init__.py"):
                for dep in _resolve(target, names, modules):
                    if dep != name:
                        edges.setdefault(dep, node.lineno)
        graph.edges[name] = edges
    return graph


def layer(module: str) -> str:
    """The layer a module belongs to (see the module docstring)."""
    for top in TOP:
        if module == top or module.startswith(top + "."):
            return top
    for sub, name in (("autoprune.agents", "agents"), ("autoprune.envs", "envs")):
        if module == sub or module.startswith(sub + "."):
            return name
    return "core"


def layer_violations(graph: Graph) -> list[str]:
    """Imports that go up a layer, or into the facade from inside the library."""
    out = []
    for module, deps in sorted(graph.edges.items()):
        if module == FACADE:
            continue
        for dep, line in sorted(deps.items()):
            where = f"{graph.files[module]}:{line}: {module} imports {dep}"
            if dep == FACADE:
                out.append(f"{where} (import the defining module, not the facade)")
            elif layer(dep) not in ALLOWED[layer(module)]:
                out.append(f"{where} ({layer(module)} may not import {layer(dep)})")
    return out


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph.edges):
        if v not in index and v != FACADE:
            visit(v)
    return sorted(found)


def script_violations(root: Path) -> list[str]:
    """Scripts in experiments/ that import the test suite or a private name."""
    out = []
    suite = {p.stem for p in (root / "tests").glob("*.py")}  # reachable by a sys.path insert
    for path in sorted((root / "experiments").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target, names in _imported(node, "experiments", False):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                head = target.split(".")[0]
                if head == "tests" or head in suite:
                    out.append(f"{path}:{node.lineno}: imports the test suite ({target})")
                elif private or any(p.startswith("_") for p in target.split(".")[1:]):
                    out.append(f"{path}:{node.lineno}: imports a private name from {target}")
    return out


def breaches(root: Path) -> list[str]:
    """Every breach of the contract under ``root``, one line each."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    graph = build_graph(root)
    out = layer_violations(graph)
    out += [f"import cycle: {' <-> '.join(group)}" for group in cycles(graph)]
    return out + script_violations(root)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    graph = build_graph(root)
    edges = sum(len(d) for d in graph.edges.values())
    found = breaches(root)
    print(f"layering: {len(graph.files)} modules, {edges} imports between them")
    for line in found:
        print(line)
    print(f"layering: {len(found)} breach(es)" if found else "layering: contract kept")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
