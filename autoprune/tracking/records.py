"""What tracking reads from a search: structural types of an evaluation record and a result.

A searcher's :class:`~autoprune.agents.base.Record` and
:class:`~autoprune.agents.base.SearchResult` satisfy these protocols; tracking and the figures
type against them instead of importing the searchers (core never imports ``autoprune.agents``,
not even for types). Members are read-only properties, so the searchers' dataclasses (whose
fields are more specific, e.g. ``list[Record]``) match them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RecordView(Protocol):
    """One evaluated policy of a search's history, as tracking reads it."""

    @property
    def index(self) -> int: ...  # 1-based evaluation count: the MLflow step

    @property
    def ratios(self) -> dict[str, float]: ...

    @property
    def accuracy(self) -> float: ...

    @property
    def loss(self) -> float: ...

    @property
    def flops_ratio(self) -> float: ...

    @property
    def params_ratio(self) -> float: ...

    @property
    def latency_ratio_table(self) -> float | None: ...

    @property
    def meets_budget(self) -> bool: ...

    @property
    def eval_seconds(self) -> float: ...

    @property
    def elapsed(self) -> float: ...

    @property
    def cached(self) -> bool: ...

    @property
    def reward(self) -> float | None: ...

    @property
    def note(self) -> str: ...

    @property
    def partial(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


class ResultView(Protocol):
    """A search's result (best record within budget, full history), as tracking reads it."""

    @property
    def searcher(self) -> str: ...

    @property
    def budget(self) -> dict[str, float]: ...

    @property
    def seed(self) -> int: ...

    @property
    def best(self) -> RecordView | None: ...

    @property
    def history(self) -> Sequence[RecordView]: ...

    @property
    def seconds(self) -> float: ...

    @property
    def evaluations(self) -> int: ...

    def best_so_far(self) -> list[float]: ...
