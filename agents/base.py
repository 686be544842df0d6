"""The common interface of every searcher, and the result type they all return.

A searcher proposes policies for one task and budget, has each judged by the evaluator, and
keeps the best one that meets the budget. Every evaluation is appended to the history and
reported to an optional callback (the hook used by progress bars, MLflow and Ray).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from autoprune.agents.options import CONFLICT, SearchOptions, config_options
from pydantic import ValidationError

from autoprune.budget import Budget
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.parallel import Backend, SerialBackend
from autoprune.policy import Policy
from autoprune.task import Task


class SearchError(ValueError):
    """A search that cannot start: unknown searcher, bad option, too small a budget."""


def require_channel(task: Task, searcher: str) -> None:
    """Raise :class:`SearchError` unless the task prunes whole channels."""
    if task.space.granularity != "channel":
        raise SearchError(
            f"searcher {searcher!r} supports channel pruning only; this task's granularity is "
            f"{task.space.granularity!r}"
        )


@dataclass
class Record:
    """One evaluated policy in a search's history: the evaluator's :class:`Evaluation` and what
    the search made of it (its place, whether it meets the budget, its reward and note)."""

    index: int  # 1-based evaluation count
    evaluation: Evaluation
    meets_budget: bool
    elapsed: float  # seconds since the search started
    reward: float | None = None
    note: str = ""  # searcher-specific: "warm-up", "iteration 3", ...

    # The evaluation's metrics, read through.
    @property
    def ratios(self) -> dict[str, float]:
        return self.evaluation.ratios

    @property
    def accuracy(self) -> float:
        return self.evaluation.accuracy

    @property
    def loss(self) -> float:
        return self.evaluation.loss

    @property
    def flops_ratio(self) -> float:
        return self.evaluation.flops_ratio

    @property
    def params_ratio(self) -> float:
        return self.evaluation.params_ratio

    @property
    def macs(self) -> float:
        return self.evaluation.macs

    @property
    def params(self) -> float:
        return self.evaluation.params

    @property
    def latency_ratio_table(self) -> float | None:
        """The lookup table's prediction (a latency measured on the clock is elsewhere:
        ``latency_ratio_measured`` of an experiment's outcome)."""
        return self.evaluation.latency_ratio_table

    @property
    def eval_seconds(self) -> float:
        return self.evaluation.seconds.get("total", 0.0)

    @property
    def cached(self) -> bool:
        return self.evaluation.cached

    @property
    def partial(self) -> bool:
        """Rejected early: accuracy and loss estimated on a first slice only."""
        return self.evaluation.partial

    def costs(self) -> dict[str, float]:
        return self.evaluation.costs()

    def to_dict(self) -> dict[str, Any]:
        """The flat row recorded in MLflow histories and the crash journal."""
        return {name: getattr(self, name) for name in ROW_FIELDS}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Record:
        """Back from :meth:`to_dict` (rows recorded before the table's prediction was named
        ``latency_ratio_table`` call it ``latency_ratio``)."""
        table = row.get("latency_ratio_table", row.get("latency_ratio"))
        evaluation = Evaluation(
            ratios=dict(row["ratios"]), accuracy=float(row["accuracy"]),
            loss=float(row["loss"]), flops_ratio=float(row["flops_ratio"]),
            params_ratio=float(row["params_ratio"]), macs=float(row.get("macs", math.nan)),
            params=float(row.get("params", math.nan)),
            latency_ratio_table=None if table is None else float(table),
            seconds={"total": float(row.get("eval_seconds") or 0.0)},
            cached=bool(row.get("cached", False)), partial=bool(row.get("partial", False)),
        )  # fmt: skip
        reward = row.get("reward")
        return cls(
            index=int(row["index"]), evaluation=evaluation,
            meets_budget=bool(row["meets_budget"]), elapsed=float(row.get("elapsed") or 0.0),
            reward=None if reward is None else float(reward), note=str(row.get("note") or ""),
        )  # fmt: skip


