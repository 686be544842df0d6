"""The common interface of every searcher, and the result type they all return.

A searcher proposes policies for one task and budget, has each judged by the evaluator, and
keeps the best one that meets the budget. Every evaluation is appended to the history and
reported to an optional callback (the hook used by progress bars, MLflow and Ray).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from autoprune.budget import Budget
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.parallel import Backend, SerialBackend
from autoprune.policy import Policy
from autoprune.task import Task


class SearchError(ValueError):
    """A search that cannot start: unknown searcher, bad option, too small a budget."""


@dataclass
class Record:
    """One evaluated policy in a search's history."""

    index: int  # 1-based evaluation count
    ratios: dict[str, float]
    accuracy: float
    loss: float
    flops_ratio: float
    params_ratio: float
    latency_ratio: float | None
    meets_budget: bool
    eval_seconds: float
    elapsed: float  # seconds since the search started
    cached: bool = False
    reward: float | None = None
    note: str = ""  # searcher-specific: "warm-up", "iteration 3", ...
    partial: bool = False  # rejected early: accuracy / loss estimated on a first slice only

    def costs(self) -> dict[str, float]:
        out = {"flops": self.flops_ratio, "params": self.params_ratio}
        if self.latency_ratio is not None:
            out["latency"] = self.latency_ratio
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """Best policy, its metrics, and the full history of a search."""

    searcher: str
    budget: dict[str, float]
    seed: int
    best: Record | None = None
    history: list[Record] = field(default_factory=list)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def best_ratios(self) -> dict[str, float]:
        if self.best is None:
            raise SearchError("the search found no policy within the budget")
        return dict(self.best.ratios)

    def best_so_far(self) -> list[float]:
        """Best search accuracy after each evaluation (within budget only)."""
        out, best = [], float("nan")
        for r in self.history:
            if r.meets_budget and not r.partial and not best >= r.accuracy:
                best = r.accuracy
            out.append(best)
        return out

    def policy(self, task: Task) -> Policy:
        best = self.best
        if best is None:
            raise SearchError("the search found no policy within the budget")
        skip = ("ratios", "note", "partial")  # the best is never partial
        metrics = {k: v for k, v in best.to_dict().items() if k not in skip}
        return Policy.from_task(task, best.ratios, metrics, self.budget, self.searcher)


Callback = Callable[[Record, SearchResult], None]


@dataclass(frozen=True)
class Preflight:
    """What is known about a search before its task is built: the granularity, the evaluation
    count the searcher gets, the model's number of prunable units (None: not known yet) and
    whether this machine has a CUDA device."""

    granularity: str = "channel"
    evaluations: int | None = None
    units: int | None = None
    cuda: bool = True


Problem = tuple[tuple[str, ...], str]  # (where, relative to ``search``; message)


