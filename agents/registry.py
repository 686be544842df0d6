"""The searcher registry: ``search("ddpg", task, budget, ...)`` and friends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from autoprune.agents.base import Callback, Searcher, SearchError, SearchResult
from autoprune.agents.options import SearchOptions, config_options

from autoprune.budget import Budget
from autoprune.evaluate import Evaluator
from autoprune.parallel import Backend, make_backend
from autoprune.task import Task

SEARCHERS: dict[str, type[Searcher]] = {}
S = TypeVar("S", bound=Searcher)


def register(cls: type[S]) -> type[S]:
    """Class decorator: make a searcher available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    SEARCHERS[cls.name] = cls
    return cls


def get_searcher(name: str) -> type[Searcher]:
    try:
        return SEARCHERS[name]
    except KeyError:
        raise SearchError(f"unknown searcher {name!r}; choose from {sorted(SEARCHERS)}") from None


def options_model(name: str) -> type[SearchOptions]:
    """The schema of ``search.options.<name>`` in a config: searcher ``name``'s options model
    (each option with its type, bounds and default; no others) plus ``evaluations`` and
    ``seeds``; the one schema the CLI, YAML configs and the service validate against."""
    return config_options(get_searcher(name).options_type)


def search(
    name: str,
    task: Task,
    budget: Budget | str | Mapping[str, float],
    seed: int = 0,
    evaluations: int | None = None,
    callback: Callback | None = None,
    evaluator: Evaluator | None = None,
    backend: Backend | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    **options: Any,
) -> SearchResult:
    """Run searcher ``name`` on a task under a budget and return its result.

    Evaluations run on ``backend`` when given (the caller closes it); otherwise on a backend
    made here and closed at the end: serial with ``workers=0``, else ``workers`` Ray actors
    (a local Ray, or the cluster at ``ray_address``).
    """
    cls = get_searcher(name)
    if workers < 0 or (ray_address and workers == 0):
        raise SearchError(f"workers must be >= 1 with a Ray address, >= 0 otherwise; got {workers}")
    # Options and budget are checked here, before any worker starts.
    searcher = cls(
        task, budget, seed=seed, evaluations=evaluations, callback=callback,
        evaluator=evaluator, backend=backend, **options,
    )  # fmt: skip
    if backend is not None or workers == 0:
        return searcher.run()
    needs_latency = "latency" in searcher.budget.metrics
    with make_backend(task, workers, ray_address, predict_latency=needs_latency) as made:
        searcher.backend = made
        return searcher.run()
