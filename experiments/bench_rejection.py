"""Early rejection and agent overhead, measured on real searches.

For each searcher x seed, the same search (same task, budget, seed, evaluations) with early
rejection on (``eval.reject=true``, the default on Fashion-MNIST) and off: the best policy's
search accuracy (a fully evaluated one in both cases), evaluations per second, how many
evaluations were partial, and the searcher's own overhead: wall time not spent inside
evaluations (agent gradient steps, environment steps, bookkeeping), as a fraction of the
evaluation time. One thread, in this process (no Ray), no MLflow.

    python experiments/bench_rejection.py [--task fashion_mnist] [--searchers random,ddpg]
        [--seeds 0,1] [--evaluations 60] [--budget flops=0.5]

Results are kept per run in ``experiments/results/rejection.json`` (a rerun skips what is
there), then printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "rejection.json"
TASKS = {"fashion_mnist": ["data.name=fashion_mnist"], "digits": []}


def one(task_name: str, searcher: str, seed: int, evaluations: int, budget: str, reject: bool,
        options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from autoprune.agents import search

    from autoprune import build_task

    task = build_task(None, [*TASKS[task_name], "threads=1", f"eval.reject={str(reject).lower()}"])
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = search(searcher, task, budget, seed=seed, evaluations=evaluations, **options)
    wall = time.perf_counter() - start
    in_evals = sum(r.eval_seconds for r in result.history)
    assert result.best is not None
    return {
        "task": task_name, "searcher": searcher, "seed": seed, "reject": reject,
        "evaluations": result.evaluations, "best_accuracy": result.best.accuracy,
        "best_index": result.best.index, "partial": sum(r.partial for r in result.history),
        "wall_s": wall, "evaluations_per_s": result.evaluations / wall,
        "evaluation_s": in_evals, "overhead": (wall - in_evals) / in_evals,
        "best_ratios": result.best.ratios,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fashion_mnist", choices=sorted(TASKS))
    parser.add_argument("--searchers", default="random,ddpg")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--evaluations", type=int, default=60)
    parser.add_argument("--budget", default="flops=0.5")
    parser.add_argument("--modes", default="on,off", help="rejection on, off, or both")
    parser.add_argument("--ddpg-warmup", type=int, default=20)
    args = parser.parse_args()
    done: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for searcher in args.searchers.split(","):
        options = {"warmup_episodes": args.ddpg_warmup} if searcher == "ddpg" else {}
        for seed in (int(s) for s in args.seeds.split(",")):
            for mode in args.modes.split(","):
                key = (f"{args.task} {args.budget} {searcher} seed {seed} "
                       f"evals {args.evaluations} reject {mode}")  # fmt: skip
                if key in done:
                    continue
                done[key] = one(args.task, searcher, seed, args.evaluations, args.budget,
                                mode == "on", options)  # fmt: skip
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(done, indent=1))
                r = done[key]
                print(
                    f"{key}: best {r['best_accuracy']:.4f}, {r['evaluations_per_s']:.3f} "
                    f"eval/s, {r['partial']} partial, overhead {r['overhead']:.1%}",
                    flush=True,
                )
    print(
        "\n| task | budget | searcher | seed | rejection | best search acc | evals | partial "
        "| wall s | evals/s | agent overhead |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for key, r in done.items():
        print(f"| {r['task']} | {key.split()[1]} | {r['searcher']} | {r['seed']} | "
              f"{'on' if r['reject'] else 'off'} | {r['best_accuracy']:.4f} | "
              f"{r['evaluations']} | {r['partial']} | {r['wall_s']:.0f} | "
              f"{r['evaluations_per_s']:.3f} | {r['overhead']:.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
