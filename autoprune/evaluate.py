"""The evaluator: policy -> metrics. The one hot path of the whole system.

Following AMC, a policy is judged without fine-tuning on a search split carved from the training
data (never the test split), after adaptive batch-norm recalibration (EagleEye, ECCV 2020): the
pruned copy re-estimates its BN statistics on a fixed sample of training images, which turns a
pruned network's accuracy into a faithful proxy of its potential. Costs come from the analytic
tables of the pruning space (no tracing); latency, when asked for, is measured on the pruned copy.

Evaluations are deterministic for a task and seed (the same BN sample, no randomness in forward
passes), and repeated policies (the same channel / weight counts) are answered from a cache.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from autoprune.data import Split
from autoprune.task import Task
from autoprune.training import evaluate_split, recalibrate_bn, staged_accuracy


@dataclass
class Evaluation:
    """Metrics of one policy. Cost ratios are fractions of the dense model (analytic)."""

    ratios: dict[str, float]  # achieved ratios (after rounding to whole channels / patterns)
    accuracy: float
    loss: float
    flops_ratio: float
    params_ratio: float
    macs: float
    params: float
    latency_ratio_table: float | None = None  # lookup-table prediction, when the task needs it
    latency_ms: float | None = None  # measured on the pruned copy, when asked for
    seconds: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    # Early rejection: scored on a first slice only (``images`` of the search split) because
    # even ``upper``, a high-confidence bound on its full-split accuracy, is below the best so
    # far. ``accuracy`` / ``loss`` are then the slice's estimate; never a search's best.
    partial: bool = False
    images: int | None = None
    upper: float | None = None

    @classmethod
    def of(
        cls,
        task: Task,
        vec: np.ndarray,
        accuracy: float,
        loss: float,
        seconds: dict[str, float] | None = None,
        latency_ratio_table: float | None = None,
    ) -> Evaluation:
        """The evaluation of ratio vector ``vec`` with measured accuracy and analytic costs."""
        space = task.space
        macs, params = space.costs(vec)
        return cls(
            ratios=task.ratios_dict(space.achieved_ratios(vec)),
            accuracy=accuracy,
            loss=loss,
            flops_ratio=macs / space.dense_macs,
            params_ratio=params / space.dense_params,
            macs=macs,
            params=params,
            latency_ratio_table=latency_ratio_table,
            seconds=dict(seconds or {}),
        )

    def costs(self) -> dict[str, float]:
        """Cost ratios by budget metric name."""
        out = {"flops": self.flops_ratio, "params": self.params_ratio}
        if self.latency_ratio_table is not None:
            out["latency"] = self.latency_ratio_table
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        """Back from :meth:`to_dict` or the environment's info (a missing loss is None there)."""
        loss = data.get("loss")
        return cls(**{**data, "loss": math.nan if loss is None else float(loss)})


Key = tuple[int, ...]  # removed channels / weights per unit: what makes two policies the same


class EvaluationMemo:
    """Evaluations by key: recorded ones (a resumed search replays them; never evicted) and an
    LRU cache of up to ``size`` fresh ones. Answers are copies; a cache hit is marked cached."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lru: OrderedDict[Key, Evaluation] = OrderedDict()
        self._recorded: dict[Key, Evaluation] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._recorded or key in self._lru

    def answers(self, key: Key, reject_below: float | None) -> bool:
        """Whether what is stored answers a request: a recorded evaluation (a resumed search
        replays its own requests) or a full one always; a partial one while its bound stays
        below the request's threshold."""
        if key in self._recorded:
            return True
        e = self._lru.get(key)
        if e is None:
            return False
        return not e.partial or (
            reject_below is not None and e.upper is not None and e.upper < reject_below
        )

    def get(self, key: Key) -> Evaluation | None:
        if key in self._recorded:
            return _copy(self._recorded[key], cached=self._recorded[key].cached)
        hit = self._lru.get(key)
        if hit is None:
            return None
        self._lru.move_to_end(key)
        return _copy(hit, cached=True)

    def put(self, key: Key, evaluation: Evaluation) -> None:
        if self.size <= 0:
            return
        self._lru[key] = evaluation
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)

    def record(self, key: Key, evaluation: Evaluation) -> None:
        self._recorded[key] = evaluation


