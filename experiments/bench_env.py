"""Benchmark of PruningEnv on the embedded default task (ResNet-20 on digits).

Measures the time of a non-terminal step (analytic costs and AMC's action clipping only) and the
terminal step's overhead beyond the evaluator itself, for a FLOPs budget and, for reference, a
two-limit budget and a latency budget (lookup table).

    python experiments/bench_env.py [--episodes 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from autoprune.envs import PruningEnv

import autoprune as ap


def bench(task: ap.Task, budget: str, episodes: int, seed: int = 0) -> None:
    try:
        env = PruningEnv(task, budget=budget)
    except ap.BudgetError as exc:
        print(f"{budget}: skipped ({exc})")
        return
    rng = np.random.default_rng(seed)
    steps, overhead, evals = [], [], []
    for episode in range(episodes):
        env.reset(seed=episode)
        for t in range(len(task.units)):
            action = rng.uniform(-1, 1, 1).astype(np.float32)
            start = time.perf_counter()
            _, _, done, _, info = env.step(action)
            seconds = time.perf_counter() - start
            if not done:
                steps.append(seconds)
            elif not info["cached"]:
                evals.append(info["eval_seconds"])
                overhead.append(seconds - info["eval_seconds"])
            assert done == (t == len(task.units) - 1)
    step_ms = 1e3 * statistics.median(steps)
    eval_ms = 1e3 * statistics.median(evals)
    over_ms = 1e3 * statistics.median(overhead)
    print(
        f"{budget:>22}: non-terminal step {step_ms:.3f} ms (median of {len(steps)}); terminal "
        f"step = evaluator {eval_ms:.1f} ms + overhead {over_ms:.2f} ms "
        f"({100 * over_ms / eval_ms:.1f}% of the evaluator)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench_env  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  "
          f"{args.threads} thread(s), {args.episodes} episodes per budget")  # fmt: skip
    task = ap.build_task()
    for budget in ("flops=0.25", "flops=0.25,params=0.3", "latency=0.9"):
        bench(task, budget, args.episodes)


if __name__ == "__main__":
    main()