# The columns of a recorded row, in order (MLflow history chunks, the crash journal).
ROW_FIELDS = (
    "index", "ratios", "accuracy", "loss", "flops_ratio", "params_ratio", "macs", "params",
    "latency_ratio_table", "meets_budget", "eval_seconds", "elapsed", "cached", "reward", "note",
    "partial",
)  # fmt: skip


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
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the task's, for the policy

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

    def policy(self) -> Policy:
        """The best policy as a :class:`Policy`: its ratios, metrics, the budget and searcher,
        and the fingerprint of the task it was searched on."""
        best = self.best
        if best is None:
            raise SearchError("the search found no policy within the budget")
        skip = ("ratios", "note", "partial")  # the best is never partial
        metrics = {k: v for k, v in best.to_dict().items() if k not in skip}
        return Policy(
            ratios=dict(best.ratios), fingerprint=dict(self.fingerprint), metrics=metrics,
            budget=dict(self.budget), searcher=self.searcher,
        )  # fmt: skip


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

    # The searcher's options, declared once as one typed model (defaults, types, bounds, the
    # rules between options); ``self.options`` is an instance of it.
    options_type: ClassVar[type[SearchOptions]] = SearchOptions

    def __init__(
        self,
        task: Task,
        budget: Budget | str | Mapping[str, float],
        *,
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
        self.options = self.parse_options(options)
        self.check_task()
        needs_latency = "latency" in self.budget.metrics
        if evaluator is None and isinstance(backend, SerialBackend):
            evaluator = backend.evaluator
        self.evaluator = evaluator or Evaluator(task, predict_latency=needs_latency)
        # Where evaluations run: this process (serial) or a Ray pool; the caller owns a backend
        # it passes in and closes it.
        self.backend = backend or SerialBackend(task, evaluator=self.evaluator)
        self.rng = np.random.default_rng(self.seed)
        self.result = SearchResult(
            self.name, self.budget.to_dict(), self.seed, fingerprint=task.fingerprint()
        )
        self._start = time.perf_counter()

    # ------------------------------------------------------------ options
    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> SearchOptions:
        """The searcher's options model over ``options``: a :class:`SearchError` naming the
        first option that is unknown, of the wrong type, out of bounds or in conflict."""
        known = cls.options_type.model_fields
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SearchError(
                f"unknown option(s) {unknown} for searcher {cls.name!r}; "
                f"known: {sorted(known) or 'none'}"
            )
        try:
            return cls.options_type.model_validate(dict(options))
        except ValidationError as err:
            raise SearchError(cls._option_error(err)) from None

    @classmethod
    def _option_error(cls, err: ValidationError) -> str:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == CONFLICT:  # a rule between options: its message says it all
            return f"{cls.name} option {where}: {first['msg']}"
        return f"{cls.name} option {where}={first.get('input')!r}: {first['msg']}"

    @classmethod
    def typed_options(cls, options: SearchOptions | Mapping[str, Any]) -> SearchOptions:
        """``options`` as the searcher's model: a config's ``search.options.<name>`` (which may
        also hold ``evaluations`` and ``seeds``) validated, or the model itself."""
        if isinstance(options, cls.options_type):
            return options
        return config_options(cls.options_type).model_validate(dict(options))

    @classmethod
    def preflight(cls, options: SearchOptions | Mapping[str, Any], ctx: Preflight) -> list[Problem]:
        """What would only fail once the search runs, found from its (valid) options and what
        is known of the task (``ctx``): each problem as (where, message), ``where`` relative to
        the ``search`` section (``("searchers",)``, ``("options", name, key)``, ...). The CLI,
        the experiment runner and the service all ask this before any expensive work; a
        searcher asks it again with its task (:meth:`check_task`)."""
        if cls.channel_only and ctx.granularity != "channel":
            return [(("searchers",), f"{cls.name} supports channel granularity only, "
                                     f"not {ctx.granularity!r}")]  # fmt: skip
        return []

    def check_task(self) -> None:
        """Refuse what this task rules out: channel pruning only, then :meth:`preflight` with
        what the task tells (its granularity and units), the first problem raised."""
        if self.channel_only:
            require_channel(self.task, self.name)
        space = self.task.space
        ctx = Preflight(space.granularity, self.evaluations, len(space), torch.cuda.is_available())
        for where, message in self.preflight(self.options, ctx)[:1]:
            if where[0] == "options":
                raise SearchError(f"{self.name} option {where[-1]}: {message}")
            raise SearchError(message)

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
        if "latency" in self.budget.metrics and evaluation.latency_ratio_table is None:
            vec = self.task.ratio_vector(evaluation.ratios)
            evaluation = replace(evaluation, latency_ratio_table=self.cost_ratios(vec)["latency"])
        rec = Record(
            index=self.result.evaluations + 1,
            evaluation=evaluation,
            meets_budget=self.budget.met_by(evaluation.costs()),
            elapsed=time.perf_counter() - self._start,
            reward=reward,
            note=note,
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
