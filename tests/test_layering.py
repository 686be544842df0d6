"""The layering contract (tests/layering.py): the project keeps it, and it catches breaches."""

from __future__ import annotations

import shutil
from pathlib import Path

import layering
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_tree(dst: Path) -> Path:
    """The project's sources (the package folders, experiments/ and tests/) under ``dst``."""
    for folder in (*layering.SOURCES, "experiments", "tests"):
        shutil.copytree(
            ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("*.pt", "results")
        )
    return dst


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_project_keeps_the_contract() -> None:
    assert layering.breaches(ROOT) == []


def test_a_core_module_importing_the_service_breaks_it(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    _append(root / "autoprune" / "budget.py", "from autoprune.service.app import create_app")
    found = layering.breaches(root)
    assert any("autoprune.budget imports autoprune.service.app" in f for f in found), found
    assert layering.main(["layering", str(root)]) == 1


def test_a_lazy_import_closing_a_cycle_breaks_it(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    # An import from inside a function still ties the two modules together.
    _append(root / "autoprune" / "budget.py", "def f():\n    from autoprune.policy import Policy")
    _append(root / "autoprune" / "policy.py", "from autoprune.budget import Budget")
    cycles = layering.cycles(layering.build_graph(root))
    assert any({"autoprune.budget", "autoprune.policy"} <= set(group) for group in cycles)


@pytest.mark.parametrize(
    ("module", "line", "why"),
    [
        (
            "envs/rewards.py",
            "from autoprune.agents.base import Record",
            "envs may not import agents",
        ),
        ("autoprune/runner/experiment.py", "import autoprune.cli", "may not import autoprune.cli"),
        ("autoprune/training.py", "from autoprune import build_task", "not the facade"),
    ],
)
def test_layer_breaches_are_named(tmp_path: Path, module: str, line: str, why: str) -> None:
    root = _copy_tree(tmp_path)
    _append(root / module, line)
    assert any(why in f for f in layering.layer_violations(layering.build_graph(root)))


def test_scripts_may_not_reach_into_tests_or_private_names(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "experiments" / "probe.py").write_text(
        "from autoprune.agents.netadapt import _State\nimport structures\n"
    )
    found = layering.script_violations(root)
    assert any("probe.py:1: imports a private name" in f for f in found)
    assert any("probe.py:2: imports the test suite" in f for f in found)
