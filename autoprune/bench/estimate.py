"""What a benchmark plan costs on this machine: measured unit costs per model, then an estimate
of every group's wall time from the plan's counts (``autoprune bench PLAN --estimate``).

For each model and granularity of the plan (its checkpoint, the plan's task settings) it
measures the pieces every search is made of:

- one policy evaluation (prune, adaptive BN, score the search split as the plan samples it) at
  one thread, as a Ray worker runs it: the median of ``repeats`` distinct policies at the
  group's budget, scored in full (no early rejection, so an upper bound for the searchers that
  reject);
- one pass over the test split and the plan's fine-tune (``finetune_batches`` batches, timed on
  ``ft_batches`` of them and scaled), at the driver's threads (every core);
- the latency lookup table's build, when the plan has a latency budget (cached on disk after).

The estimate of a group is ``evaluations x evaluation / workers`` for every stochastic search
and ``units x grid + 2`` evaluations for ``sensitivity``, plus ``2 test passes + fine-tune`` for
every search; ``netadapt`` is left out (its cost depends on its own schedule and short
fine-tunes: the headline slice measured it at 97 s on ResNet-20) and so is the agent's own
overhead. It is an estimate built on measured pieces, not a measurement of the plan: the
benchmark's own record (``benchmark_runs.jsonl``) has the groups' real times. Nothing is
searched and nothing is recorded.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from autoprune.agents import get_searcher
from autoprune.bench.plan import Group, Plan
from autoprune.budget import Budget
from autoprune.evaluate import Evaluator
from autoprune.task import Task, build_task
from autoprune.training import fine_tune

DETERMINISTIC_SEARCHES = ("uniform", "global")  # one evaluation each
SENSITIVITY_GRID = (0.2, 0.4, 0.6, 0.8)  # sensitivity's grid when the plan names none
FINETUNE_BATCH = 64  # apply_policy fine-tunes at batch 64


@dataclass(frozen=True)
class UnitCosts:
    """The measured pieces of a model's searches, in seconds."""

    model: str
    granularity: str
    units: int
    build_s: float
    evaluation_s: float
    test_s: float
    finetune_s: float
    finetune_batches: int
    latency_table_s: float | None
    threads: int


@dataclass(frozen=True)
class GroupEstimate:
    """A group's searches (netadapt left out), their evaluations and estimated minutes."""

    group: str
    searches: int
    evaluations: int
    search_min: float
    after_min: float
    total_min: float


@dataclass
class PlanEstimate:
    """Unit costs per (model, granularity) and the estimate of every group, in plan order."""

    costs: dict[tuple[str, str], UnitCosts] = field(default_factory=dict)
    groups: list[GroupEstimate] = field(default_factory=list)
    repeats: int = 3

    @property
    def total_hours(self) -> float:
        return sum(g.total_min for g in self.groups) / 60


def _evaluation_seconds(task: Task, budget: str, repeats: int) -> tuple[list[Any], float]:
    """Projected random policies at ``budget`` and the median seconds of one evaluation (one
    thread, after a warm-up evaluation)."""
    checked = task.check_budget(budget)
    evaluator = Evaluator(task)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray worker's
    try:
        vecs = [
            task.project(rng.uniform(0, task.space.max_ratio, len(task.space)), checked)
            for _ in range(repeats + 1)
        ]
        evaluator.evaluate(vecs[0])  # warm-up
        times = []
        for vec in vecs[1:]:
            t0 = time.perf_counter()
            evaluator.evaluate(vec)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return vecs, statistics.median(times)


def _finetune_batches(plan: Plan, task: Task) -> int:
    batches = plan.finetune_epochs * math.ceil(len(task.data.train) / FINETUNE_BATCH)
    return batches if plan.finetune_batches is None else min(batches, plan.finetune_batches)


def _after_search_seconds(
    task: Task, vec: Any, batches: int, ft_batches: int
) -> tuple[float, float]:
    """Seconds of one test pass of a pruned model and of the plan's fine-tune (``batches``,
    timed on ``ft_batches`` of them and scaled)."""
    pruned = task.prune(vec, persistent=True)
    task.recalibrate(pruned)
    t0 = time.perf_counter()
    task.score(pruned, "test")
    test = time.perf_counter() - t0
    ft_batches = min(ft_batches, batches) or 1
    t0 = time.perf_counter()
    fine_tune(pruned, task.data, 1, lr=0.01, seed=0, augment=task.config.train.finetune_augment,
              flip=task.config.train.flip, max_batches=ft_batches)  # fmt: skip
    return test, (time.perf_counter() - t0) * batches / ft_batches


def _table_seconds(plan: Plan, group: Group, task: Task) -> float | None:
    """Seconds to build the model's latency lookup table, when a group of it needs one."""
    if group.granularity != "channel" or not any(
        "latency" in Budget.parse(g.budget).metrics for g in plan.groups if g.model == group.model
    ):
        return None
    t0 = time.perf_counter()
    _ = task.latency_table
    return time.perf_counter() - t0


