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
import autoprune.runner.latency_check as latency_check_module
from autoprune.budget import Budget
from autoprune.costs.counting import count_params
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.runner.config import experiment_config
from autoprune.runner.experiment import run_experiment
from autoprune.runner.latency_check import check_latency_on_clock
from autoprune.tracking.writer import Tracker


def _linear(task):
    """A copy of ``task`` whose lookup table is made up: latency falls linearly with the mean
    ratio (1.0 dense, 0.2 at every unit's maximum), so nothing hangs on this machine's timings."""
    task = copy.copy(task)
    task.__dict__.pop("_budget_targets", None)  # the shared fixture's cache is not ours
    real = type(task).cost_ratios

    def cost_ratios(self, vec, metrics=("flops", "params")):
        out = real(self, vec, tuple(m for m in metrics if m != "latency"))
        if "latency" in metrics:
            out["latency"] = 1.0 - 0.8 * float(np.mean(vec)) / self.space.max_ratio
        return out

    task.cost_ratios = types.MethodType(cost_ratios, task)
    return task


def _table(task, vec) -> float:
    return task.cost_ratios(np.asarray(vec), ("latency",))["latency"]


class Clock:
    """A made-up timer: measured latency ratio = ``f(table ratio)``; remembers what it timed."""

    def __init__(self, task, f) -> None:
        self.task, self.f = task, f
        self.timed: list[np.ndarray] = []

    def __call__(self, _task, vecs: list[np.ndarray]) -> list[float]:
        self.timed += [np.asarray(v) for v in vecs]
        return [self.f(_table(self.task, v)) for v in vecs]


class Evaluate:
    """A made-up evaluation of the policies the check builds (accuracy 0.5), counted."""

    def __init__(self, task) -> None:
        self.task, self.calls = task, 0

    def __call__(self, vec):
        self.calls += 1
        return Evaluation.of(self.task, vec, 0.5, 1.0, {"total": 0.1})


def _search(task) -> SearchResult:
    """A search whose best policy sits at 0.6 of the dense latency by the table."""
    best_vec = np.full(len(task.units), 0.5 * task.space.max_ratio)
    best_vec[0] = 0.0  # not uniform: projection moves every unit its own way
    best_vec[1] = task.space.max_ratio
    ratios = task.ratios_dict(best_vec)
    best = Record.from_dict({
        "index": 7, "ratios": ratios, "accuracy": 0.9, "loss": 0.3, "flops_ratio": 0.5,
        "params_ratio": 0.5, "latency_ratio_table": _table(task, task.ratio_vector(ratios)),
        "meets_budget": True, "eval_seconds": 0.1, "elapsed": 5.0,
    })  # fmt: skip
    return SearchResult("random", {"latency": 0.6}, 0, best=best, history=[best], seconds=9.0)


LATENCY = Budget.parse("latency=0.6")


def test_a_best_that_meets_the_budget_on_the_clock_stays(default_task):
    task = _linear(default_task)
    result = _search(task)
    best = result.best
    clock, evaluate = Clock(task, lambda t: t - 0.05), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 4, clock, evaluate)
    assert len(clock.timed) == 1 and evaluate.calls == 0
    assert result.best is best
    table = best.latency_ratio_table
    assert summary == {
        "limit": 0.6, "measured": pytest.approx(table - 0.05), "table": table, "met": True,
        "replaced": False, "timed": 1, "timings": 1,
        "searched_measured": pytest.approx(table - 0.05), "searched_table": table,
    }  # fmt: skip
    assert result.info["latency_check"] == summary


