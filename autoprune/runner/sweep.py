"""Accuracy-vs-budget sweeps: the same searchers and seeds at several budgets, and the frontier.

:func:`run_sweep` runs one experiment (:func:`autoprune.runner.experiment.run_experiment`) per budget,
in the order given, each its own MLflow parent run (with its child runs per searcher and seed)
in the config's experiment; every parent run is tagged ``autoprune.runner.sweep`` (the sweep's budgets)
and ``autoprune.sweep_index``. Every budget is checked before any work: a malformed one is a
:class:`~autoprune.config.ConfigError` before the task is built, and one the task cannot reach
is refused once the task is built, before the first run starts. Budgets may use different
metrics (``flops=0.5`` and ``params=0.5`` in one sweep).

The result has one row per budget x searcher x seed (``{"budget": ..., **Outcome.row()}``).
:func:`frontier_points` (also :meth:`SweepResult.frontier`) reduces such rows to one point per
searcher and budget, the mean and standard deviation over seeds of the achieved cost ratio and
of the accuracy; :func:`plot_frontier` draws them (accuracy in % against the achieved cost
ratio, error bars over seeds, the individual seeds as a faint scatter). Both work from plain
row dicts with the keys ``searcher``, ``budget`` and the chosen cost and accuracy keys, so any
script can plot its own rows.

    from autoprune.runner.experiment import experiment_config
    from autoprune.runner.sweep import run_sweep

    sweep = run_sweep(experiment_config(overrides=["search.searchers=[uniform,random]"]),
                      ["flops=0.75", "flops=0.5", "flops=0.25"])
    sweep.frontier()                       # {"uniform": [{"budget", "cost", ...}, ...], ...}
    sweep.plot().savefig("sweep.png")
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprune.budget import Budget, BudgetError
from autoprune.config import ConfigError
from autoprune.runner.experiment import ExperimentConfig, ExperimentResult, Hooks, Outcome, run_experiment
from autoprune.task import Task

COST_LABELS = {
    "flops_ratio": "achieved FLOPs ratio",
    "params_ratio": "achieved params ratio",
    "latency_ratio": "achieved latency ratio",
}


# ------------------------------------------------------------------ budgets


def parse_budgets(budgets: Sequence[str | Budget]) -> list[Budget]:
    """Every budget of a sweep parsed, or a one-line :class:`ConfigError` naming the bad one."""
    if isinstance(budgets, str):
        raise ConfigError(f"budgets must be a list of budgets, got the string {budgets!r}")
    if not budgets:
        raise ConfigError("a sweep needs at least one budget, e.g. flops=0.5")
    parsed: list[Budget] = []
    for i, spec in enumerate(budgets, 1):
        try:
            budget = Budget.parse(spec)
        except (BudgetError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"sweep budget {i} of {len(budgets)} ({str(spec)!r}): {exc}"
            ) from None
        if budget in parsed:
            raise ConfigError(f"sweep budget {budget} is given twice")
        parsed.append(budget)
    return parsed


def split_budgets(text: str) -> list[str]:
    """The budgets of a ``--budgets`` string, e.g. ``"flops=0.75,0.5,params=0.5"``.

    Commas separate budgets; a bare number reuses the metric of the budget before it
    (``flops=0.75,0.5,0.25``); ``+`` joins the limits of one budget (``flops=0.5+params=0.6``).
    Only the shape is checked here; :func:`parse_budgets` checks the values.
    """
    out: list[str] = []
    metric: str | None = None
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", item):
            if metric is None:
                raise ConfigError(
                    f"budget {item!r} needs a metric name first, e.g. flops={item} "
                    "(a bare number reuses the metric of the budget before it)"
                )
            out.append(f"{metric}={item}")
            continue
        parts = [p.strip() for p in re.split(r"\+(?=\s*[a-zA-Z])", item)]
        out.append(",".join(parts))
        names = [m.group(1) for p in parts if (m := re.match(r"\s*([a-zA-Z_]+)", p))]
        metric = names[0] if len(names) == 1 else None  # after several limits: ambiguous
    if not out:
        raise ConfigError(f"no budget in {text!r}; write e.g. flops=0.75,0.5,0.25")
    return out


# ------------------------------------------------------------------ running


@dataclass
class SweepResult:
    """Rows (budget x searcher x seed) and the experiment of every budget, in order."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    results: list[ExperimentResult] = field(default_factory=list)

    def frontier(
        self, accuracy_key: str = "test_accuracy", cost_key: str = "flops_ratio"
    ) -> dict[str, list[dict[str, Any]]]:
        """Per searcher, one point per budget (mean and std over seeds), sorted by cost."""
        return frontier_points(self.rows, accuracy_key, cost_key)

    def plot(
        self,
        accuracy_key: str = "test_accuracy",
        cost_key: str = "flops_ratio",
        title: str | None = None,
    ) -> Any:
        """:func:`plot_frontier` of the rows."""
        return plot_frontier(self.rows, accuracy_key, cost_key, title)


class _SweepHooks(Hooks):
    """The caller's hooks, plus: once the first task is built, every budget must be reachable."""

    def __init__(self, inner: Hooks, budgets: list[Budget]) -> None:
        self.inner = inner
        self.budgets = budgets
        self.checked = False

    def task_ready(self, task: Task) -> None:
        if not self.checked:  # before the first parent run starts
            for budget in self.budgets:
                task.check_budget(budget)
            self.checked = True
        self.inner.task_ready(task)

    def search_started(self, searcher: str, seed: int, total: int | None, done: int) -> None:
        self.inner.search_started(searcher, seed, total, done)

    def evaluation(self, record: Any, result: Any) -> None:
        self.inner.evaluation(record, result)

    def search_finished(self, outcome: Outcome) -> None:
        self.inner.search_finished(outcome)


