"""A latency search's result checked on the clock (search.latency_check): which policies are
timed, which one is returned, and what a search records. Timings here are made up: the logic is
tested, never the speed of this machine."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import pytest
from autoprune.agents.base import Record, SearchResult

import autoprune.apply as apply_module
import autoprune.experiment as experiment_module
from autoprune.budget import Budget
from autoprune.costs import count_params
from autoprune.experiment import check_latency_on_clock, experiment_config, run_experiment
from autoprune.tracking import Tracker


def _record(task, index, level, accuracy, table, meets=True, partial=False) -> Record:
    ratios = task.ratios_dict(np.full(len(task.units), level))
    return Record(
        index=index, ratios=ratios, accuracy=accuracy, loss=0.0, flops_ratio=0.5,
        params_ratio=0.5, latency_ratio=table, meets_budget=meets, eval_seconds=0.0,
        elapsed=0.0, partial=partial,
    )  # fmt: skip


class Clock:
    """A made-up timer: the measured ratio of a policy is looked up by its uniform level."""

    def __init__(self, measured: dict[float, float]) -> None:
        self.measured = measured
        self.calls: list[list[float]] = []

    def __call__(self, task, vecs: list[np.ndarray]) -> list[float]:
        levels = [round(float(v[0]), 3) for v in vecs]
        self.calls.append(levels)
        return [self.measured[level] for level in levels]


def _search(task) -> SearchResult:
    """A search whose best (level 0.40, table 0.600) runs slower than the table says."""
    history = [
        _record(task, 1, 0.30, 0.97, 0.66, meets=False),  # over the budget by the table itself
        _record(task, 2, 0.40, 0.95, 0.600),  # the search's best
        _record(task, 3, 0.45, 0.96, 0.50, partial=True),  # rejected early: no full accuracy
        _record(task, 4, 0.40, 0.95, 0.600),  # the best again (same policy)
        _record(task, 5, 0.42, 0.94, 0.580),  # the table's error says it misses: not timed
        _record(task, 6, 0.50, 0.93, 0.540),
        _record(task, 7, 0.55, 0.92, 0.520),
        _record(task, 8, 0.60, 0.91, 0.500),
    ]
    return SearchResult("random", {"latency": 0.6}, 0, best=history[1], history=history)


def test_a_best_that_meets_the_budget_on_the_clock_stays(default_task):
    result = _search(default_task)
    best = result.best
    clock = Clock({0.4: 0.59})
    summary = check_latency_on_clock(default_task, result, Budget.parse("latency=0.6"), 4, clock)
    assert clock.calls == [[0.4]]  # nothing else timed
    assert result.best is best
    assert summary == {
        "limit": 0.6, "measured": 0.59, "table": 0.6, "met": True, "replaced": False,
        "timed": 1, "searched_measured": 0.59, "searched_table": 0.6,
    }  # fmt: skip
    assert result.info["latency_check"] == summary


def test_a_best_that_misses_is_replaced_by_the_most_accurate_that_meets(default_task):
    result = _search(default_task)
    # measured 0.66 against the table's 0.60: the table is 10% optimistic for this model, so
    # policies at table 0.54 and below may meet 0.6; 0.58 (0.638 corrected) is not worth timing
    clock = Clock({0.4: 0.66, 0.5: 0.61, 0.55: 0.57, 0.6: 0.55})
    summary = check_latency_on_clock(default_task, result, Budget.parse("latency=0.6"), 4, clock)
    assert clock.calls == [[0.4], [0.5, 0.55, 0.6]]  # by accuracy; no duplicate, partial, over
    assert result.best.index == 7  # 0.5 measured over the limit; 0.55 is the most accurate left
    assert summary is not None
    assert (summary["met"], summary["replaced"], summary["timed"]) == (True, True, 4)
    assert summary["measured"] == 0.57 and summary["table"] == 0.52
    assert (summary["searched_measured"], summary["searched_table"]) == (0.66, 0.6)
    policy = result.policy(default_task)
    assert policy.ratios == pytest.approx(result.history[6].ratios)


def test_the_count_caps_what_is_timed(default_task):
    result = _search(default_task)
    clock = Clock({0.4: 0.66, 0.5: 0.61})
    summary = check_latency_on_clock(default_task, result, Budget.parse("latency=0.6"), 2, clock)
    assert clock.calls == [[0.4], [0.5]]
    assert result.best.index == 2  # nothing timed meets the limit: the search's best stays
    assert summary is not None
    assert (summary["met"], summary["replaced"], summary["measured"]) == (False, False, 0.66)


def test_nothing_is_timed_without_a_latency_limit_or_with_a_count_of_zero(default_task):
    clock = Clock({})
    result = _search(default_task)
    latency = Budget.parse("latency=0.6")
    assert check_latency_on_clock(default_task, result, Budget.parse("flops=0.5"), 4, clock) is None
    assert check_latency_on_clock(default_task, result, latency, 0, clock) is None
    empty = SearchResult("random", {"latency": 0.6}, 0)
    assert check_latency_on_clock(default_task, empty, latency, 4, clock) is None
    assert clock.calls == [] and result.best.index == 2


def test_latency_ratios_time_the_pruned_models_against_the_dense_one(default_task, monkeypatch):
    """What is timed: the dense model first, then each policy's model with the channels the
    analytic parameter count says it keeps, at the budget's batch size on one thread."""
    seen: dict = {}

    def measure(models, input_shape, batch_size, threads, repeats):
        seen.update(models=list(models), batch=batch_size, threads=threads)
        return [0.020, 0.010, 0.015]

    monkeypatch.setattr(apply_module, "measure_latencies", measure)
    task = default_task
    vecs = [np.full(len(task.units), 0.5), np.full(len(task.units), 0.25)]
    ratios = apply_module.latency_ratios(task, vecs)
    assert ratios == pytest.approx([0.5, 0.75])
    assert seen["models"][0] is task.model
    assert (seen["batch"], seen["threads"]) == (task.config.eval.latency_batch_size, 1)
    dense = count_params(task.model)
    for model, vec in zip(seen["models"][1:], vecs, strict=True):
        expected = task.cost_ratios(vec)["params"] * dense
        assert count_params(model) == pytest.approx(expected, rel=1e-6)


