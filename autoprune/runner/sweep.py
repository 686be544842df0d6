"""Accuracy-vs-budget sweeps: the same searchers and seeds at several budgets, and the frontier.

:func:`run_sweep` runs one experiment (:func:`autoprune.runner.experiment.run_experiment`) per
budget, in the order given, each its own MLflow parent run (with its child runs per searcher and
seed) in the config's experiment; every parent run is tagged ``autoprune.sweep`` (the sweep's
budgets) and ``autoprune.sweep_index``. Every budget is checked before any work: a malformed one
is a :class:`~autoprune.config.ConfigError` before the task is built, and one the task cannot
reach is refused once the task is built, before the first run starts. Budgets may use different
metrics (``flops=0.5`` and ``params=0.5`` in one sweep).

The result has one row per budget x searcher x seed (``{"budget": ..., **Outcome.row()}``).
:func:`frontier_points` (also :meth:`SweepResult.frontier`) reduces such rows to one point per
searcher and budget, the mean and standard deviation over seeds of the achieved cost ratio and
of the accuracy; :func:`plot_frontier` draws them (accuracy in % against the achieved cost
ratio, error bars over seeds, the individual seeds as a faint scatter). Both work from plain
row dicts with the keys ``searcher``, ``budget`` and the chosen cost and accuracy keys, so any
script can plot its own rows. :func:`save_frontier`, :func:`save_rows` and :func:`log_sweep`
store what ``autoprune sweep`` shows: the frontier plot, the rows as CSV, and both in MLflow.

    from autoprune.runner.config import experiment_config
    from autoprune.runner.sweep import run_sweep

    sweep = run_sweep(experiment_config(overrides=["search.searchers=[uniform,random]"]),
                      ["flops=0.75", "flops=0.5", "flops=0.25"])
    sweep.frontier()                       # {"uniform": [{"budget", "cost", ...}, ...], ...}
    sweep.plot().savefig("sweep.png")
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoprune.budget import Budget, BudgetError
from autoprune.config import ConfigError
from autoprune.frontier import frontier_points
from autoprune.plots import plot_frontier
from autoprune.runner.config import ExperimentConfig
from autoprune.runner.experiment import ExperimentResult, Hooks, Outcome, run_experiment
from autoprune.task import Task

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
    budgets: list[Budget] = field(default_factory=list)

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
    sweep = SweepResult(budgets=parsed)
    for i, budget in enumerate(parsed):
        search = config.search.model_copy(update={"budget": str(budget)})
        cfg = config.model_copy(update={"search": search})
        result = run_experiment(cfg, hooks=sweep_hooks)
        _tag(result, {"autoprune.sweep": label, "autoprune.sweep_index": str(i)})
        sweep.results.append(result)
        sweep.rows.extend({"budget": str(budget), **o.row()} for o in result.outcomes)
    return sweep


def _tag(result: ExperimentResult, tags: dict[str, str]) -> None:
    from autoprune.tracking.reader import TrackingStore

    store = TrackingStore(result.tracking_uri)
    for key, value in tags.items():
        store.client.set_tag(result.parent_id, key, value)


# ------------------------------------------------------------------ saving


def frontier_keys(sweep: SweepResult, config: ExperimentConfig) -> tuple[str, str]:
    """The accuracy and cost a sweep's frontier shows: test accuracy after fine-tuning when the
    config fine-tunes, else before; the params ratio when every budget is params only, else
    the FLOPs ratio."""
    accuracy = "test_accuracy_finetuned" if config.search.finetune_epochs else "test_accuracy"
    only_params = all(b.metrics == ("params",) for b in sweep.budgets)
    return accuracy, "params_ratio" if only_params else "flops_ratio"


def save_frontier(sweep: SweepResult, config: ExperimentConfig, path: Path) -> Any:
    """The frontier plot (:func:`frontier_keys`, titled with the task) written to ``path`` as
    PNG; returns the figure (for :func:`log_sweep`)."""
    title = f"{config.model.name} on {config.data.name}, {config.granularity}"
    figure = sweep.plot(*frontier_keys(sweep, config), title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return figure


def save_rows(sweep: SweepResult, path: Path) -> Path:
    """Every row (budget x searcher x seed) written to ``path`` as CSV."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(sweep.rows).to_csv(path, index=False)
    return path


def log_sweep(sweep: SweepResult, figure: Any) -> ExperimentResult:
    """The frontier figure (``sweep.png``) and the rows (``sweep.md`` / ``sweep.csv``) logged to
    the last budget's parent run; returns that budget's experiment."""
    from autoprune.tracking.writer import Tracker

    last = sweep.results[-1]
    tracker = Tracker(last.tracking_uri, last.experiment)
    tracker.log_figure(last.parent_id, figure, "sweep.png")
    tracker.log_table(last.parent_id, sweep.rows, "sweep")
    return last
