"""Simple searchers every learned policy must beat: ``uniform``, ``random``, ``sensitivity`` and
``global``.

- ``uniform``: one ratio for every unit, the smallest that meets the budget (1 evaluation).
- ``random``: random actions through the RL agent's own environment and action clipping (AMC),
  so it is the agent's search space without the learning.
- ``sensitivity``: prune each unit alone over a grid (MIT 6.5940, lecture 3), then spend the
  budget greedily where the scan predicts the smallest accuracy loss per unit of cost saved.
- ``global``: torch-pruning's global magnitude ranking at the budget, what a user of
  torch-pruning alone would do.

Every returned policy meets the budget: each searcher ends with the task's exact projection as a
safety net before its final evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Annotated, Any, cast

import numpy as np
import torch
import torch_pruning as tp
from autoprune.agents.base import Preflight, Problem, Searcher, SearchError
from autoprune.agents.options import SearchOptions
from autoprune.agents.registry import register
from autoprune.envs.pruning_env import PruningEnv
from pydantic import Field

from autoprune.budget import Budget, within
from autoprune.engine.surgery import CONVS, TRANSPOSED
from autoprune.sensitivity import SensitivityResult, scan
from autoprune.task import Task

CostFn = Callable[[np.ndarray], Mapping[str, float]]
_GRID_EPS = 1e-9  # grid ratios this close to a unit's ratio are the same step


def unmet_saving(budget: Budget, before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Cost saved by a change, summed over the budget metrics not yet met (cost ratios)."""
    unmet = [m for m, limit in budget.limits.items() if not within(before[m], limit)]
    return float(sum(before[m] - after[m] for m in unmet))


# ---------------------------------------------------------------- uniform


@register
class UniformSearcher(Searcher):
    """The same ratio for every unit, the smallest that meets the budget (found by bisection).

    One evaluation. The reference point of every pruning paper: any per-unit allocation worth
    searching for must beat it.
    """

    name = "uniform"
    fixed_evaluations = 1

    def _search(self) -> None:
        vec = self.project(np.zeros(len(self.task.space)))
        self.result.info["ratio"] = float(vec.max(initial=0.0))
        self.evaluate(vec, note="uniform")


# ---------------------------------------------------------------- random


RANDOM_BATCH = 8  # policies drawn (and, with Ray, evaluated) together


@register
class RandomSearcher(Searcher):
    """Random search in the RL agent's environment: uniform random actions in [-1, 1].

    Each episode walks the units through :class:`~autoprune.envs.PruningEnv` with AMC's action
    clipping, so every policy meets the budget and the search space is exactly the agent's. One
    episode per evaluation (``evaluations`` is required). Actions come from the searcher's seeded
    generator, so the same seed gives the same policies.
    """

    name = "random"
    needs_evaluations = True

    def _search(self) -> None:
        env = PruningEnv(self.task, self.budget, evaluator=self.evaluator)
        assert self.evaluations is not None  # needs_evaluations: checked by the base class
        units = len(self.task.space)
        # Batches keep every Ray worker busy; the same size in this process, so that early
        # rejection (against the best before each batch) rejects the same policies either way.
        batch = max(RANDOM_BATCH, 2 * self.backend.workers)
        done = 0
        while done < self.evaluations:
            size = min(batch, self.evaluations - done)
            # One action per unit from the seeded generator: the policies depend on the seed only.
            vecs = [env.rollout(self.rng.uniform(-1.0, 1.0, size=units)) for _ in range(size)]
            for evaluation in self.backend.map(vecs, self.reject_below):
                done += 1
                reward = float(env.reward_fn(evaluation))
                self.record(evaluation, reward=reward, note=f"episode {done}")


# ---------------------------------------------------------------- sensitivity


class SensitivityOptions(SearchOptions):
    """Options of ``sensitivity``."""

    grid: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6, 0.8],
        min_length=1,
        max_length=100,
        description="the ratios each unit is scanned at, alone (at most the task's max_ratio)",
    )


