"""The searcher registry: ``search("ddpg", task, budget, ...)`` and friends."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any

from autoprune.agents.base import Callback, Searcher, SearchError, SearchResult
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from autoprune.budget import Budget
from autoprune.evaluate import Evaluator
from autoprune.parallel import Backend, make_backend
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


# Options every searcher takes in ``search.options.<name>``: its own evaluation budget and seeds.
COMMON_OPTION_TYPES: dict[str, Any] = {
    "evaluations": Annotated[int, Field(ge=1, le=10_000_000)],
    "seeds": Annotated[  # one seed or a list
        list[Annotated[int, Field(ge=0)]],
        BeforeValidator(lambda v: [v] if isinstance(v, int) and not isinstance(v, bool) else v),
        Field(min_length=1, max_length=1000),
    ],
}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)


@cache
def options_model(name: str) -> type[BaseModel]:
    """The schema of ``search.options.<name>``: every option of searcher ``name`` with its type
    and bounds, all optional (a missing one keeps the searcher's default), no others; the one
    schema the CLI, YAML configs and the service validate against."""
    cls = get_searcher(name)
    missing = sorted(set(cls.defaults) - set(cls.option_types))
    if missing:
        raise TypeError(f"searcher {name!r} declares no type for option(s) {missing}")
    fields: dict[str, Any] = {
        key: (kind, None) for key, kind in {**cls.option_types, **COMMON_OPTION_TYPES}.items()
    }
    return create_model(f"{cls.__name__}Options", __base__=_Options, **fields)


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
    searcher = cls(task, budget, seed, evaluations, callback, evaluator, backend, **options)
    if backend is not None or workers == 0:
        return searcher.run()
    needs_latency = "latency" in searcher.budget.metrics
    with make_backend(task, workers, ray_address, predict_latency=needs_latency) as made:
        searcher.backend = made
        return searcher.run()
