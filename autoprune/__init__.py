"""autoprune: find how much to prune each layer of a trained network under a resource budget.

The public API, all from one import::

    import autoprune as ap

    task = ap.task_from_module(model, train=(x, y), test=(x_test, y_test))  # or ap.build_task()
    result = ap.search("ddpg", task, "flops=0.5", evaluations=300)
    table = ap.compare(task, ["ddpg", "sensitivity", "uniform"], "flops=0.5",
                       evaluations=300, seeds=[0, 1]).table()
    applied = ap.apply_policy(task, result.policy(), finetune_epochs=3)
    ap.save_pruned("pruned.pt", task, applied.model, result.policy())
    model, policy = ap.load_pruned("pruned.pt")

``ap.run_experiment`` runs a whole configured experiment (several searchers and seeds, MLflow).
Names resolve on first use, so ``import autoprune`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autoprune._version import __version__

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import autoprune`` (and the CLI, for ``--help`` or ``best``) does not pay for torch.
_EXPORTS = {
    "ApplyResult": "autoprune.apply",
    "apply_policy": "autoprune.apply",
    "load_pruned": "autoprune.apply",
    "save_pruned": "autoprune.apply",
    "Budget": "autoprune.budget",
    "BudgetError": "autoprune.budget",
    "ConfigError": "autoprune.config",
    "TaskConfig": "autoprune.config",
    "task_config": "autoprune.config",
    "ExportError": "autoprune.export",
    "ExportResult": "autoprune.export",
    "export": "autoprune.export",
    "Evaluation": "autoprune.evaluate",
    "Evaluator": "autoprune.evaluate",
    "Policy": "autoprune.policy",
    "PolicyError": "autoprune.policy",
    "SensitivityResult": "autoprune.sensitivity",
    "scan": "autoprune.sensitivity",
    "PruningSpace": "autoprune.engine.space",
    "SpaceError": "autoprune.engine.units",
    "Task": "autoprune.task",
    "build_task": "autoprune.task",
    "task_from_module": "autoprune.task",
    "Record": "autoprune.agents.base",
    "SearchError": "autoprune.agents.base",
    "SearchResult": "autoprune.agents.base",
    "search": "autoprune.agents.registry",
    "SEARCHERS": "autoprune.agents.registry",
    "Comparison": "autoprune.agents.compare",
    "compare": "autoprune.agents.compare",
    "ExperimentResult": "autoprune.runner.experiment",
    "run_experiment": "autoprune.runner.experiment",
    "experiment_config": "autoprune.runner.config",
}

if TYPE_CHECKING:
    from autoprune.agents.base import Record, SearchError, SearchResult
    from autoprune.agents.compare import Comparison, compare
    from autoprune.agents.registry import SEARCHERS, search
    from autoprune.apply import ApplyResult, apply_policy, load_pruned, save_pruned
    from autoprune.budget import Budget, BudgetError
    from autoprune.config import ConfigError, TaskConfig, task_config
    from autoprune.engine.space import PruningSpace
    from autoprune.engine.units import SpaceError
    from autoprune.evaluate import Evaluation, Evaluator
    from autoprune.export import ExportError, ExportResult, export
    from autoprune.policy import Policy, PolicyError
    from autoprune.runner.config import experiment_config
    from autoprune.runner.experiment import ExperimentResult, run_experiment
    from autoprune.sensitivity import SensitivityResult, scan
    from autoprune.task import Task, build_task, task_from_module


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "SEARCHERS",
    "ApplyResult",
    "Budget",
    "BudgetError",
    "Comparison",
    "ConfigError",
    "Evaluation",
    "Evaluator",
    "ExperimentResult",
    "ExportError",
    "ExportResult",
    "Policy",
    "PolicyError",
    "PruningSpace",
    "Record",
    "SearchError",
    "SearchResult",
    "SensitivityResult",
    "SpaceError",
    "Task",
    "TaskConfig",
    "__version__",
    "apply_policy",
    "build_task",
    "compare",
    "experiment_config",
    "export",
    "load_pruned",
    "run_experiment",
    "save_pruned",
    "scan",
    "search",
    "task_config",
    "task_from_module",
]