@register
class SensitivitySearcher(Searcher):
    """Allocate ratios from a layer sensitivity scan (MIT 6.5940, lecture 3).

    The scan evaluates each unit alone at each ``grid`` ratio (plus the dense model). Starting
    from nothing pruned, the unit whose next grid step costs the least predicted accuracy per
    unit of budget cost saved is raised one step at a time until the budget is met; the last step
    stops part-way, just where the budget is met. Predicted drops are the scan's losses against
    the dense model, linearly interpolated between grid points and clipped at 0 (a unit that
    gained accuracy is predicted to lose nothing). Needs ``units * len(grid) + 2`` evaluations:
    the dense model, the scan and the final policy.
    """

    name = "sensitivity"
    options_type = SensitivityOptions
    options: SensitivityOptions

    def check_task(self) -> None:
        max_ratio = self.task.space.max_ratio
        self.grid = tuple(sorted(set(self.options.grid)))  # the scan's ratios, once each
        if any(r > max_ratio for r in self.grid):
            raise SearchError(f"sensitivity grid {list(self.grid)} must be ratios in "
                              f"(0, {max_ratio:g}]")  # fmt: skip
        super().check_task()  # the evaluations the scan needs: preflight

    @classmethod
    def preflight(cls, options: SearchOptions | Mapping[str, Any], ctx: Preflight) -> list[Problem]:
        out = super().preflight(options, ctx)
        grid = set(cast(SensitivityOptions, cls.typed_options(options)).grid)
        if ctx.units is not None and ctx.evaluations is not None:
            needed = ctx.units * len(grid) + 2
            if ctx.evaluations < needed:
                out.append((
                    ("evaluations",),
                    f"sensitivity needs {needed} evaluations ({ctx.units} units x {len(grid)} "
                    f"grid ratios + dense + final), got {ctx.evaluations}",
                ))  # fmt: skip
        return out

    def _search(self) -> None:
        self.record(self.evaluator.dense(), note="scan")  # the scan's own call is then cached
        result = scan(
            self.evaluator,
            self.grid,
            callback=lambda _unit, _ratio, e: self.record(e, note="scan"),
            evaluate_many=self.backend.map if self.backend.workers else None,
        )
        vec = allocate(result, self.budget, self.cost_ratios, self.task.space.max_ratio)
        vec = self.project(vec)  # safety net: a grid that stops short of the budget
        self.result.info["sensitivity"] = {
            "grid": list(result.grid),
            "dense_accuracy": result.dense_accuracy,
            "accuracy": result.accuracy.round(6).tolist(),
            "predicted_drop": float(sum(predicted_drop(result, i, r) for i, r in enumerate(vec))),
        }
        self.evaluate(vec, note="final")


def predicted_drop(result: SensitivityResult, unit: int, ratio: float) -> float:
    """Accuracy lost by one unit alone at ``ratio``: the scan interpolated, clipped at 0."""
    drops = np.maximum(result.drop()[unit], 0.0)
    return float(np.interp(ratio, [0.0, *result.grid], [0.0, *drops]))


def allocate(
    result: SensitivityResult, budget: Budget, cost_fn: CostFn, max_ratio: float
) -> np.ndarray:
    """Greedy allocation: raise the cheapest unit (predicted drop per cost saved) one grid step at
    a time until the budget is met; the last step stops where the budget is just met."""
    vec = np.zeros(len(result.units))
    costs = cost_fn(vec)
    while not budget.met_by(costs):
        step = _cheapest_step(result, budget, cost_fn, vec, costs)
        if step is None:
            return vec  # every unit at the top of the grid: the caller projects
        unit, ratio = step
        before = vec[unit]
        vec[unit] = ratio
        costs = cost_fn(vec)
        if budget.met_by(costs):
            vec[unit] = _just_enough(budget, cost_fn, vec, unit, before, ratio)
    return np.minimum(vec, max_ratio)


def _cheapest_step(
    result: SensitivityResult,
    budget: Budget,
    cost_fn: CostFn,
    vec: np.ndarray,
    costs: Mapping[str, float],
) -> tuple[int, float] | None:
    """The (unit, next grid ratio that saves cost) with the smallest predicted drop per cost
    saved. A grid step that saves nothing (both ratios round to the same channel count or N:M
    pattern: 0.4 and 0.6 are both 2:4) is passed over for the next one, so a unit is never stuck
    below the levels that would meet the budget."""
    best: tuple[float, float, int] | None = None
    ratio_of: dict[int, float] = {}
    for i in range(len(vec)):
        for ratio in (r for r in result.grid if r > vec[i] + _GRID_EPS):
            trial = vec.copy()
            trial[i] = ratio
            saved = unmet_saving(budget, costs, cost_fn(trial))
            if saved > 0:
                break
        else:
            continue  # the top of the grid, or no step of this unit saves anything
        extra = max(0.0, predicted_drop(result, i, ratio) - predicted_drop(result, i, vec[i]))
        key = (extra / saved, -saved, i)  # ties: the bigger saving, then network order
        if best is None or key < best:
            best, ratio_of[i] = key, ratio
    return None if best is None else (best[2], ratio_of[best[2]])


