"""The searcher registry: ``search("ddpg", task, budget, ...)`` and friends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoprune.agents.base import Callback, Searcher, SearchError, SearchResult

from autoprune.budget import Budget
from autoprune.evaluate import Evaluator
from autoprune.task import Task

SEARCHERS: dict[str, type[Searcher]] = {}


def register(cls: type[Searcher]) -> type[Searcher]:
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


def search(
    name: str,
    task: Task,
    budget: Budget | str | Mapping[str, float],
    seed: int = 0,
    evaluations: int | None = None,
    callback: Callback | None = None,
    evaluator: Evaluator | None = None,
    **options: Any,
) -> SearchResult:
    """Run searcher ``name`` on a task under a budget and return its result."""
    cls = get_searcher(name)
    return cls(task, budget, seed, evaluations, callback, evaluator, **options).run()