class Searcher(ABC):
    """Base class: subclasses implement :meth:`_search` using :meth:`evaluate`."""

    name: ClassVar[str] = ""
    needs_evaluations: ClassVar[bool] = False  # True: an evaluation budget is required
    # How many policies a searcher that cannot use an evaluation budget always evaluates (the
    # others take ``evaluations`` as a budget, or as a limit where they stop early).
    fixed_evaluations: ClassVar[int | None] = None
    channel_only: ClassVar[bool] = False  # True: refuses fine-grained and N:M tasks

    def __init__(
        self,
        task: Task,
        budget: Budget | str | Mapping[str, float],
        seed: int = 0,
        evaluations: int | None = None,
        callback: Callback | None = None,
        evaluator: Evaluator | None = None,
        backend: Backend | None = None,
        **options: Any,
    ) -> None:
        self.task = task
        self.budget = task.check_budget(budget)
        self.seed = int(seed)
        if evaluations is not None and evaluations < 1:
            raise SearchError(f"evaluations must be >= 1, got {evaluations}")
        if self.needs_evaluations and evaluations is None:
            raise SearchError(f"searcher {self.name!r} needs an evaluation budget (evaluations=N)")
        self.evaluations = evaluations
        self.callback = callback
        self.options = self.check_options(options)
        needs_latency = "latency" in self.budget.metrics
        if evaluator is None and isinstance(backend, SerialBackend):
            evaluator = backend.evaluator
        self.evaluator = evaluator or Evaluator(task, predict_latency=needs_latency)
        # Where evaluations run: this process (serial) or a Ray pool; the caller owns a backend
        # it passes in and closes it.
        self.backend = backend or SerialBackend(task, evaluator=self.evaluator)
        self.rng = np.random.default_rng(self.seed)
        self.result = SearchResult(self.name, self.budget.to_dict(), self.seed)
        self._start = time.perf_counter()

    # ------------------------------------------------------------ options
    defaults: ClassVar[dict[str, Any]] = {}
    # The type and bounds of each option (pydantic annotations), checked by the config schema
    # (CLI, YAML, HTTP) before a searcher is built: see ``registry.options_model``.
    option_types: ClassVar[dict[str, Any]] = {}

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Merge options into the searcher's defaults, each checked against its type and bounds
        (``option_types``); unknown names are errors."""
        from autoprune.agents.registry import COMMON_OPTION_TYPES, options_model
        from pydantic import ValidationError

        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = sorted(self.defaults) or "none"
            raise SearchError(
                f"unknown option(s) {unknown} for searcher {self.name!r}; known: {known}"
            )
        given = {k: v for k, v in options.items() if k not in COMMON_OPTION_TYPES}
        try:
            checked = options_model(self.name).model_validate(given)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise SearchError(
                f"{self.name} option {where}={first.get('input')!r}: {first['msg']}"
            ) from None
        return {**self.defaults, **checked.model_dump(exclude_unset=True)}

    @classmethod
    def preflight(cls, options: Mapping[str, Any], ctx: Preflight) -> list[Problem]:
        """What would only fail once the search runs, found from its options alone (they have
        passed ``option_types``): each problem as (where, message), ``where`` relative to the
        ``search`` section (``("searchers",)``, ``("options", name, key)``, ...). The CLI,
        the experiment runner and the service all ask this before any expensive work."""
        if cls.channel_only and ctx.granularity != "channel":
            return [(("searchers",), f"{cls.name} supports channel granularity only, "
                                     f"not {ctx.granularity!r}")]  # fmt: skip
        return []

    # ------------------------------------------------------------ running
    def run(self) -> SearchResult:
        """Run the search and return its result (best policy within budget, full history)."""
        self._start = time.perf_counter()
        self._search()
        self.result.seconds = time.perf_counter() - self._start
        return self.result

    @abstractmethod
    def _search(self) -> None: ...

    def cost_ratios(self, vec: np.ndarray) -> dict[str, float]:
        return self.task.cost_ratios(vec, self.budget.metrics)

    def project(self, vec: np.ndarray) -> np.ndarray:
        return self.task.project(np.asarray(vec, dtype=np.float64), self.budget)

    @property
    def remaining(self) -> int | None:
        if self.evaluations is None:
            return None
        return self.evaluations - self.result.evaluations

    def record(self, evaluation: Evaluation, reward: float | None = None, note: str = "") -> Record:
        """Append an evaluation to the history, update the best, call the callback."""
        costs = evaluation.costs()
        if "latency" in self.budget.metrics and evaluation.latency_ratio is None:
            costs["latency"] = self.cost_ratios(self.task.ratio_vector(evaluation.ratios))[
                "latency"
            ]
        rec = Record(
            index=self.result.evaluations + 1,
            ratios=dict(evaluation.ratios),
            accuracy=evaluation.accuracy,
            loss=evaluation.loss,
            flops_ratio=evaluation.flops_ratio,
            params_ratio=evaluation.params_ratio,
            latency_ratio=costs.get("latency"),
            meets_budget=self.budget.met_by(costs),
            eval_seconds=evaluation.seconds.get("total", 0.0),
            elapsed=time.perf_counter() - self._start,
            cached=evaluation.cached,
            reward=reward,
            note=note,
            partial=evaluation.partial,
        )
        self.result.history.append(rec)
        best = self.result.best
        # Only a fully evaluated policy can be the best (a partial one is an estimate, rejected
        # for being below the best already).
        if rec.meets_budget and not rec.partial and (best is None or rec.accuracy > best.accuracy):
            self.result.best = rec
        if self.callback is not None:
            self.callback(rec, self.result)
        return rec

    def evaluate(self, vec: np.ndarray, note: str = "") -> Record:
        """Evaluate a ratio vector (already within budget) and record it."""
        return self.evaluate_many([vec], [note])[0]

    @property
    def reject_below(self) -> float | None:
        """The threshold for early rejection: the best accuracy within budget so far (searchers
        that only need to know which policies beat it pass it to the backend)."""
        return None if self.result.best is None else self.result.best.accuracy

    def evaluate_many(self, vecs: list[np.ndarray], notes: list[str]) -> list[Record]:
        """Evaluate ratio vectors on the backend (in parallel with Ray) and record them in
        order."""
        evaluations = self.backend.map(vecs)
        return [self.record(e, note=n) for e, n in zip(evaluations, notes, strict=True)]