def test_a_best_that_misses_is_pruned_further_until_it_meets_on_the_clock(default_task):
    task = _linear(default_task)
    result = _search(task)
    best = result.best
    best_vec = task.ratio_vector(best.ratios)
    clock, evaluate = Clock(task, lambda t: 1.1 * t), Evaluate(task)  # the table 10% optimistic
    summary = check_latency_on_clock(task, result, LATENCY, 4, clock, evaluate)
    assert summary is not None
    assert (summary["met"], summary["replaced"], summary["timed"]) == (True, True, 2)
    assert summary["searched_measured"] == pytest.approx(1.1 * best.latency_ratio_table)
    new = result.best
    new_vec = task.ratio_vector(new.ratios)
    # what was timed second and returned: the best policy pruned further, towards each unit's
    # maximum, until the table says 0.588 / 1.1 of the dense latency (measured: 2% under 0.6)
    assert np.allclose(clock.timed[1], new_vec)
    assert np.all(new_vec >= best_vec - 1e-12) and np.any(new_vec > best_vec + 1e-3)
    assert _table(task, new_vec) == pytest.approx(0.588 / 1.1, abs=1e-3)
    assert _table(task, new_vec) <= 0.588 / 1.1 * (1 + 1e-6)
    assert summary["measured"] == pytest.approx(1.1 * _table(task, new_vec))
    assert summary["measured"] == pytest.approx(0.588, abs=1e-3)
    assert evaluate.calls == 1 and new.accuracy == 0.5 and new.meets_budget
    assert result.policy().ratios == pytest.approx(task.ratios_dict(new_vec))


def test_the_count_caps_the_timings_and_a_best_that_never_meets_stays(default_task):
    task = _linear(default_task)
    result = _search(task)
    best = result.best
    # a fixed 0.1 over the table: the first, proportional correction falls short (0.604)
    clock, evaluate = Clock(task, lambda t: t + 0.1), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 2, clock, evaluate)
    assert summary is not None
    assert len(clock.timed) == 2 and summary["timed"] == 2 and evaluate.calls == 0
    assert result.best is best
    assert (summary["met"], summary["replaced"]) == (False, False)
    assert summary["measured"] == pytest.approx(best.latency_ratio_table + 0.1)


def test_the_second_correction_follows_the_line_through_the_last_two_timings(default_task):
    task = _linear(default_task)
    result = _search(task)
    clock, evaluate = Clock(task, lambda t: t + 0.1), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 3, clock, evaluate)
    assert summary is not None and summary["met"] and summary["replaced"]
    tables = [_table(task, v) for v in clock.timed]
    assert tables[0] == pytest.approx(0.6)
    assert tables[1] == pytest.approx(0.6 * 0.588 / 0.7, abs=1e-3)  # proportional: 0.604 measured
    assert tables[2] == pytest.approx(0.488, abs=1e-3)  # slope 1: exactly 0.588 measured
    assert summary["measured"] == pytest.approx(0.588, abs=1e-3) and evaluate.calls == 1


def test_a_correction_out_of_the_models_reach_stops_the_check(default_task):
    task = _linear(default_task)
    result = _search(task)
    best = result.best
    # measured 4x the table: the table would have to say 0.147, under its floor of 0.2
    clock, evaluate = Clock(task, lambda t: 4 * t), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 4, clock, evaluate)
    assert summary is not None and len(clock.timed) == 1 and evaluate.calls == 0
    assert result.best is best and not summary["met"]


