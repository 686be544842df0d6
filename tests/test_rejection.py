"""Early rejection (multi-fidelity evaluation): a policy that provably cannot beat the best so
far is scored on a first slice of the search split only, flagged partial, and never the best.

The default task's search split (500 digits) is below the size where rejection is on by
default; these tests lower ``eval.reject_min_images`` on a copy of the task.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from autoprune.agents.registry import search

from autoprune.evaluate import Evaluator, _FullSplitBound
from autoprune.runner.experiment import _evaluation
from autoprune.task import Task
from autoprune.training import evaluate_accuracy, recalibrate_bn


@pytest.fixture(scope="module")
def task(default_task: Task) -> Task:
    out = copy.copy(default_task)
    out.config = default_task.config.model_copy(
        update={"eval": default_task.config.eval.model_copy(update={"reject_min_images": 100})}
    )
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wrecked(task: Task) -> np.ndarray:
    return np.full(len(task.space), task.space.max_ratio)


def test_the_bound_holds_on_random_slices() -> None:
    """Simulated splits: the bound after a slice is above the full-split accuracy (z = 3)."""
    rng = np.random.default_rng(0)
    bound = _FullSplitBound(2000, 3.0)
    misses = 0
    for _ in range(4000):
        right = rng.random(2000) < rng.uniform(0.05, 0.99)
        misses += bound(int(right[:400].sum()), 400) < right.mean()
    # One-sided 3 sigma: ~0.13% (5 of 4000) expected; a bound that ignored the rest's own
    # noise missed about 0.5% (20).
    assert misses <= 12
    assert bound(400, 400) > 0.99 and bound(0, 400) < 0.83  # never 1 - nothing, never 0
    assert bound(1200, 2000) == pytest.approx(0.6)  # the whole split: exact


def test_a_hopeless_policy_is_rejected_on_a_slice(task: Task) -> None:
    evaluator = Evaluator(task)
    assert evaluator.rejects
    dense = evaluator.dense()
    rejected = evaluator.evaluate(wrecked(task), reject_below=dense.accuracy)
    full = Evaluator(task).evaluate(wrecked(task))  # no threshold: the whole split
    total = len(task.search_split)
    assert rejected.partial and not full.partial
    assert rejected.images is not None and rejected.images < total
    assert rejected.upper is not None and full.accuracy <= rejected.upper < dense.accuracy
    # Independently: the pruned, recalibrated model on the first slice of the seeded order.
    model = task.prune(wrecked(task))
    cfg = task.config.eval
    recalibrate_bn(
        model, evaluator._bn_images, cfg.bn_batches, cfg.bn_batch_size, seed=task.config.seed
    )
    split = task.search_split
    order = torch.randperm(total, generator=torch.Generator().manual_seed(task.config.seed))
    first = order[: rejected.images]
    accuracy, _ = evaluate_accuracy(model, split.x[first], split.y[first])
    assert rejected.accuracy == pytest.approx(accuracy, abs=1e-9)
    assert rejected.flops_ratio == full.flops_ratio


def test_a_good_policy_is_scored_in_full_and_the_memo_upgrades(task: Task) -> None:
    evaluator = Evaluator(task)
    plain = Evaluator(task).dense()
    dense = evaluator.evaluate(np.zeros(len(task.space)), reject_below=plain.accuracy - 0.05)
    assert not dense.partial and dense.accuracy == plain.accuracy
    assert dense.loss == pytest.approx(plain.loss, rel=1e-5)  # another order of the same sum
    first = evaluator.evaluate(wrecked(task), reject_below=plain.accuracy)
    assert first.partial
    again = evaluator.evaluate(wrecked(task), reject_below=plain.accuracy)
    assert again.partial and again.cached  # still below the bar: the partial one answers
    full = evaluator.evaluate(wrecked(task))  # no bar (e.g. sensitivity): measured in full
    assert not full.partial and not full.cached
    assert evaluator.evaluate(wrecked(task), reject_below=plain.accuracy).cached


def test_random_search_finds_the_same_best_with_rejection(task: Task) -> None:
    off = copy.copy(task)
    off.config = task.config.model_copy(
        update={"eval": task.config.eval.model_copy(update={"reject": False})}
    )
    with_rejection = search("random", task, "flops=0.5", seed=1, evaluations=24)
    without = search("random", off, "flops=0.5", seed=1, evaluations=24)
    partial = [r for r in with_rejection.history if r.partial]
    assert partial, "some random policies should be rejected against the best so far"
    assert not any(r.partial for r in without.history)
    assert with_rejection.best is not None and without.best is not None
    assert not with_rejection.best.partial
    assert with_rejection.best_ratios == without.best_ratios
    assert with_rejection.best.accuracy == without.best.accuracy
    # Every rejected policy was below the best at the time, in full too.
    full = {tuple(r.ratios.values()): r.accuracy for r in without.history}
    for r in partial:
        earlier = [h.accuracy for h in with_rejection.history[: r.index - 1]
                   if h.meets_budget and not h.partial]  # fmt: skip
        assert full[tuple(r.ratios.values())] < max(earlier)


def test_a_recorded_partial_row_replays_as_partial(task: Task) -> None:
    row = {"ratios": dict.fromkeys(task.units, 0.5), "accuracy": 0.3, "loss": 2.0,
           "partial": True}  # fmt: skip
    assert _evaluation(task, row).partial
    assert not _evaluation(task, {**row, "partial": False}).partial
    assert not _evaluation(task, {k: v for k, v in row.items() if k != "partial"}).partial


def test_ddpg_on_ray_subenvironments_rejects_early(task: Task, ray_session: Any) -> None:
    """The agent's Ray sub-environments learn the best so far as it changes: hopeless
    episodes are scored on a slice there too, and the best is always a full evaluation."""
    from autoprune.parallel import RayBackend

    backend = RayBackend(task, workers=2)
    try:
        result = search(
            "ddpg", task, "flops=0.5", seed=0, evaluations=16, backend=backend,
            warmup_episodes=8, batch_size=16,
        )  # fmt: skip
    finally:
        backend.close()
    assert result.info["n_envs"] == 2
    partial = [r for r in result.history if r.partial]
    assert partial, "some of the agent's episodes on Ray should be rejected early"
    assert all(r.index > 2 for r in partial)  # the first round has nothing to beat
    assert result.best is not None and not result.best.partial
    for r in partial:  # rejected against a full evaluation recorded before its round
        earlier = [h.accuracy for h in result.history[: 2 * ((r.index - 1) // 2)]
                   if h.meets_budget and not h.partial]  # fmt: skip
        assert r.accuracy < max(earlier)