def _just_enough(
    budget: Budget, cost_fn: CostFn, vec: np.ndarray, unit: int, lo: float, hi: float
) -> float:
    """The smallest ratio of one unit in [lo, hi] that meets the budget (bisection)."""
    trial = vec.copy()
    for _ in range(30):
        trial[unit] = (lo + hi) / 2
        if budget.met_by(cost_fn(trial)):
            hi = trial[unit]
        else:
            lo = trial[unit]
    return hi


# ---------------------------------------------------------------- global


class GlobalOptions(SearchOptions):
    """Options of ``global``."""

    bisection_steps: int = Field(
        14, ge=1, le=64, description="prunings of a copy that bisect the global ratio"
    )


@register
class GlobalSearcher(Searcher):
    """torch-pruning's global magnitude pruning at the budget (DepGraph, Fang et al., CVPR 2023).

    What a user of torch-pruning alone would do: ``MetaPruner`` with group L2 magnitude
    importance and ``global_pruning=True`` ranks every channel of the network against every
    other, and one global ratio decides how many go. The global ratio is found by bisection
    (``bisection_steps`` cheap prunings of a copy, no evaluation): the smallest one whose
    per-unit channel counts meet the budget. Only those per-unit counts come from torch-pruning;
    the evaluator then removes channels within each unit by the task's own criterion, like every
    other searcher. Per-unit ratios are clipped to ``max_ratio`` (torch-pruning's
    ``max_pruning_ratio`` only stops further pruning of a group, it does not cap one step).
    Channel granularity only. One evaluation.
    """

    name = "global"
    channel_only = True
    fixed_evaluations = 1
    options_type = GlobalOptions
    options: GlobalOptions

    def _search(self) -> None:
        zeros = np.zeros(len(self.task.space))
        ratio, vec = 0.0, zeros
        if not self.budget.met_by(self.cost_ratios(zeros)):
            ratio, vec = self._bisect(self.options.bisection_steps)
        vec = self.project(vec)  # safety net (a no-op when the bisection met the budget)
        self.result.info["global_ratio"] = ratio
        self.evaluate(vec, note=f"global ratio {ratio:.4f}")

    def _bisect(self, steps: int) -> tuple[float, np.ndarray]:
        """The smallest global ratio in (0, max_ratio] meeting the budget, and its vector."""
        lo, hi = 0.0, self.task.space.max_ratio
        best = global_ratios(self.task, hi)
        for _ in range(steps - 1):
            mid = (lo + hi) / 2
            vec = global_ratios(self.task, mid)
            if self.budget.met_by(self.cost_ratios(vec)):
                hi, best = mid, vec
            else:
                lo = mid
        return hi, best


def global_ratios(task: Task, ratio: float) -> np.ndarray:
    """Per-unit ratios that torch-pruning's global magnitude ranking gives at a global ratio.

    Prunes a deep copy of the task's model with ``MetaPruner(global_pruning=True)`` and reads the
    kept output channels of each unit's root module; removed / size, clipped to max_ratio.
    """
    space = task.space
    model = copy.deepcopy(task.model).eval()
    modules = dict(model.named_modules())
    example = torch.zeros((1, *task.input_shape), device=task.device)
    round_to = task.config.round_to if task.config.round_to > 1 else None
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=float(ratio),
        max_pruning_ratio=space.max_ratio,
        ignored_layers=[modules[space.classifier]],
        round_to=round_to,
    )
    pruner.step()
    sizes = np.array([u.size for u in space.units], dtype=np.float64)
    kept = np.array([_out_channels(modules[u.name]) for u in space.units], dtype=np.float64)
    return np.clip((sizes - kept) / sizes, 0.0, space.max_ratio)


def _out_channels(module: torch.nn.Module) -> int:
    if isinstance(module, (*CONVS, *TRANSPOSED)):
        return int(module.out_channels)
    if isinstance(module, torch.nn.Linear):
        return int(module.out_features)
    raise SearchError(f"unit root {type(module).__name__} is neither a conv nor a linear layer")
