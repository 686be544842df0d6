"""A short default search on the embedded task (what ``make run`` shows until the agents land).

It compares the uniform policy that meets the budget exactly with a small random search whose
every proposal is projected onto the budget, and returns the best policy found. The full
searchers (DDPG, NetAdapt, ...) live in ``autoprune.agents``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from autoprune.budget import Budget
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.task import Task


@dataclass
class DemoResult:
    best_ratios: np.ndarray
    best: Evaluation
    uniform: Evaluation
    evaluations: int
    seconds: float


def quick_search(
    task: Task,
    budget: Budget,
    evaluations: int = 40,
    seed: int = 0,
    callback: Callable[[int, Evaluation, Evaluation], None] | None = None,
) -> DemoResult:
    """Uniform policy, then ``evaluations - 1`` random budget-projected policies; keep the best."""
    if evaluations < 1:
        raise ValueError(f"evaluations must be >= 1, got {evaluations}")
    start = time.perf_counter()
    evaluator = Evaluator(task)
    rng = np.random.default_rng(seed)
    n, top = len(task.space), task.space.max_ratio
    best_vec = task.project(np.zeros(n), budget)
    uniform = best = evaluator.evaluate(best_vec)
    if callback is not None:
        callback(1, uniform, best)
    for i in range(2, evaluations + 1):
        vec = task.project(rng.uniform(0, top, n) * rng.uniform(0.2, 1.0), budget)
        result = evaluator.evaluate(vec)
        if result.accuracy > best.accuracy:
            best, best_vec = result, vec
        if callback is not None:
            callback(i, result, best)
    return DemoResult(best_vec, best, uniform, evaluations, time.perf_counter() - start)
