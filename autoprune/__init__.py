"""autoprune: find how much to prune each layer of a trained network under a resource budget.

The public API::

    import autoprune as ap

    task = ap.build_task()                       # ResNet-20 on digits, channel pruning, l2
    task.units                                   # the units a policy decides on
    evaluator = ap.Evaluator(task)
    result = evaluator.evaluate({"layer1.0.conv1": 0.5})   # accuracy, flops_ratio, ...
    budget = task.check_budget("flops=0.5")
    ratios = task.project(ratios_vector, budget)  # meet a budget exactly
    pruned = ap.apply_policy(task, policy, finetune_epochs=3).model
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
    "Budget": "autoprune.budget",
    "BudgetError": "autoprune.budget",
    "ConfigError": "autoprune.config",
    "TaskConfig": "autoprune.config",
    "task_config": "autoprune.config",
    "Evaluation": "autoprune.evaluate",
    "Evaluator": "autoprune.evaluate",
    "Policy": "autoprune.policy",
    "PolicyError": "autoprune.policy",
    "SensitivityResult": "autoprune.sensitivity",
    "scan": "autoprune.sensitivity",
    "PruningSpace": "autoprune.engine.space",
    "SpaceError": "autoprune.engine.space",
    "Task": "autoprune.task",
    "build_task": "autoprune.task",
}

if TYPE_CHECKING:
    from autoprune.apply import ApplyResult, apply_policy
    from autoprune.budget import Budget, BudgetError
    from autoprune.config import ConfigError, TaskConfig, task_config
    from autoprune.evaluate import Evaluation, Evaluator
    from autoprune.policy import Policy, PolicyError
    from autoprune.sensitivity import SensitivityResult, scan
    from autoprune.engine.space import PruningSpace, SpaceError
    from autoprune.task import Task, build_task


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
    "ApplyResult",
    "Budget",
    "BudgetError",
    "ConfigError",
    "Evaluation",
    "Evaluator",
    "Policy",
    "PolicyError",
    "PruningSpace",
    "SensitivityResult",
    "SpaceError",
    "Task",
    "TaskConfig",
    "__version__",
    "apply_policy",
    "build_task",
    "scan",
    "task_config",
]
