"""Layer sensitivity analysis: prune one unit at a time over a ratio grid, the others dense.

The curve of accuracy against ratio per unit shows which layers tolerate pruning (MIT 6.5940,
lecture 3); the ``sensitivity`` searcher allocates ratios from it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoprune.evaluate import Evaluation, Evaluator
from autoprune.plots import plot_sensitivity

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class SensitivityResult:
    """Accuracy (and loss, FLOPs) of every unit at every grid ratio, plus the dense baseline."""

    units: list[str]
    grid: list[float]
    accuracy: np.ndarray  # (units, grid)
    loss: np.ndarray
    flops_ratio: np.ndarray
    dense_accuracy: float

    def rows(self) -> list[dict[str, float | str]]:
        """One row per (unit, ratio): a tidy table."""
        return [
            {
                "unit": u,
                "ratio": r,
                "accuracy": float(self.accuracy[i, j]),
                "loss": float(self.loss[i, j]),
                "flops_ratio": float(self.flops_ratio[i, j]),
            }
            for i, u in enumerate(self.units)
            for j, r in enumerate(self.grid)
        ]

    def save_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` as CSV (one row per unit and ratio) and return the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["unit", "ratio"])
            writer.writeheader()
            writer.writerows(rows)
        return out

    def drop(self) -> np.ndarray:
        """Accuracy lost against the dense model, (units, grid)."""
        return self.dense_accuracy - self.accuracy

    def plot(self, path: str | Path, title: str = "Layer sensitivity") -> Path:
        """Accuracy vs. ratio, one line per unit (:func:`autoprune.plots.plot_sensitivity`),
        saved as an image."""
        fig = plot_sensitivity(self, title)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        return out


def _grid(grid: Sequence[float], max_ratio: float) -> list[float]:
    values = sorted({float(r) for r in grid})
    bad = [r for r in values if not 0 < r <= max_ratio]
    if bad:
        raise ValueError(f"sensitivity grid values {bad} are outside (0, max_ratio={max_ratio}]")
    return values


def scan(
    evaluator: Evaluator,
    grid: Sequence[float] = DEFAULT_GRID,
    units: Sequence[str] | None = None,
    callback: Callable[[str, float, Evaluation], None] | None = None,
    evaluate_many: Callable[[list[np.ndarray]], list[Evaluation]] | None = None,
) -> SensitivityResult:
    """Evaluate each unit alone at each ratio of ``grid`` (others dense).

    ``evaluate_many`` (e.g. a parallel backend's ``map``) evaluates the whole scan as one batch;
    by default each policy goes through ``evaluator`` in turn.
    """
    task = evaluator.task
    names = list(units) if units is not None else task.units
    for name in names:
        task.space.unit(name)  # unknown names fail before any evaluation
    values = _grid(grid, task.space.max_ratio)
    shape = (len(names), len(values))
    acc, loss, flops = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    dense = evaluator.dense()
    cells = [(i, j) for i in range(len(names)) for j in range(len(values))]
    vecs = [task.ratio_vector({names[i]: values[j]}) for i, j in cells]
    if evaluate_many is None:
        results: Iterable[Evaluation] = (evaluator.evaluate(v) for v in vecs)
    else:
        results = evaluate_many(vecs)
    for (i, j), e in zip(cells, results, strict=True):
        acc[i, j], loss[i, j], flops[i, j] = e.accuracy, e.loss, e.flops_ratio
        if callback is not None:
            callback(names[i], values[j], e)
    return SensitivityResult(names, values, acc, loss, flops, dense.accuracy)
