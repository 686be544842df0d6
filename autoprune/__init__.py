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

from autoprune._version import __version__
from autoprune.apply import ApplyResult, apply_policy
from autoprune.budget import Budget, BudgetError
from autoprune.config import ConfigError, TaskConfig, task_config
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.policy import Policy, PolicyError
from autoprune.sensitivity import SensitivityResult, scan
from autoprune.space import PruningSpace, SpaceError
from autoprune.task import Task, build_task

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
