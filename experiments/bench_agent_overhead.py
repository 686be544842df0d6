"""The agent's own cost (issue 15): seconds per ``ddpg`` episode against per ``random``
evaluation on the default digits task (ResNet-20, FLOPs <= 0.25, 200 episodes, one process,
one thread), with AMC's one gradient step per layer and with a fixed count per episode. The
difference is what the agent adds (gradient steps, environment steps, logging).

    python experiments/bench_agent_overhead.py
"""

from __future__ import annotations

import time

import torch
from autoprune.agents import search

import autoprune as ap

RUNS = [
    ("random", {}),
    ("random", {}),  # the first run also warms caches; the second is the reference
    ("ddpg", {"warmup_episodes": 60}),
    ("ddpg", {"warmup_episodes": 60, "gradient_steps": 1}),
    ("ddpg", {"warmup_episodes": 60, "gradient_steps": 4}),
    ("random", {}),
]


def main() -> None:
    torch.set_num_threads(1)
    task = ap.build_task(None, [])
    print(
        "| searcher | options | seconds | ms / episode | best search acc |\n|---|---|---|---|---|"
    )
    for name, opts in RUNS:
        start = time.perf_counter()
        result = search(name, task, "flops=0.25", seed=0, evaluations=200, **opts)
        wall = time.perf_counter() - start
        assert result.best is not None
        print(f"| {name} | {opts or '-'} | {wall:.1f} | {1000 * wall / 200:.0f} | "
              f"{100 * result.best.accuracy:.1f}% |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
