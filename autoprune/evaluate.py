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

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from autoprune.task import Task
from autoprune.training import evaluate_split, recalibrate_bn


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
    latency_ratio: float | None = None  # lookup-table prediction, when the task needs it
    latency_ms: float | None = None  # measured on the pruned copy, when asked for
    seconds: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    @classmethod
    def of(
        cls,
        task: Task,
        vec: np.ndarray,
        accuracy: float,
        loss: float,
        seconds: dict[str, float] | None = None,
        latency_ratio: float | None = None,
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
            latency_ratio=latency_ratio,
            seconds=dict(seconds or {}),
        )

    def costs(self) -> dict[str, float]:
        """Cost ratios by budget metric name."""
        out = {"flops": self.flops_ratio, "params": self.params_ratio}
        if self.latency_ratio is not None:
            out["latency"] = self.latency_ratio
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        self.memo = EvaluationMemo(cfg.cache_size)
        self.calls = 0
        if predict_latency:
            _ = task.latency_table  # build (or load) it now, not inside the first evaluation

    def _key(self, vec: np.ndarray) -> tuple[int, ...]:
        return tuple(int(c) for c in self.task.space.removed_counts(vec))

    def evaluate(self, ratios: Mapping[str, float] | Sequence[float] | np.ndarray) -> Evaluation:
        """Prune a copy, recalibrate BN, measure accuracy and loss on the search split, costs."""
        self.calls += 1
        vec = self.task.ratio_vector(ratios)
        key = self._key(vec)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        result = self._evaluate(vec)
        self.memo.put(key, result)
        return result

    def preload(self, evaluations: Iterable[Evaluation]) -> None:
        """Answer these policies from memory, never evicted (resuming a search: its recorded
        evaluations are replayed instead of measured again)."""
        for e in evaluations:
            self.memo.record(self._key(self.task.ratio_vector(e.ratios)), e)

    def _evaluate(self, vec: np.ndarray) -> Evaluation:
        cfg = self.task.config.eval
        t0 = time.perf_counter()
        model = self.task.prune(vec, light=True)
        t1 = time.perf_counter()
        recalibrate_bn(model, self._bn_images, cfg.bn_batches, cfg.bn_batch_size, seed=self.seed)
        t2 = time.perf_counter()
        acc, loss = evaluate_split(model, self._search, cfg.batch_size, self.task.metric)
        t3 = time.perf_counter()
        result = Evaluation.of(self.task, vec, acc, loss)
        if self.predict_latency:
            result.latency_ratio = self.task.cost_ratios(vec, ("latency",))["latency"]
        if self.measure_latency:
            from autoprune.costs import measure_latency

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


def _copy(e: Evaluation, cached: bool) -> Evaluation:
    return Evaluation(**{**asdict(e), "cached": cached})
