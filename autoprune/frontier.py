"""Accuracy against cost over seeds: the frontier of sweep rows, and the spread every table reports.

Rows are plain dicts with the keys ``searcher``, ``budget`` and the chosen cost and accuracy
keys (a sweep's ``{"budget": ..., **Outcome.row()}``, or any script's own), so sweeps, the
benchmark and :func:`autoprune.plots.plot_frontier` share one reduction. Missing values (None
or NaN) are skipped, never counted as zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def seed_points(
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
    for searcher, by_budget in seed_points(rows, accuracy_key, cost_key).items():
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
