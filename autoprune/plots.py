"""Every matplotlib figure of autoprune: a search's plots, a comparison, a sweep's frontier, a
sensitivity scan.

Each function returns a :class:`matplotlib.figure.Figure` (no pyplot, no global state, no
display) that the caller saves or logs to MLflow. matplotlib is imported inside the functions,
so importing this module (the tracking writer, sweeps and the sensitivity scan do) costs
nothing until a figure is drawn, and the CLI stays light.

- a search (logged by :meth:`autoprune.tracking.writer.Tracker.finish`):
  :func:`plot_best_so_far`, :func:`plot_accuracy_vs_flops`, :func:`plot_ratios`;
- an experiment's comparison (``comparison.png`` of the parent run): :func:`plot_curves`;
- a sweep (``sweep.png``, the benchmark): :func:`plot_frontier`;
- a sensitivity scan: :func:`plot_sensitivity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from autoprune.frontier import frontier_points, seed_points

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from autoprune.tracking.records import RecordView, ResultView

COST_LABELS = {
    "flops_ratio": "achieved FLOPs ratio",
    "params_ratio": "achieved params ratio",
    "latency_ratio_measured": "measured latency ratio",
}


class SensitivityCurves(Protocol):
    """What :func:`plot_sensitivity` reads (a :class:`~autoprune.sensitivity.SensitivityResult`)."""

    @property
    def units(self) -> list[str]: ...

    @property
    def grid(self) -> list[float]: ...

    @property
    def accuracy(self) -> np.ndarray: ...  # (units, grid)

    @property
    def dense_accuracy(self) -> float: ...


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    """A matplotlib figure on the Agg canvas (no pyplot, no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------ a search


def plot_best_so_far(result: ResultView) -> Figure:
    """Best search accuracy within budget after each evaluation (NaN before the first)."""
    fig = _figure()
    ax = fig.add_subplot()
    best = result.best_so_far()
    ax.step(range(1, len(best) + 1), best, where="post")
    ax.set(xlabel="evaluation", ylabel="best search accuracy (within budget)")
    ax.set_title(f"{result.searcher} (seed {result.seed})")
    ax.grid(alpha=0.3)
    return fig


def plot_ratios(best: RecordView) -> Figure:
    """One bar per unit: the pruning ratio of the best policy."""
    units = list(best.ratios)
    fig = _figure(width=max(6.0, 0.3 * len(units)), height=4.5)
    ax = fig.add_subplot()
    ax.bar(range(len(units)), list(best.ratios.values()))
    ax.set_xticks(range(len(units)), units, rotation=90, fontsize=7)
    ax.set(ylabel="pruning ratio", ylim=(0, 1))
    ax.set_title(f"best policy: accuracy {best.accuracy:.4f}, flops {best.flops_ratio:.3f}")
    return fig


def plot_accuracy_vs_flops(result: ResultView) -> Figure:
    """Every evaluated policy; budget-meeting ones highlighted, the best one starred."""
    fig = _figure()
    ax = fig.add_subplot()
    styles = {False: ("0.7", "over budget"), True: ("C0", "within budget")}
    for meets, (color, label) in styles.items():
        points = [(r.flops_ratio, r.accuracy) for r in result.history if r.meets_budget == meets]
        if points:
            flops, accuracy = zip(*points, strict=True)
            ax.scatter(flops, accuracy, s=10, alpha=0.7, color=color, label=label)
    if result.best is not None:
        best = result.best
        ax.scatter([best.flops_ratio], [best.accuracy], marker="*", s=150, color="C3", label="best")
    if "flops" in result.budget:
        ax.axvline(result.budget["flops"], color="C3", linestyle="--", linewidth=1)
    ax.set(xlabel="FLOPs ratio (pruned / original)", ylabel="search accuracy")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------ several searches


def plot_curves(curves: dict[str, list[float]]) -> Any:
    """Best search accuracy so far vs evaluations, one line per search."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best search accuracy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_frontier(
    rows: list[dict[str, Any]],
    accuracy_key: str = "test_accuracy",
    cost_key: str = "flops_ratio",
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Accuracy (%) vs achieved cost ratio: per searcher a line through its budgets (mean over
    seeds, error bars one std in both directions) and its seeds as a faint scatter
    (:func:`autoprune.frontier.frontier_points` of the rows).

    Draws into ``ax`` when given (and returns ``ax.figure``); otherwise returns a new
    :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    own = ax is None
    if own:
        ax = Figure(figsize=(6, 4)).add_subplot()
    points = frontier_points(rows, accuracy_key, cost_key)
    seeds = seed_points(rows, accuracy_key, cost_key)
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


# ------------------------------------------------------------------ sensitivity


def plot_sensitivity(result: SensitivityCurves, title: str = "Layer sensitivity") -> Figure:
    """Accuracy (%) vs ratio removed, one line per unit, the dense accuracy dashed."""
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot()
    for i, unit in enumerate(result.units):
        ax.plot(result.grid, 100 * result.accuracy[i], marker="o", ms=3, label=unit)
    ax.axhline(100 * result.dense_accuracy, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("ratio removed")
    ax.set_ylabel("search accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return fig