def test_a_latency_search_returns_and_records_the_policy_checked_on_the_clock(
    default_task, monkeypatch, tmp_path: Path
):
    """A real search under a latency budget, with a made-up table (latency falls linearly with
    the mean ratio, so the result does not hang on this machine's timings) and a made-up clock
    on which that table is 6% optimistic: the policy returned, logged and recorded meets the
    limit on that clock, and is the most accurate of the search's policies that does."""
    task = copy.copy(default_task)
    task.__dict__.pop("_budget_targets", None)  # the shared fixture's cache is not ours
    real = type(task).cost_ratios

    def cost_ratios(self, vec, metrics=("flops", "params")):
        out = real(self, vec, tuple(m for m in metrics if m != "latency"))
        if "latency" in metrics:
            out["latency"] = 1.0 - 0.8 * float(np.mean(vec)) / self.space.max_ratio
        return out

    monkeypatch.setattr(task, "cost_ratios", types.MethodType(cost_ratios, task))

    def table(vec) -> float:
        return task.cost_ratios(vec, ("latency",))["latency"]

    def clock(_task, vecs):
        return [1.06 * table(v) for v in vecs]

    monkeypatch.setattr(experiment_module, "latency_ratios", clock)
    limit = 0.7
    cfg = experiment_config(overrides=[
        "search.searchers=[random]", "search.evaluations=8", "search.workers=0",
        f"search.budget=latency={limit}", "search.latency_check=8",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ])  # fmt: skip
    result = run_experiment(cfg, task=task)
    outcome = result.outcomes[0]
    assert outcome.result is not None and outcome.policy is not None
    check = outcome.result.info["latency_check"]
    assert check["searched_measured"] > limit  # the search's own best misses on this clock
    assert check["met"] and check["replaced"]
    vec = task.ratio_vector(outcome.policy.ratios)
    assert 1.06 * table(vec) <= limit
    feasible = [
        r for r in outcome.result.history
        if r.meets_budget and not r.partial and 1.06 * table(task.ratio_vector(r.ratios)) <= limit
    ]  # fmt: skip
    assert outcome.result.best.accuracy == max(r.accuracy for r in feasible)
    assert outcome.policy.metrics["latency_measured"] == pytest.approx(1.06 * table(vec))
    metrics = outcome.metrics
    assert metrics["best_latency_measured"] == pytest.approx(1.06 * table(vec))
    assert metrics["latency_check_met"] == 1.0
    assert result.rows()[0]["latency_ratio"] == pytest.approx(1.06 * table(vec))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", cfg.tracking.experiment)
    logged, _ = tracker.best_policy(run_id=outcome.run_id)
    assert logged["ratios"] == pytest.approx(outcome.policy.ratios)


def test_the_measurement_script_reports_both_policies_and_refuses_a_budget_without_latency():
    """experiments/bench_latency_check.py's report, from made-up rows."""
    from experiment_scripts import load

    mod = load("bench_latency_check")
    args = mod.parse_args(["--budget", "latency=0.6"])

    def policy(table, measured, retimed, search, test):
        keys = ("table", "measured", "retimed", "search_accuracy", "test_accuracy")
        return dict(zip(keys, (table, measured, retimed, search, test), strict=True))

    rows = [
        {"model": "resnet56", "table_best": policy(0.6, 0.64, 0.635, 0.9, 0.85),
         "returned": policy(0.56, 0.59, 0.605, 0.89, 0.84), "replaced": True, "timed": 4,
         "check_s": 12.0, "search_s": 300.0, "when": "2026-12-06 07:00"},
        {"model": "vgg11", "table_best": policy(0.6, 0.5, 0.51, 0.88, 0.83),
         "returned": policy(0.6, 0.5, 0.51, 0.88, 0.83), "replaced": False, "timed": 1,
         "check_s": 3.0, "search_s": 200.0, "when": "2026-12-06 07:10"},
    ]  # fmt: skip
    text = mod.report(rows, args)
    assert "| resnet56 | table's best | 0.600 | 0.640 | 0.635 | 90.0 | 85.0 | no |" in text
    # the independent timing decides the last column, not the check's own
    assert "| resnet56 | returned | 0.560 | 0.590 | 0.605 | 89.0 | 84.0 | no |" in text
    assert "| vgg11 | table's best | 0.600 | 0.500 | 0.510 | 88.0 | 83.0 | yes |" in text
    assert "| vgg11 | returned | the same policy |" in text
    with pytest.raises(SystemExit):
        mod.parse_args(["--budget", "flops=0.5"])
