"""The benchmark's latency column: each pruned model timed against the dense model, and the
retiming of groups recorded the older ways.

Each search's pruned model is timed after the group's searches, with nothing else running, in a
pair with the dense model, interleaved and warm (``LATENCY_TIMING_VERSION`` 4). Groups recorded
without a version timed each pruned model as its search ended, beside the other Ray worker's
search, and the dense model alone before the searches: their ratios are noisy (off by up to 0.05
either way). Version 2 timed all the group's models after the searches, one pass each per
round: a round of 14 models evicts each other's kernels from oneDNN's primitive cache, and the
pruned models' ratios came out inflated (MobileNetV2: 0.58-0.80 against 0.33-0.43 timed warm).
Version 3 timed them warm (an untimed pass right before each timed one) in the same rounds:
still inflated on MobileNetV2 (0.52-0.66 against 0.33-0.43 in pairs). :func:`retime_group`
times such a group again from its recorded (or MLflow-logged) policies.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Callable
from typing import Any

from autoprune.bench.plan import Group, Plan
from autoprune.bench.records import Record
from autoprune.budget import Budget
from autoprune.costs.latency import measure_latencies
from autoprune.task import Task, build_task

LATENCY_REPEATS = 20
LATENCY_TIMING = (
    "after the group's searches, each pruned model in a pair with the dense model, interleaved "
    "and warm"
)
LATENCY_TIMING_VERSION = 4  # recorded as ``latency_timing_version``; older groups lack it

Ratios = dict[str, float]
Timing = dict[str, float | None]
NO_TIMING: Timing = {
    "latency_ms": None, "latency_ratio": None, "latency_table_ratio": None, "dense_pair_ms": None
}  # fmt: skip


def time_models(models: list[Any], input_shape: tuple[int, ...], batch: int) -> list[float]:
    """Seconds per forward pass of each model (median of ``LATENCY_REPEATS`` interleaved rounds,
    one thread)."""
    return measure_latencies(models, input_shape, batch, threads=1, repeats=LATENCY_REPEATS)


def table_ratios(task: Task, budget: str, policies: list[Ratios]) -> list[float | None]:
    """The lookup table's latency ratio of each policy, for a latency budget (what the searches
    had to meet; the measured ratio is beside it in the report); None for other budgets."""
    if "latency" not in Budget.parse(budget).metrics:
        return [None] * len(policies)
    return [task.cost_ratios(task.ratio_vector(p), ("latency",))["latency"] for p in policies]


def time_group(
    task: Task, budget: str, batch: int, policies: list[Ratios | None]
) -> tuple[float, list[Timing]]:
    """The dense model's latency (ms) and, per policy, the latency of the model it prunes to,
    its ratio to the dense one and the table's ratio (:func:`table_ratios`), with nothing else
    running (call it after the searches: a model timed beside a running search competes with
    it for the cores). Each pruned model is timed in a pair with the dense model, interleaved
    (``dense_pair_ms``: the dense model's timing in that pair; the ratio is of the pair), and
    the group's dense latency is the median of those: timed together in rounds of all the
    group's models, pruned MobileNetV2s measured 0.52-0.80 of the dense latency that they
    measure at 0.33-0.43 alone or in pairs. A None policy (a search that found none) gets None
    values."""
    table = iter(table_ratios(task, budget, [p for p in policies if p is not None]))
    out: list[Timing] = []
    dense: list[float] = []
    for policy in policies:
        if policy is None:
            out.append(dict(NO_TIMING))
            continue
        pair = time_models([task.model, task.prune(policy)], task.input_shape, batch)
        d, q = (1e3 * s for s in pair)
        dense.append(d)
        out.append({"latency_ms": q, "latency_ratio": q / d, "latency_table_ratio": next(table),
                    "dense_pair_ms": d})  # fmt: skip
    if not dense:
        dense = [1e3 * time_models([task.model], task.input_shape, batch)[0]]
    return statistics.median(dense), out


def timed_now(record: Record) -> bool:
    """Whether a recorded group was timed the current way."""
    return bool(record.get("latency_timing_version") == LATENCY_TIMING_VERSION)


def timing_fields(dense_ms: float, batch: int) -> dict[str, Any]:
    """What a group records of how its latencies were timed."""
    return {"dense_latency_ms": dense_ms, "latency_timing": LATENCY_TIMING,
            "latency_timing_version": LATENCY_TIMING_VERSION, "latency_batch": batch}  # fmt: skip


def group_policies(record: Record, store: Callable[[], Any]) -> list[Ratios | None]:
    """The best policy's ratios of every row of a recorded group: from the row, or from the
    search's MLflow run (``best_policy.json``); None for a search that found no policy (its row
    has no latency). Raises TrackingError when a run lacks the policy it should have."""
    policies: list[Ratios | None] = []
    for row in record["rows"]:
        if "ratios" in row:
            ratios = row["ratios"]
        elif row.get("latency_ms") is None:  # recorded the old way, without a policy
            ratios = None
        else:
            ratios = store().best_policy(run_id=row["run_id"])[0]["ratios"]
        policies.append(None if ratios is None else {str(k): float(v) for k, v in ratios.items()})
    return policies


def retime_group(
    record: Record, group: Group, plan: Plan, tracking_uri: str | None, store: Callable[[], Any]
) -> None:
    """Time one recorded group again (:func:`time_group`) and update ``record`` in place."""
    policies = group_policies(record, store)
    task = build_task(plan.config(group, tracking_uri).task())
    # A channel-pruned model's latency follows its channel counts, which the policy and the
    # architecture fix; still, a record made on other weights is another model's.
    if record.get("checkpoint") not in (None, task.checkpoint_hash):
        raise ValueError(f"it was measured on checkpoint {record['checkpoint']}, this machine's "
                         f"{group.model} is {task.checkpoint_hash}")  # fmt: skip
    batch = int(record.get("latency_batch", task.config.eval.latency_batch_size))
    count = sum(p is not None for p in policies)
    print(f"{group.key}: timing {count} pruned models with the dense one", flush=True)
    dense_ms, timed = time_group(task, group.budget, batch, policies)
    for row, ratios, timing in zip(record["rows"], policies, timed, strict=True):
        row.update(ratios=ratios, **timing)
    record.update(**timing_fields(dense_ms, batch),
                  latency_retimed=dt.datetime.now().strftime("%Y-%m-%d %H:%M"))  # fmt: skip
