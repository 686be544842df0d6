"""The latency clock check: a latency search's policy timed on this machine, repaired when it
misses the limit.

Searches meet a latency budget through a lookup table of per-layer latencies, whose prediction
for a whole pruned model can be off either way. :func:`check_latency_on_clock` times the
search's best policy, and when it misses, projects it onto tighter table limits
(:func:`_table_target`), stepping back between a wide overshoot and the closest miss
(:func:`_bracket_target`), within ``search.latency_check`` timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from autoprune.agents.base import Record, SearchResult
from autoprune.apply import latency_ratios
from autoprune.budget import Budget, within
from autoprune.evaluate import Evaluation, Evaluator
from autoprune.task import Task

LATENCY_CHECK_MARGIN = 0.02
"""How far under the limit a repaired policy aims on the clock (timings vary by about 1%)."""


def _table_target(points: list[tuple[float, float]], aim: float) -> float:
    """The table ratio expected to measure ``aim``, from the (table, measured) pairs timed so
    far: proportional to the last one at first, then along the line through the last two
    (the table's error grows as a model is pruned further, so a proportional step falls short);
    always below the last table ratio."""
    t1, m1 = points[-1]
    target = t1 * aim / m1
    if len(points) > 1:
        t0, m0 = points[-2]
        slope = (m1 - m0) / (t1 - t0) if t1 != t0 else 0.0
        if slope > 0:
            target = t1 + (aim - m1) / slope
    return min(target, t1 * (1 - 1e-3))


def _bracket_target(
    points: list[tuple[float, float]], hit: float, aim: float, meets: Callable[[float], bool]
) -> float | None:
    """After a repair that meets the limit with room to spare: the table ratio between the
    least pruned policy that meets (table ratio ``hit``) and the most pruned one that misses,
    on the line through their timings, kept off both ends (a tenth of the gap); None once the
    gap is under 0.5% of the table ratio (nothing left to gain)."""
    met = {t: m for t, m in points if meets(m)}
    missed = [(t, m) for t, m in points if not meets(m) and t > hit]
    if not missed:
        return None
    t1, m1 = min(missed)
    t0, m0 = hit, met[hit]
    gap = t1 - t0
    if gap < 0.005 * t1:
        return None
    target = t0 + (aim - m0) * gap / (m1 - m0) if m1 > m0 else t0 + gap / 2
    return min(max(target, t0 + 0.1 * gap), t1 - 0.1 * gap)


LatencyTimer = Callable[[Task, list[np.ndarray]], list[float]]
"""Measured latency ratios (pruned / dense) of ratio vectors, as :func:`latency_ratios`."""


def check_latency_on_clock(
    task: Task,
    result: SearchResult,
    budget: Budget,
    count: int,
    timer: LatencyTimer | None = None,
    evaluate: Callable[[np.ndarray], Evaluation] | None = None,
) -> dict[str, Any] | None:
    """Check a latency search's result on this machine's clock, and repair it when it misses.

    Searches meet a latency budget by a lookup table of per-layer latencies, whose prediction
    for a whole pruned model can be off either way (``experiments/results/latency_check.md``).
    The search's best policy is timed first (``timer``: against the dense model, interleaved);
    if it meets the limit it stays. Otherwise the best policy is projected again (more pruning,
    every unit the same fraction of the way to its maximum, as searches project) onto a tighter
    table limit, the one the timings so far say measures 2% under the limit
    (:func:`_table_target`), and timed; up to ``count`` policies in all. A policy that meets
    the limit by less than the margin is timed twice and judged by the slower timing. A
    projection that meets the limit with more than twice the margin to spare pruned too much:
    the remaining timings step back up between it and the closest miss
    (:func:`_bracket_target`). The least pruned
    projection that met the limit on the clock is evaluated like any policy (``evaluate``,
    default a fresh :class:`~autoprune.evaluate.Evaluator`) and becomes ``result.best``. When
    none does, or the tighter limit is out of reach, the best stays and the summary says it
    misses.

    Returns None where there is nothing to check (no latency limit, ``count`` 0, no policy);
    else ``limit``, ``measured`` and ``table`` (latency ratios of the returned policy), ``met``,
    ``replaced``, ``timed`` (policies timed), ``timings`` (timings taken), ``searched_measured``
    and ``searched_table`` (the search's own best).
    """
    limit = budget.limits.get("latency")
    best = result.best
    if limit is None or count < 1 or best is None:
        return None
    timer = timer or latency_ratios

    def table(vec: np.ndarray) -> float:
        return float(task.cost_ratios(vec, ("latency",))["latency"])

    def meets(ratio: float) -> bool:  # the budget's one tolerance
        return within(ratio, limit)

    vec = task.ratio_vector(best.ratios)
    searched_table = (
        float(best.latency_ratio_table) if best.latency_ratio_table is not None else table(vec)
    )
    aim = limit * (1 - LATENCY_CHECK_MARGIN)
    timings = 0

    def clock(policy: np.ndarray) -> float:
        """The policy's measured ratio; one that meets the limit by less than the margin is
        timed again and judged by the slower timing (timings vary by 1-2%)."""
        nonlocal timings
        measured = timer(task, [policy])[0]
        timings += 1
        if not within(measured, aim) and meets(measured):
            measured = max(measured, timer(task, [policy])[0])
            timings += 1
        return float(measured)

    first = clock(vec)
    points = [(searched_table, first)]  # (table ratio, measured ratio) of each policy timed
    close = limit * (1 - 2 * LATENCY_CHECK_MARGIN)  # a repair measuring this much or more is kept
    hit: tuple[float, float, np.ndarray, float] | None = None  # target, table, policy, measured
    while not meets(first) and len(points) < count:
        if hit is None:
            target = _table_target(points, aim)
        else:
            if hit[3] >= close:
                break
            between = _bracket_target(points, hit[1], aim, meets)
            if between is None:
                break
            target = between
        try:
            tighter = Budget({**budget.limits, "latency": target})
        except ValueError:
            break
        candidate = task.project(vec, tighter)
        predicted = table(candidate)
        if not tighter.met_by(task.cost_ratios(candidate, tighter.metrics)):
            break  # the tighter limit is out of this model's reach
        points.append((predicted, clock(candidate)))
        if meets(points[-1][1]) and (hit is None or predicted > hit[1]):
            hit = (target, predicted, candidate, points[-1][1])  # the least pruning that meets
    chosen, measured, chosen_table = best, first, searched_table
    if hit is not None:
        target, chosen_table, candidate, measured = hit
        e = (evaluate or Evaluator(task).evaluate)(candidate)
        e = replace(
            e, ratios=task.ratios_dict(candidate), latency_ratio_table=chosen_table,
            seconds={"total": float(sum(e.seconds.values()))},
        )  # fmt: skip
        chosen = Record(
            index=0,
            evaluation=e,
            meets_budget=True,
            elapsed=result.seconds,
            note=f"clock check: projected to latency {target:.4f}",
        )
    result.best = chosen
    timed = len(points)
    summary = {
        "limit": float(limit), "measured": float(measured), "table": chosen_table,
        "met": meets(measured), "replaced": chosen is not best, "timed": timed,
        "timings": timings, "searched_measured": float(first), "searched_table": searched_table,
    }  # fmt: skip
    result.info["latency_check"] = summary
    return summary