def measure_costs(plan: Plan, group: Group, repeats: int = 3, ft_batches: int = 20) -> UnitCosts:
    """The unit costs of a group's model and granularity (policies at the group's budget)."""
    t0 = time.perf_counter()
    task = build_task(plan.config(group, None).task())
    build = time.perf_counter() - t0
    vecs, evaluation = _evaluation_seconds(task, group.budget, repeats)
    batches = _finetune_batches(plan, task)
    test, ft = _after_search_seconds(task, vecs[1], batches, ft_batches)
    return UnitCosts(
        model=group.model, granularity=group.granularity, units=len(task.space), build_s=build,
        evaluation_s=evaluation, test_s=test, finetune_s=ft, finetune_batches=batches,
        latency_table_s=_table_seconds(plan, group, task), threads=torch.get_num_threads(),
    )  # fmt: skip


def _evaluations(plan: Plan, group: Group, name: str, units: int) -> tuple[int, int]:
    """(searches, evaluations) of one searcher of a group; netadapt: none counted."""
    if name == "netadapt":
        return 0, 0
    if name in plan.deterministic:
        if name == "sensitivity":
            grid = plan.options.get("sensitivity", {}).get("grid", SENSITIVITY_GRID)
            return 1, units * len(grid) + 2
        return 1, 1 if name in DETERMINISTIC_SEARCHES else group.evaluations
    seeds = list(group.seeds) if group.seeds is not None else plan.seeds
    fixed = get_searcher(name).fixed_evaluations
    return len(seeds), len(seeds) * (fixed or group.evaluations)


def group_estimate(plan: Plan, group: Group, cost: UnitCosts) -> GroupEstimate:
    """A group's estimated wall time from its model's unit costs."""
    counts = [_evaluations(plan, group, name, cost.units) for name in group.searchers]
    searches = sum(c[0] for c in counts)
    evaluations = sum(c[1] for c in counts)
    search_s = evaluations * cost.evaluation_s / max(plan.workers, 1)
    after_s = searches * (2 * cost.test_s + cost.finetune_s)
    table_s = (cost.latency_table_s or 0.0) if "latency" in group.budget else 0.0
    return GroupEstimate(group.key, searches, evaluations, search_s / 60, after_s / 60,
                         (search_s + after_s + table_s) / 60)  # fmt: skip


def estimate_plan(
    plan: Plan,
    repeats: int = 3,
    ft_batches: int = 20,
    progress: Callable[[str], None] = print,
) -> PlanEstimate:
    """Measure the unit costs of every model and granularity of the plan (once each) and
    estimate every group."""
    out = PlanEstimate(repeats=repeats)
    for group in plan.groups:
        pair = (group.model, group.granularity)
        if pair in out.costs:
            continue
        out.costs[pair] = c = measure_costs(plan, group, repeats, ft_batches)
        progress(f"{group.model}/{group.granularity}: evaluation {c.evaluation_s:.2f} s, "
                 f"test pass {c.test_s:.1f} s, fine-tune {c.finetune_s:.0f} s")  # fmt: skip
    out.groups = [group_estimate(plan, g, out.costs[(g.model, g.granularity)]) for g in plan.groups]
    return out


def estimate_report(estimate: PlanEstimate, plan: Plan, command: str) -> str:
    """The unit costs and the estimate as Markdown (``experiments/results/bench_costs.md``)."""
    ref = next(iter(estimate.costs.values()))
    lines = [
        f"# Benchmark costs on this machine  {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`{command}` on {platform.machine()}, torch {torch.__version__}, {plan.workers} Ray "
        "workers in the plan. Evaluation: one policy at the main budget on the plan's search "
        f"images, 1 thread, in full (median of {estimate.repeats}); test pass and fine-tune at "
        f"{ref.threads} threads.",
        "",
        *_costs_table(estimate, ref),
        "",
        "Estimated wall time per group (no early rejection, no agent overhead, netadapt left out):",
        "",
        *_groups_table(estimate),
        "",
        f"**Estimated total: {estimate.total_hours:.1f} hours** for {len(plan.groups)} groups.",
    ]
    return "\n".join(lines) + "\n"


def _costs_table(estimate: PlanEstimate, ref: UnitCosts) -> list[str]:
    m = ref.model
    lines = [
        "| model | granularity | units | evaluation s | test pass s | fine-tune s (batches) "
        f"| latency table s | evaluation vs {m} | test vs {m} | fine-tune vs {m} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in estimate.costs.values():
        table = "-" if c.latency_table_s is None else f"{c.latency_table_s:.0f}"
        lines.append(
            f"| {c.model} | {c.granularity} | {c.units} | {c.evaluation_s:.2f} | {c.test_s:.1f} "
            f"| {c.finetune_s:.0f} ({c.finetune_batches}) | {table} | "
            f"{_times(c.evaluation_s, ref.evaluation_s)} | {_times(c.test_s, ref.test_s)} | "
            f"{_times(c.finetune_s, ref.finetune_s)} |"
        )
    return lines


def _times(value: float, ref: float) -> str:
    return f"{value / ref:.1f}x" if ref > 0 else "-"


def _groups_table(estimate: PlanEstimate) -> list[str]:
    lines = [
        "| group | searches (not netadapt) | evaluations | searching min | fine-tune + test min "
        "| total min |",
        "|---|---|---|---|---|---|",
    ]
    for e in estimate.groups:
        lines.append(
            f"| {e.group} | {e.searches} | {e.evaluations} | {e.search_min:.0f} | "
            f"{e.after_min:.0f} | {e.total_min:.0f} |"
        )
    return lines