class Evaluator:
    """Judges policies of one task. Build once; call :meth:`evaluate` many times."""

    def __init__(
        self,
        task: Task,
        latency: bool | None = None,
        predict_latency: bool = False,
        seed: int | None = None,
    ) -> None:
        self.task = task
        cfg = task.config.eval
        self.measure_latency = cfg.latency if latency is None else latency
        self.predict_latency = predict_latency
        self.seed = task.config.seed if seed is None else seed
        n = cfg.bn_batches * cfg.bn_batch_size
        x_bn, _ = task.data.subset("train", n, seed=self.seed) if n else (torch.zeros(0), 0)
        self._bn_images = x_bn.to(task.device)
        # in memory: the search images live on the task's device once; a stream is read per call
        self._search = task.search_split.map(lambda t: t.to(task.device))
        self._shuffled = self._rejection_order()
        self.memo = EvaluationMemo(cfg.cache_size)
        self.calls = 0
        if predict_latency:
            _ = task.latency_table  # build (or load) it now, not inside the first evaluation

    def _key(self, vec: np.ndarray) -> tuple[int, ...]:
        return tuple(int(c) for c in self.task.space.removed_counts(vec))

    @property
    def rejects(self) -> bool:
        """Whether a threshold passed to :meth:`evaluate` can stop an evaluation early: on by
        default (``eval.reject``) for top-1 accuracy on an in-memory search split of at least
        ``eval.reject_min_images`` images."""
        return self._shuffled is not None

    def _rejection_order(self) -> Split | None:
        """The search split in a fixed, seeded random order (once): a first slice of it is a
        random sample, whatever order the split came in (e.g. sorted by class)."""
        cfg = self.task.config.eval
        split = self._search
        if not cfg.reject or self.task.metric is not None or not split.in_memory:
            return None
        if len(split) < cfg.reject_min_images:
            return None
        assert split.x is not None and split.y is not None
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(split), generator=generator).to(split.x.device)
        return Split(split.x[order], split.y[order])

    def evaluate(
        self,
        ratios: Mapping[str, float] | Sequence[float] | np.ndarray,
        reject_below: float | None = None,
    ) -> Evaluation:
        """Prune a copy, recalibrate BN, measure accuracy and loss on the search split, costs.

        ``reject_below`` (a searcher's best accuracy so far): when the evaluator :attr:`rejects`,
        a policy whose accuracy on a first slice of the split bounds its full-split accuracy
        below this value with high confidence is not scored further; the result is flagged
        ``partial`` with the slice's estimate.
        """
        self.calls += 1
        vec = self.task.ratio_vector(ratios)
        key = self._key(vec)
        if self.memo.answers(key, reject_below):
            hit = self.memo.get(key)
            assert hit is not None
            return hit
        result = self._evaluate(vec, reject_below if self.rejects else None)
        self.memo.put(key, result)  # a full evaluation replaces a partial one
        return result

    def preload(self, evaluations: Iterable[Evaluation]) -> None:
        """Answer these policies from memory, never evicted (resuming a search: its recorded
        evaluations are replayed instead of measured again)."""
        for e in evaluations:
            self.memo.record(self._key(self.task.ratio_vector(e.ratios)), e)

    def _evaluate(self, vec: np.ndarray, reject_below: float | None = None) -> Evaluation:
        cfg = self.task.config.eval
        t0 = time.perf_counter()
        model = self.task.prune(vec, light=True)
        t1 = time.perf_counter()
        recalibrate_bn(model, self._bn_images, cfg.bn_batches, cfg.bn_batch_size, seed=self.seed)
        t2 = time.perf_counter()
        seen, upper = None, None
        if reject_below is None or self._shuffled is None:
            acc, loss = evaluate_split(model, self._search, cfg.batch_size, self.task.metric)
        else:
            total = len(self._shuffled)
            checks = [int(f * total) for f in cfg.reject_stages]
            bound = _FullSplitBound(total, cfg.reject_z)

            def stop(correct: int, n: int) -> bool:
                return bound(correct, n) < reject_below

            acc, loss, seen = staged_accuracy(
                model, _segments(self._shuffled, checks, cfg.batch_size), checks, stop
            )
            if seen < total:
                upper = bound(round(acc * seen), seen)
        t3 = time.perf_counter()
        result = Evaluation.of(self.task, vec, acc, loss)
        if seen is not None and seen < len(self._search):
            result.partial, result.images, result.upper = True, seen, upper
        if self.predict_latency:
            result.latency_ratio_table = self.task.cost_ratios(vec, ("latency",))["latency"]
        if self.measure_latency:
            from autoprune.costs.latency import measure_latency

            batch = self.task.config.eval.latency_batch_size
            shape = self.task.input_shape
            result.latency_ms = 1e3 * measure_latency(model, shape, batch, repeats=20)
        t4 = time.perf_counter()
        result.seconds = {
            "prune": t1 - t0,
            "recalibrate": t2 - t1,
            "accuracy": t3 - t2,
            "costs": t4 - t3,
            "total": t4 - t0,
        }
        return result

    def dense(self) -> Evaluation:
        """Metrics of the unpruned model (all ratios 0), recalibrated like every policy."""
        return self.evaluate(np.zeros(len(self.task.space)))


def _segments(split: Split, checks: Sequence[int], batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Batches of an in-memory split that end exactly at every check (image count)."""
    assert split.x is not None and split.y is not None
    edges = [0, *(c for c in checks if 0 < c < len(split)), len(split)]
    for start, end in itertools.pairwise(edges):
        for lo in range(start, end, batch_size):
            hi = min(lo + batch_size, end)
            yield split.x[lo:hi], split.y[lo:hi]


class _FullSplitBound:
    """An upper bound on full-split accuracy after ``n`` of ``total`` images, ``correct`` right:
    the slice's own ``correct`` plus the rest at the slice's Wilson upper bound (confidence z,
    widened for the rest's own sampling noise).

    Why Wilson: near 0 or 1 accuracy (a wrecked or a near-dense policy) the normal
    approximation's interval collapses to a point, Wilson's does not.
    """

    def __init__(self, total: int, z: float) -> None:
        self.total, self.z = total, z

    def __call__(self, correct: int, n: int) -> float:
        if n >= self.total:
            return correct / n
        # The rest is itself a sample: slice and rest differ by noise of both, variance
        # p(1-p)(1/n + 1/rest); widen the slice's interval by that much.
        z = self.z * float(np.sqrt(1 + n / (self.total - n)))
        z2 = z * z
        p = correct / n
        centre = p + z2 / (2 * n)
        spread = z * float(np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)))
        upper = min(1.0, (centre + spread) / (1 + z2 / n))
        return (correct + (self.total - n) * upper) / self.total


def _copy(e: Evaluation, cached: bool) -> Evaluation:
    return Evaluation(**{**asdict(e), "cached": cached})
