"""What a benchmark plan costs on this machine: measured unit costs per model, then an estimate
of every group's wall time from the plan's counts.

For each model of the plan (its cached default checkpoint, the plan's task settings) it measures
the pieces every search is made of:

- one policy evaluation (prune, adaptive BN, score the search split as the plan samples it) at
  one thread, as a Ray worker runs it: the median of ``--repeats`` distinct policies at the
  main budget, scored in full (no early rejection, so an upper bound for the searchers that
  reject);
- one pass over the test split and the plan's fine-tune (``finetune_batches`` batches, timed on
  ``--ft-batches`` of them and scaled), at the driver's threads (every core);
- the latency lookup table's build, when the plan has a latency budget (cached on disk after).

The estimate of a group is ``evaluations x evaluation / workers`` for every stochastic search
and ``units x grid + 2`` evaluations for ``sensitivity``, plus ``2 test passes + fine-tune`` for
every search; ``netadapt`` is left out (its cost depends on its own schedule and short
fine-tunes: the headline slice measured it at 97 s on ResNet-20) and so is the agent's own
overhead. It is an estimate built on measured pieces, not a measurement of the plan: the
benchmark's own record (``benchmark_runs.jsonl``) has the groups' real times.

    python experiments/bench_costs.py [--plan experiments/benchmark.yaml] [--models resnet20,vgg11]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from autoprune.agents import get_searcher

from autoprune.budget import Budget
from autoprune.evaluate import Evaluator
from autoprune.task import build_task
from autoprune.training import fine_tune

HERE = Path(__file__).resolve().parent
DETERMINISTIC_SEARCHES = ("uniform", "global")  # one evaluation each


def _plan(args: argparse.Namespace) -> Any:
    import benchmark  # the plan's reader (experiments/benchmark.py)

    ns = benchmark.parse_args(["--plan", str(args.plan), *(
        ["--models", args.models] if args.models else [])])  # fmt: skip
    return benchmark.load_plan(args.plan, ns)


def measure(group: Any, plan: Any, repeats: int, ft_batches: int) -> dict[str, Any]:
    """The unit costs of a group's model and granularity (policies at the group's budget)."""
    cfg = plan.config(group, None)
    t0 = time.perf_counter()
    task = build_task(cfg.task())
    build = time.perf_counter() - t0
    budget = task.check_budget(group.budget)
    evaluator = Evaluator(task)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray worker's
    try:
        vecs = [
            task.project(rng.uniform(0, task.space.max_ratio, len(task.space)), budget)
            for _ in range(repeats + 1)
        ]
        evaluator.evaluate(vecs[0])  # warm-up
        times = []
        for vec in vecs[1:]:
            t0 = time.perf_counter()
            evaluator.evaluate(vec)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    pruned = task.prune(vecs[1], persistent=True)
    task.recalibrate(pruned)
    t0 = time.perf_counter()
    task.score(pruned, "test")
    test = time.perf_counter() - t0
    per_epoch = math.ceil(len(task.data.train) / 64)  # apply_policy fine-tunes at batch 64
    batches = plan.finetune_epochs * per_epoch
    if plan.finetune_batches is not None:
        batches = min(batches, plan.finetune_batches)
    ft_batches = min(ft_batches, batches) or 1
    t0 = time.perf_counter()
    fine_tune(pruned, task.data, 1, lr=0.01, seed=0, augment=task.config.train.finetune_augment,
              flip=task.config.train.flip, max_batches=ft_batches)  # fmt: skip
    ft = (time.perf_counter() - t0) * batches / ft_batches
    table = None
    model = group.model
    if group.granularity == "channel" and any(
        "latency" in Budget.parse(g.budget).metrics for g in plan.groups if g.model == model
    ):
        t0 = time.perf_counter()
        _ = task.latency_table
        table = time.perf_counter() - t0
    return {
        "model": model, "granularity": group.granularity, "units": len(task.space),
        "build_s": build,
        "evaluation_s": statistics.median(times), "test_s": test, "finetune_s": ft,
        "finetune_batches": batches, "latency_table_s": table, "threads": threads,
    }  # fmt: skip


def group_estimate(plan: Any, group: Any, cost: dict[str, Any]) -> dict[str, Any]:
    seeds = list(group.seeds) if group.seeds is not None else plan.seeds
    searches, evaluations = 0, 0
    for name in group.searchers:
        if name == "netadapt":
            continue
        if name in plan.deterministic:
            searches += 1
            if name == "sensitivity":
                grid = plan.options.get("sensitivity", {}).get("grid", (0.2, 0.4, 0.6, 0.8))
                evaluations += cost["units"] * len(grid) + 2
            elif name not in DETERMINISTIC_SEARCHES:
                evaluations += group.evaluations
            else:
                evaluations += 1
            continue
        searches += len(seeds)
        cls = get_searcher(name)
        evaluations += len(seeds) * (cls.fixed_evaluations or group.evaluations)
    search_s = evaluations * cost["evaluation_s"] / max(plan.workers, 1)
    after_s = searches * (2 * cost["test_s"] + cost["finetune_s"])
    table_s = (cost["latency_table_s"] or 0.0) if "latency" in group.budget else 0.0
    return {
        "group": group.key, "searches": searches, "evaluations": evaluations,
        "search_min": search_s / 60, "after_min": after_s / 60,
        "total_min": (search_s + after_s + table_s) / 60,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan", type=Path, default=HERE / "benchmark.yaml")
    p.add_argument("--models", help="comma-separated subset of the plan's models")
    p.add_argument("--repeats", type=int, default=3, help="evaluations timed per model")
    p.add_argument("--ft-batches", type=int, default=20, help="fine-tuning batches timed")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_costs.md")
    args = p.parse_args()
    plan = _plan(args)
    costs: dict[tuple[str, str], dict[str, Any]] = {}
    for group in plan.groups:  # one measurement per model and granularity
        pair = (group.model, group.granularity)
        if pair in costs:
            continue
        costs[pair] = c = measure(group, plan, args.repeats, args.ft_batches)
        print(
            f"{group.model}/{group.granularity}: evaluation {c['evaluation_s']:.2f} s, "
            f"test pass {c['test_s']:.1f} s, fine-tune {c['finetune_s']:.0f} s",
            flush=True,
        )
    first = next(iter(costs))
    models = [first[0]]
    ref = costs[first]
    lines = [
        f"# Benchmark costs on this machine  {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`python experiments/bench_costs.py --plan {args.plan.name}"
        f"{' --models ' + args.models if args.models else ''}` on {platform.machine()}, "
        f"torch {torch.__version__}, {plan.workers} Ray workers in the plan. Evaluation: one "
        "policy at the main budget on the plan's search images, 1 thread, in full (median of "
        f"{args.repeats}); test pass and fine-tune at {ref['threads']} threads.",
        "",
        "| model | granularity | units | evaluation s | test pass s | fine-tune s (batches) "
        "| latency table s "
        f"| evaluation vs {models[0]} | test vs {models[0]} | fine-tune vs {models[0]} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, gran), c in costs.items():
        table = "-" if c["latency_table_s"] is None else f"{c['latency_table_s']:.0f}"
        lines.append(
            f"| {m} | {gran} | {c['units']} | {c['evaluation_s']:.2f} | {c['test_s']:.1f} | "
            f"{c['finetune_s']:.0f} ({c['finetune_batches']}) | {table} | "
            f"{c['evaluation_s'] / ref['evaluation_s']:.1f}x | {c['test_s'] / ref['test_s']:.1f}x"
            f" | {c['finetune_s'] / ref['finetune_s']:.1f}x |"
        )
    lines += [
        "",
        "Estimated wall time per group (no early rejection, no agent overhead, netadapt left "
        "out; see the module docstring):",
        "",
        "| group | searches (not netadapt) | evaluations | searching min | fine-tune + test min "
        "| total min |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for group in plan.groups:
        e = group_estimate(plan, group, costs[(group.model, group.granularity)])
        total += e["total_min"]
        lines.append(
            f"| {e['group']} | {e['searches']} | {e['evaluations']} | {e['search_min']:.0f} | "
            f"{e['after_min']:.0f} | {e['total_min']:.0f} |"
        )
    lines += ["", f"**Estimated total: {total / 60:.1f} hours** for {len(plan.groups)} groups."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE))
    sys.exit(main())
