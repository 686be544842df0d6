"""The ``evolution`` searcher: children on the budget's boundary, learning across generations,
no policy evaluated twice, and its options checked."""

from __future__ import annotations

import numpy as np
import pytest
from autoprune.agents.base import SearchError, SearchResult
from autoprune.agents.registry import search

from autoprune.task import Task


@pytest.fixture(scope="module")
def evolved(default_task: Task) -> SearchResult:
    return search(
        "evolution", default_task, "flops=0.5", seed=0, evaluations=48, population=8, parents=3
    )


def _generation(result: SearchResult, g: int) -> list[float]:
    return [r.accuracy for r in result.history if r.note == f"generation {g}"]


def test_generations_improve_on_the_first(evolved: SearchResult) -> None:
    assert evolved.info["generations"] == 6
    assert [len(_generation(evolved, g)) for g in range(6)] == [8] * 6
    first, last = _generation(evolved, 0), _generation(evolved, 5)
    # the children of the best policies are better, on average, than random policies
    assert np.mean(last) > np.mean(first) + 0.02
    assert evolved.best is not None and evolved.best.index > 8  # found after the first generation


def test_every_child_sits_on_the_budget_boundary(default_task: Task, evolved: SearchResult) -> None:
    for record in evolved.history:
        vec = default_task.ratio_vector(record.ratios)
        flops = default_task.cost_ratios(vec, ("flops",))["flops"]
        assert record.meets_budget and flops <= 0.5 + 1e-9
        # pruning any less (every ratio scaled by 0.9) misses the budget: nothing is removed
        # beyond what the budget asks
        assert default_task.cost_ratios(vec * 0.9, ("flops",))["flops"] > 0.5


def test_no_policy_is_evaluated_twice(default_task: Task, evolved: SearchResult) -> None:
    keys = {
        default_task.space.removed_counts(default_task.ratio_vector(r.ratios)).tobytes()
        for r in evolved.history
    }
    assert len(keys) == len(evolved.history)
    assert not any(r.cached for r in evolved.history)


def test_parents_are_the_best_so_far(evolved: SearchResult) -> None:
    from autoprune.agents.evolution import EvolutionOptions, EvolutionSearcher

    searcher = EvolutionSearcher.__new__(EvolutionSearcher)
    searcher.result, searcher.options = evolved, EvolutionOptions(parents=3)
    parents = searcher._parents()
    ranked = sorted(evolved.history, key=lambda r: -r.accuracy)
    assert [p.accuracy for p in parents] == [r.accuracy for r in ranked[:3]]
    assert searcher._worst_parent() == ranked[2].accuracy


def test_crossover_and_mutation(default_task: Task) -> None:
    from autoprune.agents.evolution import EvolutionSearcher

    searcher = EvolutionSearcher(default_task, "flops=0.5", seed=0, evaluations=4)
    searcher.max_ratio = default_task.space.max_ratio
    n = len(default_task.space)
    a, b = np.full(n, 0.1), np.full(n, 0.7)
    for _ in range(20):
        child = searcher._crossover([a, b])
        assert set(np.round(child, 6)) <= {0.1, 0.7}  # every ratio from one parent
        mutant = searcher._mutate([a])
        changed = int((mutant != a).sum())
        assert changed >= 1 and (mutant >= 0).all() and (mutant <= searcher.max_ratio).all()
    crosses = [searcher._crossover([a, b]) for _ in range(20)]
    assert any(len(set(np.round(c, 6))) == 2 for c in crosses)  # both parents contribute


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"population": 1}, "population=1: Input should be greater than or equal to 2"),
        ({"parents": 0}, "parents=0: Input should be greater than or equal to 1"),
        ({"population": 4, "parents": 5}, r"parents \(5\) cannot exceed the population \(4\)"),
        ({"crossover": 1.5}, "crossover=1.5: Input should be less than or equal to 1"),
        ({"mutation_sigma": 0}, "mutation_sigma=0: Input should be greater than 0"),
        ({"population": "ten"}, "population='ten': Input should be a valid integer"),
        ({"mutation_prob": "high"}, "mutation_prob='high': Input should be a valid number"),
        ({"elitism": True}, "unknown option"),
    ],
)
def test_bad_options_are_refused(default_task: Task, options, message: str) -> None:
    with pytest.raises(SearchError, match=message):
        search("evolution", default_task, "flops=0.5", evaluations=10, **options)


def test_needs_an_evaluation_budget(default_task: Task) -> None:
    with pytest.raises(SearchError, match="needs an evaluation budget"):
        search("evolution", default_task, "flops=0.5")
