"""Baseline searchers (uniform, random, sensitivity, global), evolution and NetAdapt: the budget
guarantee, history lengths, determinism, the callback, and bad input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from autoprune.agents.base import Record, SearchError, SearchResult
from autoprune.agents.baselines import allocate
from autoprune.agents.netadapt import NetAdaptSearcher
from autoprune.agents.registry import search

import autoprune as ap
from autoprune.costs.counting import measure_macs
from autoprune.sensitivity import SensitivityResult
from autoprune.task import Task

BUDGET = "flops=0.5"
GRID = (0.4, 0.8)
# Small settings per searcher, and the exact history length they give on ResNet-20 (12 units).
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "uniform": ({}, 1),
    "random": ({"evaluations": 4}, 4),
    "sensitivity": ({"grid": GRID}, 12 * len(GRID) + 2),  # dense + scan + final
    "global": ({"bisection_steps": 6}, 1),
    "netadapt": ({"evaluations": 6, "r0": 0.1, "finetune_batches": 2}, 6),
    "evolution": ({"evaluations": 7, "population": 3, "parents": 2}, 7),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and steadily so on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(default_task: Task) -> dict[tuple[str, int, int], tuple[SearchResult, list[Record]]]:
    """Results by (searcher, seed, repeat), each run once per module, with its callback log."""
    return {}


def _run(
    cache: dict[tuple[str, int, int], tuple[SearchResult, list[Record]]],
    task: Task,
    name: str,
    seed: int = 0,
    repeat: int = 0,
) -> tuple[SearchResult, list[Record]]:
    key = (name, seed, repeat)
    if key not in cache:
        calls: list[Record] = []
        options = CASES[name][0]
        result = search(
            name, task, BUDGET, seed=seed, callback=lambda r, _: calls.append(r), **options
        )
        cache[key] = (result, calls)
    return cache[key]


def _meets(task: Task, result: SearchResult, limits: dict[str, float]) -> None:
    vec = result.policy().check(task)  # the policy is valid for the task
    costs = task.cost_ratios(vec, tuple(limits))
    for metric, limit in limits.items():
        assert costs[metric] <= limit + 1e-9, (metric, costs)
    assert result.best is not None and result.best.meets_budget


@pytest.mark.parametrize("name", list(CASES))
def test_searcher_meets_budget_with_exact_history(default_task: Task, runs, name: str) -> None:
    result, calls = _run(runs, default_task, name)
    _meets(default_task, result, {"flops": 0.5})
    assert result.evaluations == CASES[name][1]
    assert [r.index for r in calls] == list(range(1, result.evaluations + 1))  # once per eval
    assert calls == result.history
    assert result.best is not None and result.best.accuracy > 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_same_result(default_task: Task, runs, name: str) -> None:
    first, _ = _run(runs, default_task, name)
    again, _ = _run(runs, default_task, name, repeat=1)
    assert again.best_ratios == first.best_ratios
    assert [r.accuracy for r in again.history] == [r.accuracy for r in first.history]


@pytest.mark.parametrize("name", ["random", "evolution"])
def test_random_seeds_differ(default_task: Task, runs, name: str) -> None:
    first, _ = _run(runs, default_task, name)
    other, _ = _run(runs, default_task, name, seed=1)
    assert [r.ratios for r in other.history] != [r.ratios for r in first.history]


def test_sensitivity_records_the_scan(default_task: Task, runs) -> None:
    result, _ = _run(runs, default_task, "sensitivity")
    notes = [r.note for r in result.history]
    assert notes == ["scan"] * (12 * len(GRID) + 1) + ["final"]
    assert result.history[0].ratios == dict.fromkeys(default_task.units, 0.0)  # dense first


def test_sensitivity_allocates_to_the_insensitive_unit_first(default_task: Task) -> None:
    units, grid = default_task.units, [0.4, 0.8]
    acc = np.full((len(units), len(grid)), 0.2)
    acc[units.index("layer3.0.conv2")] = 0.99  # pruning this stage costs nothing
    flops = np.ones_like(acc)
    scan = SensitivityResult(units, grid, acc, acc.copy(), flops, dense_accuracy=0.99)
    budget = ap.Budget.parse("flops=0.8")
    vec = allocate(scan, budget, default_task.cost_ratios, default_task.space.max_ratio)
    assert budget.met_by(default_task.cost_ratios(vec))
    assert np.flatnonzero(vec).tolist() == [units.index("layer3.0.conv2")]


def test_sensitivity_passes_over_grid_steps_that_save_nothing() -> None:
    """N:M-like quantised costs (4-weight patterns: ratios 0.4 and 0.6 are both 2:4) and a part
    no unit can prune: with every unit at 2:4 the budget is still missed, so the least sensitive
    unit must go on to 1:4 (0.8), past the 0.6 step that saves nothing. A stuck allocation would
    leave the budget unmet for a projection that moves every unit to 1:4."""
    units, grid = ["a", "b", "c"], [0.2, 0.4, 0.6, 0.8]
    sizes, fixed = np.array([100.0, 100.0, 100.0]), 30.0

    def level(r: np.ndarray) -> np.ndarray:
        return np.minimum(np.rint(np.asarray(r) * 4) / 4, 0.75)

    def costs(vec: np.ndarray) -> dict[str, float]:
        kept = fixed + float((sizes * (1 - level(vec))).sum())
        return {"params": kept / (fixed + sizes.sum()), "flops": 1.0}

    acc = np.array([[0.9, 0.89, 0.89, 0.5], [0.9, 0.89, 0.89, 0.8], [0.9, 0.89, 0.89, 0.6]])
    scan = SensitivityResult(units, grid, acc, acc.copy(), np.ones_like(acc), dense_accuracy=0.9)
    budget = ap.Budget.parse("params=0.5")
    vec = allocate(scan, budget, costs, 0.8)
    assert budget.met_by(costs(vec))
    assert level(vec).tolist() == [0.5, 0.75, 0.5]  # only b, the least hurt at 1:4, goes on
    assert costs(vec)["params"] > costs(np.full(3, 0.8))["params"] + 0.1  # not every unit 1:4


def test_netadapt_full_run_carries_weights(default_task: Task) -> None:
    searcher = NetAdaptSearcher(default_task, BUDGET, seed=0, r0=0.1, finetune_batches=2)
    result = searcher.run()
    _meets(default_task, result, {"flops": 0.5})
    assert result.best is not None and result.best.accuracy > 0.3
    iterations = result.info["iterations"]
    assert sum(it["proposals"] for it in iterations) == result.evaluations
    for it in iterations:  # every proposal reaches its iteration's target
        records = [r for r in result.history if r.note.startswith(f"iteration {it['iteration']} ")]
        assert len(records) == it["proposals"]
        assert all(r.flops_ratio <= it["targets"]["flops"] + 1e-9 for r in records)
    assert searcher.model is not None  # the carried model is physically that small
    macs = measure_macs(searcher.model, default_task.input_shape)
    assert macs / default_task.space.dense_macs == pytest.approx(iterations[-1]["costs"]["flops"])


def test_netadapt_params_budget(default_task: Task) -> None:
    result = search("netadapt", default_task, "params=0.6", r0=0.2, finetune_batches=2)
    _meets(default_task, result, {"params": 0.6})
    assert result.best is not None and result.best.note.startswith("iteration")


def _fine_task(task: Task) -> Task:
    cfg = ap.task_config(overrides=["granularity=fine", "criterion=magnitude"])
    return Task(cfg, task.model, task.data, task.checkpoint)


def test_bad_input(default_task: Task) -> None:
    with pytest.raises(SearchError, match=r"unknown searcher 'nope'.*'uniform'"):
        search("nope", default_task, BUDGET)
    with pytest.raises(SearchError, match=r"unknown option\(s\) \['colour'\]"):
        search("uniform", default_task, BUDGET, colour="red")
    with pytest.raises(ap.BudgetError, match="smallest reachable is flops="):
        search("uniform", default_task, "flops=0.001")
    with pytest.raises(SearchError, match="needs an evaluation budget"):
        search("random", default_task, BUDGET)
    with pytest.raises(SearchError, match="sensitivity needs 50 evaluations"):
        search("sensitivity", default_task, BUDGET, evaluations=49)
    with pytest.raises(SearchError, match="grid"):
        search("sensitivity", default_task, BUDGET, grid=(0.5, 0.95))
    with pytest.raises(SearchError, match="select"):
        search("netadapt", default_task, BUDGET, select="loudest")
    with pytest.raises(SearchError, match="round_to"):
        search("netadapt", default_task, BUDGET, round_to=0)
    fine = _fine_task(default_task)
    for name in ("global", "netadapt"):
        with pytest.raises(SearchError, match="channel pruning"):
            search(name, fine, BUDGET)


def test_netadapt_out_of_evaluations_projects(default_task: Task, runs) -> None:
    result, _ = _run(runs, default_task, "netadapt")
    assert result.history[-1].note == "final (evaluation budget exhausted)"
    assert result.history[0].note.startswith("iteration 1 unit ")


def test_every_searcher_gets_the_evaluations_it_can_use() -> None:
    """``search.evaluations`` is a budget for ddpg / random, a limit for netadapt / sensitivity;
    uniform and global cannot use one and the launch says so instead of ignoring it."""
    from autoprune.runner.config import DEFAULT_EVALUATIONS, SearchConfig, evaluations_for
    from autoprune.runner.config import evaluation_notices as notices

    names = ["ddpg", "random", "netadapt", "sensitivity", "uniform", "global"]
    unset = SearchConfig(searchers=names)
    assert {n: evaluations_for(unset, n) for n in names} == {
        "ddpg": DEFAULT_EVALUATIONS, "random": DEFAULT_EVALUATIONS, "netadapt": None,
        "sensitivity": None, "uniform": None, "global": None,
    }  # fmt: skip
    assert notices(unset) == []
    given = SearchConfig(
        searchers=names, evaluations=12, options={"random": {"evaluations": 5}, "global": {}}
    )
    assert {n: evaluations_for(given, n) for n in names} == {
        "ddpg": 12, "random": 5, "netadapt": 12, "sensitivity": 12, "uniform": None,
        "global": None,
    }  # fmt: skip
    assert notices(given) == [
        "uniform evaluates 1 policy: evaluations=12 does not apply to it",
        "global evaluates 1 policy: evaluations=12 does not apply to it",
    ]
    # A recorded config (resume) keeps "not given" as it was: netadapt stays unlimited.
    again = SearchConfig.model_validate(unset.model_dump(mode="json"))
    assert evaluations_for(again, "netadapt") is None
