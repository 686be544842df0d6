"""Several searchers on one task and budget, in memory: ``ap.compare(task, [...], budget)``.

The notebook counterpart of ``autoprune compare`` (which runs the same searches through the
experiment runner and records them in MLflow): every searcher runs with every seed on one
evaluation backend, and the result is a table of the best accuracy each reached (mean and
spread over seeds) beside the cost it met the budget with.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoprune.agents.base import Callback, SearchError, SearchResult
from autoprune.agents.registry import get_searcher, search

from autoprune.budget import Budget
from autoprune.frontier import mean_std
from autoprune.parallel import make_backend
from autoprune.task import Task


@dataclass
class Comparison:
    """The searches of a comparison, keyed by (searcher, seed), in the order they ran."""

    budget: dict[str, float]
    results: dict[tuple[str, int], SearchResult] = field(default_factory=dict)

    @property
    def searchers(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.results))

    @property
    def best(self) -> SearchResult | None:
        """The search whose best policy has the highest search accuracy (None: none met the
        budget); ``comparison.best.policy()`` is the policy to apply."""
        found = [r for r in self.results.values() if r.best is not None]
        return max(found, key=lambda r: r.best.accuracy) if found else None  # type: ignore[union-attr]

    def table(self) -> list[dict[str, Any]]:
        """One row per searcher: the best search accuracy (mean and standard deviation over
        seeds), the costs of the best seed's policy, evaluations and seconds (means)."""
        return [self._row(name) for name in self.searchers]

    def _row(self, name: str) -> dict[str, Any]:
        runs = [r for (n, _), r in self.results.items() if n == name]
        found = [r for r in runs if r.best is not None]
        spread = mean_std([r.best.accuracy for r in found])  # type: ignore[union-attr]
        top = max(found, key=lambda r: r.best.accuracy, default=None)  # type: ignore[union-attr]
        row: dict[str, Any] = {
            "searcher": name,
            "seeds": len(runs),
            "accuracy": None if spread is None else spread[0],
            "accuracy_std": None if spread is None else spread[1],
            "evaluations": statistics.fmean(r.evaluations for r in runs),
            "seconds": statistics.fmean(r.seconds for r in runs),
        }
        costs = top.best.costs() if top is not None and top.best is not None else {}
        row.update({f"{metric}_ratio": costs.get(metric) for metric in ("flops", "params")})
        if "latency" in self.budget:
            row["latency_ratio_table"] = costs.get("latency")
        return row


def _checked(searchers: Sequence[str], seeds: Sequence[int], evaluations: int | None) -> None:
    """Refuse an empty or repeated list, or a searcher that needs an evaluation budget when
    none is given, before any search starts."""
    if isinstance(searchers, str) or not searchers:
        raise SearchError("searchers must be a non-empty list of names, e.g. ['ddpg', 'uniform']")
    for name in searchers:
        if get_searcher(name).needs_evaluations and evaluations is None:
            raise SearchError(f"searcher {name!r} needs an evaluation budget (evaluations=N)")
    if len(set(searchers)) < len(searchers):
        raise SearchError(f"searchers are repeated: {list(searchers)}")
    if not seeds or len(set(seeds)) < len(seeds):
        raise SearchError(f"seeds must be a non-empty list without repeats, got {list(seeds)}")


def compare(
    task: Task,
    searchers: Sequence[str],
    budget: Budget | str | Mapping[str, float],
    *,
    seeds: Sequence[int] = (0,),
    evaluations: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    callback: Callback | None = None,
) -> Comparison:
    """Run each searcher with each seed on ``task`` under ``budget``; ``options`` maps a
    searcher to its options. One backend (serial, or ``workers`` Ray actors) serves them all."""
    _checked(searchers, seeds, evaluations)
    parsed = task.check_budget(budget)
    options = dict(options or {})
    unknown = sorted(set(options) - set(searchers))
    if unknown:
        raise SearchError(f"options given for searchers not compared: {unknown}")
    out = Comparison(parsed.to_dict())
    needs_latency = "latency" in parsed.metrics
    with make_backend(task, workers, ray_address, predict_latency=needs_latency) as backend:
        for name in searchers:
            for seed in seeds:
                out.results[(name, int(seed))] = search(
                    name, task, parsed, seed=int(seed), evaluations=evaluations,
                    callback=callback, backend=backend, **dict(options.get(name, {})),
                )  # fmt: skip
    return out