def test_nothing_is_timed_without_a_latency_limit_or_with_a_count_of_zero(default_task):
    task = _linear(default_task)
    clock = Clock(task, lambda t: t)
    result = _search(task)
    best = result.best
    assert check_latency_on_clock(task, result, Budget.parse("flops=0.5"), 4, clock) is None
    assert check_latency_on_clock(task, result, LATENCY, 0, clock) is None
    empty = SearchResult("random", {"latency": 0.6}, 0)
    assert check_latency_on_clock(task, empty, LATENCY, 4, clock) is None
    assert clock.timed == [] and result.best is best


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
    """A real search under a latency budget, with a made-up table and a made-up clock on which
    that table is 6% optimistic: the policy returned, logged and recorded meets the limit on
    that clock, and its accuracy is what an evaluator of its own says."""
    task = _linear(default_task)
    clock = Clock(task, lambda t: 1.06 * t)
    monkeypatch.setattr(latency_check_module, "latency_ratios", clock)
    limit = 0.7
    cfg = experiment_config(overrides=[
        "search.searchers=[random]", "search.evaluations=6", "search.workers=0",
        f"search.budget=latency={limit}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ])  # fmt: skip
    result = run_experiment(cfg, task=task)
    outcome = result.outcomes[0]
    assert outcome.result is not None and outcome.policy is not None
    check = outcome.result.info["latency_check"]
    assert check["searched_measured"] > limit  # the search's own best misses on this clock
    assert check["met"] and check["replaced"] and check["timed"] <= 4  # the default count
    vec = task.ratio_vector(outcome.policy.ratios)
    measured = 1.06 * _table(task, vec)
    assert measured <= limit * (1 + 1e-6)
    assert outcome.result.best.accuracy == Evaluator(task).evaluate(vec).accuracy
    assert outcome.policy.metrics["latency_measured"] == pytest.approx(measured)
    metrics = outcome.metrics
    assert metrics["best_latency_measured"] == pytest.approx(measured)
    assert metrics["latency_check_met"] == 1.0
    assert metrics["policy_accuracy"] == outcome.result.best.accuracy
    assert result.rows()[0]["latency_ratio_measured"] == pytest.approx(measured)
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


def test_a_repair_that_overshoots_steps_back_up_towards_the_limit(default_task):
    task = _linear(default_task)
    result = _search(task)
    # the table grows more optimistic as the model is pruned: the first correction (proportional,
    # table 0.504) measures 0.415, far under the limit; the next ones step back up towards it
    clock, evaluate = Clock(task, lambda t: 0.7 * (t / 0.6) ** 3), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 5, clock, evaluate)
    assert summary is not None and summary["met"] and summary["replaced"]
    tables = [_table(task, v) for v in clock.timed]
    measured = [clock.f(t) for t in tables]
    assert tables[1] == pytest.approx(0.6 * 0.588 / 0.7, abs=1e-3) and measured[1] < 0.45
    assert len(tables) >= 3 and tables[1] < tables[2] < tables[0]  # stepped back up
    met = [(t, m) for t, m in zip(tables, measured, strict=True) if m <= 0.6]
    least_pruned = max(met)
    new_vec = task.ratio_vector(result.best.ratios)
    assert _table(task, new_vec) == pytest.approx(least_pruned[0])
    assert summary["measured"] == pytest.approx(least_pruned[1]) and summary["measured"] >= 0.57
    assert summary["timed"] == len(tables) and evaluate.calls == 1  # only the returned one


def test_a_step_back_that_misses_is_not_returned(default_task):
    task = _linear(default_task)
    result = _search(task)
    # a jump: anything over 0.55 by the table measures 0.7, anything under it 0.4
    clock, evaluate = Clock(task, lambda t: 0.7 if t > 0.55 else 0.4), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 4, clock, evaluate)
    assert summary is not None and summary["met"] and summary["timed"] == 4
    tables = [_table(task, v) for v in clock.timed]
    assert tables[2] > 0.55  # the first step back missed ...
    assert tables[1] < tables[3] < 0.55  # ... the second met, closer to the limit
    assert _table(task, task.ratio_vector(result.best.ratios)) == pytest.approx(tables[3])
    assert summary["measured"] == 0.4 and evaluate.calls == 1


def test_a_policy_that_meets_by_less_than_the_margin_is_timed_again(default_task):
    task = _linear(default_task)
    result = _search(task)
    best = result.best
    # the best measures 0.595, then 0.605 (noise): judged by the slower timing, it misses
    noisy = iter([0.595, 0.605])
    clock, evaluate = Clock(task, lambda t: next(noisy, 1.0 * t)), Evaluate(task)
    summary = check_latency_on_clock(task, result, LATENCY, 4, clock, evaluate)
    assert summary is not None
    assert np.allclose(clock.timed[0], clock.timed[1])  # the same policy, twice
    assert summary["searched_measured"] == pytest.approx(0.605)
    assert summary["replaced"] and summary["met"] and result.best is not best
    assert summary["timings"] == len(clock.timed) > summary["timed"]
    # a steady clock under the margin: one timing
    result = _search(task)
    steady = Clock(task, lambda t: 0.595)
    again = check_latency_on_clock(task, result, LATENCY, 4, steady, Evaluate(task))
    assert again is not None and again["met"] and not again["replaced"]
    assert len(steady.timed) == 2 and again["timings"] == 2 and again["timed"] == 1