def run_sweep(
    config: ExperimentConfig, budgets: Sequence[str | Budget], hooks: Hooks | None = None
) -> SweepResult:
    """Run ``config``'s searchers x seeds at every budget, in order; see the module docstring.

    ``config.search.budget`` is replaced by each budget in turn; everything else (task,
    searchers, seeds, evaluations, workers, tracking) is the config's.
    """
    parsed = parse_budgets(budgets)
    sweep_hooks = _SweepHooks(hooks or Hooks(), parsed)
    label = "; ".join(str(b) for b in parsed)
    sweep = SweepResult()
    for i, budget in enumerate(parsed):
        search = config.search.model_copy(update={"budget": str(budget)})
        cfg = config.model_copy(update={"search": search})
        result = run_experiment(cfg, hooks=sweep_hooks)
        _tag(result, {"autoprune.sweep": label, "autoprune.sweep_index": str(i)})
        sweep.results.append(result)
        sweep.rows.extend({"budget": str(budget), **o.row()} for o in result.outcomes)
    return sweep


def _tag(result: ExperimentResult, tags: dict[str, str]) -> None:
    from autoprune.tracking.tracker import TrackingStore

    store = TrackingStore(result.tracking_uri)
    for key, value in tags.items():
        store.client.set_tag(result.parent_id, key, value)


# ------------------------------------------------------------------ frontier


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _grouped(
    rows: Sequence[dict[str, Any]], accuracy_key: str, cost_key: str
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """searcher -> budget -> [(cost, accuracy) per seed], skipping rows missing either value."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        accuracy, cost = _value(row, accuracy_key), _value(row, cost_key)
        if accuracy is None or cost is None:
            continue
        by_budget = out.setdefault(str(row["searcher"]), {})
        by_budget.setdefault(str(row.get("budget")), []).append((cost, accuracy))
    return out


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_std(values: Sequence[Any]) -> tuple[float, float, int] | None:
    """Mean, sample std (0 for one value) and count of the finite values; None if there are none.
    The spread every sweep and benchmark table reports."""
    finite = [v for v in (_value({"v": x}, "v") for x in values) if v is not None]
    if not finite:
        return None
    arr = np.array(finite)
    return float(arr.mean()), _std(arr), len(finite)


def frontier_points(
    rows: Sequence[dict[str, Any]],
    accuracy_key: str = "test_accuracy",
    cost_key: str = "flops_ratio",
) -> dict[str, list[dict[str, Any]]]:
    """Per searcher, one point per budget, sorted by cost: ``{"budget", "cost", "cost_std",
    "accuracy", "accuracy_std", "n"}`` (mean and sample std over the seeds; std 0 for one seed).
    Rows whose accuracy or cost is missing (None or NaN) are skipped."""
    out: dict[str, list[dict[str, Any]]] = {}
    for searcher, by_budget in _grouped(rows, accuracy_key, cost_key).items():
        points = []
        for budget, pairs in by_budget.items():
            costs = np.array([c for c, _ in pairs])
            accuracies = np.array([a for _, a in pairs])
            points.append(
                {
                    "budget": budget,
                    "cost": float(costs.mean()),
                    "cost_std": _std(costs),
                    "accuracy": float(accuracies.mean()),
                    "accuracy_std": _std(accuracies),
                    "n": len(pairs),
                }
            )
        out[searcher] = sorted(points, key=lambda p: (p["cost"], p["budget"]))
    return out


def plot_frontier(
    rows: list[dict[str, Any]],
    accuracy_key: str = "test_accuracy",
    cost_key: str = "flops_ratio",
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Accuracy (%) vs achieved cost ratio: per searcher a line through its budgets (mean over
    seeds, error bars one std in both directions) and its seeds as a faint scatter.

    Draws into ``ax`` when given (and returns ``ax.figure``); otherwise returns a new
    :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    own = ax is None
    if own:
        ax = Figure(figsize=(6, 4)).add_subplot()
    points = frontier_points(rows, accuracy_key, cost_key)
    seeds = _grouped(rows, accuracy_key, cost_key)
    for i, (searcher, line) in enumerate(points.items()):
        color = f"C{i % 10}"
        scattered = [pair for pairs in seeds[searcher].values() for pair in pairs]
        ax.scatter(
            [c for c, _ in scattered], [100 * a for _, a in scattered],
            color=color, alpha=0.25, s=14, linewidths=0,
        )  # fmt: skip
        ax.errorbar(
            [p["cost"] for p in line], [100 * p["accuracy"] for p in line],
            xerr=[p["cost_std"] for p in line], yerr=[100 * p["accuracy_std"] for p in line],
            color=color, marker="o", markersize=4, capsize=3, label=searcher,
        )  # fmt: skip
    if not points:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(COST_LABELS.get(cost_key, cost_key))
    ax.set_ylabel(f"{accuracy_key.replace('_', ' ')} %")
    ax.set_title(title if title is not None else f"{accuracy_key} vs {cost_key}")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="small")
    if own:
        ax.figure.tight_layout()
    return ax.figure
