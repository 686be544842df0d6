"""Latency floors: the predicted latency ratio with every unit at the maximum ratio, per model and
lookup-table batch size, on Fashion-MNIST at 28x28 (which latency budgets can be reached).

    python experiments/latency_floor.py resnet20,vgg11 1,64
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import autoprune as ap


def main(models: list[str], batches: list[int]) -> None:
    torch.set_num_threads(1)
    for m in models:
        for b in batches:
            start = time.perf_counter()
            task = ap.build_task(None, [f"model.name={m}", "data.name=fashion_mnist",
                                        "threads=1", f"eval.latency_batch_size={b}"])  # fmt: skip
            floor = np.full(len(task.space), task.space.max_ratio)
            costs = task.cost_ratios(floor, ("flops", "params", "latency"))
            print(f"{m} batch {b}: every unit at {task.space.max_ratio}: {costs}; "
                  f"task + table {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1].split(","), [int(b) for b in sys.argv[2].split(",")])
